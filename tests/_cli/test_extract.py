"""The ``jaxspec`` command line: ``jaxspec extract`` end to end, and bad input.

Runs ``jaxspec._cli.main([...])`` in-process (one compiled extraction shared by the
tests of a module); one subprocess test runs the installed console script.

* a full-CCD preproc simulated from ``psf-r0-00067784.fits`` (fibers 25-74, 201
  wavelengths), extracted by the command and compared with :func:`jaxspec.extract`
  on the same input, with the truth, and with the frame format desispec reads;
* the same image with a dead fiber, a dead bundle and NaN / inf / negative-ivar
  pixels: ivar 0 and MASK set there, no NaN anywhere, warnings with counts;
* specter's reference cases placed into a full CCD (ivar 0 elsewhere): the
  command agrees with REF_FLUX / REF_IVAR / REF_RESOLUTION;
* every bad input: exit code 2, a message naming the file / HDU / option, no
  output and no temporary file left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

import jaxspec
from jaxspec._cli import common as _cli_common
from jaxspec._cli import main as _cli
from jaxspec._io import frames as _frameio
from jaxspec._cli.main import main

PSF_NAME = "psf-r0-00067784.fits"
SPECMIN, NSPEC = 25, 50  # two bundles
WAVE_OPT = "6500,6660,0.8"  # 201 wavelengths
WAVE = 6500.0 + 0.8 * np.arange(201)
CHUNK = 10  # --chunk-size: 5 chunks of patches here, so the progress bar moves
DEAD_FIBER = 30
DEAD_BUNDLE = range(50, 75)
REF_CASES = ["specter-r0-67784-f000-024.fits", "specter-r0-67784-f100-124.fits"]


# --------------------------------------------------------------------------- helpers
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(f"{r.levelname} {r.getMessage()}" for r in self.records)


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def _run(argv, stderr=None) -> dict:
    """main(argv) with stdout, stderr and the jaxspec log captured."""
    out = io.StringIO()
    err = io.StringIO() if stderr is None else stderr
    handler = _Records()
    logger = logging.getLogger("jaxspec")
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in argv])
    finally:
        logger.removeHandler(handler)
    return dict(rc=rc, out=out.getvalue(), err=err.getvalue(), log=handler.text)


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def _pulls(resolution, flux, ivar, truth):
    conv = np.asarray(jaxspec.apply_resolution(resolution, truth))
    return ((flux - conv) * np.sqrt(ivar))[:, 10:-10]


# --------------------------------------------------------------------------- full-CCD simulation
@pytest.fixture(scope="module")
def sim(tmp_path_factory, psf_path):
    """A full-size preproc (fibers 25-74 lit) made by ``jaxspec simulate``, plus a FIBERMAP."""
    psf = psf_path(PSF_NAME)
    d = tmp_path_factory.mktemp("cli_sim")
    pre = d / "preproc-r0-00000001.fits"
    res = _run(["simulate", "--psf", psf, "-o", pre, "-s", SPECMIN, "-n", NSPEC, "-w", WAVE_OPT,
                "--seed", 11, "--quiet"])
    assert res["rc"] == 0, res["err"]
    assert f"{NSPEC} fibers x {len(WAVE)} wavelengths" in res["out"]
    # a DESI-like fibermap of the whole spectrograph: 500 rows, FIBER 0..499
    fmap = Table({"FIBER": np.arange(500, dtype=np.int32),
                  "TARGETID": np.arange(500, dtype=np.int64) * 7 + 39627000000000,
                  "OBJTYPE": np.array(["TGT"] * 500)})
    fits.append(pre, fits.table_to_hdu(fmap).data, header=fits.Header([("EXTNAME", "FIBERMAP")]))
    return dict(psf=psf, pre=pre, dir=d, fibermap=fmap, psf_model=jaxspec.read_psf(psf))


@pytest.fixture(scope="module")
def e2e(sim):
    """``jaxspec extract`` on the simulated preproc, and jaxspec.extract on the same input."""
    out = sim["dir"] / "frame-r0-00000001.fits"
    res = _run(["extract", "-i", sim["pre"], "-p", sim["psf"], "-o", out, "-s", SPECMIN, "-n", NSPEC,
                "-w", WAVE_OPT, "--chunk-size", CHUNK])
    pre = jaxspec.read_preproc(sim["pre"])
    ex = jaxspec.extract(pre.image, pre.ivar, sim["psf_model"], WAVE, specmin=SPECMIN, nspec=NSPEC,
                         chunk_size=CHUNK)
    return dict(res=res, path=out, pre=pre, ex=ex)


def test_extract_end_to_end_matches_library(e2e):
    res = e2e["res"]
    assert res["rc"] == 0, res["err"]
    fr = jaxspec.read_frame(e2e["path"])
    ex = e2e["ex"]
    np.testing.assert_array_equal(fr.wave, np.asarray(ex.wave))
    # the file holds the library's numbers, rounded to float32
    for name in ("flux", "ivar", "resolution", "chi2pix"):
        want = np.asarray(getattr(ex, name)).astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(getattr(fr, name), want, rtol=1e-6, atol=1e-30, err_msg=name)
    assert np.all(fr.ivar[:, 5:-5] > 0)
    assert np.all(fr.mask[fr.ivar > 0] == 0)


def test_extract_end_to_end_pulls_against_truth(e2e):
    fr = jaxspec.read_frame(e2e["path"])
    truth = e2e["pre"].truth
    assert truth["specmin"] == SPECMIN
    np.testing.assert_allclose(truth["wave"], fr.wave, atol=1e-9)
    pulls = _pulls(fr.resolution, fr.flux, fr.ivar, truth["flux"])
    assert abs(pulls.mean()) < 0.05, pulls.mean()
    assert 0.95 < pulls.std() < 1.05, pulls.std()


def test_extract_frame_format(e2e):
    """HDUs, dtypes and shapes of the DESI frame format (as desispec.io.read_frame reads it)."""
    with fits.open(e2e["path"], uint=True) as hd:
        assert [h.name for h in hd] == ["FLUX", "IVAR", "MASK", "WAVELENGTH", "RESOLUTION", "FIBERMAP", "CHI2PIX",
                                         "SCORES"]
        for name in ("FLUX", "IVAR", "RESOLUTION", "CHI2PIX"):
            assert hd[name].data.dtype.kind == "f" and hd[name].data.dtype.itemsize == 4, name
        assert hd["MASK"].data.dtype == np.uint32
        assert hd["WAVELENGTH"].data.dtype.itemsize == 8
        assert hd["FLUX"].data.shape == (NSPEC, len(WAVE))
        assert hd["RESOLUTION"].data.shape == (NSPEC, 11, len(WAVE))
        hd.verify("exception")
        assert hd[0].verify_checksum() == 1 and hd["RESOLUTION"].verify_datasum() == 1


def test_extract_frame_read_by_desispec(e2e):
    """desispec's own reader: vet() == 0, the fibers of the sliced FIBERMAP, MASK and SCORES as desispec's."""
    import importlib

    def need(name):  # required in CI; skipped elsewhere without desispec
        return importlib.import_module(name) if os.environ.get("CI") else pytest.importorskip(name)

    dio, score = need("desispec.io"), need("desispec.specscore")
    fr = dio.read_frame(str(e2e["path"]))
    assert fr.vet() == 0
    np.testing.assert_array_equal(fr.fibers, np.arange(SPECMIN, SPECMIN + NSPEC))
    assert fr.meta["BUNIT"] == "electron/Angstrom" and fr.meta["WAVEGRID"] == "option"
    theirs, _ = score.compute_frame_scores(fr, suffix="RAW", flux_per_angstrom=False)
    assert set(theirs) == set(fr.scores.dtype.names) == {"SUM_RAW_COUNT_R", "MEDIAN_RAW_COUNT_R", "MEDIAN_RAW_SNR_R"}
    for k, v in theirs.items():
        np.testing.assert_allclose(fr.scores[k], v, rtol=1e-12, err_msg=k)


def test_extract_header_keys_carried_and_recorded(e2e, sim):
    h = jaxspec.read_frame(e2e["path"]).header
    # identifying keys of the input, as `jaxspec simulate` wrote them
    assert (h["CAMERA"], h["FLAVOR"], h["NIGHT"], h["EXPID"], h["EXPTIME"]) == ("r0", "science", 20201214, 1, 900.0)
    # the version, the inputs and the options
    assert h["DEPNAM00"] == "jaxspec" and h["DEPVER00"] == jaxspec.__version__
    assert h["IN_IMG"] == str(sim["pre"]) and h["IN_PSF"] == str(sim["psf"])
    assert (h["SPECMIN"], h["NSPEC"], h["SPECMAX"], h["FIBERMIN"]) == (SPECMIN, NSPEC, SPECMIN + NSPEC, SPECMIN)
    assert h["WAVEMIN"] == pytest.approx(WAVE[0]) and h["WAVEMAX"] == pytest.approx(WAVE[-1])
    assert h["WAVESTEP"] == pytest.approx(0.8)
    assert (h["BUNDLSZ"], h["NSUBBUND"], h["NWAVSTEP"]) == (25, 5, 50)
    assert (h["WPADFRAC"], h["PPADFRAC"], h["REGULARZ"]) == (0.2, 0.8, 0.0)
    assert h["PSFERR"] == pytest.approx(sim["psf_model"].psferr)
    assert h["DECORREL"] == "signal"
    assert h["BUNIT"] == "electron/Angstrom"


def test_extract_fibermap_passed_through(e2e, sim):
    fm = jaxspec.read_frame(e2e["path"]).fibermap
    assert len(fm) == NSPEC
    np.testing.assert_array_equal(fm["FIBER"], np.arange(SPECMIN, SPECMIN + NSPEC))
    np.testing.assert_array_equal(fm["TARGETID"], sim["fibermap"]["TARGETID"][SPECMIN:SPECMIN + NSPEC])
    assert list(fm["OBJTYPE"][:2]) == ["TGT", "TGT"]


def test_extract_summary_and_quiet_progress(e2e):
    res = e2e["res"]
    assert re.search(
        rf"^jaxspec extract: 1 frame, {NSPEC} spectra x {len(WAVE)} wavelengths in [0-9.]+ s "
        rf"\([0-9.]+ spectra/s\) -> {re.escape(str(e2e['path']))}$", res["out"], re.M), res["out"]
    # stderr is no terminal here: no progress bar, and nothing else but logging
    assert "patch" not in res["err"] and "%|" not in res["err"] and "\r" not in res["err"]
    assert "extracting fibers 25-74, 201 wavelengths 6500.0-6660.0 A" in res["log"]
    assert f"wrote {e2e['path']}" in res["log"]
    assert "WARNING" not in res["log"], res["log"]  # a clean input gives no warnings
    assert _leftovers(e2e["path"].parent) == []


def test_extract_refuses_to_overwrite(e2e, sim):
    before = _digest(e2e["path"])
    res = _run(["extract", "-i", sim["pre"], "-p", sim["psf"], "-o", e2e["path"], "-s", SPECMIN,
                "-n", NSPEC, "-w", WAVE_OPT])
    assert res["rc"] == 2
    assert f"{e2e['path']} already exists; use --overwrite" in res["err"]
    assert _digest(e2e["path"]) == before
    # an output that is the input file is refused even with --overwrite
    pre_before = _digest(sim["pre"])
    res = _run(["extract", "-i", sim["pre"], "-p", sim["psf"], "-o", sim["pre"], "-s", SPECMIN,
                "-n", NSPEC, "-w", WAVE_OPT, "--overwrite"])
    assert res["rc"] == 2 and "is the --input file" in res["err"]
    res = _run(["extract", "-i", sim["pre"], "-p", sim["psf"], "-o", e2e["path"], "-m", e2e["path"],
                "-s", SPECMIN, "-n", NSPEC, "-w", WAVE_OPT, "--overwrite"])
    assert res["rc"] == 2 and "--model" in res["err"] and "is the --output file" in res["err"]
    assert _digest(sim["pre"]) == pre_before and _digest(e2e["path"]) == before
    assert _leftovers(sim["dir"]) == []


@pytest.fixture(scope="module")
def masked(sim, e2e):
    """The simulated image with a dead fiber, a dead bundle and NaN / inf / negative-ivar pixels,
    written raw (not through write_preproc, which would clean it), extracted with --overwrite,
    --model and a (fake) terminal on stderr."""
    psf = sim["psf_model"]
    pre = e2e["pre"]
    image = pre.image.copy()
    ivar = pre.ivar.copy()
    ny, nx = image.shape
    rows = np.arange(ny)
    wext = np.linspace(WAVE[0] - 20, WAVE[-1] + 20, 400)
    cols = np.arange(nx)[None, :]

    def kill_between(xlo, xhi):
        ylo, yhi = (int(v) for v in np.asarray(psf.y(SPECMIN, np.array([wext[0], wext[-1]]))))
        lo = np.interp(rows, np.asarray(psf.y(SPECMIN, wext)), xlo)[:, None]
        hi = np.interp(rows, np.asarray(psf.y(SPECMIN, wext)), xhi)[:, None]
        band = (cols > lo) & (cols < hi) & (rows[:, None] > ylo - 40) & (rows[:, None] < yhi + 40)
        ivar[band] = 0.0

    x = {f: np.asarray(psf.x(f, wext)) for f in (DEAD_FIBER, DEAD_BUNDLE[0], DEAD_BUNDLE[-1])}
    # spots are 17 columns wide: +-9 columns kill every pixel of a fiber (half of each neighbour's)
    kill_between(x[DEAD_FIBER] - 9.0, x[DEAD_FIBER] + 9.0)
    kill_between(x[DEAD_BUNDLE[0]] - 9.0, x[DEAD_BUNDLE[-1]] + 30.0)
    # bad pixels on the good fibers' traces: 2 NaN + 1 inf in IMAGE, 1 NaN in IVAR, 2 negative IVAR
    ybad = int(np.asarray(psf.y(40, WAVE[100])))
    xbad = int(np.asarray(psf.x(40, WAVE[100])))
    image[ybad, xbad] = np.nan
    image[ybad + 1, xbad] = np.nan
    image[ybad + 2, xbad] = np.inf
    ivar[ybad + 3, xbad] = np.nan
    ivar[ybad + 4, xbad] = -1.0
    ivar[ybad + 5, xbad] = -2.0
    path = sim["dir"] / "preproc-masked.fits"
    with fits.open(sim["pre"]) as src:
        hdus = fits.HDUList([fits.PrimaryHDU(image.astype(np.float32), header=src[0].header),
                             fits.ImageHDU(ivar.astype(np.float32), name="IVAR"),
                             fits.ImageHDU(np.zeros(image.shape, np.int32), name="MASK")])
        hdus.writeto(path)
    out = sim["dir"] / "frame-masked.fits"
    model = sim["dir"] / "model-masked.fits"
    out.write_bytes(b"an old frame, replaced with --overwrite")
    tty = _FakeTTY()
    res = _run(["extract", "-i", path, "-p", sim["psf"], "-o", out, "-m", model, "-s", SPECMIN, "-n", NSPEC,
                "-w", WAVE_OPT, "--chunk-size", CHUNK, "--overwrite"], stderr=tty)
    return dict(res=res, path=out, model=model, image_shape=image.shape)


def test_masked_fiber_and_bundle_give_ivar_zero_without_nan(masked):
    res = masked["res"]
    assert res["rc"] == 0, res["err"]
    fr = jaxspec.read_frame(masked["path"])  # the old file was replaced
    for name in ("flux", "ivar", "resolution", "chi2pix"):
        assert np.all(np.isfinite(getattr(fr, name))), name
    dead = [DEAD_FIBER - SPECMIN] + [f - SPECMIN for f in DEAD_BUNDLE]
    assert np.all(fr.ivar[dead] == 0)
    assert np.all(fr.flux[dead] == 0) or np.abs(fr.flux[dead]).max() < 1e-6 * np.abs(fr.flux).max()
    alive = [i for i in range(NSPEC) if i not in dead]
    assert np.all(fr.ivar[alive][:, 5:-5] > 0)
    # the neighbours of the dead fiber lost half their pixels, fiber 49 (bundle gap) none
    med = np.median(fr.ivar[:, 10:-10], axis=1)
    assert med[DEAD_FIBER - SPECMIN - 1] < 0.8 * med[DEAD_FIBER - SPECMIN - 3]
    assert med[DEAD_BUNDLE[0] - 1 - SPECMIN] > 0.8 * med[DEAD_BUNDLE[0] - 3 - SPECMIN]
    # MASK has bits other than SOMEBADPIX / BAD2DFIT (desispec's flags of bins that keep their
    # ivar) exactly where ivar is 0; the dead fiber's neighbours, half masked, get SOMEBADPIX
    from jaxspec._io import maskbits

    kept = maskbits.bit("SOMEBADPIX") | maskbits.bit("BAD2DFIT")
    np.testing.assert_array_equal((fr.mask & ~np.uint32(kept)) != 0, fr.ivar == 0)
    assert np.any(fr.mask[DEAD_FIBER - SPECMIN - 1] & maskbits.bit("SOMEBADPIX"))
    assert np.all(fr.mask[dead] & _frameio.SPECMASK_ALLBADPIX)
    assert f"26 of {NSPEC} fibers have no unmasked pixels" in res["log"]
    assert f"{DEAD_FIBER}, {DEAD_BUNDLE[0]}-{DEAD_BUNDLE[-1]}" in res["log"]


def test_masked_input_pixels_reported_with_counts(masked):
    log = masked["res"]["log"]
    assert re.search(r"WARNING .*preproc-masked.fits.*: 4 pixel\(s\) with NaN or inf in IMAGE or IVAR masked", log), log
    assert re.search(r"WARNING .*preproc-masked.fits.*: 2 pixel\(s\) with negative IVAR masked", log), log


def test_model_image_and_progress_bar_on_a_terminal(masked):
    with fits.open(masked["model"]) as hd:
        assert hd[0].name == "MODEL" and hd[0].data.shape == masked["image_shape"]
        assert hd[0].data.dtype.itemsize == 4 and hd[0].header["CAMERA"] == "r0"
        assert np.isfinite(hd[0].data).all() and hd[0].data.max() > 100
    err = masked["res"]["err"]
    assert "preproc-masked.fits" in err and "patch" in err and "100%" in err, err
    assert _leftovers(masked["path"].parent) == []


@pytest.mark.parametrize("quiet,tty,shown", [(False, True, True), (True, True, False), (False, False, False)])
def test_progress_bar_only_on_a_terminal_without_quiet(monkeypatch, quiet, tty, shown):
    err = _FakeTTY() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = _cli_common.Progress("frame.fits", quiet)
    for done in (10, 20, 30):
        bar(done, 30)
    bar.close()
    assert ("30/30" in err.getvalue()) is shown, err.getvalue()
    assert (err.getvalue() == "") is not shown


def test_desispec_reads_the_frame(e2e, sim):
    """desispec's own reader (optional: skipped unless desispec is installed)."""
    dio = pytest.importorskip("desispec.io")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Frame did not pass simple vetting test" would fail here
        frame = dio.read_frame(str(e2e["path"]))
    ours = jaxspec.read_frame(e2e["path"])
    np.testing.assert_array_equal(frame.flux, ours.flux)
    np.testing.assert_array_equal(frame.ivar, ours.ivar)
    np.testing.assert_array_equal(frame.wave, ours.wave)
    np.testing.assert_array_equal(frame.mask, ours.mask)
    np.testing.assert_array_equal(frame.resolution_data, ours.resolution)
    np.testing.assert_array_equal(frame.chi2pix, ours.chi2pix)
    np.testing.assert_array_equal(frame.fibers, np.arange(SPECMIN, SPECMIN + NSPEC))
    assert frame.meta["CAMERA"].strip() == "r0" and frame.meta["FIBERMIN"] == SPECMIN
    assert frame.R.shape == (NSPEC,) and frame.R[0].shape == (len(WAVE), len(WAVE))
    assert frame.vet() == 0


