"""The compiled kernel: one patch from spots to diagnostics, vmapped over a chunk of patches
(on CPUs mapped, one patch after another).

For one patch (F fibers x K wavelength bins, a margin box of NY x NX pixels):

    spots (PSF)  ->  A^T W A (its block band over fibers), A^T W p (:mod:`.projection`)
    ->  block-band factor, solve and decorrelation of the kept fibers
    (:func:`jaxspec.solve.solve_patch`)  ->  model, chi2pix, pixmask

:func:`_solve_chunk` is the jit-compiled, vmapped function over a chunk of patches; its
signature ``(psf, image, ivar, inputs, regularize, minweight_frac, psferr, static)`` is
the seam for sharding (:class:`jaxspec._pipeline.devices.ShardedSolve` is a drop-in
replacement).  It specialises only on :class:`_Static` (shapes and the decorrelation
mode), so every frame of one shape shares one compiled program.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ..psf import PSF
from ..solve import solve_patch
from .geometry import PatchGeometry
from .projection import gather_box, model_box, normal_equations, normal_equations_regions, pixel_diagnostics


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the compiled patch function specializes on."""

    nfiber: int
    nbin: int
    box: tuple[int, int]  # margin box (NY + 2 ny, NX + 2 nx)
    band: int
    fiber_band: int
    ndiag: int
    decorrelate: str
    #: fibers a patch keeps (its own, not its neighbours): only these are decorrelated;
    #: None decorrelates every slot
    nkeep: int | None = None
    #: the CPU's kernel: the patches of a chunk one after another (``lax.map``), the
    #: normal equations of each assembled one (fiber, bin) offset per step over the
    #: stamps' overlap only (:func:`normal_equations_regions`, a loop XLA:CPU runs
    #: faster than the fused gather of every offset), then the same block-band solve
    #: as on accelerators; the same results to rounding (docs/performance.md, "CPU
    #: (2-core CI machine)")
    offset_steps: bool = False


def _round_up(n: int, m: int) -> int:
    return int(m * math.ceil(n / m))


#: Fields of the PSF models that only host code reads (the wavelength limits, for
#: checks and default grids); the spots never do.  They follow from the traces, so
#: every exposure's PSF file has its own values.
_HOST_ONLY_STATIC = ("wmin", "wmax", "wmin_all", "wmax_all")


def _kernel_psf(psf: PSF) -> PSF:
    """``psf`` (the same arrays) with its host-only *static* fields at one fixed value.

    A PSF's static fields are part of the compiled kernel's cache key.  The library's
    models keep the wavelength limits as leaves (:func:`jaxspec.psf._base.wave_limit_field`),
    so they come back unchanged; a PSF class that declares them static gets them set
    to 0 here, so that frames whose PSFs differ only in their traces still share one
    program.  The spots are unchanged: the kernel never reads these fields.
    """
    if not dataclasses.is_dataclass(psf):
        return psf
    names = [f.name for f in dataclasses.fields(psf)
             if f.name in _HOST_ONLY_STATIC and f.metadata.get("static") and getattr(psf, f.name) != 0.0]
    if not names:
        return psf
    out = copy.copy(psf)
    for name in names:
        object.__setattr__(out, name, 0.0)
    return out


def _patch_inputs(geom: PatchGeometry, origin: tuple[int, int], margin: tuple[int, int], nbin: int) -> dict[str, np.ndarray]:
    """Per-patch index arrays (host) consumed by the compiled function."""
    k = np.arange(nbin)[None, :]
    wave_idx = geom.wave_start[:, None] + k
    wave_ok = (k < geom.nwave_patch[:, None]) & (wave_idx < len(geom.wave_ext))
    wave_idx = np.where(wave_ok, wave_idx, 0)
    oy, ox = origin
    my, mx = margin
    box = geom.box
    # margin-box origin in canvas coordinates, and the real box inside it
    y0 = box[:, 2] - oy - my
    x0 = box[:, 0] - ox - mx
    kept = geom.out_fiber >= 0
    return dict(
        keep_slot=np.argmax(kept, axis=1).astype(np.int32),  # first kept slot (kept slots are contiguous)
        fibers=geom.fibers,
        fiber_valid=geom.fiber_valid,
        wave=geom.wave_ext[wave_idx],
        wave_valid=wave_ok,
        y0=y0.astype(np.int32),
        x0=x0.astype(np.int32),
        box_ny=(box[:, 3] - box[:, 2]).astype(np.int32),
        box_nx=(box[:, 1] - box[:, 0]).astype(np.int32),
        box_ylo=box[:, 2].astype(np.int32),
        box_xlo=box[:, 0].astype(np.int32),
    )


