"""The frame job as DESI's pipeline runs it: camera grid, masks in and out, fibermap, scores, HELIOCOR.

One tiny simulated frame (``_frames``: 50 fibers, 38 wavelengths) with a cosmic ray
left unmasked, a block of masked pixels on one fiber and a shuffled 500-row fibermap,
extracted once by :func:`jaxspec._pipeline.job.run_frame` with barycentric correction;
the frame is read back with jaxspec and with desispec's own reader
(``desispec.io.read_frame``, ``vet() == 0``; required in CI, skipped elsewhere without it).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os

import jax
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

import _frames
import jaxspec
from jaxspec._extraction.options import OptionError
from jaxspec._io import frames as fio
from jaxspec._io import maskbits
from jaxspec._pipeline import job

COSMIC = (10, 5668.0)  # fiber, wavelength [A] of the unmasked cosmic ray
MASKED = (30, 5681.6)  # fiber, central wavelength of the masked block (+- 2 A)
HEADER = {"CAMERA": "r0", "EXPID": 7, "FLAVOR": "science", "TARGTRA": 150.1, "TARGTDEC": 2.2,
          "MJD-OBS": 59500.3, "EXPTIME": 900.0}


def desispec_module(name: str):
    """``desispec.<name>``: required in CI, skipped elsewhere when desispec is not installed."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


