"""Block-banded factor, solve and inverse blocks against the dense reference; the banded solve_patch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxspec.solve import (
    band_factor,
    band_from_dense,
    band_inverse_blocks,
    band_solve,
    dense_from_band,
    regularize_band,
    regularize_normal,
    solve_patch,
)

SHAPES = [(7, 2, 6), (5, 1, 4), (4, 3, 5), (1, 0, 3), (3, 2, 4), (6, 0, 3)]  # (blocks, band, block size)


def _banded_spd(seed, nb, w, m, grade=0.0):
    """Seeded random SPD matrix, zero between blocks more than w apart; ``grade`` spreads
    its unknowns' scales over 10**grade (as regularised padding bins do in a patch)."""
    rng = np.random.default_rng(seed)
    n = nb * m
    B = rng.standard_normal((n, n))
    mask = np.kron(np.abs(np.subtract.outer(np.arange(nb), np.arange(nb))) <= w, np.ones((m, m)))
    Q = (B @ B.T) * mask + n * np.eye(n)  # diagonally dominant within the band: SPD
    s = 10.0 ** rng.uniform(-grade, 0.0, n)
    return s[:, None] * Q * s[None, :], rng.standard_normal(n)


_factor = jax.jit(band_factor)
_solve = jax.jit(band_solve)
_blocks = jax.jit(band_inverse_blocks)


@pytest.mark.parametrize("nb,w,m", SHAPES)
def test_storage_round_trip(nb, w, m):
    Q, _ = _banded_spd(0, nb, w, m)
    Qb = np.asarray(band_from_dense(Q, nb, w))
    assert Qb.shape == (nb, w + 1, m, m)
    np.testing.assert_array_equal(dense_from_band(Qb), Q)
    for i in range(nb):
        for d in range(w + 1):
            ref = Q[i * m:(i + 1) * m, (i - d) * m:(i - d + 1) * m] if i >= d else 0.0
            np.testing.assert_array_equal(Qb[i, d], ref)


@pytest.mark.parametrize("nb,w,m", SHAPES)
def test_factor_is_the_cholesky_factor(nb, w, m):
    Q, _ = _banded_spd(1, nb, w, m)
    F = np.asarray(_factor(band_from_dense(Q, nb, w)))
    L = np.linalg.cholesky(Q).reshape(nb, m, nb, m)
    for j in range(nb):
        D = np.linalg.inv(F[j, 0])
        np.testing.assert_allclose(D, L[j, :, j, :], rtol=1e-12, atol=1e-12)
        for d in range(1, w + 1):
            if j - d >= 0:
                np.testing.assert_allclose(F[j, d] @ L[j - d, :, j - d, :], L[j, :, j - d, :], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("grade", [0.0, 4.0])
@pytest.mark.parametrize("nb,w,m", SHAPES)
def test_solve_and_inverse_blocks_match_dense(nb, w, m, grade):
    Q, y = _banded_spd(2, nb, w, m, grade)
    F = _factor(band_from_dense(Q, nb, w))
    x = np.asarray(_solve(F, y))
    np.testing.assert_allclose(x, np.linalg.solve(Q, y), rtol=1e-10, atol=1e-12 * np.abs(x).max())
    C = np.linalg.inv(Q)
    S = np.asarray(_blocks(F))
    for j in range(nb):
        ref = C[j * m:(j + 1) * m, j * m:(j + 1) * m]
        # entry by entry, on the scale of its row and column (graded matrices)
        scale = np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
        assert np.max(np.abs(S[j] - ref) / scale) < 1e-11
        np.testing.assert_array_equal(S[j], S[j].T)


def test_not_positive_definite_gives_nan():
    Q, _ = _banded_spd(3, 4, 1, 3)
    Q[5, 5] = -1.0
    F = np.asarray(_factor(band_from_dense(Q, 4, 1)))
    assert np.isnan(F[1:]).any()


def test_vmap_matches_loop():
    Qs, ys = zip(*[_banded_spd(s, 5, 2, 4) for s in range(3)])
    Qb = jnp.stack([band_from_dense(q, 5, 2) for q in Qs])
    ys = np.stack(ys)
    xs, bs = jax.jit(jax.vmap(lambda q, y: (band_solve(band_factor(q), y), band_inverse_blocks(band_factor(q)))))(Qb, ys)
    for i in range(3):
        F = _factor(Qb[i])
        np.testing.assert_allclose(xs[i], _solve(F, ys[i]), rtol=1e-13)
        np.testing.assert_allclose(bs[i], _blocks(F), rtol=1e-13)


def test_regularize_band_is_regularize_normal():
    nb, w, m = 4, 1, 5
    Q, _ = _banded_spd(4, nb, w, m)
    rng = np.random.default_rng(4)
    fw = rng.uniform(1.0, 2.0, nb * m)
    fw[[2, 7]] = [1e-3, 0.0]
    valid = np.ones(nb * m, bool)
    valid[[11, 19]] = False
    Q[11, :] = Q[:, 11] = 5.0  # garbage in a padding row, inside the band
    Q *= np.kron(np.abs(np.subtract.outer(np.arange(nb), np.arange(nb))) <= w, np.ones((m, m)))
    for reg in (0.0, 0.3):
        ref = regularize_normal(Q, fw, valid, reg, 0.01)
        out = regularize_band(band_from_dense(Q, nb, w), fw, valid, reg, 0.01)
        np.testing.assert_array_equal(dense_from_band(out), ref)


def _patch(patch_factory, seed, nspec, nwave):
    p = patch_factory(seed, nspec, nwave, low_rows=6)
    return p, band_from_dense(p["Q"], nspec, nspec - 1)  # every fiber of the synthetic patch couples


@pytest.mark.parametrize("mode", ["signal", "full"])
def test_solve_patch_band_equals_dense(patch_factory, mode):
    nspec, nwave = 4, 12
    p, Qb = _patch(patch_factory, 7, nspec, nwave)
    valid = np.ones(nspec * nwave, bool)
    valid[-3:] = False
    kw = dict(nspec=nspec, nwave=nwave, ndiag=3, decorrelate=mode, regularize=0.1, minweight_frac=0.01)
    dense = solve_patch(p["Q"], p["y"], p["fluxweight"], valid, **kw)
    band = solve_patch(Qb, p["y"], p["fluxweight"], valid, **kw)
    for name in ("flux", "ivar", "resolution", "xflux"):
        a, b = np.asarray(getattr(band, name)), np.asarray(getattr(dense, name))
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11 * np.abs(b).max())


