import numpy as np
import pytest
from astropy.io import fits

from jaxspec.psf import GaussHermitePSF, desi_like_psf, read_psf, write_psf


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


def test_gauss_hermite2_refused(psf_path):
    with pytest.raises(ValueError, match="GAUSS-HERMITE2"):
        read_psf(psf_path("psf-gausshermite2-specter-test.fits"))


def test_write_type_check(tmp_path):
    with pytest.raises(TypeError):
        write_psf(tmp_path / "x.fits", object())
    assert issubclass(GaussHermitePSF, object)