def _solve_one_patch(psf: PSF, image, ivar, inputs, regularize, minweight_frac, psferr, static: _Static):
    """Spots -> normal equations -> solve -> diagnostics for one patch."""
    ny, nx = psf.stamp_shape
    nbox_y, nbox_x = static.box
    with jax.named_scope("spots"):
        fibers = inputs["fibers"][:, None]
        wave = inputs["wave"][None, :]
        # placed as specter's xypix places them at the CCD's edges: a spot whose trace
        # centre is off the CCD's rows is dropped, one whose corner falls below row or
        # column 0 is a row (column) short (docs/concepts.md, "At the CCD's edges")
        xmin, ymin, stamps = psf.spots(fibers, wave, edges="specter")
        valid = inputs["fiber_valid"][:, None] & inputs["wave_valid"][None, :]
        stamps = jnp.where(valid[..., None, None], stamps, 0.0)
        # corners in margin-box coordinates; a far-away spot is parked in the margin
        cy = jnp.clip(ymin - inputs["box_ylo"] + ny, 0, nbox_y - ny)
        cx = jnp.clip(xmin - inputs["box_xlo"] + nx, 0, nbox_x - nx)
        far = (ymin - inputs["box_ylo"] + ny != cy) | (xmin - inputs["box_xlo"] + nx != cx)
        stamps = jnp.where(far[..., None, None], 0.0, stamps)
    with jax.named_scope("pixels"):
        img = gather_box(image, inputs["y0"], inputs["x0"], static.box)
        iv = gather_box(ivar, inputs["y0"], inputs["x0"], static.box)
        rows = jnp.arange(nbox_y, dtype=jnp.int32)[:, None]
        cols = jnp.arange(nbox_x, dtype=jnp.int32)[None, :]
        inside = (rows >= ny) & (rows < ny + inputs["box_ny"]) & (cols >= nx) & (cols < nx + inputs["box_nx"])
        iv = jnp.where(inside, iv, 0.0)
        img = jnp.where(inside, img, 0.0)
    with jax.named_scope("normal_equations"):
        if static.offset_steps:
            q, y, fluxweight = normal_equations_regions(stamps, cy, cx, valid, img, iv, static.band,
                                                        static.fiber_band)
        else:
            q, y, fluxweight = normal_equations(stamps, cy, cx, valid, img, iv, static.band, static.fiber_band)
    with jax.named_scope("solve"):
        sol = solve_patch(
            q, y, fluxweight, valid.reshape(-1), static.nfiber, static.nbin, static.ndiag,
            decorrelate=static.decorrelate, regularize=regularize, minweight_frac=minweight_frac,
            keep=None if static.nkeep is None else (inputs["keep_slot"], static.nkeep),
        )
    with jax.named_scope("diagnostics"):
        model = model_box(stamps, cy, cx, sol.xflux, static.box)
        chi2pix, pixmask = pixel_diagnostics(stamps, cy, cx, img, iv, model, psferr)
    return dict(
        flux=sol.flux, ivar=sol.ivar, resolution=sol.resolution, xflux=sol.xflux,
        chi2pix=chi2pix, pixmask_fraction=pixmask,
    )


@functools.partial(jax.jit, static_argnames=("static",))
def _solve_chunk(psf, image, ivar, inputs, regularize, minweight_frac, psferr, static):
    fn = functools.partial(_solve_one_patch, static=static)
    if static.offset_steps:
        # CPU: one patch after another; the assembly's lax.switch stays a branch (under
        # vmap it would run every size class) and one patch's stamps stay in cache
        return jax.lax.map(lambda x: fn(psf, image, ivar, x, regularize, minweight_frac, psferr), inputs)
    return jax.vmap(fn, in_axes=(None, None, None, 0, None, None, None))(
        psf, image, ivar, inputs, regularize, minweight_frac, psferr
    )


