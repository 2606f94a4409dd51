"""Cholesky factor, solve, and diagonal blocks of the inverse of one SPD matrix."""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from jaxtyping import Array, ArrayLike, Float

__all__ = ["cholesky_factor", "cholesky_solve", "cholesky_inverse_blocks"]


def cholesky_factor(Q: Float[ArrayLike, "n n"]) -> Float[Array, "n n"]:
    """Lower Cholesky factor ``L`` with ``Q = L L^T`` (n, n); NaN if Q is not PD."""
    return jnp.linalg.cholesky(Q, symmetrize_input=True)


def cholesky_solve(L: Float[ArrayLike, "n n"], y: Float[ArrayLike, " n"]) -> Float[Array, " n"]:
    """Solve ``(L L^T) x = y`` for x (n,) by two triangular solves."""
    z = solve_triangular(L, y, lower=True)
    return solve_triangular(L.T, z, lower=False)


def cholesky_inverse_blocks(
    L: Float[ArrayLike, "n n"], nblocks: int, blocksize: int
) -> Float[Array, "nblocks blocksize blocksize"]:
    """Diagonal blocks of ``(L L^T)^{-1}`` without forming the whole inverse.

    With ``M = L^{-1}`` (triangular solve against the identity), the inverse is
    ``M^T M`` and its block ``b`` is ``M[:, b]^T M[:, b]``.  ``nblocks`` and
    ``blocksize`` are static, ``nblocks * blocksize == n``.
    """
    n = L.shape[0]
    if nblocks * blocksize != n:
        raise ValueError(f"nblocks*blocksize = {nblocks * blocksize} != n = {n}")
    Linv = solve_triangular(L, jnp.eye(n, dtype=L.dtype), lower=True)
    cols = Linv.reshape(n, nblocks, blocksize)
    blocks = jnp.einsum("kbi,kbj->bij", cols, cols)
    return 0.5 * (blocks + jnp.swapaxes(blocks, -1, -2))
