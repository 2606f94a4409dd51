"""The batch runner behind ``jaxspec extract-batch``: many frames, ranks, IO overlap, resume.

A batch is a list of :class:`FrameJob` (preproc image, PSF file, output frame file).
:func:`run_batch`

* skips jobs whose output already exists (outputs are written atomically, so a
  killed run resumes where it stopped and loses nothing);
* shares the rest out over MPI ranks in rounds of one frame per rank; a last round
  with fewer frames than ranks splits each frame's bundles over a group of ranks,
  whose results are gathered (mpi4jax) to the group's first rank, which writes;
* on each rank (``overlap=True``), reads the next frames and cuts their patch
  geometry in reader threads (on JAX's CPU device, so that nothing they evaluate
  queues behind the accelerator's work), writes the previous ones in writer
  threads, and queues each frame's device work before fetching the previous frame's
  results; it shards the patch solve over the rank's devices when it has several;
* records a failure per frame (unreadable input, bad PSF, write error, ...) without
  stopping the others, and returns a :class:`BatchSummary` (the same on every rank).
"""

from __future__ import annotations

import collections
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
            ('ok' or 'failed'), error, rank, read_s (checks and reading), geometry_s
            (cutting the patches; 0 when cached), wait_s (the main thread waiting for
            the readers), compute_s (dispatch_s + fetch_s), dispatch_s (the main thread
            queueing the frame's device work; it waits there while the device's queue is
            full), fetch_s (waiting for the results and bringing them to the host: in a
            writer thread when IO is overlapped, so the main thread feeds the device
            meanwhile), handoff_s (the main thread waiting for a free writer), write_s.
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
@dataclasses.dataclass
class _Loaded:
    """One unit read, checked and cut, its pixels and PSF on the compute device.

    Attributes:
        prep: the frame job's :class:`~jaxspec._pipeline.job.Prepared` (PSF, image,
            ivar on the device).
        first, n: the fibers of this unit.
        geometry: their patch geometry (None when n is 0).
        geometry_s: seconds spent cutting it (0 when it came from the cache).
    """

    prep: job.Prepared
    first: int
    n: int
    geometry: object
    geometry_s: float


def _host_device():
    """JAX's CPU device, or None when this JAX has none."""
    import jax

    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


class _Loader:
    """Reads and prepares units for the compute (thread-safe; the reader threads share one).

    ``device``: where the pixels and the PSF go; None (the batch's choice) for the
    process's default device, uncommitted, as ``jaxspec extract`` places them.

    Per unit: the path checks and :func:`jaxspec._pipeline.job.prepare` (PSF through a
    cache, preproc, every check), then the unit's patch geometry.  All of it runs with
    JAX's CPU device as the default device: the PSF's small evaluations (its inverse
    traces, the geometry's trace positions) then never queue behind the accelerator's
    kernels of the frame being computed, which would serialise them with it.  The
    pixels and the PSF are then placed on ``device``.  Geometries and device copies of
    the PSF are kept for the last few PSF objects (frames that share a PSF file cut
    one geometry).
    """

    def __init__(self, jobs, opts: job.FrameOptions, device=None, cache_size: int = 4):
        self.jobs, self.opts, self.device = jobs, opts, device
        self.host = _host_device()
        self.psfs = job.PsfCache(cache_size)
        self._lock = threading.Lock()
        self._size = cache_size
        self._geoms: dict = {}
        self._on_device: dict = {}

    def get(self, path: str):
        """The PSF of ``path`` (the :class:`~jaxspec._pipeline.job.PsfCache` protocol, locked)."""
        with self._lock:
            return self.psfs.get(path)

    def _remember(self, store: dict, key, value):
        with self._lock:
            store[key] = value
            while len(store) > self._size:
                store.pop(next(iter(store)))

    def _geometry(self, psf, wave, first: int, n: int):
        from .._extraction.extract import patch_geometry_for

        ex = self.opts.extraction
        key = (id(psf), wave.tobytes(), first, n, ex.bundlesize, ex.nsubbundles, ex.nwavestep, ex.wavepad_frac,
               ex.pixpad_frac)
        hit = self._geoms.get(key)
        if hit is not None and hit[0] is psf:
            return hit[1], 0.0
        t0 = time.perf_counter()
        geom = patch_geometry_for(psf, wave, first, n, ex)
        self._remember(self._geoms, key, (psf, geom))
        return geom, time.perf_counter() - t0

    def _placed(self, psf):
        """``psf`` with its arrays on the compute device (one copy per PSF object)."""
        import jax

        hit = self._on_device.get(id(psf))
        if hit is not None and hit[0] is psf:
            return hit[1]
        placed = jax.tree_util.tree_map(lambda a: self._put(a) if isinstance(a, jax.Array) else a, psf)
        self._remember(self._on_device, id(psf), (psf, placed))
        return placed

    def _put(self, a):
        """``a`` on the compute device: uncommitted on the default device when ``device`` is None.

        Uncommitted, as ``jaxspec extract`` has its inputs, so that both commands compile
        (and find in the persistent cache) the same programs: committed inputs change
        the compiled program's key.
        """
        import jax
        import numpy as np

        return jax.device_put(np.asarray(a)) if self.device is None else jax.device_put(a, self.device)

    def __call__(self, u: _Unit) -> _Loaded:
        import contextlib

        import jax

        from .devices import split_fibers

        frame = self.jobs[u.index]
        where = jax.default_device(self.host) if self.host is not None else contextlib.nullcontext()
        with where:
            job.check_paths(frame, overwrite=True, labels=_LABELS)
            prep = job.prepare(frame, self.opts, self, labels=_LABELS)
            first, n = split_fibers(prep.specmin, prep.nspec, self.opts.extraction.bundlesize, u.part, u.nparts)
            geom, geom_s = self._geometry(prep.psf, prep.wave, first, n) if n > 0 else (None, 0.0)
        t0 = time.perf_counter()
        prep.image, prep.ivar = self._put(prep.image), self._put(prep.ivar)
        psf_host = prep.psf
        prep.psf = self._placed(psf_host)
        prep.read_s += time.perf_counter() - t0
        return _Loaded(prep, first, n, geom, geom_s)