def default_chunk_size() -> int:
    """Patches per compiled call: 512 on accelerators, 32 on CPUs.

    On a CPU the patches of a call run one after another (``lax.map``), so the
    working set is one patch's whatever the chunk; 32 patches a call (the reference
    cases' 20 in one) leave little host work per patch (docs/performance.md,
    "CPU (2-core CI machine)").
    """
    return 512 if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else 32


#: (library name part, set, get) of the BLAS thread-count controls probed in the
#: process's loaded libraries: OpenBLAS (plain, 64-bit-integer and the scipy/numpy
#: wheels' prefixed builds), MKL, BLIS
_BLAS_CONTROLS = (
    ("openblas", "openblas_set_num_threads", "openblas_get_num_threads"),
    ("openblas", "openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas", "scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas", "scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("mkl_rt", "MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
    ("blis", "bli_thread_set_num_threads", "bli_thread_get_num_threads"),
)
_blas_found: dict[str, list] = {}
_blas_scan: list = []  # [len(sys.modules) at the last scan, its controls]


def _loaded_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[-1].strip() for line in f if ".so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def _blas_thread_controls() -> list[tuple]:
    """``(set, get)`` ctypes functions of every BLAS thread pool loaded in this process
    (the scan again only once more modules are imported: libraries come with them)."""
    key = len(sys.modules)
    if _blas_scan and _blas_scan[0] == key:
        return _blas_scan[1]
    found = []
    for path in _loaded_libraries():
        name = os.path.basename(path).lower()
        if not any(part in name for part, _, _ in _BLAS_CONTROLS):
            continue
        if path not in _blas_found:
            funcs = []
            try:
                lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL)
            except OSError:
                lib = None
            for part, set_name, get_name in _BLAS_CONTROLS:
                if lib is None or part not in name:
                    continue
                try:
                    set_fn, get_fn = getattr(lib, set_name), getattr(lib, get_name)
                except AttributeError:
                    continue
                set_fn.restype, set_fn.argtypes = None, [ctypes.c_int]
                get_fn.restype, get_fn.argtypes = ctypes.c_int, []
                funcs.append((set_fn, get_fn))
                break
            _blas_found[path] = funcs
        found.extend(_blas_found[path])
    _blas_scan[:] = [key, found]
    return found


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Limit the loaded BLAS libraries (OpenBLAS, MKL, BLIS) to ``n`` threads inside the block.

    XLA:CPU's LAPACK calls (Cholesky, triangular solves, eigh) go through the BLAS
    that scipy links; its own thread pool then competes with XLA's for the same
    cores.  The CPU extraction runs with one BLAS thread (docs/performance.md, "CPU
    (2-core CI machine)"); each library's previous count is restored on exit.
    ``n=None`` does nothing (accelerators).  It uses the libraries' C API through
    ctypes (found in ``/proc/self/maps``), else threadpoolctl where it is installed;
    a BLAS neither knows is left alone.  The count is the process's: BLAS calls of
    other threads meanwhile see it too.
    """
    if n is None:
        yield
        return
    controls = _blas_thread_controls()
    if not controls and ("threadpoolctl" in sys.modules or _has_threadpoolctl()):
        import threadpoolctl

        with threadpoolctl.threadpool_limits(limits=int(n), user_api="blas"):
            yield
        return
    before = [get() for _, get in controls]
    for (set_fn, _), old in zip(controls, before):
        if old != n:
            set_fn(int(n))
    try:
        yield
    finally:
        for (set_fn, get_fn), old in zip(controls, before):
            if get_fn() != old:
                set_fn(old)


@functools.lru_cache(maxsize=1)
def _has_threadpoolctl() -> bool:
    import importlib.util

    return importlib.util.find_spec("threadpoolctl") is not None
