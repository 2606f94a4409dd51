"""``jaxspec extract`` and ``jaxspec extract-batch`` run the one frame job: the same outcome on every case
of the bad-input table (issue 15: bad PSF files, bad or awkward preprocs, FIBERMAP, camera, CCD size).

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
from _badfiles import _flat_width, _nan_xtrace, _psf_as_image, _set_coeff, _set_header, _swap_wave, _with_card
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
    out.update(_bad_psfs(d, name, image, psf))
    out.update(_bad_preprocs(d, name, image, pre, psf))
    return out


def _edited_psf(d: Path, name: str, psf: str, case: str, edit) -> str:
    """A copy of the PSF file with ``edit(hdulist)`` applied."""
    path = d / f"{name}-psf-{case}.fits"
    with fits.open(psf) as h:
        hl = fits.HDUList([x.copy() for x in h])
    edit(hl)
    hl.writeto(path, overwrite=True)
    return str(path)


def _bad_psfs(d: Path, name: str, image: str, psf: str) -> dict:
    """The bad PSF files of the bad-input table (issue 15, item 2 and the unclear messages)."""
    edits = {
        "psf-ghsigx-nan": (_set_coeff("GHSIGX", np.nan, (2, 0)), "non-finite"),
        "psf-ghsigx-zero": (_flat_width("GHSIGX", 0.0), "GHSIGX"),
        "psf-ghsigy-negative": (_flat_width("GHSIGY", -1.1), "not positive"),
        "psf-hsizex-negative": (_set_header("PSF", "HSIZEX", -3), "HSIZEX = -3 must be >= 1"),
        "psf-npix-x-text": (_set_header("PSF", "NPIX_X", "wide"), "NPIX_X = 'wide' is not an integer"),
        "psf-wave-swapped": (_swap_wave("PSF"), "swapped"),
        "psf-xtrace-nan": (_nan_xtrace, "HDU XTRACE has 1 non-finite"),
        "psf-as-image": (_psf_as_image, "HDU PSF is an image"),
    }
    out = {case: (image, _edited_psf(d, name, psf, case, edit), text) for case, (edit, text) in edits.items()}
    cut = d / f"{name}-psf-truncated.fits"
    data = Path(psf).read_bytes()
    cut.write_bytes(data[: len(data) - 2880])
    out["psf-truncated"] = (image, str(cut), "the file is truncated")
    return out


def _bad_preprocs(d: Path, name: str, image: str, pre, psf: str) -> dict:
    """The bad or awkward preproc files of the bad-input table (issue 15)."""
    hdr = {"CAMERA": "r0", "FLAVOR": "science"}
    out = {}
    # an unparsable identifying card: refused
    out["card-camera"] = (_with_card(image, d / f"{name}-card.fits", "CAMERA", "CAMERA  = r0 no quotes"),
                          psf, "header card CAMERA")
    # a FIBERMAP stored as an image: refused
    p = d / f"{name}-fmimage.fits"
    _frameio.write_preproc(p, pre.image, pre.ivar, header=hdr, overwrite=True)
    with fits.open(p, mode="append") as h:
        h.append(fits.ImageHDU(np.zeros((3, 2)), name="FIBERMAP"))
    out["fibermap-image"] = (str(p), psf, "FIBERMAP HDU is an image")
    # an int64 MASK with bits above 2^32 (DEAD | bit 40 on fiber 3's trace, x ~ 42, rows
    # 84-138 for these wavelengths): written, the pixels masked
    mask = np.zeros(pre.image.shape, dtype=np.int64)
    mask[80:145, 40:45] = (1 << 40) | 4
    p = d / f"{name}-mask64.fits"
    _frameio.write_preproc(p, pre.image, pre.ivar, header=hdr, overwrite=True)
    with fits.open(p, mode="update") as h:
        if "MASK" in h:
            h["MASK"].data = mask
        else:
            h.append(fits.ImageHDU(mask, name="MASK"))
    out["mask64"] = (str(p), psf, None)
    # bins whose spots fall almost entirely on masked pixels: written, and flagged in MASK
    ivar = pre.ivar.copy()
    rng = np.random.default_rng(3)
    block = ivar[95:115, :]  # rows inside the extracted wavelengths
    block[rng.random(block.shape) < 0.998] = 0.0
    p = d / f"{name}-mostlymasked.fits"
    _frameio.write_preproc(p, pre.image, ivar, header=hdr, overwrite=True)
    out["mostly-masked"] = (str(p), psf, None)
    # a path with non-ASCII characters: written
    sub = d / "données"
    sub.mkdir(exist_ok=True)
    p = sub / f"{name}-préproc.fits"
    _frameio.write_preproc(p, pre.image, pre.ivar, header=hdr, overwrite=True)
    out["non-ascii"] = (str(p), psf, None)
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
    ok = jaxspec.read_frame(tmp_path / "extract-ok.fits")
    for case in ("mask64", "mostly-masked"):  # masked pixels change the frame and are flagged
        fr = jaxspec.read_frame(tmp_path / f"extract-{case}.fits")
        assert np.all(np.isfinite(fr.flux)) and np.all(np.isfinite(fr.ivar))
        assert np.any(fr.mask != 0) and not np.array_equal(fr.ivar, ok.ivar), case
    assert np.any(jaxspec.read_frame(tmp_path / "extract-mostly-masked.fits").mask & 1)  # SOMEBADPIX


def test_camera_mismatch_can_be_allowed(base, tmp_path, capsys):
    d, (image, psf, _) = base
    img, p, _ = _case(tmp_path, "m", image, psf)["camera"]
    out = tmp_path / "frame.fits"
    rc, _, err = _run(["extract", "-i", img, "-p", p, "-o", out, *OPTS, "--allow-camera-mismatch"], capsys)
    assert rc == 0, err
    assert jaxspec.read_frame(out).header["CAMERA"].strip() == "b1"