# --------------------------------------------------------------------------- reference cases
@pytest.mark.slow
@pytest.mark.parametrize("name", REF_CASES)
def test_reference_case_in_full_ccd(name, ref_path, psf_path, tmp_path):
    """specter's reference sub-image placed at XMIN/YMIN of a full CCD (ivar 0 elsewhere).

    The second case also checks --loglevel WARNING, --device cpu, a camera that is not the
    PSF's and a FIBERMAP too short for the fibers (warned about, left out of the frame).
    """
    with fits.open(ref_path(name)) as h:
        hdr = h[0].header
        case = {k: np.asarray(h[k].data, dtype=np.float64) for k in
                ("IMAGE", "IVAR", "WAVELENGTH", "TRUTH", "REF_FLUX", "REF_IVAR", "REF_RESOLUTION")}
        hdr = dict(hdr)
    psf = psf_path(hdr["PSF"])
    p = jaxspec.read_psf(psf)
    image, ivar = _frameio.embed_subimage(case["IMAGE"], case["IVAR"], (hdr["XMIN"], hdr["YMIN"]),
                                          (p.npix_y, p.npix_x))
    odd = name == REF_CASES[1]
    pre = tmp_path / "preproc.fits"
    _frameio.write_preproc(pre, image, ivar, header={"CAMERA": "b1" if odd else "r0", "FLAVOR": "science"},
                           fibermap=Table({"FIBER": np.arange(10)}) if odd else None)
    w = case["WAVELENGTH"]
    out = tmp_path / "frame.fits"
    extra = ["--loglevel", "WARNING", "--device", "cpu", "--allow-camera-mismatch"] if odd else []
    res = _run(["extract", "-i", pre, "-p", psf, "-o", out, "-s", hdr["SPECMIN"], "-n", hdr["NSPEC"],
                "-w", f"{float(w[0])!r},{float(w[-1])!r},0.8", "--nwavestep", hdr["WAVESIZE"],
                "--nsubbundles", hdr["NSUB"], "--chunk-size", CHUNK, "--quiet", *extra])
    assert res["rc"] == 0, res["err"]
    fr = jaxspec.read_frame(out)
    np.testing.assert_allclose(fr.wave, w, rtol=0, atol=1e-9)
    dsig = np.abs(fr.flux - case["REF_FLUX"]) * np.sqrt(case["REF_IVAR"])
    assert np.mean(dsig < 0.01) >= 0.999, np.quantile(dsig, 0.999)
    assert dsig.max() < 0.05, dsig.max()
    rel = np.abs(fr.ivar / case["REF_IVAR"] - 1)
    assert np.mean(rel < 0.01) >= 0.999
    dres = np.abs(fr.resolution - case["REF_RESOLUTION"]).max(axis=1)
    assert np.mean(dres < 1e-3) >= 0.999
    assert fr.resolution.shape == case["REF_RESOLUTION"].shape
    pulls = _pulls(fr.resolution, fr.flux, fr.ivar, case["TRUTH"])
    assert abs(pulls.mean()) < 0.03 and 0.95 < pulls.std() < 1.05
    if odd:
        assert "INFO" not in res["log"]
        assert f"is camera b1 but --psf {psf} is camera r0" in res["log"]
        assert "FIBERMAP of" in res["log"] and "has 10 rows, too few for fibers 100..124" in res["log"]
        assert fr.fibermap is None and fr.header["CAMERA"] == "b1"
    else:
        assert "WARNING" not in res["log"], res["log"]
        assert "extracting fibers 0-24" in res["log"]


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    """Small broken preproc files (each refused before any extraction)."""
    d = tmp_path_factory.mktemp("cli_bad")
    files = {}
    files["text"] = d / "notes.fits"
    files["text"].write_text("SIMPLE? no, this is a text file\n" * 10)
    files["noivar"] = d / "noivar.fits"
    hdus = fits.HDUList([fits.PrimaryHDU(np.ones((20, 30), np.float32))])
    hdus[0].header["EXTNAME"] = "IMAGE"
    hdus.writeto(files["noivar"])
    files["shape"] = d / "shape.fits"
    hdus = fits.HDUList([fits.PrimaryHDU(np.ones((20, 30), np.float32)),
                         fits.ImageHDU(np.ones((30, 20), np.float32), name="IVAR")])
    hdus[0].header["EXTNAME"] = "IMAGE"
    hdus.writeto(files["shape"])
    files["huge"] = d / "huge.fits"
    _frameio.write_preproc(files["huge"], np.zeros((5000, 10)), np.ones((5000, 10)))
    return files


