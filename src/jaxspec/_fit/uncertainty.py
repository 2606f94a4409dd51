"""PSF uncertainty into extracted flux (d flux / d PSF parameters and ``diag(J C J^T)``) and into
the traces and spots themselves (:func:`trace_spot_sigma`)."""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .bundle import BundleFit
from .params import PSF_KEYS, _Layout, apply_psf_params
from .result import FitResult

__all__ = ["flux_jacobian", "propagate_psf_uncertainty", "trace_spot_sigma"]


def _psf_of_params(fit: FitResult | BundleFit):
    """``(layout, p0, psf_of)``: the fit's PSF parameters (in the order of ``fit.psf_cov``), their
    fitted values and the PSF as a JAX function of them (the inverse trace not refitted)."""
    keys = [k for k in PSF_KEYS if k in fit.params and (isinstance(fit, BundleFit) or k in fit.slices)]
    lay = _Layout({k: np.shape(fit.params[k]) for k in keys})
    p0 = jnp.asarray(lay.flatten(fit.params))

    def psf_of(p):
        return apply_psf_params(fit.psf_init, lay.unflatten(p), fit.fibers, gh_terms=getattr(fit, "gh_terms", ()),
                                shape_terms=getattr(fit, "shape_terms", None), live=fit.live)

    return lay, p0, psf_of


def flux_jacobian(
    fit: FitResult | BundleFit,
    image,
    ivar,
    wave,
    *,
    xyrange: tuple[int, int, int, int] | None = None,
    nsubbundles: int = 1,
    nwavestep: int = 50,
    batch: int = 8,
    wavesize: int | None = None,
    **extract_kwargs,
):
    """Extract the fitted fibers with the fitted PSF, and d flux / d PSF parameters.

    The extraction geometry is fixed (from ``fit.psf``; all fitted fibers form
    one bundle); the decorrelated flux is differentiated through the patch
    solves by forward mode, ``batch`` parameters at a time (``jax.linearize``).

    ``nsubbundles``, ``nwavestep``: the extraction's patch sizes (``wavesize``, the previous
    release's name of ``nwavestep``, still accepted with a DeprecationWarning).

    ``fit`` is a patch fit (:class:`FitResult`) or a full-model bundle fit
    (:class:`BundleFit`: columns ``dx``, ``dy``, ``pc`` in the order of ``fit.cov``).

    Returns:
        ``(extraction, jac)``: the :class:`Extraction` and ``jac`` of shape
        ``(nspec, nwave, npsf)`` [photons / A per unit parameter], columns in the
        order of ``fit.theta[fit.psf_mask]`` (i.e. of ``fit.psf_cov``).
    """
    from .._extraction.extract import _as_array, extract_patches
    from .._extraction.geometry import patch_geometry

    if wavesize is not None:
        warnings.warn("flux_jacobian(wavesize=) is deprecated: use nwavestep=", DeprecationWarning, stacklevel=2)
        nwavestep = wavesize
    fibers = fit.fibers
    nf = len(fibers)
    geom = patch_geometry(fit.psf, np.asarray(wave), int(fibers[0]), nf, nf, nsubbundles, nwavestep,
                          **{k: extract_kwargs.pop(k) for k in ("wavepad_frac", "pixpad_frac") if k in extract_kwargs})
    image = _as_array(image)
    ivar = _as_array(ivar)
    lay, p0, psf_of = _psf_of_params(fit)
    psf_fit = fit.psf

    def flux(p):
        psf = psf_of(p)
        # extraction never uses the inverse trace: keep the fitted one
        psf = eqx.tree_at(lambda q: (q.wcoef, q.ylim), psf, (psf_fit.wcoef, psf_fit.ylim))
        return extract_patches(image, ivar, psf, geom, xyrange=xyrange, **extract_kwargs).flux

    ex = extract_patches(image, ivar, psf_fit, geom, xyrange=xyrange, **extract_kwargs)
    _, jvp = jax.linearize(flux, p0)
    eye = jnp.eye(lay.size, dtype=p0.dtype)
    cols = [jax.vmap(jvp)(eye[i:i + batch]) for i in range(0, lay.size, batch)]
    jac = jnp.moveaxis(jnp.concatenate(cols, axis=0), 0, -1)
    return ex, np.asarray(jac)


def propagate_psf_uncertainty(jac, cov) -> np.ndarray:
    """Flux variance from PSF uncertainty: ``diag(J C J^T)`` per (fiber, wavelength).

    Args:
        jac: ``(..., npsf)`` Jacobian of the flux w.r.t. the PSF parameters
            (:func:`flux_jacobian`).
        cov: ``(npsf, npsf)`` covariance of those parameters (``FitResult.psf_cov``).
            Parameters with a non-finite variance were held fixed (those of broken
            fibers, with an infinite or NaN variance): they add nothing.

    Returns:
        The variance, shape ``jac.shape[:-1]`` [(photons / A)^2]; add ``1 / ivar``
        for the total.
    """
    jac = np.asarray(jac)
    cov = np.asarray(cov)
    if cov.shape != (jac.shape[-1], jac.shape[-1]):
        raise ValueError(f"cov {cov.shape} does not match the Jacobian's {jac.shape[-1]} parameters")
    cov = _finite_cov(cov)
    return np.einsum("...i,ij,...j->...", jac, cov, jac)


