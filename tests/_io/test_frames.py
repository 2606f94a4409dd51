"""Tests for jaxspec._io.frames: preproc and frame FITS I/O (NumPy + astropy only)."""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from _badfiles import _with_card
from jaxspec._io import frames as fio
from jaxspec._io.frames import (
    Frame,
    FrameIOWarning,
    check_output_path,
    embed_subimage,
    read_frame,
    read_preproc,
    write_frame,
    write_model,
    write_preproc,
)

RNG = np.random.default_rng(1234)


def _header():
    h = fits.Header()
    h["CAMERA"] = ("b1", "Spectrograph camera")
    h["FLAVOR"] = "science"
    h["NIGHT"] = 20201214
    h["EXPID"] = 67890
    h["TILEID"] = 80605
    h["EXPTIME"] = 900.0
    h["SPECTRO"] = 1
    h["DETECTOR"] = "M1-49"
    h["DATE-OBS"] = "2020-12-15T05:06:07.8"
    h["MJD-OBS"] = 59198.2126
    return h


def _frame_arrays(nspec=5, nwave=40, ndiag=11):
    wave = np.linspace(3600.0, 3600.0 + 0.8 * (nwave - 1), nwave)
    flux = RNG.normal(100.0, 10.0, (nspec, nwave))
    ivar = RNG.uniform(0.5, 2.0, (nspec, nwave))
    res = RNG.uniform(0.0, 1.0, (nspec, ndiag, nwave))
    chi2 = RNG.uniform(0.0, 3.0, (nspec, nwave))
    return dict(wave=wave, flux=flux, ivar=ivar, resolution=res, chi2pix=chi2)


def _no_temp_files(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


# ---------------------------------------------------------------- preproc


def test_preproc_round_trip(tmp_path):
    img = RNG.normal(0, 5, (30, 20))
    ivar = RNG.uniform(0.1, 1.0, (30, 20))
    mask = np.zeros((30, 20), dtype=np.int32)
    truth = dict(wave=np.linspace(5000, 5100, 17), flux=RNG.uniform(0, 10, (4, 17)),
                 specmin=25)
    fm = Table({"FIBER": np.arange(525, 529), "OBJTYPE": ["TGT"] * 4})
    path = tmp_path / "preproc.fits"
    out = write_preproc(path, img, ivar, mask=mask, header=_header(), truth=truth,
                        fibermap=fm)
    assert out == str(path)
    pp = read_preproc(path)
    np.testing.assert_array_equal(pp.image, img.astype(np.float32))
    np.testing.assert_array_equal(pp.ivar, ivar.astype(np.float32))
    assert pp.image.dtype == np.float64 and pp.ivar.dtype == np.float64
    np.testing.assert_array_equal(pp.mask, mask)
    for key, val in _header().items():
        assert pp.header[key] == val
    assert pp.header["DEPNAM00"] == "jaxspec"
    assert "NAXIS1" not in pp.header and "EXTNAME" not in pp.header
    np.testing.assert_array_equal(pp.truth["wave"], truth["wave"])
    np.testing.assert_array_equal(pp.truth["flux"], truth["flux"])
    assert pp.truth["specmin"] == 25
    assert list(pp.fibermap["FIBER"]) == [525, 526, 527, 528]
    assert pp.path == str(path)

    with fits.open(path) as hd:
        assert [h.name for h in hd] == ["IMAGE", "IVAR", "MASK", "FIBERMAP",
                                        "TRUTH_WAVE", "TRUTH_FLUX"]
        assert hd[0].data.dtype == np.dtype(">f4")
        assert hd["IVAR"].data.dtype == np.dtype(">f4")
        assert hd["MASK"].data.dtype == np.dtype(">i4")
        assert hd["TRUTH_FLUX"].data.dtype == np.dtype(">f8")
        assert hd["TRUTH_FLUX"].header["SPECMIN"] == 25


def test_preproc_without_truth_or_mask_hdu(tmp_path):
    path = tmp_path / "p.fits"
    img = np.ones((4, 6))
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(img, name="IMAGE"),
                         fits.ImageHDU(img, name="IVAR")])
    hdus[0].header["NIGHT"] = 20200101
    hdus[1].header["CAMERA"] = "r3"
    hdus.writeto(path)
    pp = read_preproc(path)
    assert pp.mask is None and pp.truth is None and pp.fibermap is None
    # primary header merged under the IMAGE extension header
    assert pp.header["NIGHT"] == 20200101 and pp.header["CAMERA"] == "r3"


