"""Symmetric matrix functions (square root, inverse square root, inverse) via eigh.

The eigenvalues are clipped exactly as specter's ``eigen_compose`` does, with
``threshold = 10 * eps`` (eps of the input dtype; for float64 this is specter's
``10 * sys.float_info.epsilon``) and ``wmax = max(w)``:

* ``sqrt``:      ``sqrt(w)``   where ``w > sqrt(wmax)*threshold``       else ``sqrt(wmax)*threshold``
  (specter compares ``w`` itself, not ``sqrt(w)``, against the threshold here);
* ``inv_sqrt``:  ``1/sqrt(w)`` where ``sqrt(w) > sqrt(wmax)*threshold`` else ``1/(sqrt(wmax)*threshold)``;
* ``inv``:       ``1/w``       where ``w > wmax*threshold``             else ``1/(wmax*threshold)``.

Derivatives use a ``jax.custom_jvp`` with the Daleckii-Krein formula
``df = V (F o (V^T dM V)) V^T``, ``F_ij`` the divided difference of ``f`` at
``(w_i, w_j)``, written in closed, cancellation-free forms so that repeated
eigenvalues (an identity block) give finite, exact derivatives.  Clipped
eigenvalues depend on ``wmax``; that dependence is included too.

A matmul-only coupled Newton-Schulz iteration (``method="newton_schulz"``) is
available for accelerators; it does no clipping and differentiates by unrolling.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

__all__ = ["sqrtm_sym", "inv_sqrtm_sym", "inv_sym", "eigen_threshold"]

_KINDS = ("sqrt", "inv_sqrt", "inv")


def eigen_threshold(dtype) -> float:
    """specter's relative eigenvalue threshold, ``10 * eps`` of ``dtype``."""
    return 10.0 * float(np.finfo(dtype).eps)


def _sym(M):
    return 0.5 * (M + jnp.swapaxes(M, -1, -2))


def _spectral(w, kind: str, threshold: float):
    """Clipped values f(w), derivatives f'(w), clipped mask, d f_clipped / d wmax."""
    wmax = jnp.max(w)
    wmax_pos = jnp.maximum(wmax, jnp.finfo(w.dtype).tiny)
    wpos = jnp.maximum(w, 0.0)
    s = jnp.sqrt(wpos)
    if kind == "sqrt":
        minval = jnp.sqrt(wmax_pos) * threshold
        keep = w > minval
        s_safe = jnp.where(keep, s, 1.0)
        f = jnp.where(keep, s, minval)
        fprime = jnp.where(keep, 0.5 / s_safe, 0.0)
        dfdmax = jnp.where(keep, 0.0, 0.5 * minval / wmax_pos)
    elif kind == "inv_sqrt":
        minval = jnp.sqrt(wmax_pos) * threshold
        keep = s > minval
        s_safe = jnp.where(keep, s, 1.0)
        f = jnp.where(keep, 1.0 / s_safe, 1.0 / minval)
        fprime = jnp.where(keep, -0.5 / (s_safe * s_safe * s_safe), 0.0)
        dfdmax = jnp.where(keep, 0.0, -0.5 / (minval * wmax_pos))
    elif kind == "inv":
        minval = wmax_pos * threshold
        keep = w > minval
        w_safe = jnp.where(keep, w, 1.0)
        f = jnp.where(keep, 1.0 / w_safe, 1.0 / minval)
        fprime = jnp.where(keep, -1.0 / (w_safe * w_safe), 0.0)
        dfdmax = jnp.where(keep, 0.0, -1.0 / (minval * wmax_pos))
    else:  # pragma: no cover - guarded by callers
        raise ValueError(f"unknown kind {kind!r}")
    return f, fprime, keep, dfdmax, s


