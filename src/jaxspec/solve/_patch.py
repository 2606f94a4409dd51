"""One-call solve of a single patch: regularise, Cholesky-solve, decorrelate, band."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._banded import band_factor, band_solve, dense_from_band
from ._cholesky import cholesky_factor, cholesky_solve
from ._decorrelate import decorrelate_full, decorrelate_signal
from ._normal import SPECTER_MINWEIGHT_FRAC, regularize_band, regularize_normal
from ._sqrtm import inv_sym
from ._resolution import resolution_diagonals

__all__ = ["PatchSolution", "solve_patch"]


class PatchSolution(eqx.Module):
    """Result of ``solve_patch`` for one patch (add a leading batch axis under vmap).

    Attributes:
        flux: (nspec, nwave) decorrelated flux ``R xflux``.
        ivar: (nspec, nwave) inverse variance of ``flux``; 0 for padding and for
            bins with no weight at all (``fluxweight == 0``).
        resolution: (nspec, 2*ndiag+1, nwave) diagonals of each fiber's block of R
            (see ``resolution_diagonals``).
        xflux: (nspec, nwave) undecorrelated solution ``Q^{-1} y``.

    Padding bins come out with flux 0, ivar 0 and an identity row of R (1 on the
    central diagonal); bins with ``fluxweight == 0`` are constrained to 0 by the
    low-weight term, so their flux is finite (0 for ``y == 0``) and ivar is 0.
    """

    flux: Float[Array, "nspec nwave"]
    ivar: Float[Array, "nspec nwave"]
    resolution: Float[Array, "nspec ndiag2 nwave"]
    xflux: Float[Array, "nspec nwave"]


def solve_patch(
    Q: Float[ArrayLike, "n n"] | Float[ArrayLike, "nspec w1 nwave nwave"],
    y: Float[ArrayLike, " n"],
    fluxweight: Float[ArrayLike, " n"],
    valid: Bool[ArrayLike, " n"],
    nspec: int,
    nwave: int,
    ndiag: int,
    decorrelate: str = "signal",
    regularize: float | Float[ArrayLike, ""] = 0.0,
    minweight_frac: float | Float[ArrayLike, ""] = SPECTER_MINWEIGHT_FRAC,
    square_lowweight: bool = True,
    threshold: float | None = None,
    method: str = "eigh",
    keep: tuple[Int[ArrayLike, ""], int] | None = None,
) -> PatchSolution:
    """Extract one patch from its normal equations, as specter's ``ex2d_patch``.

    Args:
        Q: ``A^T W A``, fiber-major unknowns, n = nspec*nwave: dense (n, n), or its
            lower block band over fibers (nspec, w + 1, nwave, nwave) when fibers more
            than w apart do not couple (:func:`band_from_dense`; what the extraction
            kernel builds).  In ``signal`` mode the band is factored block by block
            (:mod:`._banded`), O(nspec w^2 nwave^3) instead of O(n^3); the results
            are those of the dense path to rounding.
        y: ``A^T W p`` (n,).
        fluxweight: column sums of ``W A`` (n,).
        valid: (n,) False marks padding unknowns (decoupled; real results unchanged).
        nspec: static number of fibers of the patch.
        nwave: static number of bins per fiber; ``n = nspec * nwave``.
        ndiag: static half-width of the resolution band kept.
        decorrelate: static, ``"signal"`` (per-fiber, specter default) or ``"full"``
            (whole patch, specter ``ndecorr=True``).
        regularize: added (squared) to every bin's diagonal, see ``regularize_normal``.
        minweight_frac: low-weight threshold, see ``regularize_normal``.
        square_lowweight: static; specter's (True) or gpu_specter's low-weight term.
        threshold: static eigenvalue clipping threshold (default specter's), see ``sqrtm_sym``.
        method: static matrix function method, ``"eigh"`` or ``"newton_schulz"``.
        keep: ``(start, count)``, ``count`` static: only fibers ``start .. start +
            count - 1`` need flux, ivar and resolution (the extraction keeps a patch's
            own fibers, not its neighbours'); in ``signal`` mode the others are not
            decorrelated and come out 0 (xflux is complete); ``full`` mode ignores it.
            Default: every fiber.

    Returns:
        ``PatchSolution`` with flux, ivar, resolution, xflux.
    """
    n = nspec * nwave
    Q = jnp.asarray(Q)
    banded = Q.ndim == 4
    if (Q.shape[:1] + Q.shape[2:] != (nspec, nwave, nwave)) if banded else (Q.shape != (n, n)):
        want = f"{(n, n)} or (nspec, w + 1, nwave, nwave) = {(nspec, 'w + 1', nwave, nwave)}"
        raise ValueError(f"Q has shape {Q.shape}, expected {want}")
    if decorrelate not in ("signal", "full"):
        raise ValueError(f"decorrelate must be 'signal' or 'full', not {decorrelate!r}")
    valid = jnp.asarray(valid, bool)
    y = jnp.where(valid, jnp.asarray(y, Q.dtype), 0.0)
    if decorrelate == "signal":
        if banded:
            L = band_factor(regularize_band(Q, fluxweight, valid, regularize, minweight_frac, square_lowweight))
            xflux = band_solve(L, y)
        else:
            L = cholesky_factor(regularize_normal(Q, fluxweight, valid, regularize, minweight_frac, square_lowweight))
            xflux = cholesky_solve(L, y)
        flux, ivar, Rblocks = decorrelate_signal(L, xflux, nspec, nwave, threshold, method, keep)
    else:
        Qr = regularize_normal(dense_from_band(Q) if banded else Q, fluxweight, valid, regularize,
                               minweight_frac, square_lowweight)
        # The whole-patch eigendecomposition serves the solve too (no Cholesky): one
        # factorisation instead of two, and it sidesteps an XLA:CPU hang seen with a
        # triangular solve and a large eigh in one program (jax 0.10.2, 2 threads).
        xflux = inv_sym(Qr, threshold=0.0, method=method) @ y
        flux, ivar, R = decorrelate_full(Qr, xflux, threshold, method)
        flux, ivar = flux.reshape(nspec, nwave), ivar.reshape(nspec, nwave)
        R4 = R.reshape(nspec, nwave, nspec, nwave)
        Rblocks = jnp.diagonal(R4, axis1=0, axis2=2).transpose(2, 0, 1)

    live = (valid & (jnp.asarray(fluxweight) > 0)).reshape(nspec, nwave)
    ivar = jnp.where(live, ivar, 0.0)
    resolution = jax.vmap(lambda Rb: resolution_diagonals(Rb, ndiag))(Rblocks)
    return PatchSolution(flux=flux, ivar=ivar, resolution=resolution, xflux=xflux.reshape(nspec, nwave))
