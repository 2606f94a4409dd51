"""Legendre series helpers: per-fiber coefficient sets ("trace sets") and their inverse.

A trace set holds coefficients ``c[nspec, ncoef]`` and a domain ``(a, b)``; fiber
``i`` at abscissa ``w`` has value ``sum_k c[i, k] P_k(t)`` with
``t = (w - a) * (2 / (b - a)) - 1`` (the exact normalisation DESI's specter uses).
Every function here is a pure JAX function (jit / vmap / grad safe).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float


def _as_float(x: ArrayLike) -> Array:
    """``x`` as a JAX array, integers converted to the default float dtype."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def normalize(w: ArrayLike, a: ArrayLike, b: ArrayLike) -> Float[Array, "..."]:
    """Map ``w`` from the domain ``[a, b]`` to ``[-1, 1]`` as specter does."""
    return (_as_float(w) - a) * (2.0 / (b - a)) - 1.0


def legvander(t: ArrayLike, deg: int) -> Float[Array, "... ncoef"]:
    """Legendre basis ``P_0(t) .. P_deg(t)`` stacked on a new last axis (``ncoef = deg + 1``).

    Uses Bonnet's recurrence ``(k+1) P_{k+1} = (2k+1) t P_k - k P_{k-1}``.
    """
    t = _as_float(t)
    cols = [jnp.ones_like(t)]
    if deg >= 1:
        cols.append(t)
    for k in range(1, deg):
        cols.append(((2 * k + 1) * t * cols[k] - k * cols[k - 1]) / (k + 1))
    return jnp.stack(cols, axis=-1)


def legval(t: ArrayLike, coeff: ArrayLike) -> Float[Array, "..."]:
    """Evaluate Legendre series with coefficients on the last axis of ``coeff``.

    ``t`` (shape ``S``) broadcasts against ``coeff[..., ncoef]`` (shape ``S'``).
    Uses Clenshaw's backward recurrence.
    """
    t = _as_float(t)
    coeff = jnp.asarray(coeff)
    n = coeff.shape[-1]
    b1 = jnp.zeros(jnp.broadcast_shapes(t.shape, coeff.shape[:-1]), jnp.result_type(t, coeff, float))
    b2 = jnp.zeros_like(b1)
    # Clenshaw for P_k: alpha_k(t) = (2k+1) t / (k+1), beta_{k+1} = -(k+1) / (k+2)
    for k in range(n - 1, 0, -1):
        b1, b2 = coeff[..., k] + (2 * k + 1) / (k + 1) * t * b1 - (k + 1) / (k + 2) * b2, b1
    return coeff[..., 0] + t * b1 - 0.5 * b2


@jax.jit
def traceset_eval(
    coeff: Float[Array, "nspec ncoef"],
    domain: tuple[ArrayLike, ArrayLike],
    ispec: ArrayLike,
    w: ArrayLike,
) -> Float[Array, "..."]:
    """Value of the trace set at fibers ``ispec`` and abscissae ``w`` (broadcast)."""
    ispec = jnp.asarray(ispec)
    t = normalize(w, domain[0], domain[1])
    ispec, t = jnp.broadcast_arrays(ispec, t)
    return legval(t, jnp.asarray(coeff)[ispec.astype(jnp.int32)])


@jax.jit
def traceset_eval_many(
    coeff: Float[Array, "nparam nspec ncoef"],
    domain: tuple[ArrayLike, ArrayLike],
    ispec: ArrayLike,
    w: ArrayLike,
) -> Float[Array, "... nparam"]:
    """Evaluate ``nparam`` trace sets that share a domain at once.

    One Legendre basis is built per wavelength and contracted with every
    parameter's coefficients.  Returns shape ``broadcast(ispec, w) + (nparam,)``:
    parameters last, so each evaluation point's values are contiguous.
    """
    coeff = jnp.asarray(coeff)
    ispec = jnp.asarray(ispec)
    t = normalize(w, domain[0], domain[1])
    # one rank for both (leading ones), each keeping its own small shape
    nd = max(ispec.ndim, t.ndim)
    ispec = ispec.reshape((1,) * (nd - ispec.ndim) + ispec.shape)
    t = t.reshape((1,) * (nd - t.ndim) + t.shape)
    # Basis on the wavelengths' own shape and coefficients on the fibers' own shape:
    # for a (fiber, 1) x (1, wave) grid that is nspec + nwave evaluations, not their product.
    basis = legvander(t, coeff.shape[-1] - 1)  # shape(w) + (ncoef,)
    sel = jnp.take(jnp.moveaxis(coeff, 0, 1), ispec.astype(jnp.int32), axis=0)  # shape(ispec) + (nparam, ncoef)
    return jnp.sum(sel * basis[..., None, :], axis=-1)


@functools.partial(jax.jit, static_argnames=("deg", "npts"))
def fit_inverse(
    coeff: Float[Array, "nspec ncoef"],
    domain: tuple[ArrayLike, ArrayLike],
    deg: int | None = None,
    npts: int = 1000,
) -> tuple[Float[Array, "nspec ninv"], Float[Array, "2"]]:
    """Fit the inverse trace set (abscissa as a function of value), as specter does.

    The values of all fibers at the domain ends give ``(vmin, vmax)``; each fiber
    is sampled at ``npts`` abscissae evenly spanning the domain and the abscissa is
    least-squares fitted as a Legendre series of degree ``deg`` (default
    ``ncoef + 2``) of the normalised value, with column scaling (same solution
    as ``numpy.polynomial.legendre.legfit``,
    via refined normal equations).

    Returns:
        ``(inv_coeff[nspec, ninv = deg + 1], inv_domain[2] = (vmin, vmax))``.
    """
    coeff = jnp.asarray(coeff)
    a, b = domain
    if deg is None:
        deg = coeff.shape[-1] + 2
    ends = legval(normalize(jnp.array([a, b], dtype=coeff.dtype), a, b)[None, :], coeff[:, None, :])
    vmin = jnp.min(ends)
    vmax = jnp.max(ends)
    w = jnp.linspace(a, b, npts, dtype=coeff.dtype)
    v = legval(normalize(w, a, b)[None, :], coeff[:, None, :])  # (nspec, npts)
    vv = normalize(v, vmin, vmax)
    van = legvander(vv, deg)  # (nspec, npts, deg+1)
    scl = jnp.sqrt(jnp.sum(van * van, axis=1, keepdims=True))  # (nspec, 1, deg+1)
    a = van / scl
    # the column-scaled Legendre Vandermonde is well conditioned: normal equations
    # with one step of iterative refinement reach the least-squares solution to
    # ~1e-15 relative, much faster on CPU than a batched QR
    gram = jnp.einsum("snk,snl->skl", a, a)
    chol = jax.scipy.linalg.cho_factor(gram, lower=True)
    sol = jax.scipy.linalg.cho_solve(chol, jnp.einsum("snk,n->sk", a, w)[..., None])[..., 0]
    resid = w[None, :] - jnp.einsum("snk,sk->sn", a, sol)
    sol = sol + jax.scipy.linalg.cho_solve(chol, jnp.einsum("snk,sn->sk", a, resid)[..., None])[..., 0]
    return sol / scl[:, 0, :], jnp.stack([vmin, vmax])
