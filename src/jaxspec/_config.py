"""Every environment knob of jaxspec, read once (at first use), validated and documented.

| variable | meaning | default |
|---|---|---|
| ``JAXSPEC_CPU_BLOCK_SPOTS`` | spots per block when evaluating many spots on a CPU (``0`` turns blocking off) | 4096 on CPUs of at most 4 cores, else 0 |
| ``JAXSPEC_COMPILATION_CACHE`` | folder of JAX's persistent compilation cache for the commands, or ``off`` | ``$XDG_CACHE_HOME/jaxspec/jax`` (``~/.cache/jaxspec/jax``) |
| ``JAXSPEC_SHARED`` | where tests, benchmarks and examples find DESI's PSF files and specter's reference cases | ``../shared`` beside the checkout |

The library reads them here and nowhere else; the values are fixed for the life of the
process (they are not re-read while tracing, so a compiled program never depends on a
variable that changed after it was built).  Variables set by MPI launchers and
``CUDA_VISIBLE_DEVICES`` are facts about the process, read by :mod:`jaxspec._pipeline`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

__all__ = ["Config", "config"]


@dataclasses.dataclass(frozen=True)
class Config:
    """The environment's settings (see the module docstring for each variable).

    Attributes:
        cpu_block_spots: spots per ``lax.map`` block on the CPU, 0 for none.
        compilation_cache: folder of the persistent compilation cache, or None (off).
        shared: folder of the reference data.
    """

    cpu_block_spots: int
    compilation_cache: str | None
    shared: str


def _cpu_block_spots(environ) -> int:
    text = environ.get("JAXSPEC_CPU_BLOCK_SPOTS")
    if text is None or text.strip() == "":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return 4096 if cores <= 4 else 0
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"JAXSPEC_CPU_BLOCK_SPOTS={text!r}: expected a whole number of spots (0 turns "
                         "blocking off)") from None
    if value < 0:
        raise ValueError(f"JAXSPEC_CPU_BLOCK_SPOTS={text!r}: must be >= 0")
    return value


def _compilation_cache(environ) -> str | None:
    text = environ.get("JAXSPEC_COMPILATION_CACHE")
    if text is not None and text.strip().lower() in ("off", "0", "none", "no", ""):
        return None
    if text:
        return os.path.abspath(os.path.expanduser(text))
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxspec", "jax")


def _shared(environ) -> str:
    text = environ.get("JAXSPEC_SHARED")
    if text:
        return os.path.abspath(os.path.expanduser(text))
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(os.path.join(here, "..", "..", "..", "shared"))


def read_config(environ=None) -> Config:
    """The settings of ``environ`` (default: this process's environment), validated."""
    env = os.environ if environ is None else environ
    return Config(cpu_block_spots=_cpu_block_spots(env), compilation_cache=_compilation_cache(env),
                  shared=_shared(env))


@functools.cache
def config() -> Config:
    """This process's settings, read once."""
    return read_config()
