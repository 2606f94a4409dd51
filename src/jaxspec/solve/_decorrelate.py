"""Decorrelation of one patch's solution: specter's ``resolution_from_icov``.

``signal`` (default; specter's ``decorr=[nwave]*nspec``): with ``C = Q^{-1}`` and
``C_b`` the diagonal block of fiber ``b``, ``Q_b = C_b^{-1/2}``; ``R_b`` is
``Q_b`` with rows normalised to sum 1, ``ivar = (row sums of Q_b)^2`` and
``flux_b = R_b xflux_b``.  specter builds ``C`` by a clipped eigen-inverse of
``Q``; here ``C_b`` comes exactly from the Cholesky factor, identical whenever
specter's clipping (eigenvalues below ``10 eps * max``) does not trigger: by
selected inversion of the block-banded factor (:mod:`._banded`), or from the dense
factor's inverse.

``full`` (specter ``ndecorr=True``): ``Q^{1/2}`` of the whole patch, rows
normalised, ``ivar`` the squared row sums, ``flux = R xflux``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg  # noqa: F401
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int

from ._banded import band_inverse_blocks
from ._cholesky import cholesky_inverse_blocks
from ._sqrtm import inv_sqrtm_sym, sqrtm_sym

__all__ = ["decorrelate_signal", "decorrelate_full", "normalize_rows"]


def normalize_rows(S: Float[ArrayLike, "... m m"]) -> tuple[Float[Array, "... m m"], Float[Array, "... m"]]:
    """Rows of ``S`` divided by their sums, and the squared row sums (ivar).

    A row summing to exactly 0 is left unscaled (no NaN).
    """
    norm = jnp.sum(S, axis=-1)
    safe = jnp.where(norm == 0, 1.0, norm)
    return S / safe[..., :, None], norm * norm


def decorrelate_signal(
    L: Float[ArrayLike, "n n"] | Float[ArrayLike, "nspec w1 nwave nwave"],
    xflux: Float[ArrayLike, " n"],
    nspec: int,
    nwave: int,
    threshold: float | None = None,
    method: str = "eigh",
    keep: tuple[Int[ArrayLike, ""], int] | None = None,
) -> tuple[Float[Array, "nspec nwave"], Float[Array, "nspec nwave"], Float[Array, "nspec nwave nwave"]]:
    """Per-fiber decorrelation from the Cholesky factor ``L`` of ``Q``.

    Args:
        L: factor of the (regularised) normal matrix: its dense lower Cholesky factor
            (n, n), or the block-band factor (nspec, w + 1, nwave, nwave) of
            :func:`band_factor`.
        xflux: undecorrelated solution ``Q^{-1} y`` (n,), fiber-major.
        nspec: static number of fibers (blocks); ``n = nspec * nwave``.
        nwave: static number of bins per fiber.
        threshold: eigenvalue clipping threshold, passed to ``inv_sqrtm_sym``.
        method: ``"eigh"`` or ``"newton_schulz"``, passed to ``inv_sqrtm_sym``.
        keep: ``(start, count)``, ``count`` static: decorrelate only fibers
            ``start .. start + count - 1`` (``start`` clipped to fit); the others come
            out with flux, ivar and R all 0.  The extraction keeps a patch's own
            fibers, not its neighbours'.  Default: every fiber.

    Returns:
        ``(flux, ivar, R)``: (nspec, nwave), (nspec, nwave), (nspec, nwave, nwave).
    """
    L = jnp.asarray(L)
    C = band_inverse_blocks(L) if L.ndim == 4 else cholesky_inverse_blocks(L, nspec, nwave)
    xf = jnp.asarray(xflux).reshape(nspec, nwave)
    if keep is not None:
        start = jnp.clip(jnp.asarray(keep[0], jnp.int32), 0, nspec - keep[1])
        C = lax.dynamic_slice_in_dim(C, start, keep[1])
        xf = lax.dynamic_slice_in_dim(xf, start, keep[1])
    if method == "eigh":
        Qb = jax.vmap(lambda B: _inv_sqrt_from_precision(B, threshold))(C)
    else:
        Qb = _batched(inv_sqrtm_sym, C, threshold, method)
    R, ivar = normalize_rows(Qb)
    flux = jnp.einsum("bij,bj->bi", R, xf)
    if keep is not None:
        flux, ivar, R = (lax.dynamic_update_slice_in_dim(jnp.zeros((nspec,) + a.shape[1:], a.dtype), a, start, 0)
                         for a in (flux, ivar, R))
    return flux, ivar, R


def decorrelate_full(
    Q: Float[ArrayLike, "n n"],
    xflux: Float[ArrayLike, " n"],
    threshold: float | None = None,
    method: str = "eigh",
) -> tuple[Float[Array, " n"], Float[Array, " n"], Float[Array, "n n"]]:
    """Whole-patch decorrelation with ``Q^{1/2}``.

    Returns:
        ``(flux, ivar, R)``: (n,), (n,), (n, n) with ``R`` coupling all fibers.
    """
    S = sqrtm_sym(Q, threshold=threshold, method=method)
    R, ivar = normalize_rows(S)
    return R @ xflux, ivar, R


def _inv_sqrt_from_precision(C: Float[Array, "m m"], threshold: float | None) -> Float[Array, "m m"]:
    """``C^(-1/2)`` as the square root of the precision ``C^(-1)``.

    A fiber's covariance block spans ~1e8 in eigenvalue (regularised padding bins
    against well-measured ones); ``eigh`` of ``C`` resolves its small eigenvalues,
    which carry the well-measured bins, only to eps x 1e8.  ``C^(-1)`` (from the
    Cholesky factor of the graded ``C``, accurate component by component) turns
    them into its largest eigenvalues, resolved to eps: the kept rows of R come out
    the same on any platform to ~1e-11 instead of ~1e-7.
    """
    m = C.shape[-1]
    G = jnp.linalg.cholesky(C)
    Ginv = jax.scipy.linalg.solve_triangular(G, jnp.eye(m, dtype=C.dtype), lower=True)
    return sqrtm_sym(Ginv.T @ Ginv, threshold=threshold)


def _batched(fn, blocks, threshold, method):
    return jax.vmap(lambda B: fn(B, threshold=threshold, method=method))(blocks)
