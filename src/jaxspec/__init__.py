"""jaxspec: spectro-perfectionism extraction of fiber spectra in JAX.

The public API:

* PSF models and files: :func:`read_psf`, :func:`write_psf`, :class:`GaussHermitePSF`,
  :class:`TraceGaussianPSF`, :class:`GaussianPSF`, :func:`desi_like_psf` (also in
  :mod:`jaxspec.psf`).
* Forward model: :func:`project`, :func:`simulate`.
* Extraction: :func:`extract` -> :class:`Extraction`; :func:`patch_geometry`.
* DESI files: :func:`read_preproc`, :func:`write_preproc`, :func:`read_frame`,
  :func:`write_frame`.
* Linear algebra of one patch: :mod:`jaxspec.solve`.

Importing jaxspec never changes JAX's global configuration; enable float64 with
``jax.config.update("jax_enable_x64", True)`` for science results.
"""

from . import psf, solve
from ._extract import Extraction, extract
from ._frameio import Frame, Preproc, read_frame, read_preproc, write_frame, write_preproc
from ._geometry import PatchGeometry, patch_geometry
from ._project import project, simulate
from ._version import __version__
from .psf import GaussHermitePSF, GaussianPSF, PSF, TraceGaussianPSF, desi_like_psf, read_psf, write_psf
from .solve import apply_resolution

__all__ = [
    "Extraction",
    "Frame",
    "GaussHermitePSF",
    "GaussianPSF",
    "PSF",
    "PatchGeometry",
    "Preproc",
    "TraceGaussianPSF",
    "__version__",
    "apply_resolution",
    "desi_like_psf",
    "extract",
    "patch_geometry",
    "project",
    "psf",
    "read_frame",
    "read_preproc",
    "read_psf",
    "simulate",
    "solve",
    "write_frame",
    "write_preproc",
    "write_psf",
]