def test_preproc_mask_zeroes_ivar(tmp_path):
    img = np.ones((8, 8))
    ivar = np.full((8, 8), 4.0)
    mask = np.zeros((8, 8), dtype=np.int32)
    mask[2, 3] = 1
    mask[5, 5] = 16
    path = tmp_path / "p.fits"
    write_preproc(path, img, ivar, mask=mask)
    pp = read_preproc(path)
    assert pp.ivar[2, 3] == 0 and pp.ivar[5, 5] == 0
    assert (pp.ivar == 0).sum() == 2
    assert pp.image[2, 3] == 1.0  # image itself untouched


def _raw_preproc(path, img, ivar, mask=None):
    hdus = fits.HDUList([fits.PrimaryHDU(img.astype(np.float32))])
    hdus[0].header["EXTNAME"] = "IMAGE"
    hdus.append(fits.ImageHDU(ivar.astype(np.float32), name="IVAR"))
    if mask is not None:
        hdus.append(fits.ImageHDU(mask.astype(np.int32), name="MASK"))
    hdus.writeto(path)


def test_read_preproc_nan_masked_with_count(tmp_path):
    img = np.ones((6, 7))
    ivar = np.ones((6, 7))
    img[1, 1] = np.nan
    img[2, 2] = np.inf
    ivar[3, 3] = np.nan
    path = tmp_path / "nan.fits"
    _raw_preproc(path, img, ivar, np.zeros((6, 7)))
    with pytest.warns(FrameIOWarning, match=r"3 pixel\(s\) with NaN or inf") as rec:
        pp = read_preproc(path)
    assert str(path) in str(rec[0].message)
    for y, x in [(1, 1), (2, 2), (3, 3)]:
        assert pp.ivar[y, x] == 0 and pp.image[y, x] == 0
        assert pp.mask[y, x] & fio.CCDMASK_BAD
    assert np.all(np.isfinite(pp.image)) and np.all(np.isfinite(pp.ivar))
    assert (pp.ivar == 0).sum() == 3


def test_read_preproc_negative_ivar_masked(tmp_path):
    img = np.ones((5, 5))
    ivar = np.ones((5, 5))
    ivar[0, :2] = -1.0
    path = tmp_path / "neg.fits"
    _raw_preproc(path, img, ivar)
    with pytest.warns(FrameIOWarning, match=r"2 pixel\(s\) with negative IVAR"):
        pp = read_preproc(path)
    assert np.all(pp.ivar[0, :2] == 0) and (pp.ivar == 0).sum() == 2
    assert pp.mask is None


def test_read_preproc_missing_file(tmp_path):
    path = tmp_path / "nope.fits"
    with pytest.raises(FileNotFoundError, match="nope.fits"):
        read_preproc(path)


def test_read_preproc_not_fits(tmp_path):
    path = tmp_path / "text.fits"
    path.write_text("this is not a FITS file\n" * 20)
    with pytest.raises(OSError, match="text.fits.*not a readable FITS"):
        read_preproc(path)


def test_read_preproc_empty_file(tmp_path):
    path = tmp_path / "empty.fits"
    path.write_bytes(b"")
    with pytest.raises(OSError, match="empty.fits"):
        read_preproc(path)


def test_read_preproc_missing_image_hdu(tmp_path):
    path = tmp_path / "noimg.fits"
    fits.HDUList([fits.PrimaryHDU(),
                  fits.ImageHDU(np.ones((3, 3)), name="IVAR")]).writeto(path)
    with pytest.raises(ValueError, match=r"noimg.fits.*IMAGE HDU"):
        read_preproc(path)


def test_read_preproc_missing_ivar_hdu(tmp_path):
    path = tmp_path / "noivar.fits"
    hdus = fits.HDUList([fits.PrimaryHDU(np.ones((3, 3)))])
    hdus[0].header["EXTNAME"] = "IMAGE"
    hdus.writeto(path)
    with pytest.raises(ValueError, match=r"noivar.fits.*IVAR HDU"):
        read_preproc(path)


