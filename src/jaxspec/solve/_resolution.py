"""Banded storage of a resolution matrix in the DESI ``resolution_data`` convention."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = ["apply_resolution", "resolution_diagonals", "resolution_offsets"]


def resolution_offsets(ndiag: int) -> np.ndarray:
    """Diagonal offsets ``[ndiag, ..., -ndiag]`` of the rows of ``resolution_diagonals``."""
    return np.arange(ndiag, -ndiag - 1, -1)


def resolution_diagonals(R: Float[Array, "m m"], ndiag: int) -> Float[Array, "d m"]:
    """Diagonals of one fiber's resolution block, shape (2*ndiag+1, m).

    ``diags[d, j] = R[j + d - ndiag, j]`` (0 where that row is outside ``[0, m)``),
    so ``scipy.sparse.dia_matrix((diags, resolution_offsets(ndiag)), shape=(m, m))``
    rebuilds the band of ``R``; ``ndiag`` is static.
    """
    m = R.shape[-1]
    d = np.arange(2 * ndiag + 1)[:, None]
    j = np.arange(m)[None, :]
    rows = j + d - ndiag
    inside = (rows >= 0) & (rows < m)
    vals = R[np.clip(rows, 0, m - 1), np.broadcast_to(j, rows.shape)]
    return jnp.where(inside, vals, jnp.zeros((), R.dtype))


def apply_resolution(
    diags: Float[Array, "... d m"], flux: Float[Array, "... m"]
) -> Float[Array, "... m"]:
    """Convolve ``flux`` with the resolution matrix stored as diagonals: ``R @ flux``.

    ``diags`` in the DESI convention (row d holds offset ``ndiag - d``, see
    :func:`resolution_diagonals`); leading axes (e.g. fibers) broadcast.  This is
    how a model spectrum is compared with extracted flux.
    """
    diags = jnp.asarray(diags)
    flux = jnp.asarray(flux)
    nd2, m = diags.shape[-2], diags.shape[-1]
    ndiag = (nd2 - 1) // 2
    prod = diags * flux[..., None, :]  # [.., d, j] = R[j + d - ndiag, j] f[j]
    pad = jnp.pad(prod, [(0, 0)] * (prod.ndim - 1) + [(ndiag, ndiag)])
    # row i collects column j = i + ndiag - d, i.e. padded index i + 2 ndiag - d
    out = 0.0
    for d in range(nd2):
        out = out + pad[..., d, 2 * ndiag - d: 2 * ndiag - d + m]
    return out
