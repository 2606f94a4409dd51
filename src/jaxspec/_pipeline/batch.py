"""The batch runner behind ``jaxspec extract-batch``: many frames, ranks, IO overlap, resume.

A batch is a list of :class:`FrameJob` (preproc image, PSF file, output frame file).
:func:`run_batch`

* skips jobs whose output already exists (outputs are written atomically, so a
  killed run resumes where it stopped and loses nothing);
* shares the rest out over MPI ranks in rounds of one frame per rank; a last round
  with fewer frames than ranks splits each frame's bundles over a group of ranks,
  whose results are gathered (mpi4jax) to the group's first rank, which writes;
* on each rank, reads the next frame and writes the previous one in two threads
  while the current one is on the device (``overlap=True``), and shards the patch
  solve over the rank's devices when it has several;
* records a failure per frame (unreadable input, bad PSF, write error, ...) without
  stopping the others, and returns a :class:`BatchSummary` (the same on every rank).
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import json
import logging
import os
import queue
import re
import threading
import time
import traceback
from collections.abc import Callable, Sequence

from .._io.atomic import atomic_write, clean_stale_temps
from . import job
from .job import FrameJob

log = logging.getLogger("jaxspec")

#: How a job's files are named in its messages.
_LABELS = {"image": "image", "psf": "PSF", "output": "output", "model": "model"}

#: A ``#`` that starts a comment in a job list: at the start of a line or after white space.
_COMMENT = re.compile(r"(?:^|\s)#")
_PROGRESS_TAG = 7301


# ----------------------------------------------------------------------------- jobs
def read_job_list(path: str | os.PathLike) -> list[FrameJob]:
    """Jobs from a text file: one ``IMAGE PSF OUTPUT`` triple per line.

    Blank lines and comments are ignored: a ``#`` at the start of a line or after
    white space starts one, so ``out/frame#1.fits`` is a path; relative paths are
    relative to the current directory.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"job list {path}: no such file")
    jobs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            text = _COMMENT.split(line, maxsplit=1)[0].strip()
            if not text:
                continue
            parts = text.split()
            if len(parts) != 3:
                raise ValueError(f"job list {path}, line {lineno}: expected 'IMAGE PSF OUTPUT', got {text!r}")
            jobs.append(FrameJob(*parts))
    return jobs


def _fields(image: str) -> dict[str, str]:
    """Template fields of an input path: dir, name, stem, tag (stem without 'preproc-')."""
    name = os.path.basename(image)
    stem = name
    for ext in (".fits.gz", ".fits.fz", ".fits", ".fit"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    tag = stem[len("preproc-"):] if stem.startswith("preproc-") else stem
    return dict(dir=os.path.dirname(image) or ".", name=name, stem=stem, tag=tag)


def glob_jobs(pattern: str, psf: str, output: str) -> list[FrameJob]:
    """Jobs for every file matching ``pattern`` (sorted).

    ``psf`` and ``output`` are templates with the fields ``{dir}``, ``{name}``,
    ``{stem}`` and ``{tag}`` of each input, e.g. ``preproc-r0-00012345.fits`` gives
    ``tag = r0-00012345``: ``--psf psf/psf-{tag}.fits --output out/frame-{tag}.fits``.
    """
    images = sorted(_glob.glob(pattern))
    if not images:
        raise FileNotFoundError(f"--glob {pattern!r}: no file matches")
    jobs = []
    for im in images:
        f = _fields(im)
        try:
            jobs.append(FrameJob(im, psf.format(**f), output.format(**f)))
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"template {psf!r} / {output!r}: unknown field {err}; use {{dir}}, {{name}}, "
                             f"{{stem}} or {{tag}}") from None
    return jobs


def check_jobs(jobs: Sequence[FrameJob]) -> None:
    """Refuse two jobs writing one output, or an output that is also an input."""
    seen: dict[str, int] = {}
    inputs = {os.path.abspath(j.image) for j in jobs} | {os.path.abspath(j.psf) for j in jobs}
    for i, j in enumerate(jobs):
        out = os.path.abspath(j.output)
        if out in seen:
            raise ValueError(f"jobs {seen[out] + 1} and {i + 1} both write {j.output}")
        if out in inputs:
            raise ValueError(f"job {i + 1}: output {j.output} is also an input")
        seen[out] = i