def _xy(psf, fiber, wave):
    return float(np.asarray(psf.x(fiber, wave))), float(np.asarray(psf.y(fiber, wave)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny frame with the defects, its fibermap file, and the frame run_frame wrote."""
    d = tmp_path_factory.mktemp("job")
    (img, psf_path, out), = _frames.make_frames(d, 1, seed=5)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    psf = jaxspec.read_psf(psf_path)
    pre = fio.read_preproc(img)
    image, ivar = pre.image.copy(), pre.ivar.copy()
    mask = np.zeros(image.shape, np.int32)
    x, y = _xy(psf, *COSMIC)
    iy, ix = int(round(y)), int(round(x))
    image[iy - 1:iy + 2, ix] += 3000.0  # a cosmic ray, left unmasked
    x, y = _xy(psf, *MASKED)
    y0, y1 = _xy(psf, MASKED[0], MASKED[1] - 2.0)[1], _xy(psf, MASKED[0], MASKED[1] + 2.0)[1]
    mask[int(y0):int(np.ceil(y1)) + 1, int(x) - 3:int(x) + 5] = maskbits.bit("COSMIC", "ccdmask")
    # a BADREADNOISE patch elsewhere: not an extraction bit, so these pixels keep their ivar
    xb, yb = _xy(psf, 40, 5670.0)
    mask[int(yb) - 2:int(yb) + 3, int(xb) - 2:int(xb) + 3] = maskbits.bit("BADREADNOISE", "ccdmask")
    fio.write_preproc(img, image, ivar, mask=mask, header=HEADER, overwrite=True)
    rng = np.random.default_rng(1)
    order = rng.permutation(500)
    fmap = Table({"FIBER": np.arange(500, dtype=np.int32)[order],
                  "TARGETID": (np.arange(500, dtype=np.int64) * 7 + 39627000000000)[order],
                  "FIBERSTATUS": np.where(np.arange(500) % 7 == 3, 4, 0).astype(np.int32)[order]})
    fmap_path = d / "fibermap.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(fmap)]).writeto(fmap_path)
    fits.setval(fmap_path, "EXTNAME", value="FIBERMAP", ext=1)
    opts = jaxspec.FrameOptions(wavelength=_frames.WAVELENGTH, fibermap=str(fmap_path), barycentric=True,
                                extraction=jaxspec.ExtractOptions(nwavestep=20, chunk_size=8))
    fj = job.FrameJob(img, psf_path, out)
    info = job.run_frame(fj, opts)
    return dict(dir=d, img=img, psf_path=psf_path, psf=psf, out=out, info=info, fmap=fmap, opts=opts, job=fj)


@pytest.mark.slow
def test_frame_masks_cosmic_bad2dfit_and_somebadpix(tiny):
    fr = fio.read_frame(tiny["out"])
    assert fr.mask.dtype == np.uint32
    b2d, some = maskbits.bit("BAD2DFIT"), maskbits.bit("SOMEBADPIX")
    wave = fr.wave / fr.header["HELIOCOR"]  # the detector's wavelengths
    fiber, w = COSMIC
    near = np.abs(wave - w) < 1.0
    assert np.any(fr.mask[fiber, near] & b2d), fr.chi2pix[fiber, near]
    # only around the cosmic: its fiber and the neighbours its pixels touch, within a spot (~4 A)
    f_idx, w_idx = np.nonzero(fr.mask & b2d)
    assert set(f_idx) <= {fiber - 1, fiber, fiber + 1}, sorted(set(f_idx))
    assert np.all(np.abs(wave[w_idx] - w) < 4.5)
    fiber, w = MASKED
    k = int(np.argmin(np.abs(wave - w)))
    assert fr.mask[fiber, k] & some
    assert not np.any(fr.mask[fiber, np.abs(wave - w) > 4.0] & some)
    # the BADREADNOISE pixels were used: fiber 40 has no masked bins
    assert not np.any(fr.mask[40] & (some | maskbits.bit("ALLBADPIX")))


@pytest.mark.slow
def test_frame_content_as_desispec_writes_it(tiny):
    with fits.open(tiny["out"], uint=True) as h:
        assert [x.name for x in h] == ["FLUX", "IVAR", "MASK", "WAVELENGTH", "RESOLUTION", "FIBERMAP", "CHI2PIX",
                                       "SCORES"]
        hdr = h[0].header
        assert hdr["BUNIT"] == "electron/Angstrom" and h["WAVELENGTH"].header["BUNIT"] == "Angstrom"
        assert h["MASK"].data.dtype == np.uint32
        n = len(h["WAVELENGTH"].data)
        assert (hdr["NSPEC"], hdr["FIBERMIN"], hdr["SPECMIN"]) == (_frames.NSPEC, 0, 0)
        assert (hdr["WAVEMIN"], hdr["WAVEMAX"]) == (5660.0, 5660.0 + 0.8 * (n - 1))
        assert hdr["WAVESTEP"] == pytest.approx(0.8, abs=1e-12)
        assert hdr["IN_PSF"] == os.path.abspath(tiny["psf_path"]) and hdr["IN_IMG"] == os.path.abspath(tiny["img"])
        assert hdr["WAVEGRID"] == "option" and hdr["MASKRULE"] == "desispec"
        fm = Table(h["FIBERMAP"].data)
    # the fibermap file's rows of fibers 0..49 (matched by FIBER in the shuffled table), FIBERSTATUS kept
    np.testing.assert_array_equal(fm["FIBER"], np.arange(_frames.NSPEC))
    src = tiny["fmap"]
    by_fiber = {int(f): i for i, f in enumerate(src["FIBER"])}
    rows = [by_fiber[f] for f in range(_frames.NSPEC)]
    np.testing.assert_array_equal(fm["FIBERSTATUS"], np.asarray(src["FIBERSTATUS"])[rows])
    np.testing.assert_array_equal(fm["TARGETID"], np.asarray(src["TARGETID"])[rows])
    assert np.count_nonzero(fm["FIBERSTATUS"]) == 7


@pytest.mark.slow
def test_heliocor_equals_desispec_and_shifts_the_extraction_grid(tiny):
    helio = desispec_module("desispec.heliocentric")
    hdr = fits.getheader(tiny["out"])
    mjd = HEADER["MJD-OBS"] + HEADER["EXPTIME"] / 2 / 86400
    want = helio.barycentric_velocity_multiplicative_corr(HEADER["TARGTRA"], HEADER["TARGTDEC"], mjd)
    assert hdr["HELIOCOR"] == pytest.approx(want, rel=1e-12)
    assert abs(hdr["HELIOCOR"] - 1) > 1e-5
    prep = job.prepare(tiny["job"], tiny["opts"])
    np.testing.assert_allclose(prep.wave * hdr["HELIOCOR"], prep.frame_wave, rtol=1e-14)
    np.testing.assert_array_equal(fits.getdata(tiny["out"], "WAVELENGTH"), prep.frame_wave)


@pytest.mark.slow
def test_desispec_reads_the_frame(tiny):
    """desispec.io.read_frame loads it with vet() == 0; MASK decodes; SCORES are desispec's."""
    dio = desispec_module("desispec.io")
    mb = desispec_module("desispec.maskbits")
    score = desispec_module("desispec.specscore")
    fr = dio.read_frame(str(tiny["out"]))
    assert fr.vet() == 0
    assert fr.flux.shape == (_frames.NSPEC, len(fr.wave)) and fr.resolution_data.shape[0] == _frames.NSPEC
    np.testing.assert_array_equal(fr.fibers, np.arange(_frames.NSPEC))
    names = {n for v in np.unique(fr.mask) for n in mb.specmask.names(int(v))}
    assert {"BAD2DFIT", "SOMEBADPIX"} <= names
    theirs, _ = score.compute_frame_scores(fr, suffix="RAW", flux_per_angstrom=False)
    assert set(theirs) == set(fr.scores.dtype.names) == {"SUM_RAW_COUNT_B", "MEDIAN_RAW_COUNT_B",
                                                         "MEDIAN_RAW_SNR_B"}
    for k, v in theirs.items():
        np.testing.assert_allclose(fr.scores[k], v, rtol=1e-12, err_msg=k)  # both from the file's float32 values
    assert fr.scores_comments["MEDIAN_RAW_SNR_B"]


def test_default_grid_is_the_cameras(tmp_path, psf_path):
    """No --wavelength: desi_proc's grid of the camera (r: 5760-7620 A at 0.8, 2326 bins)."""
    path = psf_path("psf-r0-00067784.fits")
    img = tmp_path / "preproc.fits"
    fio.write_preproc(img, np.zeros((30, 30)), np.ones((30, 30)), header={"CAMERA": "r0", "FLAVOR": "science"})
    prep = job.prepare(job.FrameJob(str(img), path, str(tmp_path / "f.fits")), job.FrameOptions(nspec=25))
    assert prep.wave_source == "camera r"
    assert len(prep.wave) == 2326 and prep.wave[0] == 5760.0 and prep.wave[-1] == pytest.approx(7620.0, abs=1e-9)
    for arm, (lo, hi, n) in {"b": (3600.0, 5800.0, 2751), "z": (7520.0, 9824.0, 2881)}.items():
        w = job.wave_grid(None, None, camera=f"{arm}3")
        assert (len(w), w[0]) == (n, lo) and w[-1] == pytest.approx(hi, abs=1e-9)


def test_default_grid_psf_range_when_camera_unknown(tmp_path):
    psf = _frames.tiny_psf()
    psf_path = tmp_path / "psf.fits"
    jaxspec.write_psf(psf_path, psf)
    img = tmp_path / "preproc.fits"
    fio.write_preproc(img, np.zeros((20, 20)), np.ones((20, 20)), header={"FLAVOR": "science"})
    prep = job.prepare(job.FrameJob(str(img), str(psf_path), str(tmp_path / "f.fits")), job.FrameOptions())
    assert prep.wave_source == "psf"
    assert prep.wave[0] == np.ceil(psf.wmin_all) and prep.wave[1] - prep.wave[0] == pytest.approx(0.8)
    # a camera whose grid the PSF does not cover: an error that says to give --wavelength
    fio.write_preproc(img, np.zeros((20, 20)), np.ones((20, 20)), header={"CAMERA": "b1"}, overwrite=True)
    with pytest.raises(OptionError, match="camera b default grid does not fit this PSF; give --wavelength"):
        job.prepare(job.FrameJob(str(img), str(psf_path), str(tmp_path / "f.fits")), job.FrameOptions())


@pytest.mark.slow
def test_fibermap_too_short_is_an_error(tiny, tmp_path):
    short = tmp_path / "short.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(Table({"FIBER": np.arange(10)}))]).writeto(short)
    fits.setval(short, "EXTNAME", value="FIBERMAP", ext=1)
    opts = jaxspec.FrameOptions(wavelength=_frames.WAVELENGTH, fibermap=str(short))
    with pytest.raises(ValueError, match=r"--fibermap .*short.fits: FIBERMAP .* has 10 rows, too few for fibers 0..49"):
        job.prepare(tiny["job"], opts)
    with pytest.raises(OptionError, match="mask_rule"):
        jaxspec.FrameOptions(mask_rule="most")


@pytest.mark.slow
def test_tile_compressed_gzipped_preproc(tiny):
    """A preproc as DESI ships them: tile-compressed HDUs (CompImageHDU) in a .fits.gz: the same frame."""
    with fits.open(tiny["img"]) as h:
        hdr = fits.Header([c for c in h[0].header.cards if c.keyword in HEADER])
        comp = fits.HDUList([fits.PrimaryHDU(header=hdr)] + [
            fits.CompImageHDU(np.asarray(h[name].data), name=name, compression_type="GZIP_2", quantize_level=0.0)
            for name in ("IMAGE", "IVAR", "MASK")])
    img = tiny["dir"] / "preproc-r0-compressed.fits.gz"
    comp.writeto(img)
    with fits.open(img) as h:
        assert all(isinstance(h[n], fits.CompImageHDU) for n in ("IMAGE", "IVAR", "MASK"))
    out = tiny["dir"] / "out" / "frame-compressed.fits"
    job.run_frame(job.FrameJob(str(img), tiny["psf_path"], str(out)), tiny["opts"])
    a, b = _frames.frame_arrays(tiny["out"]), _frames.frame_arrays(out)
    assert a.keys() == b.keys()
    for k in a:
        if k != "header":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert b["header"]["IN_IMG"].endswith("preproc-r0-compressed.fits.gz")


# --------------------------------------------------------------------------- the exported kernel
def _computed(prep, solve_chunk=None):
    return job.compute(prep, solve_chunk=solve_chunk)


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit (NaN where NaN)


@pytest.mark.slow
def test_exported_kernel_is_the_traced_kernel_bit_for_bit(tmp_path, monkeypatch):
    """ExportedSolve exports once per key into the cache folder, later reads it; the frame's arrays are
    the traced kernel's bit for bit; damaged files, a changed source and failures fall back."""
    pytest.importorskip("flatbuffers")  # jax.export's serialisation
    from jaxspec._pipeline import exported

    (img, psf_path, out), = _frames.make_frames(tmp_path / "in", 1, seed=3)
    opts = jaxspec.FrameOptions(wavelength=_frames.WAVELENGTH, extraction=jaxspec.ExtractOptions(nwavestep=20,
                                                                                                  chunk_size=8))
    prep = job.prepare(job.FrameJob(img, psf_path, out), opts)
    ref = _computed(prep)
    cache = tmp_path / "cache"

    first = exported.ExportedSolve(cache)
    _assert_same(ref, _computed(prep, first))
    files = sorted((cache / exported.FOLDER).glob("*.jaxexport"))
    assert (first.exported, first.loaded, first.traced) == (1, 0, 0) and len(files) == 1  # one key, every chunk

    again = exported.ExportedSolve(cache)  # what the next process does: the file, no tracing
    _assert_same(ref, _computed(prep, again))
    assert (again.exported, again.loaded) == (0, 1)

    files[0].write_bytes(b"not an exported module")  # damaged: exported again, the file replaced
    damaged = exported.ExportedSolve(cache)
    _assert_same(ref, _computed(prep, damaged))
    assert (damaged.exported, damaged.loaded) == (1, 0)
    assert exported.ExportedSolve(cache)._read(files[0].stem, jax.tree_util.tree_leaves(
        (prep.psf, np.zeros(1)))) is None  # other arguments: not this file's

    # another source of jaxspec (a changed kernel): another key, another file
    monkeypatch.setattr(exported, "_source_hash", lambda: "a changed kernel")
    changed = exported.ExportedSolve(cache)
    _assert_same(ref, _computed(prep, changed))
    assert changed.exported == 1 and len(list((cache / exported.FOLDER).glob("*.jaxexport"))) == 2

    # the serialisation fails (e.g. a read-only folder): nothing kept, the same arrays
    monkeypatch.setattr(jax.export.Exported, "serialize", lambda self: (_ for _ in ()).throw(ImportError("x")))
    monkeypatch.setattr(exported, "_source_hash", lambda: "yet another")
    unkept = exported.ExportedSolve(cache)
    _assert_same(ref, _computed(prep, unkept))
    assert unkept.exported == 1 and len(list((cache / exported.FOLDER).glob("*.jaxexport"))) == 2

    # exporting fails (e.g. a custom call JAX will not export): the kernel runs traced
    monkeypatch.setattr(jax.export, "export", lambda *a, **k: (_ for _ in ()).throw(ValueError("no")))
    traced = exported.ExportedSolve(None)
    _assert_same(ref, _computed(prep, traced))
    assert (traced.exported, traced.loaded, traced.traced) == (0, 0, 1)

    # no flatbuffers (jax.export could not keep it): traced, nothing read or written
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flatbuffers"
                        else real_find_spec(name, *a))
    plain = exported.ExportedSolve(cache)
    _assert_same(ref, _computed(prep, plain))
    assert (plain.exported, plain.loaded, plain.traced) == (0, 0, 1)


def test_export_key_follows_shapes_structure_and_options():
    from jaxspec._extraction.patch import _Static
    from jaxspec._pipeline.exported import export_key

    psf = _frames.tiny_psf()
    static = _Static(nfiber=7, nbin=24, box=(80, 48), band=5, fiber_band=2, ndiag=5, decorrelate="signal")
    args = (psf, np.zeros((40, 40)), np.zeros((40, 40)), {"wave": np.zeros((8, 24))}, 0.0, 1e-4, 0.01)
    leaves, tree = jax.tree_util.tree_flatten(args)
    key = export_key(tree, leaves, static)
    assert key == export_key(tree, leaves, static) and len(key) == 64
    other_shape = jax.tree_util.tree_flatten(args[:3] + ({"wave": np.zeros((16, 24))},) + args[4:])
    assert export_key(other_shape[1], other_shape[0], static) != key
    assert export_key(tree, leaves, dataclasses.replace(static, nbin=28)) != key
    fewer = jaxspec.desi_like_psf(nspec=25, bundlesize=25, wmin=5640.0, wmax=5720.0)  # nspec is static
    other_psf = jax.tree_util.tree_flatten((fewer,) + args[1:])
    assert export_key(other_psf[1], other_psf[0], static) != key
    with jax.numpy_dtype_promotion("standard"):
        assert export_key(tree, leaves, static) != key