def test_read_preproc_shape_mismatch(tmp_path):
    path = tmp_path / "shape.fits"
    _raw_preproc(path, np.ones((4, 5)), np.ones((5, 4)))
    with pytest.raises(ValueError, match=r"shape.fits.*IVAR.*\(5, 4\).*IMAGE.*\(4, 5\)"):
        read_preproc(path)
    path2 = tmp_path / "mshape.fits"
    _raw_preproc(path2, np.ones((4, 5)), np.ones((4, 5)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"mshape.fits.*MASK HDU shape"):
        read_preproc(path2)


def test_write_preproc_sanitises_nan(tmp_path):
    img = np.ones((4, 4))
    ivar = np.ones((4, 4))
    img[0, 0] = np.nan
    ivar[1, 1] = np.inf
    ivar[2, 2] = -3.0
    path = tmp_path / "w.fits"
    with pytest.warns(FrameIOWarning) as rec:
        write_preproc(path, img, ivar)
    msgs = " | ".join(str(r.message) for r in rec)
    assert "2 pixel(s) with NaN or inf" in msgs and "1 pixel(s) with negative" in msgs
    with fits.open(path) as hd:
        assert np.all(np.isfinite(hd["IMAGE"].data)) and np.all(np.isfinite(hd["IVAR"].data))
        assert hd["IVAR"].data[0, 0] == 0 and hd["IVAR"].data[1, 1] == 0
        assert hd["IVAR"].data[2, 2] == 0
        assert hd["MASK"].data[0, 0] != 0 and hd["MASK"].data[2, 2] != 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_preproc(path)  # clean on the way back: no further warnings


def test_write_preproc_bad_truth(tmp_path):
    with pytest.raises(ValueError, match="truth"):
        write_preproc(tmp_path / "t.fits", np.ones((3, 3)), np.ones((3, 3)),
                      truth=dict(wave=np.arange(4.0), flux=np.ones((2, 5))))
    assert not (tmp_path / "t.fits").exists()


# ---------------------------------------------------------------- frame


def test_frame_round_trip(tmp_path):
    a = _frame_arrays()
    mask = np.zeros(a["flux"].shape, dtype=np.uint32)
    mask[0, 3] = 1 << 7
    fm = Table({"FIBER": np.arange(510, 515, dtype=np.int32),
                "TARGETID": np.arange(5, dtype=np.int64) + 1000})
    opts = dict(bundlesize=25, nsubbundles=6, nwavestep=50, wavepad_frac=0.2,
                pixpad_frac=0.8, regularize=0.0, psferr=0.01, decorrelate_fibers=False)
    path = tmp_path / "frame-b1-00067890.fits"
    write_frame(path, mask=mask, fibermap=fm, header=_header(), specmin=10,
                input_path="/data/preproc-b1-00067890.fits", psf_path="/data/psf-b1.fits",
                options=opts, version="9.8.7", **a)
    fr = read_frame(path)
    assert isinstance(fr, Frame)
    np.testing.assert_array_equal(fr.flux, a["flux"].astype(np.float32))
    np.testing.assert_array_equal(fr.ivar, a["ivar"].astype(np.float32))
    np.testing.assert_array_equal(fr.wave, a["wave"])
    np.testing.assert_array_equal(fr.resolution, a["resolution"].astype(np.float32))
    np.testing.assert_array_equal(fr.chi2pix, a["chi2pix"].astype(np.float32))
    np.testing.assert_array_equal(fr.mask, mask)
    assert fr.mask.dtype == np.uint32
    assert list(fr.fibermap["FIBER"]) == list(fm["FIBER"])
    assert list(fr.fibermap["TARGETID"]) == list(fm["TARGETID"])

    h = fr.header
    for key, val in _header().items():
        assert h[key] == val, key
    assert h["EXTNAME"] == "FLUX" and h["BUNIT"] == "electron/Angstrom"
    assert (h["SPECMIN"], h["SPECMAX"], h["NSPEC"]) == (10, 15, 5)
    assert h["FIBERMIN"] == 510
    assert h["WAVEMIN"] == a["wave"][0] and h["WAVEMAX"] == a["wave"][-1]
    assert h["WAVESTEP"] == pytest.approx(0.8)
    assert h["IN_IMG"] == "/data/preproc-b1-00067890.fits"
    assert h["IN_PSF"] == "/data/psf-b1.fits"
    assert h["BUNDLSZ"] == 25 and h["NSUBBUND"] == 6 and h["NWAVSTEP"] == 50
    assert h["WPADFRAC"] == 0.2 and h["PPADFRAC"] == 0.8
    assert h["REGULARZ"] == 0.0 and h["PSFERR"] == 0.01 and h["DECORREL"] is False
    assert h["DEPNAM00"] == "jaxspec" and h["DEPVER00"] == "9.8.7"
    assert fr.specmin == 10 and fr.nspec == 5 and fr.nwave == 40 and fr.ndiag == 11

    # layout / dtypes as desispec.io.read_frame expects
    with fits.open(path, uint=True) as hd:
        assert [x.name for x in hd] == ["FLUX", "IVAR", "MASK", "WAVELENGTH",
                                        "RESOLUTION", "FIBERMAP", "CHI2PIX"]
        assert isinstance(hd[0], fits.PrimaryHDU)
        assert hd["FLUX"].data.dtype.kind == "f" and hd["FLUX"].data.dtype.itemsize == 4
        assert hd["IVAR"].data.dtype.itemsize == 4
        assert hd["MASK"].data.dtype == np.uint32
        assert hd["WAVELENGTH"].data.dtype.itemsize == 8
        assert hd["WAVELENGTH"].header["BUNIT"] == "Angstrom"
        assert hd["RESOLUTION"].data.shape == (5, 11, 40)
        assert hd["RESOLUTION"].data.dtype.itemsize == 4
        assert isinstance(hd["FIBERMAP"], fits.BinTableHDU)
        assert hd["CHI2PIX"].data.dtype.itemsize == 4
        assert hd.fileinfo(0) is not None
        hd.verify("exception")

    # re-writing a read Frame reproduces it exactly
    path2 = tmp_path / "again.fits"
    write_frame(path2, fr, version="9.8.7")
    fr2 = read_frame(path2)
    for name in ("flux", "ivar", "wave", "resolution", "chi2pix", "mask"):
        np.testing.assert_array_equal(getattr(fr2, name), getattr(fr, name))
    assert fr2.header["SPECMIN"] == 10 and fr2.header["EXPID"] == 67890
    assert fr2.header["DEPNAM00"] == "jaxspec"
    assert sum(k.startswith("DEPNAM") for k in fr2.header) == \
        sum(k.startswith("DEPNAM") for k in fr.header)


def test_frame_minimal_and_fibermin_from_camera(tmp_path):
    a = _frame_arrays(nspec=3, nwave=10, ndiag=5)
    path = tmp_path / "f.fits"
    write_frame(path, wave=a["wave"], flux=a["flux"], ivar=a["ivar"],
                resolution=a["resolution"], header={"CAMERA": "z7", "FLAVOR": "arc"},
                specmin=20)
    fr = read_frame(path)
    assert fr.chi2pix is None and fr.fibermap is None
    assert fr.header["FIBERMIN"] == 7 * 500 + 20
    assert fr.header["DEPNAM00"] == "jaxspec"
    from jaxspec._version import __version__
    assert fr.header["DEPVER00"] == __version__
    assert np.all(fr.mask == 0)
    with fits.open(path) as hd:
        assert [x.name for x in hd] == ["FLUX", "IVAR", "MASK", "WAVELENGTH", "RESOLUTION"]


def test_frame_mask_set_where_ivar_zero_and_nan_scrubbed(tmp_path):
    a = _frame_arrays(nspec=3, nwave=12, ndiag=5)
    a["flux"][0, 0] = np.nan
    a["ivar"][1, 1] = np.inf
    a["ivar"][2, 2] = 0.0
    a["ivar"][2, 3] = -1.0
    a["ivar"][0, 5] = 1e-60  # underflows to 0 in float32
    path = tmp_path / "f.fits"
    with pytest.warns(FrameIOWarning) as rec:
        write_frame(path, **a)
    msgs = " | ".join(str(r.message) for r in rec)
    assert "2 pixel(s) with NaN or inf in FLUX or IVAR" in msgs
    assert "1 pixel(s) with negative IVAR" in msgs
    assert str(path) in msgs
    fr = read_frame(path)
    assert np.all(np.isfinite(fr.flux)) and np.all(np.isfinite(fr.ivar))
    zero = fr.ivar == 0
    assert zero.sum() == 5
    assert np.all(fr.mask[zero] & fio.SPECMASK_ALLBADPIX)
    assert np.all(fr.mask[~zero] == 0)
    assert fr.flux[0, 0] == 0 and fr.ivar[0, 0] == 0


def test_frame_shape_validation(tmp_path):
    a = _frame_arrays(nspec=3, nwave=12, ndiag=5)
    bad = dict(a, ivar=a["ivar"][:, :-1])
    with pytest.raises(ValueError, match="ivar shape"):
        write_frame(tmp_path / "x.fits", **bad)
    bad = dict(a, resolution=a["resolution"][:, :4])
    with pytest.raises(ValueError, match="ndiag=4 must be odd"):
        write_frame(tmp_path / "x.fits", **bad)
    with pytest.raises(TypeError, match="missing resolution"):
        write_frame(tmp_path / "x.fits", wave=a["wave"], flux=a["flux"], ivar=a["ivar"])
    assert os.listdir(tmp_path) == []


def test_read_frame_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.fits"):
        read_frame(tmp_path / "missing.fits")
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(OSError, match="junk.fits"):
        read_frame(junk)
    a = _frame_arrays(nspec=2, nwave=6, ndiag=3)
    path = tmp_path / "f.fits"
    write_frame(path, **a)
    with fits.open(path) as hd:
        kept = fits.HDUList([h for h in hd if h.name != "RESOLUTION"])
        kept.writeto(tmp_path / "nores.fits")
    with pytest.raises(ValueError, match=r"nores.fits.*RESOLUTION HDU"):
        read_frame(tmp_path / "nores.fits")


def test_model_write(tmp_path):
    m = RNG.normal(size=(6, 4))
    m[0, 0] = np.nan
    with pytest.warns(FrameIOWarning, match="1 non-finite"):
        write_model(tmp_path / "model.fits", m, header=_header())
    with fits.open(tmp_path / "model.fits") as hd:
        assert hd[0].name == "MODEL" and hd[0].header["EXPID"] == 67890
        assert hd[0].data[0, 0] == 0 and np.all(np.isfinite(hd[0].data))


# ---------------------------------------------------------------- output safety


@pytest.mark.parametrize("writer", ["preproc", "frame"])
def test_refuses_to_overwrite(tmp_path, writer):
    path = tmp_path / "out.fits"
    path.write_bytes(b"precious")
    a = _frame_arrays(nspec=2, nwave=6, ndiag=3)
    with pytest.raises(FileExistsError, match=r"out.fits.*--overwrite"):
        if writer == "preproc":
            write_preproc(path, np.ones((3, 3)), np.ones((3, 3)))
        else:
            write_frame(path, **a)
    assert path.read_bytes() == b"precious"
    assert _no_temp_files(tmp_path) == []
    # and replaces it when asked
    if writer == "preproc":
        write_preproc(path, np.ones((3, 3)), np.ones((3, 3)), overwrite=True)
        assert read_preproc(path).image.shape == (3, 3)
    else:
        write_frame(path, overwrite=True, **a)
        assert read_frame(path).nspec == 2
    assert _no_temp_files(tmp_path) == []


def test_check_output_path(tmp_path):
    p = tmp_path / "a.fits"
    assert check_output_path(p) == str(p)
    p.write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"a.fits.*use --overwrite"):
        check_output_path(p)
    assert check_output_path(p, overwrite=True) == str(p)
    with pytest.raises(FileNotFoundError, match=r"no_such_dir.*does not exist"):
        check_output_path(tmp_path / "no_such_dir" / "b.fits")
    with pytest.raises(IsADirectoryError):
        check_output_path(tmp_path, overwrite=True)


