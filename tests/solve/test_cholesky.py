"""Cholesky factor / solve / diagonal blocks of the inverse."""

import jax
import numpy as np
import pytest

from jaxspec.solve import cholesky_factor, cholesky_inverse_blocks, cholesky_solve


@jax.jit
def _factor_solve(Q, y):
    L = cholesky_factor(Q)
    return L, cholesky_solve(L, y)


_blocks = jax.jit(cholesky_inverse_blocks, static_argnums=(1, 2))


def _spd(seed, n):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((n, n))
    return B @ B.T + n * np.eye(n), rng.standard_normal(n)


@pytest.mark.parametrize("nb,bs", [(1, 8), (3, 5), (6, 7)])
def test_solve_and_blocks(nb, bs):
    Q, y = _spd(nb * bs, nb * bs)
    L, x = _factor_solve(Q, y)
    np.testing.assert_allclose(x, np.linalg.solve(Q, y), rtol=1e-12)
    C = np.linalg.inv(Q)
    blocks = np.asarray(_blocks(L, nb, bs))
    for b in range(nb):
        sl = slice(b * bs, (b + 1) * bs)
        np.testing.assert_allclose(blocks[b], C[sl, sl], rtol=1e-12, atol=1e-14)


def test_bad_layout():
    Q, _ = _spd(0, 6)
    with pytest.raises(ValueError):
        cholesky_inverse_blocks(np.linalg.cholesky(Q), 4, 2)


def test_vmap_matches_loop():
    Qs, ys = zip(*[_spd(s, 10) for s in range(4)])
    Qs, ys = np.stack(Qs), np.stack(ys)

    @jax.jit
    @jax.vmap
    def f(q, y):
        L, x = _factor_solve(q, y)
        return x, cholesky_inverse_blocks(L, 2, 5)

    xs, bs = f(Qs, ys)
    for i in range(4):
        L, x = _factor_solve(Qs[i], ys[i])
        np.testing.assert_allclose(xs[i], x, rtol=1e-13)
        np.testing.assert_allclose(bs[i], _blocks(L, 2, 5), rtol=1e-13)