def _bad(argv_extra, tmp_path, psf, input=None, expect=(), output=None):
    """Run extract with a bad option or input: exit 2, messages in stderr, nothing written."""
    out = output or tmp_path / "frame.fits"
    argv = ["extract", "-i", input, "-p", psf, "-o", out, "-n", 25, *argv_extra]
    res = _run(argv)
    assert res["rc"] == 2, (res["rc"], res["err"])
    assert res["err"].startswith("jaxspec extract: error: "), res["err"]
    for text in expect:
        assert text in res["err"], (text, res["err"])
    assert "Traceback" not in res["err"]
    assert not Path(out).exists()
    if Path(out).parent.exists():
        assert _leftovers(Path(out).parent) == []
    return res


def test_missing_input_and_psf(tmp_path, psf_path, small_inputs):
    psf = psf_path(PSF_NAME)
    _bad([], tmp_path, psf, input=tmp_path / "nope.fits", expect=["--input", "nope.fits", "no such file"])
    _bad([], tmp_path, tmp_path / "nopsf.fits", input=small_inputs["shape"],
         expect=["--psf", "nopsf.fits", "no such file"])
    # a PSF file that is not FITS
    _bad([], tmp_path, small_inputs["text"], input=small_inputs["shape"],
         expect=["notes.fits", "not a readable FITS file"])