def test_writers_fail_early_on_missing_directory(tmp_path):
    a = _frame_arrays(nspec=2, nwave=6, ndiag=3)
    target = tmp_path / "missing" / "f.fits"
    with pytest.raises(FileNotFoundError, match="missing"):
        write_frame(target, **a)
    with pytest.raises(FileNotFoundError, match="missing"):
        write_preproc(target, np.ones((2, 2)), np.ones((2, 2)))
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(PermissionError, match=r"ro.*not writable"):
            check_output_path(ro / "f.fits")
        with pytest.raises(PermissionError, match="not writable"):
            write_preproc(ro / "f.fits", np.ones((2, 2)), np.ones((2, 2)))
    finally:
        ro.chmod(stat.S_IRWXU)


def test_atomic_write_failure_leaves_destination_unchanged(tmp_path, monkeypatch):
    a = _frame_arrays(nspec=2, nwave=6, ndiag=3)
    path = tmp_path / "frame.fits"
    write_frame(path, **a)
    before = path.read_bytes()

    import jaxspec._io.frames as frames_mod

    real_write = frames_mod.write_hdus

    def exploding_write(fh, hdus):
        real_write(fh, hdus)                 # a full temp file exists ...
        raise RuntimeError("disk on fire")   # ... then the write "fails"

    monkeypatch.setattr(frames_mod, "write_hdus", exploding_write)
    b = _frame_arrays(nspec=2, nwave=6, ndiag=3)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_frame(path, overwrite=True, **b)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_preproc(tmp_path / "new.fits", np.ones((2, 2)), np.ones((2, 2)))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert not (tmp_path / "new.fits").exists()
    assert sorted(os.listdir(tmp_path)) == ["frame.fits"]