def write_job_list(path: str | os.PathLike, jobs: Sequence[FrameJob], comments: Sequence[str] | None = None,
                   overwrite: bool = False) -> str:
    """Write jobs as a list file (readable by :func:`read_job_list`) through the one atomic writer."""
    lines = []
    for i, j in enumerate(jobs):
        if comments is not None and comments[i]:
            lines.append("# " + " ".join(str(comments[i]).split()))
        lines.append(f"{j.image} {j.psf} {j.output}")
    data = ("\n".join(lines) + "\n" if lines else "").encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data), overwrite=overwrite)


# ----------------------------------------------------------------------------- summary
@dataclasses.dataclass
class BatchSummary:
    """What a batch did.

    Attributes:
        total: jobs given.
        done: frames extracted and written by this run.
        skipped: jobs whose output already existed.
        failed: frames that failed (see ``records``).
        seconds: wall time of the run.
        ranks, devices: ranks, and devices per rank.
        records: one dict per attempted frame: index, image, output, status
            ('ok' or 'failed'), error, rank, read_s, compute_s, write_s.
    """

    total: int
    done: int
    skipped: int
    failed: int
    seconds: float
    ranks: int
    devices: int
    records: list[dict]

    @property
    def frames_per_hour(self) -> float:
        """Frames extracted per hour of wall time (all ranks together)."""
        return 3600.0 * self.done / self.seconds if self.seconds > 0 else 0.0

    def failures(self) -> list[dict]:
        return [r for r in self.records if r["status"] != "ok"]

    def text(self) -> str:
        lines = [
            f"jaxspec extract-batch: {self.total} frames: {self.done} extracted, {self.skipped} skipped "
            f"(output exists), {self.failed} failed in {self.seconds:.1f} s "
            f"({self.frames_per_hour:.0f} frames/hour; {self.ranks} rank(s) x {self.devices} device(s))"
        ]
        for r in self.failures()[:20]:
            lines.append(f"  FAILED {r['image']} -> {r['output']}: {r['error']}")
        if self.failed > 20:
            lines.append(f"  ... and {self.failed - 20} more")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class _Unit:
    """This rank's share of one frame: part ``part`` of ``nparts`` of job ``index``."""

    index: int
    part: int = 0
    nparts: int = 1
    root: int = 0  # world rank that writes the frame
    group: int | None = None  # colour of the group communicator (split frames only)


def plan(pending: Sequence[int], size: int) -> list[list[_Unit]]:
    """Units per rank: rounds of one frame per rank; a last round with m < size frames
    gives frame ``pending[k + r % m]`` to rank r, in a group with the other ranks of
    that frame (whose first rank writes)."""
    units: list[list[_Unit]] = [[] for _ in range(size)]
    for k in range(0, len(pending), size):
        chunk = list(pending[k:k + size])
        m = len(chunk)
        for r in range(size):
            if m == size:
                units[r].append(_Unit(chunk[r], root=r))
            else:
                members = [q for q in range(size) if q % m == r % m]
                units[r].append(_Unit(chunk[r % m], members.index(r), len(members), members[0], r % m))
    return units


# ----------------------------------------------------------------------------- read / compute / write
def _load(frame: job.FrameJob, opts: job.FrameOptions, psfs: job.PsfCache) -> job.Prepared:
    """Read and check one frame (the checks of ``jaxspec extract``), its pixels placed on the device."""
    job.check_paths(frame, overwrite=True, labels=_LABELS)
    return job.prepare(frame, opts, psfs, labels=_LABELS, device_put=True)


def _error_text(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if isinstance(err, (OSError, ValueError)) \
        else f"{type(err).__name__}: {text}"


# ----------------------------------------------------------------------------- the pipeline
class _Reader:
    """Reads units ahead of the compute in a thread (at most ``depth`` waiting)."""

    def __init__(self, jobs, units, opts, psfs, depth: int = 1):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, args=(jobs, units, opts, psfs), name="jaxspec-reader",
                                  daemon=True)
        self.t.start()

    def _run(self, jobs, units, opts, psfs):
        for u in units:
            if self._stop.is_set():
                return
            try:
                item = _load(jobs[u.index], opts, psfs)
            except BaseException as err:  # noqa: BLE001 - reported per frame
                log.debug("read failed: %s", traceback.format_exc())
                item = err
            self.q.put((u, item))

    def __iter__(self):
        while True:
            if not self.t.is_alive() and self.q.empty():
                return
            try:
                yield self.q.get(timeout=0.5)
            except queue.Empty:
                continue

    def stop(self):
        self._stop.set()
        while True:  # unblock a put
            try:
                self.q.get_nowait()
            except queue.Empty:
                break


