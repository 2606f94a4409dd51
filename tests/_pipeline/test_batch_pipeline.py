"""The batch pipeline of a night: reader threads in order, each frame its own PSF, one compiled kernel."""

import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import _frames
import jaxspec
from jaxspec._extraction import patch as _patch
from jaxspec._pipeline import batch as _batch
from jaxspec._pipeline import job as _job

NFRAMES = 3


def test_reader_hands_out_units_in_order_with_errors_in_place():
    """Loads that finish out of order come out in order; a failed load is its exception, in its slot."""
    units = [_batch._Unit(i) for i in range(6)]
    running, peak, lock = [0], [0], threading.Lock()

    def load(u):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05 if u.index % 2 == 0 else 0.005)  # even units finish after the next odd one
        with lock:
            running[0] -= 1
        if u.index == 3:
            raise ValueError("unit 3: unreadable")
        return u.index * 10

    reader = _batch._Reader(load, units, workers=2, depth=2)
    got = list(reader)
    reader.stop()
    assert [u.index for u, _ in got] == list(range(6))
    assert [v for _, v in got if not isinstance(v, BaseException)] == [0, 10, 20, 40, 50]
    assert isinstance(got[3][1], ValueError) and "unit 3" in str(got[3][1])
    assert peak[0] == 2  # two loads at once


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """Tiny frames, each with its own PSF file (traces shifted by 0.03 px per frame)."""
    d = tmp_path_factory.mktemp("night")
    base = _frames.make_frames(d, NFRAMES)
    psf = _frames.tiny_psf()
    jobs = []
    for i, (img, _, out) in enumerate(base):
        shift = jnp.asarray(0.03 * (i + 1), psf.ycoef.dtype)
        p = psf.with_traces(xcoef=psf.xcoef.at[:, 0].add(shift), ycoef=psf.ycoef.at[:, 0].add(shift))
        path = str(Path(d) / f"psf-{i}.fits")
        jaxspec.write_psf(path, p, overwrite=True)
        jobs.append(_batch.FrameJob(img, path, out))
    return d, jobs


def _opts():
    return jaxspec.FrameOptions(wavelength=_frames.WAVELENGTH,
                                extraction=jaxspec.ExtractOptions(nwavestep=20, chunk_size=8))


@pytest.mark.slow
def test_night_each_frame_its_own_psf(night):
    """Geometry cut per PSF in the readers, one compiled kernel for all, frames as `jaxspec extract` writes them."""
    d, jobs = night
    psfs = [jaxspec.read_psf(j.psf) for j in jobs]
    assert len({p.wmin for p in psfs}) == NFRAMES  # the files differ in their static metadata too
    _batch.run_batch(jobs[:1], _opts(), overlap=False)  # compile once
    before = _patch._solve_chunk._cache_size()
    s = _batch.run_batch(jobs, _opts(), overlap=True, readers=2, writers=2, overwrite=True)
    assert (s.done, s.failed) == (NFRAMES, 0)
    assert _patch._solve_chunk._cache_size() == before  # no frame compiled the kernel again
    assert all(r["geometry_s"] > 0 and r["wait_s"] >= 0 and r["write_s"] > 0 for r in s.records)
    (Path(d) / "single").mkdir()
    single = [str(Path(d) / "single" / f"frame-{i}.fits") for i in range(NFRAMES)]
    for j, out in zip(jobs, single):
        _job.run_frame(_job.FrameJob(j.image, j.psf, out), _opts())
    _frames.assert_same_frames([j.output for j in jobs], single)


@pytest.mark.slow
def test_kernel_psf_shares_the_program_and_changes_nothing(night, monkeypatch):
    """Host-only static fields canonicalised: one tree structure for every PSF, the same spots and spectra."""
    import jax

    from jaxspec._extraction import extract as _extract

    _, jobs = night
    a, b = (jaxspec.read_psf(j.psf) for j in jobs[:2])
    ka, kb = _patch._kernel_psf(a), _patch._kernel_psf(b)
    # the wavelength limits differ from file to file but are leaves: one tree structure as read
    assert a.wmin != b.wmin and jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert jax.tree_util.tree_structure(ka) == jax.tree_util.tree_structure(kb)
    assert ka.xcoef is a.xcoef and a.wmin != 0.0 and ka.wmin == a.wmin  # the original is untouched
    fib, wave = jnp.arange(3)[:, None], jnp.asarray(_frames.WAVE[5:9])[None, :]
    for x, y in zip(a.spots(fib, wave, edges="specter"), ka.spots(fib, wave, edges="specter")):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    from jaxspec._io import frames as _io

    pre = _io.read_preproc(jobs[1].image)
    wave = _job.wave_grid(b, _frames.WAVELENGTH)
    opts = jaxspec.ExtractOptions(nwavestep=20, chunk_size=8)
    ex = jaxspec.extract(pre.image, pre.ivar, b, wave, specmin=0, nspec=25, options=opts)
    monkeypatch.setattr(_extract, "_kernel_psf", lambda p: p)  # the kernel on the PSF as read
    ex0 = jaxspec.extract(pre.image, pre.ivar, b, wave, specmin=0, nspec=25, options=opts)
    for k in ("flux", "ivar", "resolution", "xflux", "chi2pix"):
        np.testing.assert_array_equal(np.asarray(getattr(ex, k)), np.asarray(getattr(ex0, k)))