def _error_text(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if isinstance(err, (OSError, ValueError)) \
        else f"{type(err).__name__}: {text}"


def _safe(fn, *args):
    """``fn(*args)``, or the exception it raised (reported per frame)."""
    try:
        return fn(*args)
    except BaseException as err:  # noqa: BLE001 - reported per frame
        if isinstance(err, KeyboardInterrupt):
            raise
        log.debug("read failed: %s", traceback.format_exc())
        return err


# ----------------------------------------------------------------------------- the pipeline
class _Reader:
    """Prepares units ahead of the compute in ``workers`` threads, handed out in order.

    At most ``depth`` units are read or waiting beyond the one being computed.  The
    reading (astropy's decoding, the checks, the geometry in NumPy) releases the
    interpreter lock for most of its time, so the main thread keeps feeding the device.
    """

    def __init__(self, load: Callable, units, workers: int = 2, depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="jaxspec-reader")
        self._load = load
        self._units = list(units)
        self._depth = max(1, depth, workers)
        self._next = 0
        self._futs: collections.deque = collections.deque()
        self._fill()

    def _fill(self):
        while self._next < len(self._units) and len(self._futs) < self._depth:
            u = self._units[self._next]
            self._futs.append((u, self._pool.submit(_safe, self._load, u)))
            self._next += 1

    def __iter__(self):
        while self._futs:
            u, fut = self._futs.popleft()
            item = fut.result()
            self._fill()
            yield u, item

    def stop(self):
        self._next = len(self._units)
        for _, f in self._futs:
            f.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Writer:
    """Writes frames in ``workers`` threads (at most ``depth`` waiting); records the outcome."""

    def __init__(self, record: Callable, workers: int = 2, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.record = record
        self.ts = [threading.Thread(target=self._run, name=f"jaxspec-writer-{i}", daemon=True)
                   for i in range(max(1, workers))]
        for t in self.ts:
            t.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            self.record(*_do_write(*item))

    def put(self, *item):
        self.q.put(item)

    def close(self):
        for _ in self.ts:
            self.q.put(None)
        for t in self.ts:
            t.join()


def _do_write(rec: dict, ld: job.Prepared, arrays, opts, overwrite, fetch: bool = False):
    """Write one frame (``fetch``: first bring its device arrays to the host, here in the writer's thread)."""
    if fetch:
        t0 = time.perf_counter()
        try:
            arrays = job.fetch_arrays(arrays)
        except BaseException as err:  # noqa: BLE001 - reported per frame
            rec["status"] = "failed"
            rec["error"] = f"extracting: {_error_text(err)}"
            return (rec,)
        finally:
            rec["fetch_s"] = time.perf_counter() - t0
            rec["compute_s"] += rec["fetch_s"]
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
    readers: int = 3,
    writers: int = 2,
) -> BatchSummary:
    """Extract every job whose output does not exist yet.

    Args:
        jobs: the frames (the same list on every rank; rank 0's is used).
        opts: what to extract of each frame (default :class:`~jaxspec._pipeline.job.FrameOptions`).
        overwrite: redo jobs whose output exists (and replace it).
        overlap: read and cut the next frames (``readers`` threads) and write the
            previous ones (``writers`` threads) while the current one is computed,
            and queue each frame's device work before fetching the previous frame's
            results, so the device never waits on the host between frames; False
            runs read, compute, write in turn.
        world: a :class:`jaxspec._pipeline.devices.World` (default: serial).
        devices: this rank's devices (default: all of its local devices); with
            several, the patch solve is sharded over them.
        progress: called on rank 0 as ``progress(done, total)`` as frames finish
            (any rank's).
        readers: threads that read each frame and cut its patch geometry, with ``overlap``
            (3: on one H200, 30 frames, 0.437 s a frame with 2, 0.380 s with 3, 0.377 s with 4,
            2026-12-02; with the results fetched by the writers, reading is what limits).
        writers: threads that write the frames, with ``overlap``.

    Returns:
        A :class:`BatchSummary`, the same on every rank.
    """
    import jax

    from .devices import World, gather_parts, sharded_solve_chunk
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
                log.info("rank %d: %s -> %s (read %.2f s, geometry %.2f s, waited %.2f s, extract %.2f s, "
                         "write %.2f s)", w.rank, rec["image"], rec["output"], rec["read_s"], rec["geometry_s"],
                         rec["wait_s"], rec["compute_s"], rec["write_s"])
            else:
                log.error("rank %d: %s failed: %s", w.rank, rec["image"], rec["error"])

    def fail_text(e: BaseException) -> str:
        if isinstance(e, KeyboardInterrupt):
            raise e
        log.debug("extraction failed: %s", traceback.format_exc())
        return f"extracting: {_error_text(e)}"

    def settle(u, rec, ld, arrays, ok, err, queued: bool):
        """Hand a frame's results to the writer, or record its failure.

        A queued frame (only the overlapped run queues) still has its results on the
        device: the writer thread fetches them, so the main thread goes on feeding the
        device.
        """
        if w.rank == u.root:
            if ok:
                if overlap:
                    t0 = time.perf_counter()
                    writer.put(rec, ld, arrays, opts, overwrite, queued and arrays is not None)
                    rec["handoff_s"] = time.perf_counter() - t0
                else:
                    record(*_do_write(rec, ld, arrays, opts, overwrite))
            else:
                rec["error"] = err
                record(rec)
            finished()

    loader = _Loader(jobs, opts)
    reader = writer = None
    queued = None  # the frame whose device work is queued and whose results are not fetched yet
    try:
        reader = _Reader(loader, mine, workers=readers) if overlap else None
        writer = _Writer(record, workers=writers) if overlap else None
        source = reader if overlap else ((u, _safe(loader, u)) for u in mine)
        t_wait = time.perf_counter()
        for u, ld in source:
            frame = jobs[u.index]
            rec = dict(index=u.index, image=frame.image, output=frame.output, status="failed", error=None,
                       rank=w.rank, read_s=0.0, geometry_s=0.0, wait_s=time.perf_counter() - t_wait,
                       compute_s=0.0, dispatch_s=0.0, handoff_s=0.0, fetch_s=0.0, write_s=0.0)
            t0 = time.perf_counter()
            ok, err, arrays, prep = True, None, None, None
            pipelined = overlap and u.nparts == 1
            if isinstance(ld, BaseException):
                ok, err = False, f"reading: {_error_text(ld)}"
            else:
                prep = ld.prep
                rec["read_s"], rec["geometry_s"] = prep.read_s, ld.geometry_s
                if ld.n > 0:
                    try:
                        arrays = job.compute(prep, ld.first, ld.n, solve_chunk=solve, chunk_size=chunk_size,
                                             geometry=ld.geometry, fetch=not pipelined)
                    except BaseException as e:  # noqa: BLE001 - reported per frame
                        ok, err = False, fail_text(e)
            if u.nparts > 1:
                ok, err, arrays = gather_parts(gcomm, ok, err, arrays, ld.first if prep else 0,
                                               ld.n if prep else 0)
            rec["compute_s"] = rec["dispatch_s"] = time.perf_counter() - t0
            # this frame's work is queued on the device: now wait for the previous one's
            if queued is not None:
                settle(*queued, queued=True)
                queued = None
            if pipelined and ok:
                queued = (u, rec, prep, arrays, ok, err)
            else:
                settle(u, rec, prep, arrays, ok, err, queued=False)
            del ld, arrays, prep
            poll()
            t_wait = time.perf_counter()
        if queued is not None:
            settle(*queued, queued=True)
            queued = None
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


def summary_json(summary: BatchSummary) -> str:
    """The summary as JSON (records included)."""
    d = dataclasses.asdict(summary)
    d["frames_per_hour"] = summary.frames_per_hour
    return json.dumps(d, indent=1, default=str)
