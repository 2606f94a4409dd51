"""``jaxspec extract`` and ``jaxspec extract-batch`` run the one frame job: the same outcome on every case.

Each case is one (preproc, PSF) pair, good or bad; both commands run it, and the
outcome must match: byte-identical frame data where it succeeds (checksums aside),
a refusal naming the same problem where it fails (exit 2 for ``extract``, a failed
frame and exit 1 for ``extract-batch``), and no output or temporary file left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

import _frames
import jaxspec
from jaxspec._cli.main import main
from jaxspec._io import frames as _frameio

OPTS = ["-w", "5660,5690,0.8", "--nwavestep", "20", "--chunk-size", "8", "--quiet"]


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("both")
    jobs = _frames.make_frames(d, 1)
    return d, jobs[0]


def _case(d: Path, name: str, image: str, psf: str) -> dict:
    """Variants of one good frame: (preproc path, PSF path, text of the refusal or None)."""
    pre = _frameio.read_preproc(image)
    # the PSF with the camera in its header, as DESI's PSF files have it
    with fits.open(psf) as h:
        h[0].header["CAMERA"] = "r0"
        psf = str(d / f"{name}-psf-r0.fits")
        h.writeto(psf, overwrite=True)
    out = {"ok": (image, psf, None)}
    # a FIBERMAP of 10 rows for 50 fibers: written without FIBERMAP, with a log line, by both
    p = d / f"{name}-fibermap10.fits"
    _frameio.write_preproc(p, pre.image, pre.ivar, header={"CAMERA": "r0", "FLAVOR": "science"},
                           fibermap=Table({"FIBER": np.arange(10)}), overwrite=True)
    out["fibermap10"] = (str(p), psf, None)
    # a camera mismatch: refused by both
    p = d / f"{name}-b1.fits"
    _frameio.write_preproc(p, pre.image, pre.ivar, header={"CAMERA": "b1", "FLAVOR": "science"}, overwrite=True)
    out["camera"] = (str(p), psf, "is camera b1 but")
    # an image larger than the PSF's CCD: refused by both
    p = d / f"{name}-huge.fits"
    big = np.zeros((pre.image.shape[0] + 5, pre.image.shape[1]))
    _frameio.write_preproc(p, big, np.ones_like(big), header={"CAMERA": "r0", "FLAVOR": "science"}, overwrite=True)
    out["huge"] = (str(p), psf, "larger than the")
    # every pixel masked: written (ivar 0 everywhere) by both
    p = d / f"{name}-masked.fits"
    _frameio.write_preproc(p, pre.image, np.zeros_like(pre.ivar), header={"CAMERA": "r0", "FLAVOR": "science"}, overwrite=True)
    out["masked"] = (str(p), psf, None)
    # a missing input
    out["missing"] = (str(d / "nope.fits"), psf, "no such file")
    return out


@pytest.mark.slow
def test_extract_and_batch_agree_on_every_case(base, tmp_path, capsys):
    d, (image, psf, _) = base
    cases = _case(tmp_path, "c", image, psf)
    for name, (img, p, refusal) in cases.items():
        one = tmp_path / f"extract-{name}.fits"
        rc1, _, err1 = _run(["extract", "-i", img, "-p", p, "-o", one, *OPTS], capsys)
        lst = tmp_path / f"jobs-{name}.txt"
        two = tmp_path / "batch" / f"frame-{name}.fits"
        lst.write_text(f"{img} {p} {two}\n")
        rc2, out2, err2 = _run(["extract-batch", lst, *OPTS], capsys)
        if refusal is None:
            assert rc1 == 0 and rc2 == 0, (name, err1, err2)
            _frames.assert_same_frames([one], [two])
        else:
            assert rc1 == 2 and refusal in err1, (name, err1)
            assert rc2 == 1 and refusal in out2, (name, out2)
            assert not one.exists() and not two.exists(), name
        leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
        assert leftovers == [], leftovers
    fr = jaxspec.read_frame(tmp_path / "batch" / "frame-fibermap10.fits")
    assert fr.fibermap is None
    fr = jaxspec.read_frame(tmp_path / "extract-masked.fits")
    assert np.all(fr.ivar == 0) and np.all(np.isfinite(fr.flux))


def test_camera_mismatch_can_be_allowed(base, tmp_path, capsys):
    d, (image, psf, _) = base
    img, p, _ = _case(tmp_path, "m", image, psf)["camera"]
    out = tmp_path / "frame.fits"
    rc, _, err = _run(["extract", "-i", img, "-p", p, "-o", out, *OPTS, "--allow-camera-mismatch"], capsys)
    assert rc == 0, err
    assert jaxspec.read_frame(out).header["CAMERA"].strip() == "b1"
