"""jaxspec: spectro-perfectionism extraction of fiber spectra in JAX.

The public API:

* PSF models and files: :func:`read_psf`, :func:`write_psf`, :class:`GaussHermitePSF`,
  :class:`TraceGaussianPSF`, :class:`GaussianPSF`, :func:`desi_like_psf` (also in
  :mod:`jaxspec.psf`).
* Forward model: :func:`project`, :func:`simulate`.
* Extraction: :func:`extract` -> :class:`Extraction`; :func:`patch_geometry` and
  :func:`extract_patches` (a fixed geometry, e.g. to differentiate through the PSF).
* Calibration: :func:`simulate_arc`, :func:`simulate_flat`, :func:`arc_lines`,
  :func:`fit_psf`, :func:`fit_psf_ccd`, :func:`fit_bundle` (the full model), :func:`measure_trace_offsets`
  and :func:`apply_trace_offsets` (a start PSF a few pixels off), :func:`flux_jacobian`,
  :func:`propagate_psf_uncertainty`.
* Many frames and devices: :func:`run_batch` of :class:`FrameJob` s,
  :func:`extract_sharded` (local devices), :func:`extract_distributed` (MPI ranks).
* DESI files: :func:`read_preproc`, :func:`write_preproc`, :func:`read_frame`,
  :func:`write_frame`.
* Linear algebra of one patch: :mod:`jaxspec.solve`.

Importing jaxspec never changes JAX's global configuration; enable float64 with
``jax.config.update("jax_enable_x64", True)`` for science results.
"""

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

#: Where each public name lives (imported on first use, so that ``import jaxspec``
#: and ``jaxspec --help`` do not start JAX).
_HOMES = {
    "apply_psf_params": "._fit",
    "apply_resolution": ".solve",
    "apply_trace_offsets": "._fit",
    "arc_lines": "._simulation.calib",
    "BundleFit": "._fit",
    "calib_patch": "._fit",
    "CCDFit": "._fit",
    "CalibImage": "._simulation.calib",
    "CalibPatch": "._fit",
    "DEFAULT_GH_TERMS": "._fit",
    "desi_like_psf": ".psf",
    "extract": "._extraction.extract",
    "extract_distributed": "._pipeline.devices",
    "extract_patches": "._extraction.extract",
    "extract_sharded": "._pipeline.devices",
    "Extraction": "._extraction.extract",
    "ExtractOptions": "._extraction.options",
    "fit_bundle": "._fit",
    "fit_psf": "._fit",
    "fit_psf_ccd": "._fit",
    "fit_psf_full": "._fit",
    "FitResult": "._fit",
    "flat_spectrum": "._simulation.calib",
    "flux_jacobian": "._fit",
    "Frame": "._io.frames",
    "FrameJob": "._pipeline.batch",
    "FrameOptions": "._pipeline.job",
    "GaussHermitePSF": ".psf",
    "GaussHermite2PSF": ".psf",
    "GaussianPSF": ".psf",
    "LineList": "._simulation.calib",
    "measure_trace_offsets": "._fit",
    "OptionError": "._extraction.options",
    "patch_geometry": "._extraction.geometry",
    "plot_extraction": "._plots",
    "plot_frame": "._plots",
    "PatchGeometry": "._extraction.geometry",
    "Preproc": "._io.frames",
    "project": "._simulation.project",
    "propagate_psf_uncertainty": "._fit",
    "psf": ".psf",
    "PSF": ".psf",
    "read_frame": "._io.frames",
    "read_lines": "._simulation.calib",
    "read_preproc": "._io.frames",
    "read_psf": ".psf",
    "run_batch": "._pipeline.batch",
    "run_frame": "._pipeline.job",
    "simulate": "._simulation.project",
    "simulate_arc": "._simulation.calib",
    "simulate_flat": "._simulation.calib",
    "solve": ".solve",
    "TraceGaussianPSF": ".psf",
    "TraceOffset": "._fit",
    "write_frame": "._io.frames",
    "write_lines": "._simulation.calib",
    "write_preproc": "._io.frames",
    "write_psf": ".psf",
    "world": "._pipeline.devices",
    "bind_gpus": "._pipeline.devices",
}

__all__ = [
    "__version__",
    "apply_psf_params",
    "apply_resolution",
    "apply_trace_offsets",
    "arc_lines",
    "BundleFit",
    "calib_patch",
    "CalibImage",
    "CalibPatch",
    "CCDFit",
    "DEFAULT_GH_TERMS",
    "desi_like_psf",
    "extract",
    "extract_distributed",
    "extract_patches",
    "extract_sharded",
    "Extraction",
    "ExtractOptions",
    "fit_bundle",
    "fit_psf",
    "fit_psf_ccd",
    "fit_psf_full",
    "FitResult",
    "flat_spectrum",
    "flux_jacobian",
    "Frame",
    "FrameJob",
    "FrameOptions",
    "GaussHermitePSF",
    "GaussHermite2PSF",
    "GaussianPSF",
    "LineList",
    "measure_trace_offsets",
    "OptionError",
    "patch_geometry",
    "PatchGeometry",
    "plot_extraction",
    "plot_frame",
    "Preproc",
    "project",
    "propagate_psf_uncertainty",
    "psf",
    "PSF",
    "read_frame",
    "read_lines",
    "read_preproc",
    "read_psf",
    "run_batch",
    "run_frame",
    "simulate",
    "simulate_arc",
    "simulate_flat",
    "solve",
    "TraceGaussianPSF",
    "TraceOffset",
    "write_frame",
    "write_lines",
    "write_preproc",
    "write_psf",
    "world",
    "bind_gpus",
]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'jaxspec' has no attribute {name!r}")
    module = importlib.import_module(home, __name__)
    value = module if home == "." + name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # the same names for type checkers and documentation tools
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
    from ._fit import (
        DEFAULT_GH_TERMS,
        BundleFit,
        CalibPatch,
        CCDFit,
        FitResult,
        TraceOffset,
        apply_psf_params,
        apply_trace_offsets,
        calib_patch,
        fit_bundle,
        fit_psf,
        fit_psf_ccd,
        fit_psf_full,
        flux_jacobian,
        measure_trace_offsets,
        propagate_psf_uncertainty,
    )
    from ._io.frames import Frame, Preproc, read_frame, read_preproc, write_frame, write_preproc
    from ._extraction.geometry import PatchGeometry, patch_geometry
    from ._simulation.project import project, simulate
    from ._version import __version__
    from .psf import GaussHermite2PSF, GaussHermitePSF, GaussianPSF, PSF, TraceGaussianPSF, desi_like_psf, read_psf, write_psf
    from .solve import apply_resolution
    from ._extraction.options import ExtractOptions, OptionError
    from ._pipeline.job import FrameOptions, run_frame
    from ._pipeline.devices import bind_gpus, world
    from ._plots import plot_extraction, plot_frame