def test_unreadable_input_files(tmp_path, psf_path, small_inputs):
    psf = psf_path(PSF_NAME)
    _bad([], tmp_path, psf, input=small_inputs["text"], expect=["notes.fits", "not a readable FITS file"])
    _bad([], tmp_path, psf, input=small_inputs["noivar"], expect=["noivar.fits", "missing IVAR HDU", "IMAGE"])
    _bad([], tmp_path, psf, input=small_inputs["shape"],
         expect=["shape.fits", "IVAR HDU shape (30, 20)", "IMAGE HDU shape (20, 30)"])
    _bad([], tmp_path, psf, input=small_inputs["huge"],
         expect=["--input", "huge.fits", "5000 x 10", "larger than", PSF_NAME])
    _bad([], tmp_path, psf, input=tmp_path, expect=["is a directory"])


def test_wavelengths_outside_the_psf(tmp_path, psf_path, small_inputs):
    psf = psf_path(PSF_NAME)
    res = _bad(["-w", "3000,3100,0.8"], tmp_path, psf, input=small_inputs["shape"],
               expect=["--wavelength", "3000.00-3100.00 A fall outside the PSF's range", "choose wmin,wmax inside"])
    assert "shape.fits" not in res["err"]  # refused before the input was read
    _bad(["-w", "6000,5000,0.8"], tmp_path, psf, input=small_inputs["shape"],
         expect=["--wavelength '6000,5000,0.8'", "wmin < wmax"])
    _bad(["-w", "6000,6100"], tmp_path, psf, input=small_inputs["shape"], expect=["--wavelength", "wmin,wmax,dw"])
    _bad(["-w", "a,b,c"], tmp_path, psf, input=small_inputs["shape"], expect=["--wavelength 'a,b,c'", "three numbers"])


