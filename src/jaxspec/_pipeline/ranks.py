"""One frame over MPI ranks: ``mpirun -n N jaxspec extract ...`` writes one frame.

Every rank reads the inputs and checks them (the same files: the same checks), takes
its share of whole bundles (:func:`~jaxspec._pipeline.devices.split_fibers`), and
extracts them on its own devices; the per-fiber arrays are gathered to rank 0 with
mpi4jax (:func:`~jaxspec._pipeline.devices.gather_parts`), the model images summed
there, and rank 0 alone writes the frame, through the same
:func:`~jaxspec._pipeline.job.write` as a one-process run.  The gathered float64
arrays equal the one-process ones: bundles are extracted independently.

A failure on any rank (reading, checking, extracting, writing) is a failure on every
rank, with the failing rank's message.  mpi4py and mpi4jax are imported lazily
(through :mod:`jaxspec._pipeline.devices`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import numpy as np

from . import job as _job
from .devices import World, gather_parts, split_fibers

log = logging.getLogger("jaxspec")

__all__ = ["RankError", "compute_ranks", "run_frame_ranks"]


class RankError(RuntimeError):
    """Another rank failed; its message (``rank k: ...``) is this one's."""


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def compute_ranks(prep: _job.Prepared | None, w: World, *, failure: BaseException | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray] | None:
    """This rank's bundles of ``prep``, gathered to rank 0 (call on every rank).

    Args:
        prep: the frame read and checked on this rank (None when ``failure``).
        w: the ranks (``w.comm``).
        failure: why this rank has no ``prep`` (it still joins the collectives).
        progress: this rank's progress callback.

    Returns:
        On rank 0 the host arrays of :func:`~jaxspec._pipeline.job.compute` for all
        of the frame's fibers (``model`` summed over the ranks); None elsewhere.

    Raises:
        The rank's own exception where it failed; :class:`RankError` on the others.
    """
    comm = w.comm
    ok, err, arrays, first, n = failure is None, None, None, 0, 0
    if failure is not None:
        err = f"rank {w.rank}: {_error(failure)}"
    else:
        first, n = split_fibers(prep.specmin, prep.nspec, prep.options.extraction.bundlesize, w.rank, w.size)
        if n > 0:
            log.info("rank %d of %d: fibers %d-%d", w.rank, w.size, first, first + n - 1)
            try:
                arrays = _job.compute(prep, first, n, progress=progress)
            except Exception as e:  # noqa: BLE001 - every rank must reach the collectives
                ok, err, failure = False, f"rank {w.rank}: {_error(e)}", e
    model = None if arrays is None else arrays.pop("model", None)
    ok, err_all, out = gather_parts(comm, ok, err, arrays, first, n)
    if not ok:
        if failure is not None:
            raise failure
        raise RankError(err_all)
    if prep.job.model is not None:  # each rank's model covers its own fibers: the frame's is their sum
        shape = (int(prep.xyrange[3] - prep.xyrange[2]), int(prep.xyrange[1] - prep.xyrange[0]))
        part = np.zeros(shape, np.float64) if model is None else np.asarray(model, np.float64)
        total = comm.reduce(part, root=0)
        if out is not None:
            out["model"] = total
    if out is not None and "wave" not in out:
        out["wave"] = np.asarray(prep.wave)
    return out


def run_frame_ranks(job: _job.FrameJob, options: _job.FrameOptions, w: World, *, overwrite: bool = False,
                    progress: Callable[[int, int], None] | None = None,
                    labels: Mapping[str, str] = _job.CLI_LABELS) -> dict:
    """:func:`~jaxspec._pipeline.job.run_frame` with the frame's bundles split over the ranks of ``w``.

    Call on every rank; rank 0 writes the frame (and model).

    Returns:
        ``{"output", "nspec", "nwave", "seconds", "ranks"}`` on every rank.

    Raises:
        The failing rank's exception there; :class:`RankError` on the other ranks.
    """
    t0 = time.perf_counter()
    prep, failure = None, None
    try:
        _job.check_paths(job, overwrite, labels)
        prep = _job.prepare(job, options, labels=labels)
    except Exception as e:  # noqa: BLE001 - reported through the collective below
        failure = e
    if w.root and prep is not None:
        log.info("extracting fibers %d-%d, %d wavelengths %.1f-%.1f A from %s on %d ranks", prep.specmin,
                 prep.specmin + prep.nspec - 1, len(prep.wave), prep.wave[0], prep.wave[-1], job.image, w.size)
    arrays = compute_ranks(prep, w, failure=failure, progress=progress if w.root else None)
    path, err = None, None
    if w.root:
        try:
            path = _job.write(prep, arrays, overwrite)
        except Exception as e:  # noqa: BLE001 - the others must hear of it
            failure, err = e, f"rank 0: writing: {_error(e)}"
    path, err = w.comm.bcast((path, err), root=0)
    if err is not None:
        if w.root:
            raise failure
        raise RankError(err)
    return dict(output=path, nspec=prep.nspec, nwave=len(prep.wave), seconds=time.perf_counter() - t0,
                ranks=w.size)