class _Writer:
    """Writes frames in a thread (at most ``depth`` waiting); records the outcome."""

    def __init__(self, record: Callable, depth: int = 1):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.record = record
        self.t = threading.Thread(target=self._run, name="jaxspec-writer", daemon=True)
        self.t.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            self.record(*_do_write(*item))

    def put(self, *item):
        self.q.put(item)

    def close(self):
        self.q.put(None)
        self.t.join()


def _do_write(rec: dict, ld: job.Prepared, arrays, opts, overwrite):
    t0 = time.perf_counter()
    try:
        job.write(ld, arrays, overwrite)
        rec["status"] = "ok"
    except BaseException as err:  # noqa: BLE001 - reported per frame
        rec["status"] = "failed"
        rec["error"] = f"writing: {_error_text(err)}"
    rec["write_s"] = time.perf_counter() - t0
    return (rec,)


def run_batch(
    jobs: Sequence[FrameJob],
    opts: job.FrameOptions | None = None,
    *,
    overwrite: bool = False,
    overlap: bool = True,
    world=None,
    devices: Sequence | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BatchSummary:
    """Extract every job whose output does not exist yet.

    Args:
        jobs: the frames (the same list on every rank; rank 0's is used).
        opts: what to extract of each frame (default :class:`~jaxspec._pipeline.job.FrameOptions`).
        overwrite: redo jobs whose output exists (and replace it).
        overlap: read the next frame and write the previous one in threads while
            the current one is computed; False runs read, compute, write in turn.
        world: a :class:`jaxspec._distribute.World` (default: serial).
        devices: this rank's devices (default: all of its local devices); with
            several, the patch solve is sharded over them.
        progress: called on rank 0 as ``progress(done, total)`` as frames finish
            (any rank's).

    Returns:
        A :class:`BatchSummary`, the same on every rank.
    """
    import jax

    from .devices import World, gather_parts, sharded_solve_chunk, split_fibers
    from .._extraction.patch import default_chunk_size

    opts = opts or job.FrameOptions()
    w = world or World()
    comm = w.comm if not w.serial else None
    t_start = time.perf_counter()

    # ---- the plan, made on rank 0 and shared
    if w.root:
        jobs = list(jobs)
        check_jobs(jobs)
        pending = [i for i, j in enumerate(jobs) if overwrite or not os.path.lexists(j.output)]
        for i in pending:
            d = os.path.dirname(os.path.abspath(jobs[i].output))
            os.makedirs(d, exist_ok=True)
        stale = clean_stale_temps(jobs[i].output for i in pending)
        if stale:
            log.warning("removed %d temporary file(s) left by an interrupted run", stale)
        shared = (jobs, pending)
    else:
        shared = None
    if comm is not None:
        shared = comm.bcast(shared, root=0)
    jobs, pending = shared
    units = plan(pending, w.size)
    mine = units[w.rank]
    gcomm = None
    if comm is not None:
        from mpi4py import MPI

        any_source = MPI.ANY_SOURCE
    if comm is not None and any(u.nparts > 1 for us in units for u in us):
        colour = next((u.group for u in mine if u.group is not None), None)
        gcomm = comm.Split(MPI.UNDEFINED if colour is None else colour, key=w.rank)

    devs = list(jax.local_devices() if devices is None else devices)
    solve = sharded_solve_chunk(devs) if len(devs) > 1 else None
    chunk_size = opts.extraction.chunk_size or default_chunk_size() * len(devs)
    log.info("rank %d/%d: %d of %d frame(s) pending (%d already done), %d unit(s) here on %d device(s)%s",
             w.rank, w.size, len(pending), len(jobs), len(jobs) - len(pending), len(mine), len(devs),
             ", IO overlapped" if overlap else "")

    records: list[dict] = []
    lock = threading.Lock()
    total = len(pending)
    state = dict(done=0)

    def bump(n=1):
        state["done"] += n
        if progress is not None:
            progress(state["done"], total)

    def poll(block_until: int | None = None):
        """Rank 0: take progress messages from other ranks."""
        if comm is None or not w.root:
            return
        while True:
            if block_until is not None and state["done"] < block_until:
                comm.recv(source=any_source, tag=_PROGRESS_TAG)
                bump()
            elif comm.iprobe(source=any_source, tag=_PROGRESS_TAG):
                comm.recv(source=any_source, tag=_PROGRESS_TAG)
                bump()
            else:
                return

    sends = []

    def finished():
        if w.root:
            bump()
        elif comm is not None:
            sends.append(comm.isend(1, dest=0, tag=_PROGRESS_TAG))

    def record(rec):
        with lock:
            records.append(rec)
            if rec["status"] == "ok":
                log.info("rank %d: %s -> %s (read %.1f s, extract %.1f s, write %.1f s)", w.rank,
                         rec["image"], rec["output"], rec["read_s"], rec["compute_s"], rec["write_s"])
            else:
                log.error("rank %d: %s failed: %s", w.rank, rec["image"], rec["error"])

    psfs = job.PsfCache()
    reader = _Reader(jobs, mine, opts, psfs) if overlap else None
    writer = _Writer(record) if overlap else None
    source = reader if overlap else ((u, _safe_load(jobs[u.index], opts, psfs)) for u in mine)
    try:
        for u, ld in source:
            frame = jobs[u.index]
            rec = dict(index=u.index, image=frame.image, output=frame.output, status="failed", error=None,
                       rank=w.rank, read_s=0.0, compute_s=0.0, write_s=0.0)
            t0 = time.perf_counter()
            ok, err, arrays, first, n = True, None, None, 0, 0
            if isinstance(ld, BaseException):
                ok, err = False, f"reading: {_error_text(ld)}"
            else:
                rec["read_s"] = ld.read_s
                first, n = split_fibers(ld.specmin, ld.nspec, opts.extraction.bundlesize, u.part, u.nparts)
                if n > 0:
                    try:
                        arrays = job.compute(ld, first, n, solve_chunk=solve, chunk_size=chunk_size)
                    except BaseException as e:  # noqa: BLE001 - reported per frame
                        if isinstance(e, KeyboardInterrupt):
                            raise
                        log.debug("extraction failed: %s", traceback.format_exc())
                        ok, err = False, f"extracting: {_error_text(e)}"
            if u.nparts > 1:
                ok, err, arrays = gather_parts(gcomm, ok, err, arrays, first, n)
            rec["compute_s"] = time.perf_counter() - t0
            if w.rank == u.root:
                if ok:
                    if overlap:
                        writer.put(rec, ld, arrays, opts, overwrite)
                    else:
                        record(*_do_write(rec, ld, arrays, opts, overwrite))
                else:
                    rec["error"] = err
                    record(rec)
                finished()
            del ld, arrays
            poll()
    finally:
        if reader is not None:
            reader.stop()
        if writer is not None:
            writer.close()

    # ---- everyone's records to rank 0, one summary for all
    if comm is not None:
        for s in sends:
            s.wait()
        poll(block_until=total)
        allrec = comm.gather(records, root=0)
        records = [r for rs in allrec for r in rs] if w.root else []
    records.sort(key=lambda r: r["index"])
    ndone = sum(r["status"] == "ok" for r in records)
    summary = BatchSummary(
        total=len(jobs), done=ndone, skipped=len(jobs) - len(pending), failed=len(records) - ndone,
        seconds=time.perf_counter() - t_start, ranks=w.size, devices=len(devs), records=records,
    ) if w.root else None
    if comm is not None:
        summary = comm.bcast(summary, root=0)
    return summary


def _safe_load(frame, opts, psfs):
    try:
        return _load(frame, opts, psfs)
    except BaseException as err:  # noqa: BLE001 - reported per frame
        if isinstance(err, KeyboardInterrupt):
            raise
        return err


def summary_json(summary: BatchSummary) -> str:
    """The summary as JSON (records included)."""
    d = dataclasses.asdict(summary)
    d["frames_per_hour"] = summary.frames_per_hour
    return json.dumps(d, indent=1, default=str)
