"""Run under ``mpirun -n 2``: the batch runner and a split extraction across ranks.

    mpirun -n 2 python tests/_mpi_worker.py WORKDIR

WORKDIR holds the frames of ``_frames.make_frames`` (``jobs.txt``).  The worker

1. runs :func:`jaxspec._pipeline.batch.run_batch` on every job, writing to ``WORKDIR/out_mpi``
   (with 3 jobs and 2 ranks: one whole frame per rank, then one frame split over
   both ranks) and rank 0 writes the summary to ``WORKDIR/summary_mpi.json``;
2. extracts the first frame with its bundles split over the ranks
   (:func:`jaxspec._pipeline.devices.extract_distributed`, float64, gathered with mpi4jax)
   and rank 0 saves the arrays to ``WORKDIR/split.npz``;
3. the same through the frame job's MPI path (:func:`jaxspec._pipeline.ranks.compute_ranks`,
   what ``mpirun -n 2 jaxspec extract`` runs) and rank 0 saves them to ``WORKDIR/ranks.npz``.
"""

import json
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for _frames
import _frames  # noqa: E402

import jaxspec  # noqa: E402
from jaxspec import read_psf  # noqa: E402
from jaxspec._io import frames as _frameio  # noqa: E402
from jaxspec._pipeline import batch as _batch  # noqa: E402
from jaxspec._pipeline import devices as _distribute  # noqa: E402
from jaxspec._pipeline import job as _job  # noqa: E402
from jaxspec._pipeline import ranks as _ranks  # noqa: E402


def main(workdir: str) -> int:
    w = _distribute.world("on")
    assert w.size == 2, f"run me with mpirun -n 2 (size {w.size})"
    jobs = [_batch.FrameJob(a, b, c.replace(os.sep + "out" + os.sep, os.sep + "out_mpi" + os.sep))
            for a, b, c in (line.split() for line in open(os.path.join(workdir, "jobs.txt")) if line[0] != "#")]
    opts = jaxspec.FrameOptions(wavelength=_frames.WAVELENGTH, extraction=jaxspec.ExtractOptions(nwavestep=20, chunk_size=8))
    summary = _batch.run_batch(jobs, opts, world=w)
    if w.root:
        with open(os.path.join(workdir, "summary_mpi.json"), "w") as fh:
            fh.write(_batch.summary_json(summary))

    pre = _frameio.read_preproc(jobs[0].image)
    psf = read_psf(jobs[0].psf)
    wave = np.arange(*_frames.WAVELENGTH[:2], _frames.WAVELENGTH[2])
    out = _distribute.extract_distributed(pre.image, pre.ivar, psf, wave, comm=w.comm, specmin=0,
                                          nspec=_frames.NSPEC, **_frames.EXTRACT_KW)
    if w.root:
        np.savez(os.path.join(workdir, "split.npz"), **out)
    else:
        assert out is None

    prep = _job.prepare(_job.FrameJob(jobs[0].image, jobs[0].psf, os.path.join(workdir, "unused.fits")), opts)
    got = _ranks.compute_ranks(prep, w)
    if w.root:
        np.savez(os.path.join(workdir, "ranks.npz"), **got)
        print(json.dumps(dict(rank=w.rank, size=w.size, done=summary.done, failed=summary.failed)))
    else:
        assert got is None
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
