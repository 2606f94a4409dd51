"""Banded storage of a resolution matrix in the DESI ``resolution_data`` convention."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

__all__ = ["apply_resolution", "resolution_diagonals", "resolution_offsets"]


def resolution_offsets(ndiag: int) -> np.ndarray:
    """Diagonal offsets ``[ndiag, ..., -ndiag]`` of the rows of ``resolution_diagonals``."""
    return np.arange(ndiag, -ndiag - 1, -1)


def resolution_diagonals(R: Float[ArrayLike, "m m"], ndiag: int) -> Float[Array, "d m"]:
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
    diags: Float[ArrayLike, "... d m"], flux: Float[ArrayLike, "... m"]
) -> Float[Array, "... m"]:
    """Convolve ``flux`` with the resolution matrix stored as diagonals: ``R @ flux``.

    This is how a model spectrum is compared with extracted flux: the extracted
    flux is the truth seen through ``R``.

    Args:
        diags: ``(..., 2 ndiag + 1, nwave)`` diagonals in the DESI convention (row
            ``d`` holds offset ``ndiag - d``, see :func:`resolution_diagonals`), e.g.
            ``Extraction.resolution`` or a frame's ``RESOLUTION`` ``(nspec, 11, nwave)``.
        flux: ``(..., nwave)`` model spectra on the same grid [photons / A]; leading
            axes (e.g. fibers) broadcast against those of ``diags``.

    Returns:
        ``(..., nwave)`` the convolved spectra, ``R @ flux`` per fiber.  A JAX
        function: differentiable and jit-able.

    Example:
        ```python
        conv = jaxspec.apply_resolution(ex.resolution, model)    # (nspec, nwave)
        pull = (ex.flux - conv) * jnp.sqrt(ex.ivar)               # ~ N(0, 1) if model is right
        ```
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
