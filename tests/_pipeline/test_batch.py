"""``jaxspec extract-batch``: same frames as ``jaxspec extract``, IO overlap, failures, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import _frames
import jaxspec
from jaxspec._pipeline import batch as _batch
from jaxspec._cli.extract import extract_file
from jaxspec._cli.main import main

NFRAMES = 6


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    jobs = _frames.make_frames(d, NFRAMES)
    return d, [_batch.FrameJob(*j) for j in jobs]


def _opts():
    return jaxspec.FrameOptions(wavelength=_frames.WAVELENGTH, extraction=jaxspec.ExtractOptions(nwavestep=20, chunk_size=8))


def _moved(jobs, d, sub):
    return [_batch.FrameJob(j.image, j.psf, str(Path(d) / sub / Path(j.output).name)) for j in jobs]


@pytest.fixture(scope="module")
def uninterrupted(frames):
    """One run over every frame with IO overlapped (the reference for the other tests)."""
    d, jobs = frames
    jobs = _moved(jobs, d, "ref")
    s = _batch.run_batch(jobs, _opts(), overlap=True)
    return jobs, s


def test_batch_equals_extract_and_serial_io(frames, uninterrupted):
    d, _ = frames
    jobs, s = uninterrupted
    assert (s.total, s.done, s.skipped, s.failed) == (NFRAMES, NFRAMES, 0, 0)
    assert s.frames_per_hour > 0 and len(s.records) == NFRAMES
    assert all(r["status"] == "ok" and r["compute_s"] > 0 for r in s.records)
    # the same frames without the IO threads
    serial = _moved(jobs, d, "serial")
    s2 = _batch.run_batch(serial, _opts(), overlap=False)
    assert s2.done == NFRAMES
    _frames.assert_same_frames([j.output for j in jobs], [j.output for j in serial])
    # and as `jaxspec extract` writes it
    one = Path(d) / "single" / "frame.fits"
    one.parent.mkdir()
    extract_file(jobs[2].image, jobs[2].psf, str(one), wavelength=_frames.WAVELENGTH, nwavestep=20, chunk_size=8)
    _frames.assert_same_frames([jobs[2].output], [str(one)])


def test_existing_outputs_are_skipped(uninterrupted):
    jobs, _ = uninterrupted
    before = [os.stat(j.output).st_mtime_ns for j in jobs]
    s = _batch.run_batch(jobs, _opts())
    assert (s.done, s.skipped, s.failed) == (0, NFRAMES, 0)
    assert [os.stat(j.output).st_mtime_ns for j in jobs] == before


def test_failures_are_recorded_and_others_go_on(frames, tmp_path, capsys):
    d, jobs = frames
    bad = tmp_path / "preproc-bad.fits"
    bad.write_text("not a FITS file")
    lst = tmp_path / "jobs.txt"
    lst.write_text(
        f"{jobs[0].image} {jobs[0].psf} {tmp_path}/out/a.fits\n"
        f"{tmp_path}/missing.fits {jobs[0].psf} {tmp_path}/out/b.fits  # no such image\n"
        f"{bad} {jobs[0].psf} {tmp_path}/out/c.fits\n"
        f"{jobs[1].image} {tmp_path}/nopsf.fits {tmp_path}/out/d.fits\n"
        f"{jobs[1].image} {jobs[1].psf} {tmp_path}/out/e.fits\n"
    )
    failed = tmp_path / "failed.txt"
    rc = main(["extract-batch", str(lst), *_frames.CLI_OPTIONS, "--quiet", "--failures", str(failed),
               "--summary-json", str(tmp_path / "summary.json")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "5 frames: 2 extracted, 0 skipped (output exists), 3 failed" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.fits", "e.fits"]
    rerun = _batch.read_job_list(failed)
    assert [Path(j.output).name for j in rerun] == ["b.fits", "c.fits", "d.fits"]
    text = failed.read_text()
    assert "missing.fits: no such file" in text and "nopsf.fits: no such file" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == 3 and summary["done"] == 2
    assert {r["output"].rsplit("/", 1)[1]: r["status"] for r in summary["records"]} == {
        "a.fits": "ok", "b.fits": "failed", "c.fits": "failed", "d.fits": "failed", "e.fits": "ok"}


def test_bad_job_lists_are_usage_errors(frames, tmp_path, capsys):
    d, jobs = frames
    lst = tmp_path / "dup.txt"
    lst.write_text(f"{jobs[0].image} {jobs[0].psf} {tmp_path}/x.fits\n{jobs[1].image} {jobs[1].psf} {tmp_path}/x.fits\n")
    assert main(["extract-batch", str(lst), "--quiet"]) == 2
    assert "both write" in capsys.readouterr().err
    lst.write_text("image.fits psf.fits\n")
    assert main(["extract-batch", str(lst), "--quiet"]) == 2
    assert "line 1: expected 'IMAGE PSF OUTPUT'" in capsys.readouterr().err
    assert main(["extract-batch", "--quiet"]) == 2
    assert main(["extract-batch", "--glob", str(tmp_path / "none-*.fits"), "--psf", "p", "-o", "o", "--quiet"]) == 2


def test_glob_templates(frames, tmp_path):
    d, jobs = frames
    got = _batch.glob_jobs(str(Path(d) / "preproc-r0-0000000[0-2].fits"), "{dir}/psf-r0.fits",
                           str(tmp_path / "frame-{tag}.fits"))
    assert [Path(j.output).name for j in got] == [f"frame-r0-{i:08d}.fits" for i in range(3)]
    assert all(j.psf == jobs[0].psf for j in got)
    with pytest.raises(ValueError, match="unknown field"):
        _batch.glob_jobs(str(Path(d) / "preproc-*.fits"), "{camera}.fits", "o-{tag}.fits")


def test_killed_run_resumes_to_the_same_outputs(frames, uninterrupted, tmp_path):
    """SIGKILL a batch after its first frame; a second run finishes it with identical files."""
    d, jobs = frames
    ref_jobs, _ = uninterrupted
    lst = tmp_path / "jobs.txt"
    todo = _moved(jobs, tmp_path, "out")
    _batch.write_job_list(lst, todo)
    cmd = [sys.executable, "-m", "jaxspec._cli.main", "extract-batch", str(lst), *_frames.CLI_OPTIONS, "--quiet",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outdir = tmp_path / "out"
    t0 = time.time()
    try:
        while time.time() - t0 < 240:
            if outdir.is_dir() and any(p.suffix == ".fits" for p in outdir.iterdir()):
                break
            if proc.poll() is not None:
                pytest.fail(f"batch ended before it could be killed: {proc.communicate()[1][-2000:]}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(p.name for p in outdir.iterdir() if p.suffix == ".fits")
    assert 1 <= len(done) < NFRAMES, done
    # a temporary file as a kill during a write leaves one
    (outdir / f".{Path(todo[-1].output).name}.0123456789ab.tmp").write_bytes(b"partial")

    s = _batch.run_batch(todo, _opts())
    assert (s.done, s.skipped, s.failed) == (NFRAMES - len(done), len(done), 0)
    assert sorted(p.name for p in outdir.iterdir()) == sorted(Path(j.output).name for j in todo)
    _frames.assert_same_frames([j.output for j in ref_jobs], [j.output for j in todo])