def _divided_differences(w, f, fprime, keep, s, kind: str):
    """Matrix F_ij = (f_i - f_j)/(w_i - w_j), f'(w_i) on (near-)coincident pairs."""
    both = keep[:, None] & keep[None, :]
    si, sj = s[:, None], s[None, :]
    wi, wj = w[:, None], w[None, :]
    if kind == "sqrt":
        den = jnp.where(both, si + sj, 1.0)
        closed = 1.0 / den
    elif kind == "inv_sqrt":
        den = jnp.where(both, si * sj * (si + sj), 1.0)
        closed = -1.0 / den
    else:
        den = jnp.where(both, wi * wj, 1.0)
        closed = -1.0 / den
    dw = wi - wj
    scale = jnp.maximum(jnp.abs(wi), jnp.abs(wj))
    far = jnp.abs(dw) > 1e-10 * jnp.maximum(scale, jnp.finfo(w.dtype).tiny)
    secant = (f[:, None] - f[None, :]) / jnp.where(far, dw, 1.0)
    tangent = 0.5 * (fprime[:, None] + fprime[None, :])
    generic = jnp.where(far, secant, tangent)
    return jnp.where(both, closed, generic)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _eig_fn(M, kind: str, threshold: float):
    w, V = jnp.linalg.eigh(M, symmetrize_input=False)
    f = _spectral(w, kind, threshold)[0]
    return (V * f[None, :]) @ V.T


@_eig_fn.defjvp
def _eig_fn_jvp(kind, threshold, primals, tangents):
    (M,), (dM,) = primals, tangents
    w, V = jnp.linalg.eigh(M, symmetrize_input=False)
    f, fprime, keep, dfdmax, s = _spectral(w, kind, threshold)
    out = (V * f[None, :]) @ V.T
    F = _divided_differences(w, f, fprime, keep, s, kind)
    dMt = V.T @ _sym(dM) @ V
    kmax = jnp.argmax(w)
    dwmax = dMt[kmax, kmax]
    inner = F * dMt + jnp.diag(dfdmax * dwmax)
    return out, V @ inner @ V.T


def _newton_schulz(M, kind: str, iters: int):
    """Coupled Newton-Schulz: Y -> sqrt(M/c), Z -> inv sqrt(M/c), c = ||M||_F."""
    n = M.shape[-1]
    eye = jnp.eye(n, dtype=M.dtype)
    c = jnp.sqrt(jnp.sum(M * M))
    c = jnp.where(c > 0, c, 1.0)
    Y, Z = M / c, eye

    def body(_, yz):
        Y, Z = yz
        T = 0.5 * (3.0 * eye - Z @ Y)
        return Y @ T, T @ Z

    Y, Z = jax.lax.fori_loop(0, iters, body, (Y, Z))
    if kind == "sqrt":
        return _sym(Y) * jnp.sqrt(c)
    if kind == "inv_sqrt":
        return _sym(Z) / jnp.sqrt(c)
    return _sym(Z @ Z) / c


def _apply(M, kind, threshold, method, iters):
    M = _sym(jnp.asarray(M))
    if method == "eigh":
        thr = eigen_threshold(M.dtype) if threshold is None else float(threshold)
        return _eig_fn(M, kind, thr)
    if method == "newton_schulz":
        return _newton_schulz(M, kind, iters)
    raise ValueError(f"method must be 'eigh' or 'newton_schulz', not {method!r}")


def sqrtm_sym(
    M: Float[ArrayLike, "n n"],
    threshold: float | None = None,
    method: str = "eigh",
    iters: int = 40,
) -> Float[Array, "n n"]:
    """Symmetric square root ``M^(1/2)`` (n, n) of symmetric PSD ``M``, specter-clipped.

    ``threshold`` (static) defaults to ``10*eps``; ``method`` (static) is
    ``"eigh"`` (exact, custom JVP) or ``"newton_schulz"`` (matmul-only, ``iters``
    iterations, no clipping; needs a well-conditioned M).
    """
    return _apply(M, "sqrt", threshold, method, iters)


def inv_sqrtm_sym(
    M: Float[ArrayLike, "n n"],
    threshold: float | None = None,
    method: str = "eigh",
    iters: int = 40,
) -> Float[Array, "n n"]:
    """Symmetric inverse square root ``M^(-1/2)`` (n, n), specter-clipped; see ``sqrtm_sym``."""
    return _apply(M, "inv_sqrt", threshold, method, iters)


def inv_sym(
    M: Float[ArrayLike, "n n"],
    threshold: float | None = None,
    method: str = "eigh",
    iters: int = 40,
) -> Float[Array, "n n"]:
    """Clipped eigen-inverse ``M^(-1)`` (n, n) as specter's ``eigen_compose(invert=True)``."""
    return _apply(M, "inv", threshold, method, iters)