def test_keep_decorrelates_only_those_fibers(patch_factory):
    nspec, nwave = 5, 10
    p, Qb = _patch(patch_factory, 8, nspec, nwave)
    valid = np.ones(nspec * nwave, bool)
    kw = dict(nspec=nspec, nwave=nwave, ndiag=2, minweight_frac=0.01)
    f = jax.jit(lambda start: solve_patch(Qb, p["y"], p["fluxweight"], valid, keep=(start, 3), **kw))
    every = solve_patch(Qb, p["y"], p["fluxweight"], valid, **kw)
    for start, first in ((1, 1), (0, 0), (4, 2)):  # a start past the end is clipped to fit
        out = f(start)
        sel = slice(first, first + 3)
        rest = np.r_[0:first, first + 3:nspec]
        for name in ("flux", "ivar", "resolution"):
            a, b = np.asarray(getattr(out, name)), np.asarray(getattr(every, name))
            np.testing.assert_allclose(a[sel], b[sel], rtol=1e-13, atol=1e-13 * np.abs(b).max())
            assert not a[rest].any()
        np.testing.assert_allclose(out.xflux, every.xflux, rtol=1e-13, atol=1e-13 * np.abs(every.xflux).max())


def test_band_gradients(patch_factory):
    nspec, nwave = 3, 5
    rng = np.random.default_rng(9)
    n = nspec * nwave
    mask = np.kron(np.abs(np.subtract.outer(np.arange(nspec), np.arange(nspec))) <= 1, np.ones((nwave, nwave)))
    B = rng.standard_normal((n, n))
    y = rng.standard_normal(n)
    fw = rng.uniform(1.0, 2.0, n)
    fw[0] = 1e-3
    valid = np.ones(n, bool)

    def outputs(B, y, band):
        Q = (B @ B.T) * mask + 0.5 * jnp.eye(n)
        Q = band_from_dense(Q, nspec, 1) if band else Q
        o = solve_patch(Q, y, fw, valid, nspec, nwave, 2, regularize=0.1)
        return o.flux, o.ivar, o.xflux

    check_grads(jax.jit(lambda B, y: outputs(B, y, True)), (B, y), order=1, modes=("fwd", "rev"))
    loss = lambda band: jax.jit(jax.grad(lambda B, y: sum(jnp.sum(o) for o in outputs(B, y, band)), argnums=(0, 1)))  # noqa: E731
    for a, b in zip(loss(True)(B, y), loss(False)(B, y)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_bad_band_shape():
    with pytest.raises(ValueError, match="shape"):
        solve_patch(jnp.zeros((3, 2, 4, 4)), jnp.zeros(12), jnp.ones(12), jnp.ones(12, bool), 3, 5, 1)
