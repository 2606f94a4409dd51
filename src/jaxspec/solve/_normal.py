"""Regularisation of one patch's normal equations, following specter's ``ex2d_patch``.

specter extends the projection matrix ``A`` with an identity block whose diagonal
``Idiag`` is ``regularize`` for every flux bin, replaced by ``minweight - fluxweight``
for bins whose ``fluxweight`` (column sum of ``W A``) is below
``minweight = minweight_frac * max(fluxweight)``; the extra rows have weight 1 and
zero data.  The normal matrix therefore gains ``Idiag**2`` on its diagonal (both
terms squared) and ``y`` is unchanged.  gpu_specter instead adds ``regularize**2``
or the *unsquared* ``minweight - fluxweight``; ``square_lowweight=False`` selects
that convention.  specter uses ``minweight_frac = 1e-4`` (since 2018; its first
versions used 0.01), as does gpu_specter.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

__all__ = ["regularize_band", "regularize_normal", "SPECTER_MINWEIGHT_FRAC"]

#: ``minweight = 1e-4 * max(fluxweight)`` in specter's ``ex2d_patch`` (and gpu_specter's).
SPECTER_MINWEIGHT_FRAC = 1e-4


def regularize_normal(
    Q: Float[ArrayLike, "n n"],
    fluxweight: Float[ArrayLike, " n"],
    valid: Bool[ArrayLike, " n"],
    regularize: float | Float[ArrayLike, ""] = 0.0,
    minweight_frac: float | Float[ArrayLike, ""] = SPECTER_MINWEIGHT_FRAC,
    square_lowweight: bool = True,
) -> Float[Array, "n n"]:
    """Regularised, symmetrised normal matrix of one patch, padding decoupled.

    Args:
        Q: ``A^T W A`` (n, n), symmetric positive semi-definite.
        fluxweight: column sums of ``W A`` (n,).
        valid: (n,) True for real unknowns, False for padding.
        regularize: specter's ``regularize``; ``regularize**2`` is added to every
            real bin that is not low-weight.
        minweight_frac: low-weight bins are those with
            ``fluxweight < minweight_frac * max(fluxweight[valid])``.
        square_lowweight: static; True (specter) adds ``(minweight - fluxweight)**2``
            to low-weight bins, False (gpu_specter) adds ``minweight - fluxweight``.

    Returns:
        (n, n) matrix equal to specter's ``iCov`` on the real unknowns.  Padding
        rows/columns are zero except a diagonal equal to the largest real
        diagonal (so eigenvalue-clipping thresholds of real unknowns are
        unchanged).  Real bins still without any diagonal (a patch with no
        weight at all) get the same value, making the matrix positive definite.
    """
    Q = jnp.asarray(Q)
    valid = jnp.asarray(valid, bool)
    Q = 0.5 * (Q + Q.T)
    Q = jnp.where(valid[:, None] & valid[None, :], Q, 0.0)
    newdiag = _diagonal(jnp.diagonal(Q), fluxweight, valid, regularize, minweight_frac, square_lowweight)
    idx = jnp.arange(Q.shape[0])
    return Q.at[idx, idx].set(newdiag)


def regularize_band(
    Qb: Float[ArrayLike, "nb w1 m m"],
    fluxweight: Float[ArrayLike, " n"],
    valid: Bool[ArrayLike, " n"],
    regularize: float | Float[ArrayLike, ""] = 0.0,
    minweight_frac: float | Float[ArrayLike, ""] = SPECTER_MINWEIGHT_FRAC,
    square_lowweight: bool = True,
) -> Float[Array, "nb w1 m m"]:
    """:func:`regularize_normal` on the lower block band ``Qb`` (nb, w + 1, m, m) of Q.

    Same rule, entry for entry: ``dense_from_band(regularize_band(band_from_dense(Q)))``
    is ``regularize_normal(Q)`` for a block-banded Q (n = nb m, fiber-major).
    """
    Qb = jnp.asarray(Qb)
    nb, w1, m, _ = Qb.shape
    valid = jnp.asarray(valid, bool)
    vb = valid.reshape(nb, m)
    # the partner block of band entry [i, d] is block i - d (unused where i - d < 0)
    partner = vb[np.clip(np.arange(nb)[:, None] - np.arange(w1)[None, :], 0, None)]  # (nb, w1, m)
    Qb = jnp.where(vb[:, None, :, None] & partner[:, :, None, :], Qb, 0.0)
    diagblocks = 0.5 * (Qb[:, 0] + jnp.swapaxes(Qb[:, 0], -1, -2))
    newdiag = _diagonal(jnp.diagonal(diagblocks, axis1=-2, axis2=-1).reshape(-1), fluxweight, valid,
                        regularize, minweight_frac, square_lowweight).reshape(nb, m)
    eye = jnp.eye(m, dtype=bool)
    diagblocks = jnp.where(eye, newdiag[:, :, None], diagblocks)
    return Qb.at[:, 0].set(diagblocks)


def _diagonal(diag, fluxweight, valid, regularize, minweight_frac, square_lowweight: bool):
    """The regularised diagonal (n,) of both layouts: specter's terms, padding at the largest real value."""
    dtype = diag.dtype
    fluxweight = jnp.asarray(fluxweight, dtype)
    maxweight = jnp.max(jnp.where(valid, fluxweight, 0.0))
    minweight = minweight_frac * maxweight
    low = valid & (fluxweight < minweight)
    lowterm = minweight - fluxweight
    if square_lowweight:
        lowterm = lowterm * lowterm
    extra = jnp.where(low, lowterm, jnp.asarray(regularize, dtype) ** 2)
    extra = jnp.where(valid, extra, 0.0)
    diag = jnp.where(valid, diag, 0.0) + extra
    dmax = jnp.max(jnp.where(valid, diag, 0.0))
    dmax = jnp.where(dmax > 0, dmax, jnp.ones_like(dmax))
    return jnp.where(valid & (diag > 0), diag, dmax)
