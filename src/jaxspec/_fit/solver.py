"""Levenberg-Marquardt on one patch, and :func:`fit_psf` (one patch end to end).

The normal equations come compiled from :mod:`.patch`; the small dense solves,
the damping and the stopping rule run on the host, which also reports progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from .._simulation.calib import LineList
from ..psf._gausshermite import GaussHermitePSF
from .params import DEFAULT_GH_TERMS, DEFAULT_WHAT, LIN_KEYS, PSF_KEYS, FiberIndices
from .patch import BrokenFibers, CalibPatch, _chi2, _model, _normal_equations, calib_patch, check_fiber_light
from .result import FitResult

log = logging.getLogger("jaxspec.fit")

__all__ = ["fit_psf"]


def _lm(patch: CalibPatch, theta: np.ndarray, *, maxiter, step_tol, chi2_rtol, lam0, report):
    """Levenberg-Marquardt on the host with compiled Gauss-Newton pieces.

    Parameters whose ``J^T J`` diagonal is 0 (padding lines, a line whose spots
    have left the box, everything of a broken fiber) are held fixed in that iteration
    and get an infinite error.
    """
    lay = patch.layout
    linear = lay.mask(LIN_KEYS)
    dead = patch.dead_mask()

    def ne(th):
        c, a, g = _normal_equations(patch, jnp.asarray(th))
        a = np.asarray(a)
        return float(c), a, np.asarray(g), np.diag(a) > 0

    # the model is linear in the fluxes: solve for them first at the initial PSF
    chi2, JtJ, Jtr, active = ne(theta)
    theta = theta + _solve_scaled(JtJ, Jtr, active & linear)
    chi2, JtJ, Jtr, active = ne(theta)
    if not np.all(active[~linear & ~dead]):
        free = [k for k, sl in lay.slices.items() for i in range(sl.start, sl.stop)
                if not active[i] and not dead[i] and k in PSF_KEYS]
        raise ValueError(f"PSF parameters {sorted(set(free))} have no pixels constraining them")
    hist_c, hist_s, hist_l = [chi2], [np.inf], [0.0]
    report(0, chi2, np.inf, 0.0)
    lam = lam0
    converged = False
    it = 0
    while it < maxiter:
        it += 1
        dg = np.where(active, np.diag(JtJ), 1.0)
        accepted = False
        for _ in range(20):
            try:
                delta = _solve_scaled(JtJ + lam * np.diag(dg), Jtr, active)
            except np.linalg.LinAlgError:
                lam *= 10.0
                continue
            chi2_new = float(_chi2(patch, jnp.asarray(theta + delta)))
            if np.isfinite(chi2_new) and chi2_new <= chi2:
                accepted = True
                break
            lam *= 4.0
        if not accepted:
            log.info("fit-psf: no step lowers chi2 further (lambda %.1e); stopping", lam)
            converged = True
            break
        sig = np.sqrt(np.diag(_inv_active(JtJ, active)))
        step = float(np.max(np.abs(delta)[active] / sig[active]))
        dchi2 = chi2 - chi2_new
        theta = theta + delta
        chi2, JtJ, Jtr, active = ne(theta)
        hist_c.append(chi2)
        hist_s.append(step)
        hist_l.append(lam)
        report(it, chi2, step, lam)
        lam = max(lam / 5.0, 1e-12)
        if step < step_tol or dchi2 < chi2_rtol * chi2:
            converged = True
            break
    cov = _inv_active(JtJ, active)
    return theta, chi2, cov, active, it, converged, hist_c, hist_s, hist_l


def _solve_scaled(A, b, active):
    """Solve ``A x = b`` on the active parameters (Jacobi-scaled); 0 elsewhere."""
    out = np.zeros(len(b))
    a = A[np.ix_(active, active)]
    sc = 1.0 / np.sqrt(np.diag(a))
    out[active] = sc * np.linalg.solve(a * sc[:, None] * sc[None, :], b[active] * sc)
    return out


def _inv_active(JtJ, active):
    """Inverse of ``JtJ`` on the active parameters (inf on the diagonal elsewhere)."""
    n = len(JtJ)
    cov = np.zeros((n, n))
    a = JtJ[np.ix_(active, active)]
    sc = 1.0 / np.sqrt(np.diag(a))  # unit diagonal: a well-conditioned inverse
    inv = np.linalg.inv(a * sc[:, None] * sc[None, :]) * sc[:, None] * sc[None, :]
    cov[np.ix_(active, active)] = 0.5 * (inv + inv.T)
    cov[~active, ~active] = np.inf
    return cov


def fit_psf(
    psf_init: GaussHermitePSF,
    arcs: Sequence = (),
    flats: Sequence = (),
    *,
    lines: LineList | None = None,
    fibers: FiberIndices | None = None,
    specmin: int = 0,
    nspec: int | None = None,
    waverange: tuple[float, float] | None = None,
    xyrange: tuple[int, int, int, int] | None = None,
    what: Sequence[str] = DEFAULT_WHAT,
    trace_deg: int = 0,
    gh_terms: Sequence[str] = DEFAULT_GH_TERMS,
    per_fiber_gh: bool = False,
    flat_deg: int = 2,
    flat_lamp: Callable | None = None,
    flat_dw: float = 0.5,
    maxiter: int = 30,
    step_tol: float = 0.01,
    chi2_rtol: float = 1e-10,
    lam0: float = 1e-3,
    callback: Callable[[int, float, float, float], None] | None = None,
    broken_fibers: BrokenFibers = None,
) -> FitResult:
    """Fit PSF corrections and line / flat fluxes to calibration images of one patch.

    Args:
        psf_init: starting PSF (a :class:`GaussHermitePSF`, e.g. from :func:`read_psf`).
        arcs: arc images: :class:`CalibImage`, ``(image, ivar)`` (full CCD) or
            ``(image, ivar, xyrange)`` (a sub-image at ``xyrange``). Every arc gets
            its own line fluxes.
        flats: flat images, in the same forms; every flat gets its own amplitudes.
        lines: arc line list (required with arcs); lines whose spots reach the
            box are modelled.
        fibers: fibers to fit (consecutive absolute indices; their PSF
            corrections and fluxes are free; other fibers are not modelled, so keep
            the box clear of their light: fit whole bundles).
        specmin: first fiber to fit, when ``fibers`` is not given.
        nspec: number of fibers to fit, when ``fibers`` is not given.
        waverange: wavelength range [A] whose pixels are fitted (default: the PSF's).
        xyrange: explicit pixel box (overrides ``waverange``).
        what: subset of ``("xtrace", "ytrace", "sigma", "gh")``.
        trace_deg: Legendre degree of the trace offsets (0: constant shifts).
        gh_terms: Gauss-Hermite terms to correct.
        per_fiber_gh: correct them per fiber instead of one offset shared by the
            fitted fibers.
        flat_deg: Legendre degree (over the box's wavelengths) of each fiber's
            flat amplitude.
        flat_lamp: ``f(wave) -> shape`` of the lamp (default :func:`flat_spectrum`).
        flat_dw: flat sampling step [A].
        maxiter: most Levenberg-Marquardt iterations.
        step_tol: converged when an accepted step moves no parameter by more
            than ``step_tol`` of its uncertainty.
        chi2_rtol: converged when an accepted step lowers chi2 by less than
            ``chi2_rtol`` of it.
        lam0: initial Marquardt damping (relative to the diagonal of J^T J).
        callback: ``callback(iteration, chi2, step, lambda)`` after each
            iteration (default: log at INFO).
        broken_fibers: fibers of ``fibers`` without light (specex's ``--broken-fibers``):
            not fitted, their spots not modelled, their coefficients the input's.

    Returns:
        A :class:`FitResult`.

    Raises:
        ValueError: bad input; :class:`jaxspec._fit.patch.BundleInputError` for data
            problems of the patch (no arc line or lamp light in it, a fiber without light
            that is not in ``broken_fibers``), all before any fitting.
    """
    t0 = time.perf_counter()
    patch, meta = calib_patch(
        psf_init, arcs, flats, lines=lines, fibers=fibers, specmin=specmin, nspec=nspec,
        waverange=waverange, xyrange=xyrange, what=what, trace_deg=trace_deg, gh_terms=gh_terms,
        per_fiber_gh=per_fiber_gh, flat_deg=flat_deg, flat_lamp=flat_lamp, flat_dw=flat_dw,
        broken_fibers=broken_fibers,
    )
    check_fiber_light(psf_init, arcs, flats, lines=lines, fibers=np.asarray(patch.fibers), box=meta["real_box"],
                      broken_fibers=broken_fibers)
    return _fit_patch(patch, meta, maxiter=maxiter, step_tol=step_tol, chi2_rtol=chi2_rtol, lam0=lam0,
                      callback=callback, t0=t0)


def _fit_patch(patch: CalibPatch, meta: dict, *, maxiter=30, step_tol=0.01, chi2_rtol=1e-10, lam0=1e-3, callback=None, t0=None):
    t0 = time.perf_counter() if t0 is None else t0
    s = patch.static
    lay = patch.layout
    fibers = np.asarray(patch.fibers)
    f0, nf = int(fibers[0]), len(fibers)
    npix = int(np.count_nonzero(np.asarray(patch.sqw)))
    report = callback or (lambda it, c, st, lam: log.info(
        "fit-psf fibers %d-%d: iter %2d chi2 %.6g (chi2/dof %.4f) step %.3g sigma lambda %.1e",
        f0, f0 + nf - 1, it, c, c / max(npix - lay.size, 1), st, lam))
    theta0 = np.zeros(lay.size)
    theta, chi2, cov, active, it, converged, hc, hs, hl = _lm(
        patch, theta0, maxiter=maxiter, step_tol=step_tol, chi2_rtol=chi2_rtol, lam0=lam0, report=report)
    err = np.sqrt(np.diag(cov))
    params = {k: np.asarray(v) for k, v in lay.unflatten(theta).items()}
    errors = {k: np.asarray(v) for k, v in lay.unflatten(err).items()}
    psf_fit = patch.corrected_psf({k: jnp.asarray(v) for k, v in params.items()}).with_traces()
    model = np.asarray(_model(patch, jnp.asarray(theta)))
    data = np.asarray(patch.data)[:, :, s.pad:s.pad + s.W]
    ivar = np.asarray(patch.sqw)[:, :, s.pad:s.pad + s.W] ** 2
    kinds = ["arc"] * s.narc + ["flat"] * s.nflat
    return FitResult(
        psf=psf_fit, params=params, errors=errors, cov=cov, theta=theta, slices=dict(lay.slices),
        chi2=chi2, ndof=int(npix - int(active.sum())), chi2_history=hc, step_history=hs,
        lambda_history=hl, niter=it, converged=converged, fibers=fibers, xyrange=meta["box"],
        lines=meta["lines"], data=list(data), ivar=list(ivar), model=list(model), kinds=kinds,
        psf_init=patch.psf, gh_terms=s.gh_terms, seconds=time.perf_counter() - t0, live=np.asarray(patch.live),
    )