def _finite_cov(cov) -> np.ndarray:
    """``cov`` with the rows and columns of parameters held fixed (non-finite variance) zeroed."""
    cov = np.asarray(cov)
    fixed = ~np.isfinite(np.diag(cov))
    return np.where(fixed[:, None] | fixed[None, :], 0.0, cov) if np.any(fixed) else cov


@eqx.filter_jit
def _trace_spot_sigma_chunk(psf_init, p0, cov, fibers, live, ispec, wave, shapes, gh_terms, shape_terms):
    """One chunk of :func:`trace_spot_sigma` (one compilation for every fit of one layout)."""
    lay = _Layout(dict(shapes))

    def values(p):
        psf = apply_psf_params(psf_init, lay.unflatten(p), fibers, gh_terms=gh_terms, shape_terms=shape_terms,
                               live=live)
        xmin, ymin, st = psf.spots(ispec, wave)
        return (psf.x(ispec, wave), psf.y(ispec, wave), st), (xmin, ymin)

    (jx, jy, js), (xmin, ymin) = jax.jacfwd(values, has_aux=True)(p0)

    def sigma(j):
        return jnp.sqrt(jnp.maximum(jnp.sum((j @ cov) * j, axis=-1), 0.0))

    return sigma(jx), sigma(jy), sigma(js), xmin, ymin


def trace_spot_sigma(fit: FitResult | BundleFit, ispec, wave, *, chunk: int = 50) -> dict:
    """1-sigma of the fitted traces and spot pixels at ``(ispec, wave)``, from the fit's PSF covariance.

    ``sqrt(diag(J C J^T))`` with ``J`` the forward-mode derivative of ``x``, ``y`` and
    every pixel of the unit-sum stamps w.r.t. the fit's PSF parameters (``C`` =
    ``fit.psf_cov``; parameters with a non-finite variance held fixed) at the fitted
    values; the stamps keep the fitted PSF's corners.  Points go ``chunk`` at a time
    (memory ``~chunk * ny * nx * npsf`` floats), one compilation per parameter layout.

    Args:
        fit: a :class:`BundleFit` (full model) or :class:`FitResult` (patch fit).
        ispec: ``(n,)`` absolute fiber indices.
        wave: ``(n,)`` wavelengths [A].

    Returns:
        dict of NumPy arrays: ``x``, ``y`` ``(n,)`` [pixels]; ``spots`` ``(n, ny, nx)``
        [fraction of the spot's light per pixel]; ``xmin``, ``ymin`` ``(n,)`` the stamps'
        corners (as ``fit.psf.spots``).
    """
    ispec = np.asarray(ispec, dtype=np.int32).reshape(-1)
    wave = np.asarray(wave, dtype=float).reshape(-1)
    if ispec.shape != wave.shape:
        raise ValueError(f"ispec {ispec.shape} and wave {wave.shape} must have one shape")
    fit.psf.x(ispec, wave)  # refuses fibers the PSF lacks (FiberIndexError)
    lay, p0, _ = _psf_of_params(fit)
    cov = jnp.asarray(_finite_cov(fit.psf_cov))
    if cov.shape != (lay.size, lay.size):
        raise ValueError(f"the fit's covariance {cov.shape} does not match its {lay.size} PSF parameters")
    fibers = jnp.asarray(fit.fibers, jnp.int32)
    live = jnp.ones(fibers.shape, bool) if fit.live is None else jnp.asarray(fit.live, bool)
    static = (tuple((k, tuple(v)) for k, v in lay.shapes.items()), tuple(getattr(fit, "gh_terms", ())),
              getattr(fit, "shape_terms", None))
    n = ispec.size
    chunk = max(1, min(int(chunk), n))
    pad = -n % chunk
    ip = np.concatenate([ispec, np.full(pad, ispec[0], np.int32)])
    wp = np.concatenate([wave, np.full(pad, wave[0])])
    parts = [_trace_spot_sigma_chunk(fit.psf_init, p0, cov, fibers, live, jnp.asarray(ip[s:s + chunk]),
                                     jnp.asarray(wp[s:s + chunk]), *static) for s in range(0, n + pad, chunk)]
    out = [np.concatenate([np.asarray(p[k]) for p in parts])[:n] for k in range(5)]
    return dict(x=out[0], y=out[1], spots=out[2], xmin=out[3], ymin=out[4])