def test_atomic_write_leaves_no_temp_file(tmp_path):
    a = _frame_arrays(nspec=2, nwave=6, ndiag=3)
    write_frame(tmp_path / "f.fits", **a)
    write_preproc(tmp_path / "p.fits", np.ones((2, 2)), np.ones((2, 2)))
    assert sorted(os.listdir(tmp_path)) == ["f.fits", "p.fits"]


# ---------------------------------------------------------------- embed_subimage


def test_embed_subimage():
    sub = RNG.normal(size=(3, 4))
    iv = RNG.uniform(1, 2, size=(3, 4))
    img, ivar = embed_subimage(sub, iv, (5, 9, 2, 5), (10, 12))
    assert img.shape == ivar.shape == (10, 12)
    np.testing.assert_array_equal(img[2:5, 5:9], sub)
    np.testing.assert_array_equal(ivar[2:5, 5:9], iv)
    assert ivar.sum() == pytest.approx(iv.sum()) and np.abs(img).sum() == \
        pytest.approx(np.abs(sub).sum())
    img2, ivar2 = embed_subimage(sub, iv, (5, 2), (10, 12))
    np.testing.assert_array_equal(img2, img)
    np.testing.assert_array_equal(ivar2, ivar)
    with pytest.raises(ValueError, match="spans"):
        embed_subimage(sub, iv, (5, 10, 2, 5), (10, 12))
    with pytest.raises(ValueError, match="does not fit"):
        embed_subimage(sub, iv, (10, 2), (10, 12))


