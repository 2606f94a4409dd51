import numpy as np
import pytest
from astropy.io import fits

from jaxspec.psf import GaussHermitePSF, desi_like_psf, read_psf, write_psf
from _badfiles import _flat_width, _nan_xtrace, _psf_as_image, _set_coeff, _set_header, _swap_wave


def _same(a, b):
    assert type(a) is type(b)
    for name in ("xcoef", "ycoef", "params", "wcoef", "ylim"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    for name in ("param_names", "xdomain", "ydomain", "pdomain", "ghdegx", "ghdegy", "nspec",
                 "npix_x", "npix_y", "hsizex", "hsizey", "psferr", "wmin", "wmax", "fibermin"):
        assert getattr(a, name) == getattr(b, name), name


def test_roundtrip_real(tmp_path, psf_path):
    psf = read_psf(psf_path("psf-r0-00067784.fits"))
    out = write_psf(tmp_path / "p.fits", psf)
    _same(psf, read_psf(out))
    assert [f for f in tmp_path.iterdir()] == [out]  # no temporary left behind
    with pytest.raises(FileExistsError):
        write_psf(out, psf)
    write_psf(out, psf, overwrite=True)


def test_roundtrip_v2_and_synthetic(tmp_path, psf_path):
    for psf in (read_psf(psf_path("psf-gausshermite-v2-specter-test.fits")), desi_like_psf(7)):
        out = write_psf(tmp_path / "q.fits", psf, overwrite=True)
        back = read_psf(out)
        _same(psf, back)
        with fits.open(out) as h:
            assert h["PSF"].header["PSFVER"] == "3" and h[0].name == "XTRACE"


def test_missing_file_and_not_fits(tmp_path):
    with pytest.raises(OSError, match="nope.fits"):
        read_psf(tmp_path / "nope.fits")
    bad = tmp_path / "bad.fits"
    bad.write_text("this is not FITS\n" * 10)
    with pytest.raises(OSError, match="bad.fits"):
        read_psf(bad)


def _copy(src, dst, edit):
    with fits.open(src) as h:
        hl = fits.HDUList([x.copy() for x in h])
    edit(hl)
    hl.writeto(dst)
    return dst


def test_bad_content(tmp_path, psf_path):
    src = psf_path("psf-r0-00067784.fits")

    def drop_psf(h):
        del h["PSF"]

    f = _copy(src, tmp_path / "a.fits", drop_psf)
    with pytest.raises(ValueError, match=r"a\.fits.*PSF"):
        read_psf(f)

    def drop_key(h):
        del h["PSF"].header["HSIZEX"]

    f = _copy(src, tmp_path / "b.fits", drop_key)
    with pytest.raises(ValueError, match=r"b\.fits.*HSIZEX"):
        read_psf(f)

    def unknown(h):
        for x in h:
            if "PSFTYPE" in x.header:
                x.header["PSFTYPE"] = "SPOTGRID"

    f = _copy(src, tmp_path / "c.fits", unknown)
    with pytest.raises(ValueError, match=r"c\.fits.*SPOTGRID"):
        read_psf(f)


def test_gauss_hermite2_is_read(psf_path):
    # GAUSS-HERMITE2 used to be refused; it is read now (issue 14; spots in test_gausshermite2.py)
    from jaxspec.psf import GaussHermite2PSF

    psf = read_psf(psf_path("psf-gausshermite2-specter-test.fits"))
    assert isinstance(psf, GaussHermite2PSF)
    assert (psf.nspec, psf.npix_x, psf.npix_y, psf.stamp_shape) == (25, 4114, 4128, (20, 20))


def test_write_type_check(tmp_path):
    with pytest.raises(TypeError):
        write_psf(tmp_path / "x.fits", object())
    assert issubclass(GaussHermitePSF, object)


# ------------------------------------------------------------------ bad PSF files (issue 15)
# Each bad file is a small synthetic PSF written by write_psf, then edited; the reader must
# refuse it with a ValueError naming the file, the HDU and the key or column.


@pytest.fixture(scope="module")
def good_psf(tmp_path_factory):
    path = tmp_path_factory.mktemp("psf") / "good.fits"
    write_psf(path, desi_like_psf(7))
    return path


BAD_PSFS = {
    "ghsigx-nan": (_set_coeff("GHSIGX", np.nan, (2, 0)),
                   r"HDU PSF column COEFF has 1 non-finite.*GHSIGX"),
    "ghsigy-inf": (_set_coeff("GHSIGY", np.inf, (0, 1)),
                   r"HDU PSF column COEFF has 1 non-finite.*GHSIGY"),
    "gh-coef-nan": (_set_coeff("GH-1-0", np.nan), r"HDU PSF column COEFF has 21 non-finite.*GH-1-0"),
    "ghsigx-zero": (_flat_width("GHSIGX", 0.0), r"HDU PSF parameter GHSIGX .*not positive for 1 fiber"),
    "ghsigy-negative": (_flat_width("GHSIGY", -1.1), r"HDU PSF parameter GHSIGY .*not positive.*-1\.1"),
    "hsizex-negative": (_set_header("PSF", "HSIZEX", -3), r"HDU PSF header key HSIZEX = -3 must be >= 1"),
    "hsizey-zero": (_set_header("PSF", "HSIZEY", 0), r"HDU PSF header key HSIZEY = 0 must be >= 1"),
    "npix-x-text": (_set_header("PSF", "NPIX_X", "wide"), r"HDU PSF header key NPIX_X = 'wide' is not an integer"),
    "npix-y-fraction": (_set_header("PSF", "NPIX_Y", 40.5), r"HDU PSF header key NPIX_Y = 40.5 is not an integer"),
    "wave-swapped": (_swap_wave("PSF"), r"HDU PSF header keys WAVEMIN/WAVEMAX .*smaller than WAVEMAX \(swapped\?\)"),
    "xtrace-wave-swapped": (_swap_wave("XTRACE"), r"HDU XTRACE header keys WAVEMIN/WAVEMAX .*swapped"),
    "xtrace-nan": (_nan_xtrace, r"HDU XTRACE has 1 non-finite"),
    "legdeg-wrong": (_set_header("PSF", "LEGDEG", 4), r"HDU PSF column COEFF has 3 Legendre .* LEGDEG says 5"),
    "fibermax-wrong": (_set_header("PSF", "FIBERMAX", 9), r"HDU PSF column COEFF has 21 values .*10 fibers"),
    "psf-as-image": (_psf_as_image, r"HDU PSF is an image \(shape \(\d+, 3\)\), not a table"),
}


@pytest.mark.parametrize("case", sorted(BAD_PSFS))
def test_bad_psf_refused(tmp_path, good_psf, case):
    edit, message = BAD_PSFS[case]
    bad = _copy(good_psf, tmp_path / f"{case}.fits", edit)
    with pytest.raises(ValueError, match=rf"{case}\.fits: {message}"):
        read_psf(bad)
    read_psf(good_psf)  # the unedited file still reads


def test_truncated_psf(tmp_path, good_psf):
    data = good_psf.read_bytes()
    bad = tmp_path / "cut.fits"
    bad.write_bytes(data[: len(data) - 2880])  # the last block of the PSF table is lost
    with pytest.raises(ValueError, match=r"cut\.fits: the file is truncated.*HDU PSF is incomplete"):
        read_psf(bad)


def test_truncated_real_psf(tmp_path, psf_path):
    data = psf_path("psf-r0-00067784.fits").read_bytes()
    bad = tmp_path / "cut.fits"
    bad.write_bytes(data[: len(data) - 400_000])  # was "cannot reshape array of size 9 into shape (59,)"
    with pytest.raises(ValueError, match=r"cut\.fits: the file is truncated.*HDU PSF is incomplete"):
        read_psf(bad)


def test_bad_v2_and_trace_only(tmp_path, psf_path):
    def nan_v2(hl):
        coeff = np.array(hl[1].data["COEFF"])
        coeff[0, 4, 2] = np.nan
        hl[1].data["COEFF"] = coeff

    f = _copy(psf_path("psf-gausshermite-v2-specter-test.fits"), tmp_path / "v2.fits", nan_v2)
    with pytest.raises(ValueError, match=r"v2\.fits: HDU 1 column COEFF has 1 non-finite"):
        read_psf(f)

    def nan_xsigma(hl):
        hl["XSIGMA"].data[10] = np.nan

    f = _copy(psf_path("trace-only-psf-r0.fits"), tmp_path / "t.fits", nan_xsigma)
    with pytest.raises(ValueError, match=r"t\.fits: HDU XSIGMA has 1 non-finite"):
        read_psf(f)
