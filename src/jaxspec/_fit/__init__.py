"""PSF calibration: fit a Gauss-Hermite PSF to arc and flat exposures.

One file per idea: :mod:`.params` (the fitted corrections and their
application to a PSF), :mod:`.patch` (one calibration patch, its forward model
and Gauss-Newton pieces), :mod:`.solver` (Levenberg-Marquardt, :func:`fit_psf`),
:mod:`.result` (:class:`FitResult`), :mod:`.ccd` (the bundle x block grid,
:func:`fit_psf_ccd`, and the checks that run before any fitting),
:mod:`.uncertainty` (covariances into extracted flux), :mod:`.bundle` (the full
model of one bundle over all its rows, :func:`fit_bundle`), :mod:`.align` (the start's
trace offsets measured from the images before any check or fit,
:func:`measure_trace_offsets`).  ``_fit`` imports
``psf``, ``solve``, ``_simulation`` and ``_extraction``, never files or the CLI.

The forward model of a calibration image is the PSF's spots, scattered into the
pixels exactly as :func:`jaxspec.project` does, of

* arcs: each line of a line list, at its known wavelength, with an unknown
  number of photons per fiber and exposure (linear parameters);
* flats: a continuum ``lamp(w) * poly_f(w)`` per fiber, with ``lamp`` a known
  shape (default :func:`jaxspec.flat_spectrum`) and ``poly_f`` a Legendre
  series of degree ``flat_deg`` with unknown coefficients (linear);

through a PSF whose parameters are those of the initial PSF plus corrections.
Broken fibers (``broken_fibers``, specex's ``--broken-fibers``) have no light: their
spots are not modelled and nothing of theirs is fitted (their coefficients stay the
initial PSF's); a fiber without light that is not declared broken is refused before
any fitting (:func:`jaxspec._fit.patch.check_fiber_light`).
**What is fitted** (``what``), on top of the initial PSF's coefficients:

* ``"xtrace"``/``"ytrace"``: per-fiber offsets [pixels] of the first
  ``trace_deg + 1`` Legendre coefficients of the x / y traces (default
  ``trace_deg=0``: a constant shift of each trace);
* ``"sigma"``: per-fiber log-scales of GHSIGX and GHSIGY (all their Legendre
  coefficients multiplied by ``exp(s)``: the widths stay positive by
  construction and keep the file's wavelength dependence);
* ``"shape"``: the full model (:mod:`.bundle`, :func:`fit_bundle`): every GHSIGX,
  GHSIGY and GH-i-j coefficient but GH-0-0 as a Legendre series over the
  bundle's fibers and in wavelength, added to the file's coefficients;
* ``"gh"``: additive offsets to the constant Legendre coefficient of the
  Gauss-Hermite terms ``gh_terms``, shared by the fitted fibers (a bundle) or
  per fiber (``per_fiber_gh=True``).  The spot stays normalised to unit sum
  (the PSF model divides by the stamp's sum), so GH-0-0 is never fitted.

The default ``gh_terms`` leave out GH-1-0, GH-0-1, GH-2-0, GH-0-2: to first
order they are the derivatives of the Gaussian core with respect to its centre
and width, i.e. degenerate with the trace shifts and sigma scales.  These are
corrections constant over the fitted patch (fibers x pixel box);
:func:`fit_psf_ccd` fits a bundle x wavelength-block grid of patches and turns
the per-block corrections into Legendre coefficients of the file's degrees.

**The minimiser** is Levenberg-Marquardt on the pixel residuals
``(data - model) sqrt(ivar)``.  It is hand-written rather than taken from
optimistix because the Jacobian has a structure a generic solver cannot see (measured against
optimistix's Levenberg-Marquardt: docs/fitting.md, "The optimiser"):

* the model is linear in the line fluxes and flat amplitudes: their Jacobian
  columns are the unit-flux spot images themselves (no differentiation);
* every fiber's light depends only on that fiber's PSF corrections (plus the
  shared GH offsets), so the PSF columns of *all* fibers come from a handful of
  forward-mode derivatives (one per parameter kind, "graph colouring": ~9 jvps
  instead of one per parameter), each fiber's light kept in its own band of
  columns;
* ``J^T J`` is assembled from the products of neighbouring fibers' bands only.

A generic Levenberg-Marquardt would form the dense (pixels x parameters)
Jacobian with one jvp per parameter (hundreds) and multiply it densely; here one
iteration of a 25-fiber bundle over ~400 CCD rows costs about as much as a few
forward models.  The normal equations are small (a few hundred unknowns) and
are solved on the host, which also reports progress per iteration and applies
the stopping rule.  The covariance of all parameters is ``(J^T W J)^-1`` at the
minimum (the Gauss-Newton Hessian); its PSF block is the PSF uncertainty
marginalised over the line fluxes and flat amplitudes.
"""

from .align import TraceOffset, apply_trace_offsets, measure_bundle_offset, measure_trace_offsets
from .bundle import BundleFit, bundle_residuals, fit_bundle, fit_psf_full
from .ccd import STATUS_BROKEN, STATUS_FAILED, STATUS_NOT_CONVERGED, STATUS_OK, BundleStatus, CCDFit, fit_psf_ccd
from .params import ALL_WHAT, DEFAULT_GH_TERMS, apply_psf_params
from .patch import BundleInputError, CalibPatch, calib_patch, check_broken_fibers, check_fiber_light, check_patch
from .result import FitResult
from .solver import fit_psf
from .uncertainty import flux_jacobian, propagate_psf_uncertainty

__all__ = [
    "ALL_WHAT",
    "BundleFit",
    "BundleInputError",
    "BundleStatus",
    "bundle_residuals",
    "CCDFit",
    "CalibPatch",
    "DEFAULT_GH_TERMS",
    "FitResult",
    "STATUS_BROKEN",
    "STATUS_FAILED",
    "STATUS_NOT_CONVERGED",
    "STATUS_OK",
    "TraceOffset",
    "apply_psf_params",
    "apply_trace_offsets",
    "calib_patch",
    "check_broken_fibers",
    "check_fiber_light",
    "check_patch",
    "fit_bundle",
    "fit_psf",
    "fit_psf_ccd",
    "fit_psf_full",
    "flux_jacobian",
    "measure_bundle_offset",
    "measure_trace_offsets",
    "propagate_psf_uncertainty",
]
