"""PSF uncertainty into extracted flux: d flux / d PSF parameters and ``diag(J C J^T)``."""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .bundle import BundleFit
from .params import PSF_KEYS, _Layout, apply_psf_params
from .result import FitResult

__all__ = ["flux_jacobian", "propagate_psf_uncertainty"]


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
    keys = [k for k in PSF_KEYS if k in fit.params and (isinstance(fit, BundleFit) or k in fit.slices)]
    shapes = {k: np.shape(fit.params[k]) for k in keys}
    lay = _Layout(shapes)
    p0 = jnp.asarray(lay.flatten(fit.params))
    psf_fit = fit.psf

    def flux(p):
        d = lay.unflatten(p)
        psf = apply_psf_params(fit.psf_init, d, fibers, gh_terms=getattr(fit, "gh_terms", ()),
                               shape_terms=getattr(fit, "shape_terms", None), live=fit.live)
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
    fixed = ~np.isfinite(np.diag(cov))
    if np.any(fixed):
        cov = np.where(fixed[:, None] | fixed[None, :], 0.0, cov)
    return np.einsum("...i,ij,...j->...", jac, cov, jac)
