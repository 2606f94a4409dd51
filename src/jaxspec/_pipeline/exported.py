"""The extraction kernel through :mod:`jax.export`: a fresh process skips its tracing and lowering.

JAX's persistent compilation cache keeps the compiled kernel, but every new process
still traces ``_solve_chunk`` and lowers it to StableHLO before it can look the
program up (0.7 s of a cold ``jaxspec extract`` of a full frame on an H200, 2026-12-01).
:class:`ExportedSolve` is a drop-in ``solve_chunk`` (the signature of
:func:`jaxspec._extraction.patch._solve_chunk`) that keeps the traced kernel as an
:class:`jax.export.Exported` in the compilation cache's folder, one file per key, and
runs that: the next process deserialises the module (milliseconds) and finds the
compiled program in the persistent cache.

The key is everything the traced program depends on: the kernel's static shapes
(``_Static``), the tree structure of its arguments (the PSF's class and static
fields) and every leaf's shape, dtype and weak type, the JAX and jaxlib versions, the
backend's platform and version, the JAX options that change tracing (float64, dtype
and rank promotion, matmul precision), jaxspec's own knobs (:mod:`jaxspec._config`)
and a hash of jaxspec's source files (a changed kernel is a new key).  A file that is
absent, unreadable or does not match is exported again; one that cannot be written (an
unwritable folder) is exported again by the next process; without ``flatbuffers``
(jax.export's serialisation) or when exporting fails (a custom call JAX will not
export) the kernel runs as it is, traced.  The results are the same either way (``tests/_pipeline/test_job.py``
and ``tests/_cli/test_extract.py`` check them bit for bit).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os

__all__ = ["ExportedSolve", "export_key"]

log = logging.getLogger("jaxspec")

#: Sub-folder of the compilation cache that holds the exported kernels.
FOLDER = "jaxspec-export"


@functools.cache
def _source_hash() -> str:
    """SHA-256 of jaxspec's Python files (relative path and content), read once per process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@functools.cache
def _versions(platform: str) -> tuple[str, ...]:
    """JAX's and jaxlib's versions, the backend's platform and its version (CUDA's, ...)."""
    import jax

    try:
        platform_version = str(jax.devices(platform)[0].client.platform_version)
    except Exception:  # pragma: no cover - a backend without a client version
        platform_version = "?"
    return (jax.__version__, str(getattr(jax.lib, "__version__", "?")), platform, platform_version)


def _environment() -> str:
    """What, besides the arguments, the traced kernel depends on (versions, backend, options, source)."""
    import jax

    from .._config import config

    options = tuple(getattr(jax.config, name, None) for name in (
        "jax_enable_x64", "jax_numpy_dtype_promotion", "jax_numpy_rank_promotion", "jax_default_matmul_precision"))
    return repr((_versions(jax.default_backend()), options, config().cpu_block_spots, _source_hash()))


def export_key(treedef, leaves, static) -> str:
    """The file name (a SHA-256) of the kernel exported for these arguments (see the module docstring)."""
    import jax

    avals = []
    for leaf in leaves:
        aval = jax.typeof(leaf)
        avals.append((tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False))))
    text = repr(("jaxspec._extraction.patch._solve_chunk", repr(static), str(treedef), avals, _environment()))
    return hashlib.sha256(text.encode()).hexdigest()


class ExportedSolve:
    """``solve_chunk`` for :func:`jaxspec.extract`: the kernel exported once per key, kept in ``folder``.

    Args:
        folder: the persistent compilation cache's folder (the exported kernels go in
            its ``jaxspec-export`` sub-folder); None keeps them in this object only
            (nothing is read or written).

    Calling it is calling ``_solve_chunk(psf, image, ivar, inputs, regularize,
    minweight_frac, psferr, static)``.  ``loaded``, ``exported`` and ``traced``
    count the keys served from a file, exported in this process, and run as they
    are because exporting failed.
    """

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = None if folder is None else os.path.join(os.fspath(folder), FOLDER)
        self._calls: dict[str, object] = {}
        self.loaded = self.exported = self.traced = 0

    def __call__(self, psf, image, ivar, inputs, regularize, minweight_frac, psferr, static):
        import jax

        args = (psf, image, ivar, inputs, regularize, minweight_frac, psferr)
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = export_key(treedef, leaves, static)
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = self._get(key, treedef, leaves, static)
        if call is _TRACED:
            from .._extraction.patch import _solve_chunk

            return _solve_chunk(*args, static=static)
        return call(*leaves)

    # ------------------------------------------------------------------ internals
    def _path(self, key: str) -> str | None:
        return None if self.folder is None else os.path.join(self.folder, key + ".jaxexport")

    def _get(self, key, treedef, leaves, static):
        import jax
        from jax import export

        if importlib.util.find_spec("flatbuffers") is None:  # jax.export cannot keep it: plain tracing is cheaper
            log.debug("the extraction kernel is not exported (no flatbuffers to serialise it); tracing it")
            self.traced += 1
            return _TRACED
        exp = self._read(key, leaves)
        if exp is not None:
            self.loaded += 1
            log.debug("extraction kernel: the exported program %s", self._path(key))
            return jax.jit(exp.call)
        try:
            exp = export.export(jax.jit(_flat_kernel(treedef, static)))(*_avals(leaves))
        except Exception as err:  # a custom call JAX does not export, ...: run the kernel traced
            log.debug("the extraction kernel is not exported (%s: %s); tracing it", type(err).__name__, err)
            self.traced += 1
            return _TRACED
        self.exported += 1
        self._write(key, exp)
        log.debug("extraction kernel: exported (%s)", self._path(key) or "kept in this process")
        return jax.jit(exp.call)

    def _read(self, key, leaves):
        path = self._path(key)
        if path is None or not os.path.exists(path):
            return None
        try:
            from jax import export

            with open(path, "rb") as fh:
                exp = export.deserialize(bytearray(fh.read()))
            if [tuple(a.shape) for a in exp.in_avals] != [_shape(x) for x in leaves]:
                raise ValueError("its arguments' shapes differ")
            return exp
        except Exception as err:  # stale or damaged: exported again (and the file replaced)
            log.debug("exported kernel %s not used (%s: %s); exporting it again", path, type(err).__name__, err)
            return None

    def _write(self, key, exp) -> None:
        path = self._path(key)
        if path is None:
            return
        try:
            blob = exp.serialize()
            os.makedirs(self.folder, exist_ok=True)
            from .._io.atomic import atomic_write

            atomic_write(path, lambda fh: fh.write(blob), overwrite=True)
        except Exception as err:  # no flatbuffers, a read-only folder, ...: the next process exports again
            log.debug("exported kernel not kept in %s (%s: %s)", self.folder, type(err).__name__, err)


_TRACED = object()


def _shape(x) -> tuple[int, ...]:
    import numpy as np

    return tuple(np.shape(x))


def _avals(leaves):
    import jax

    out = []
    for leaf in leaves:
        aval = jax.typeof(leaf)
        out.append(jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False)))
    return out


def _flat_kernel(treedef, static):
    """``_solve_chunk`` of flat leaves (the exported module's arguments are plain arrays)."""
    import jax

    from .._extraction.patch import _solve_chunk

    def kernel(*leaves):
        psf, image, ivar, inputs, regularize, minweight_frac, psferr = jax.tree_util.tree_unflatten(treedef, leaves)
        return _solve_chunk(psf, image, ivar, inputs, regularize, minweight_frac, psferr, static=static)

    return kernel