def test_fibers_beyond_the_psf_and_bundle_options(tmp_path, psf_path, small_inputs):
    psf = psf_path(PSF_NAME)
    inp = small_inputs["shape"]
    _bad(["-s", 490], tmp_path, psf, input=inp, expect=["--specmin 490 --nspec 25", "fibers 490..514",
                                                          "fibers 0..499", "use --nspec 10 or less"])
    _bad(["-s", 500], tmp_path, psf, input=inp, expect=["--specmin 500", "fibers 0..499"])
    _bad(["-s", -1], tmp_path, psf, input=inp, expect=["--specmin -1"])
    # partial bundles (-n 30) and subbundles that do not divide the bundle (--nsubbundles 4) are
    # extracted as specter does (issue 14; tests/_extraction/test_specter_edges.py); more
    # subbundles than fibers in a bundle is refused
    _bad(["--nsubbundles", 26], tmp_path, psf, input=inp, expect=["--nsubbundles 26", "at most --bundlesize (25)"])
    _bad(["--bundlesize", 0], tmp_path, psf, input=inp, expect=["--bundlesize 0", "positive"])
    _bad(["--nsubbundles", 0], tmp_path, psf, input=inp, expect=["--nsubbundles 0", "positive"])
    _bad(["--nwavestep", 0], tmp_path, psf, input=inp, expect=["--nwavestep 0", "positive"])
    _bad(["--wavepad-frac", -0.1], tmp_path, psf, input=inp, expect=["--wavepad-frac -0.1", ">= 0"])
    _bad(["--pixpad-frac", "nan"], tmp_path, psf, input=inp, expect=["--pixpad-frac nan"])
    _bad(["-r", -1], tmp_path, psf, input=inp, expect=["--regularize -1.0", ">= 0"])
    _bad(["--psferr", -0.01], tmp_path, psf, input=inp, expect=["--psferr -0.01"])
    _bad(["--chunk-size", 0], tmp_path, psf, input=inp, expect=["--chunk-size 0"])


