"""jaxspec: spectro-perfectionism extraction of fiber spectra in JAX.

The public API:

* PSF models and files: :func:`read_psf`, :func:`write_psf`, :class:`GaussHermitePSF`,
  :class:`TraceGaussianPSF`, :class:`GaussianPSF`, :func:`desi_like_psf` (also in
  :mod:`jaxspec.psf`).
* Forward model: :func:`project`, :func:`simulate`.
* Extraction: :func:`extract` -> :class:`Extraction`; :func:`patch_geometry` and
  :func:`extract_patches` (a fixed geometry, e.g. to differentiate through the PSF).
* Calibration: :func:`simulate_arc`, :func:`simulate_flat`, :func:`arc_lines`,
  :func:`fit_psf`, :func:`fit_psf_ccd`, :func:`flux_jacobian`,
  :func:`propagate_psf_uncertainty`.
* Many frames and devices: :func:`run_batch` of :class:`FrameJob` s,
  :func:`extract_sharded` (local devices), :func:`extract_distributed` (MPI ranks).
* DESI files: :func:`read_preproc`, :func:`write_preproc`, :func:`read_frame`,
  :func:`write_frame`.
* Linear algebra of one patch: :mod:`jaxspec.solve`.

Importing jaxspec never changes JAX's global configuration; enable float64 with
``jax.config.update("jax_enable_x64", True)`` for science results.
"""

from . import psf, solve
from ._pipeline.batch import FrameJob, run_batch
from ._simulation.calib import (
    CalibImage,
    LineList,
    arc_lines,
    flat_spectrum,
    read_lines,
    simulate_arc,
    simulate_flat,
    write_lines,
)
from ._pipeline.devices import extract_distributed, extract_sharded
from ._extraction.extract import Extraction, extract, extract_patches
from ._fit.fit import (
    CalibPatch,
    FitResult,
    apply_psf_params,
    calib_patch,
    fit_psf,
    fit_psf_ccd,
    flux_jacobian,
    propagate_psf_uncertainty,
)
from ._io.frames import Frame, Preproc, read_frame, read_preproc, write_frame, write_preproc
from ._extraction.geometry import PatchGeometry, patch_geometry
from ._simulation.project import project, simulate
from ._version import __version__
from .psf import GaussHermitePSF, GaussianPSF, PSF, TraceGaussianPSF, desi_like_psf, read_psf, write_psf
from .solve import apply_resolution

__all__ = [
    "CalibImage",
    "CalibPatch",
    "Extraction",
    "FitResult",
    "Frame",
    "FrameJob",
    "GaussHermitePSF",
    "GaussianPSF",
    "LineList",
    "PSF",
    "PatchGeometry",
    "Preproc",
    "TraceGaussianPSF",
    "__version__",
    "apply_psf_params",
    "apply_resolution",
    "arc_lines",
    "calib_patch",
    "desi_like_psf",
    "extract",
    "extract_distributed",
    "extract_patches",
    "extract_sharded",
    "fit_psf",
    "fit_psf_ccd",
    "flat_spectrum",
    "flux_jacobian",
    "patch_geometry",
    "project",
    "propagate_psf_uncertainty",
    "psf",
    "read_frame",
    "read_lines",
    "read_preproc",
    "read_psf",
    "run_batch",
    "simulate",
    "simulate_arc",
    "simulate_flat",
    "solve",
    "write_frame",
    "write_lines",
    "write_preproc",
    "write_psf",
]
