"""jaxspec: spectro-perfectionism extraction of fiber spectra in JAX."""

from ._version import __version__
from . import psf, solve

__all__ = ["__version__", "psf", "solve"]