def test_argparse_errors_exit_2(capsys):
    for argv in (["extract"], ["extract", "-i", "a", "-p", "b", "-o", "c", "--decorrelate", "cols"],
                 ["extract", "-i", "a", "-p", "b", "-o", "c", "-n", "many"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: -i/--input, -p/--psf, -o/--output" in err
    assert "--decorrelate: invalid choice: 'cols'" in err
    assert "-n/--nspec: invalid int value: 'many'" in err


def test_output_directory_missing_or_read_only(tmp_path, psf_path, small_inputs, monkeypatch):
    psf = psf_path(PSF_NAME)
    _bad([], tmp_path, psf, input=small_inputs["shape"], output=tmp_path / "no" / "such" / "frame.fits",
         expect=["output directory", "no/such", "does not exist"])
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access  # root can write anywhere: fake the permission probe
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if os.fspath(p) == str(ro)
                        else real_access(p, mode, *a, **k))
    _bad([], tmp_path, psf, input=small_inputs["shape"], output=ro / "frame.fits",
         expect=["output directory", str(ro), "not writable"])
    res = _run(["extract", "-i", small_inputs["shape"], "-p", psf, "-o", tmp_path / "f.fits",
                "-m", ro / "model.fits", "-n", 25])
    assert res["rc"] == 2 and "not writable" in res["err"] and "model.fits" in res["err"]
    assert not (tmp_path / "f.fits").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_for_real(tmp_path, psf_path, small_inputs):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        _bad([], tmp_path, psf_path(PSF_NAME), input=small_inputs["shape"], output=ro / "frame.fits",
             expect=["not writable"])
    finally:
        ro.chmod(stat.S_IRWXU)


def test_device_gpu_without_a_gpu(tmp_path, psf_path, small_inputs):
    import jax

    try:
        if jax.devices("gpu"):
            pytest.skip("this machine has a GPU")
    except Exception:
        pass
    _bad(["--device", "gpu"], tmp_path, psf_path(PSF_NAME), input=small_inputs["shape"],
         expect=["--device gpu: no GPU is available to JAX", "--device cpu"])


def test_simulate_refuses_existing_output(tmp_path, psf_path):
    out = tmp_path / "pre.fits"
    out.write_bytes(b"keep me")
    res = _run(["simulate", "--psf", psf_path(PSF_NAME), "-o", out, "-n", 25])
    assert res["rc"] == 2 and "already exists; use --overwrite" in res["err"]
    assert out.read_bytes() == b"keep me" and _leftovers(tmp_path) == []


def test_console_script_help_and_version():
    exe = shutil.which("jaxspec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.skip("the jaxspec console script is not installed")
    res = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"jaxspec {jaxspec.__version__}"
    res = subprocess.run([exe, "extract", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for opt in ("-i INPUT, --input INPUT", "-p PSF, --psf PSF", "-o OUTPUT, --output OUTPUT", "-m MODEL, --model",
                "-w WAVELENGTH, --wavelength", "-s SPECMIN, --specmin", "-n NSPEC, --nspec", "--bundlesize",
                "--nsubbundles", "--nwavestep", "--wavepad-frac", "--pixpad-frac", "-r REGULARIZE, --regularize",
                "--psferr", "--decorrelate {signal,full}", "--overwrite", "--loglevel", "--device {cpu,gpu}",
                "--quiet"):
        assert opt in res.stdout, opt


# --------------------------------------------------------------------------- desi_extract_spectra's options
#: Every option of desispec 0.70's desi_extract_spectra (scripts/extract.py parse()), with a value, and
#: what jaxspec makes of it: attributes of the parsed arguments and of the FrameOptions, or a refusal.
DESI_OPTIONS = [
    (["-i", "IN"], {"input": "IN"}, {}),
    (["-f", "FMAP"], {"fibermap": "FMAP"}, {"fibermap": "FMAP"}),
    (["-p", "PSF"], {"psf": "PSF"}, {}),
    (["-o", "OUT"], {"output": "OUT"}, {}),
    (["-m", "MODEL"], {"model": "MODEL"}, {}),
    (["-w", "5760,7620,0.8"], {}, {"wavelength": (5760.0, 7620.0, 0.8)}),
    (["-s", "25"], {}, {"specmin": 25}),
    (["-n", "50"], {}, {"nspec": 50}),
    (["-r", "0.5"], {}, {"extraction.regularize": 0.5}),
    (["--bundlesize", "20"], {}, {"extraction.bundlesize": 20}),
    (["--nsubbundles", "4"], {}, {"extraction.nsubbundles": 4}),
    (["--nwavestep", "30"], {}, {"extraction.nwavestep": 30}),
    (["-v"], {"loglevel": "DEBUG"}, {}),
    (["--mpi"], {"mpi": "on"}, {}),
    (["--decorrelate-fibers"], {}, {"extraction.decorrelate": "full"}),
    (["--no-scores"], {}, {"scores": False}),
    (["--psferr", "0.04"], {}, {"extraction.psferr": 0.04}),
    (["--barycentric-correction"], {}, {"barycentric": True}),
    (["--use-specter"], "jaxspec is the extraction", None),
    (["--no-gpu"], {"device": "cpu"}, {}),
    (["--pixpad-frac", "0.5"], {}, {"extraction.pixpad_frac": 0.5}),
    (["--wavepad-frac", "0.1"], {}, {"extraction.wavepad_frac": 0.1}),
    (["--fibermap-first-row", "3"], "matched by their FIBER column", None),  # desispec < 0.70
]


def test_every_desi_extract_spectra_option(tmp_path, capsys):
    """Each option of desi_extract_spectra: accepted with its meaning, or refused saying what to use instead."""
    fmap = tmp_path / "FMAP"
    fmap.write_bytes(b"")
    base = ["extract", "-i", "IN", "-p", "PSF", "-o", "OUT"]
    defaults = _cli.build_parser().parse_args(base)
    d_opts = _cli_common.frame_options(defaults)
    assert (defaults.loglevel, defaults.mpi, d_opts.scores, d_opts.barycentric, d_opts.fibermap) == \
        ("INFO", "auto", True, False, None)
    assert (d_opts.extraction.nsubbundles, d_opts.extraction.bundlesize, d_opts.extraction.nwavestep) == (5, 25, 50)
    assert d_opts.wavelength is None and d_opts.mask_rule == "desispec"  # the camera's grid; desispec's mask bits
    for opt, parsed, options in DESI_OPTIONS:
        argv = base + [str(fmap) if v == "FMAP" else v for v in opt]
        if isinstance(parsed, str):  # refused: argparse's exit 2 with the message
            with pytest.raises(SystemExit) as exc:
                _cli.build_parser().parse_args(argv)
            assert exc.value.code == 2
            err = capsys.readouterr().err
            assert f"{opt[0]} is not supported: " in err and parsed in err, err
            continue
        args = _cli.build_parser().parse_args(argv)
        fo = _cli_common.frame_options(args)
        for k, v in parsed.items():
            assert getattr(args, k) == (str(fmap) if v == "FMAP" else v), (opt, k)
        for k, v in options.items():
            obj = fo
            for part in k.split("."):
                obj = getattr(obj, part)
            assert obj == (str(fmap) if v == "FMAP" else v), (opt, k, obj)
    args = _cli.build_parser().parse_args(base + ["--strict-mask"])
    assert _cli_common.frame_options(args).mask_rule == "any"


# --------------------------------------------------------------------------- a cold process
def test_backend_start_errors_are_raised_in_the_main_thread(monkeypatch):
    """JAX's backend starts in a thread (BackendStart); its errors come out of wait(), as before."""
    import jax

    def fail(*a, **k):
        raise RuntimeError("the device could not start")

    monkeypatch.setattr(jax, "device_put", fail)
    start = _cli_common.BackendStart(None)
    with pytest.raises(RuntimeError, match="the device could not start"):
        start.wait()
    monkeypatch.setattr(jax, "devices", fail)
    start = _cli_common.BackendStart("gpu")
    with pytest.raises(_cli_common.UsageError, match="--device gpu: no GPU is available to JAX .*--device cpu"):
        start.wait()


@pytest.mark.slow
def test_fresh_processes_export_then_read_the_kernel(tmp_path):
    """`jaxspec extract` in fresh processes with a compilation cache: the first exports the kernel into it,
    the next reads it (no tracing); their frames are the cache-off frame bit for bit; the backend started
    in its thread and astropy was first imported after the checks."""
    pytest.importorskip("flatbuffers")
    import _frames

    (img, psf, _), = _frames.make_frames(tmp_path / "in", 1, seed=4)
    cache = tmp_path / "cache"
    probe = ("import sys, runpy; from jaxspec._cli import extract as e; "
             "orig = e.check\n"
             "def check(args):\n"
             "    orig(args); print('astropy before the checks ended:', 'astropy' in sys.modules, file=sys.stderr)\n"
             "e.check = check\n"
             "from jaxspec._cli.main import main; sys.exit(main(sys.argv[1:]))\n")

    def extract(name, cache_arg):
        out = tmp_path / name
        res = subprocess.run([sys.executable, "-c", probe, "extract", "-i", img, "-p", psf, "-o", str(out),
                              *_frames.CLI_OPTIONS, "--quiet", "--loglevel", "DEBUG", "--compilation-cache",
                              str(cache_arg)], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "astropy before the checks ended: False" in res.stderr
        assert "JAX's backend started in" in res.stderr
        return out, res.stderr

    off, log_off = extract("off.fits", "off")
    assert "extraction kernel" not in log_off  # no cache folder: the kernel traced, nothing exported
    first, log1 = extract("first.fits", cache)
    assert "extraction kernel: exported" in log1
    assert len(list((cache / "jaxspec-export").glob("*.jaxexport"))) == 1
    second, log2 = extract("second.fits", cache)
    assert "extraction kernel: the exported program" in log2 and "extraction kernel: exported" not in log2
    ref = _frames.frame_arrays(off)
    for path in (first, second):
        got = _frames.frame_arrays(path)
        assert got.keys() == ref.keys()
        for k in ref:
            if k != "header":
                np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{path.name} {k}")