def test_embed_then_write_preproc(tmp_path):
    sub = RNG.normal(size=(3, 4))
    iv = np.ones((3, 4))
    img, ivar = embed_subimage(sub, iv, (1, 0), (6, 6))
    write_preproc(tmp_path / "full.fits", img, ivar, header=_header())
    pp = read_preproc(tmp_path / "full.fits")
    assert pp.image.shape == (6, 6) and (pp.ivar > 0).sum() == 12


def test_unwritable_directory_reported(tmp_path, monkeypatch):
    # Runs as root too: the permission probe itself is faked.
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode, *a, **k: False if os.fspath(p) == str(tmp_path)
                        else real_access(p, mode, *a, **k))
    with pytest.raises(PermissionError, match=r"not writable.*f.fits"):
        check_output_path(tmp_path / "f.fits")
    with pytest.raises(PermissionError, match="not writable"):
        write_frame(tmp_path / "f.fits", **_frame_arrays(nspec=2, nwave=6, ndiag=3))
    assert os.listdir(tmp_path) == []


def test_read_preproc_compressed_int16_mask(tmp_path):
    # desispec writes MASK as a compressed int16 image
    img = np.ones((6, 6), dtype=np.float32)
    mask = np.zeros((6, 6), dtype=np.int16)
    mask[4, 1] = 8
    hdus = fits.HDUList([fits.PrimaryHDU(img)])
    hdus[0].header["EXTNAME"] = "IMAGE"
    hdus[0].header["CAMERA"] = "b0"
    hdus.append(fits.ImageHDU(img, name="IVAR"))
    hdus.append(fits.CompImageHDU(mask, name="MASK"))
    hdus.writeto(tmp_path / "c.fits")
    pp = read_preproc(tmp_path / "c.fits")
    assert pp.mask[4, 1] == 8 and pp.ivar[4, 1] == 0 and (pp.ivar == 0).sum() == 1
    assert pp.header["CAMERA"] == "b0"


def test_fibermap_without_fiber_column_warns(tmp_path):
    a = _frame_arrays(nspec=2, nwave=6, ndiag=3)
    with pytest.warns(FrameIOWarning, match="no FIBER column"):
        write_frame(tmp_path / "f.fits", fibermap=Table({"TARGETID": [1, 2]}), **a)


def test_long_paths_and_options_without_card_warnings(tmp_path):
    # paths longer than a card holds keep their full value (CONTINUE cards), with no
    # "Card is too long" warning; the CLI's option names map to their keys
    deep = tmp_path / ("long-directory-name-" * 4)
    deep.mkdir()
    a = _frame_arrays(nspec=2, nwave=6, ndiag=3)
    inp = deep / "preproc-r0-00067784.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_frame(deep / "frame.fits", input_path=inp, psf_path=deep / "psf.fits",
                    options=dict(decorrelate="signal", psferr=0.01), **a)
    h = read_frame(deep / "frame.fits").header
    assert h["IN_IMG"] == str(inp) and len(h["IN_IMG"]) > 80
    assert h["IN_PSF"] == str(deep / "psf.fits")
    assert h["DECORREL"] == "signal" and h["PSFERR"] == 0.01


def test_camera_keys(psf_path, tmp_path):
    assert fio.header_camera({"CAMERA": "R0  "}) == "r0"
    assert fio.header_camera(_header()) == "b1"
    assert fio.header_camera({}) is None and fio.header_camera(None) is None
    # the DESI PSF stores CAMERA as "'r0      '" in its PSF HDU
    assert fio.psf_camera(psf_path("psf-r0-00067784.fits")) == "r0"
    assert fio.psf_camera(tmp_path / "missing.fits") is None
    (tmp_path / "junk.fits").write_text("junk")
    assert fio.psf_camera(tmp_path / "junk.fits") is None


# ---------------------------------------------------------------- bad preproc input (issue 15)


def test_read_preproc_unparsable_header_card(tmp_path):
    good = tmp_path / "good.fits"
    write_preproc(good, np.ones((5, 4)), np.ones((5, 4)), header=_header())
    # an identifying key that cannot be parsed: refused, naming file, HDU and card
    bad = _with_card(good, tmp_path / "cam.fits", "CAMERA", "CAMERA  = b1 no quotes")
    with pytest.raises(ValueError, match=r"cam\.fits: IMAGE HDU header card CAMERA .*not a valid FITS"):
        read_preproc(bad)
    bad = _with_card(good, tmp_path / "exp.fits", "EXPTIME", "EXPTIME = 900.0.1")
    with pytest.raises(ValueError, match=r"exp\.fits: IMAGE HDU header card EXPTIME"):
        read_preproc(bad)
    # any other key: dropped with a warning, the rest of the header kept
    bad = _with_card(good, tmp_path / "det.fits", "DETECTOR", "MYKEY   = 1.2.3 / junk")
    with pytest.warns(FrameIOWarning, match=r"det\.fits: IMAGE HDU header card MYKEY .*ignored"):
        pp = read_preproc(bad)
    assert "MYKEY" not in pp.header and pp.header["CAMERA"] == "b1" and pp.header["EXPID"] == 67890
    # the unparsable card in the primary header of a file whose IMAGE is an extension
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((4, 6)), name="IMAGE"),
                         fits.ImageHDU(np.ones((4, 6)), name="IVAR")])
    hdus[0].header["NIGHT"] = 20200101
    hdus.writeto(tmp_path / "ext.fits")
    bad = _with_card(tmp_path / "ext.fits", tmp_path / "ext2.fits", "NIGHT", "NIGHT   = 2020-01-01")
    with pytest.raises(ValueError, match=r"ext2\.fits: primary HDU header card NIGHT"):
        read_preproc(bad)


def test_read_preproc_fibermap_as_image(tmp_path):
    path = tmp_path / "p.fits"
    hdus = fits.HDUList([fits.PrimaryHDU(np.ones((4, 6), np.float32)),
                         fits.ImageHDU(np.ones((4, 6), np.float32), name="IVAR"),
                         fits.ImageHDU(np.zeros((3, 2)), name="FIBERMAP")])
    hdus[0].header["EXTNAME"] = "IMAGE"
    hdus.writeto(path)
    with pytest.raises(ValueError, match=r"p\.fits: FIBERMAP HDU is an image \(shape \(3, 2\)\), not a table"):
        read_preproc(path)
    # the same for a frame
    f = tmp_path / "f.fits"
    write_frame(f, **_frame_arrays(nspec=3, nwave=6, ndiag=3))
    with fits.open(f) as h:
        hl = fits.HDUList([x.copy() for x in h] + [fits.ImageHDU(np.zeros(3), name="FIBERMAP")])
    hl.writeto(tmp_path / "g.fits")
    with pytest.raises(ValueError, match=r"g\.fits: FIBERMAP HDU is an image"):
        read_frame(tmp_path / "g.fits")


def test_read_preproc_int64_mask_high_bits(tmp_path):
    """An int64 MASK keeps its full width: with mask_rule='any' every set bit masks its
    pixel, bits 32..63 included (a cast to 32 bits used to drop them and leave the pixels
    unmasked); the default (desispec's extraction bits) masks the pixels with those bits."""
    img = np.ones((6, 7))
    ivar = np.full((6, 7), 2.0)
    mask = np.zeros((6, 7), dtype=np.int64)
    mask[1, 2] = 1 << 32  # dropped by a cast to 32 bits
    mask[3, 4] = 1 << 62
    mask[4, 5] = (1 << 40) | 4  # DEAD (bit 2) and a high bit
    mask[5, 6] = 2  # HOT
    path = tmp_path / "p.fits"
    _raw_preproc(path, img, ivar)
    with fits.open(path, mode="append") as h:
        h.append(fits.ImageHDU(mask, name="MASK"))
    pa = read_preproc(path, mask_rule="any")
    assert pa.mask.dtype == np.int64 and pa.mask.dtype.isnative
    np.testing.assert_array_equal(pa.mask, mask)  # the full width kept
    np.testing.assert_array_equal(pa.ivar == 0, mask != 0)
    assert (pa.ivar == 0).sum() == 4
    pd = read_preproc(path)  # desispec's rule: only its extraction bits zero ivar
    np.testing.assert_array_equal(pd.mask, mask)
    assert pd.ivar[4, 5] == 0 and pd.ivar[5, 6] == 0 and (pd.ivar == 0).sum() == 2
    # NaN on top of a high-bit mask: the BAD bit is added, the high bit kept
    img[3, 4] = np.nan
    _raw_preproc(tmp_path / "q.fits", img, ivar)
    with fits.open(tmp_path / "q.fits", mode="append") as h:
        h.append(fits.ImageHDU(mask, name="MASK"))
    with pytest.warns(FrameIOWarning, match="NaN or inf"):
        pq = read_preproc(tmp_path / "q.fits")
    assert pq.mask[3, 4] == (1 << 62) | fio.CCDMASK_BAD and pq.ivar[3, 4] == 0
    # an unsigned 32-bit mask (BZERO-scaled in the file) keeps its top bit
    m32 = np.zeros((6, 7), dtype=np.uint32)
    m32[0, 0] = 1 << 31
    _raw_preproc(tmp_path / "u.fits", np.ones((6, 7)), ivar)
    with fits.open(tmp_path / "u.fits", mode="append") as h:
        h.append(fits.ImageHDU(m32, name="MASK"))
    pu = read_preproc(tmp_path / "u.fits", mask_rule="any")
    assert pu.mask.dtype == np.uint32 and pu.mask[0, 0] == 1 << 31
    assert pu.ivar[0, 0] == 0 and (pu.ivar == 0).sum() == 1


def test_non_ascii_paths(tmp_path):
    """A path with non-ASCII characters reads and writes; the header keeps an ASCII escape."""
    d = tmp_path / "données"
    d.mkdir()
    pre = d / "preproc-é.fits"
    write_preproc(pre, np.ones((5, 4)), np.ones((5, 4)), header=_header())
    pp = read_preproc(pre)
    assert pp.path == str(pre) and pp.header["CAMERA"] == "b1"
    out = write_frame(d / "frame-é.fits", input_path=pre, psf_path=d / "psf-ø.fits",
                      **_frame_arrays(nspec=2, nwave=6, ndiag=3))
    h = read_frame(out).header
    assert h["IN_IMG"] == str(pre).replace("é", "\\xe9")
    assert h["IN_PSF"].endswith("donn\\xe9es/psf-\\xf8.fits")


def test_read_model(tmp_path):
    m = RNG.normal(size=(6, 4))
    write_model(tmp_path / "model.fits", m)
    back = fio.read_model(tmp_path / "model.fits")
    assert back.dtype == np.float64 and back.shape == (6, 4)
    np.testing.assert_array_equal(back, m.astype(np.float32))
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table({"A": [1, 2]}))]).writeto(tmp_path / "t.fits")
    with pytest.raises(ValueError, match=r"t\.fits: no 2-D model image"):
        fio.read_model(tmp_path / "t.fits")
    with pytest.raises(FileNotFoundError):
        fio.read_model(tmp_path / "none.fits")


def test_frame_scores_count_non_finite_as_written():
    """A NaN flux (a bin with no unmasked pixel) is scored as the 0 the frame file holds."""
    wave = 6000.0 + 0.8 * np.arange(20)
    flux = np.full((3, 20), 10.0)
    ivar = np.full((3, 20), 4.0)
    flux[1, 5] = np.nan
    ivar[2, 7] = np.inf
    scores = fio.frame_scores(wave, flux, ivar)
    for name, (values, _) in scores.items():
        assert np.all(np.isfinite(values)), name
    total = scores["SUM_RAW_COUNT_R"][0]
    np.testing.assert_allclose(total, [200.0, 190.0, 190.0], rtol=1e-15)
    snr = scores["MEDIAN_RAW_SNR_R"][0]
    np.testing.assert_allclose(snr, 10.0 * 2.0 / np.sqrt(0.8), rtol=1e-12)
