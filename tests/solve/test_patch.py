"""solve_patch end to end: specter agreement, padding, no-weight, gradients, jit/vmap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxspec.solve import PatchSolution, solve_patch

NDIAG = 4
STATIC = ("nspec", "nwave", "ndiag", "decorrelate", "square_lowweight", "threshold", "method")
jsolve = jax.jit(solve_patch, static_argnames=STATIC)


def _run(p, nspec, nwave, mode, reg=0.0, valid=None):
    """The solve with the low-weight fraction of the reference arithmetic (0.01, so that the
    cases' low rows exercise it; the default, specter's 1e-4, is tested in test_normal.py)."""
    if valid is None:
        valid = np.ones(nspec * nwave, bool)
    return jsolve(p["Q"], p["y"], p["fluxweight"], valid, nspec=nspec, nwave=nwave,
                  ndiag=NDIAG, decorrelate=mode, regularize=reg, minweight_frac=0.01)


def _rel(a, b):
    return np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("mode", ["signal", "full"])
@pytest.mark.parametrize(
    "seed,nspec,nwave,reg,low_rows",
    [(0, 3, 24, 0.0, 0), (1, 3, 24, 0.3, 8), (2, 7, 40, 0.0, 8), (3, 7, 40, 0.05, 0)],
)
def test_matches_specter(specter, patch_factory, mode, seed, nspec, nwave, reg, low_rows):
    p = patch_factory(seed, nspec, nwave, low_rows=low_rows)
    if low_rows:  # the case must exercise specter's low-weight regularisation
        assert np.any(p["fluxweight"] < 0.01 * p["fluxweight"].max())
    ref = specter.patch(p["Q"], p["y"], p["fluxweight"], nspec, nwave, regularize=reg,
                        ndecorr=(mode == "full"))
    out = _run(p, nspec, nwave, mode, reg)
    assert isinstance(out, PatchSolution)
    assert out.resolution.shape == (nspec, 2 * NDIAG + 1, nwave)
    assert _rel(out.xflux, ref["xflux"]) < 1e-10
    assert _rel(out.flux, ref["flux"]) < 1e-10
    assert _rel(out.ivar, ref["ivar"]) < 1e-10
    for b in range(nspec):
        sl = slice(b * nwave, (b + 1) * nwave)
        rd = specter.diagonals(ref["R"][sl, sl], NDIAG)
        np.testing.assert_allclose(out.resolution[b], rd, rtol=0, atol=1e-10 * np.abs(rd).max())


@pytest.mark.parametrize("mode", ["signal", "full"])
def test_padding_is_exact(patch_factory, mode):
    nspec, nwave, pspec, pwave = 3, 24, 4, 30
    p = patch_factory(5, nspec, nwave, low_rows=6)
    base = _run(p, nspec, nwave, mode, 0.1)

    idx = (np.arange(nspec)[:, None] * pwave + np.arange(nwave)[None, :]).ravel()
    n = pspec * pwave
    valid = np.zeros(n, bool)
    valid[idx] = True
    Q = np.zeros((n, n))
    Q[np.ix_(idx, idx)] = p["Q"]
    y = np.full(n, 7.0)  # garbage in padding: must be ignored
    y[idx] = p["y"]
    fw = np.full(n, 1e6)  # garbage weights in padding: must not move minweight
    fw[idx] = p["fluxweight"]
    out = _run(dict(Q=Q, y=y, fluxweight=fw), pspec, pwave, mode, 0.1, valid)

    # signal: Cholesky of a block-diagonal padding is exact; full: the whole-patch eigh
    # of a larger matrix reorders its rounding (a few 1e-12 relative, measured)
    tol = 1e-12 if mode == "signal" else 1e-10
    for name in ("flux", "ivar", "xflux"):
        a = np.asarray(getattr(out, name))
        b = np.asarray(getattr(base, name))
        np.testing.assert_allclose(a[:nspec, :nwave], b, rtol=tol, atol=tol * np.abs(b).max())
    assert np.all(np.asarray(out.ivar)[~valid.reshape(pspec, pwave)] == 0)
    assert np.all(np.isfinite(np.asarray(out.flux)))
    rb = np.asarray(base.resolution)
    np.testing.assert_allclose(np.asarray(out.resolution)[:nspec, :, :nwave], rb, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["signal", "full"])
def test_zero_weight_fiber_and_patch(patch_factory, mode):
    nspec, nwave = 3, 24
    p = patch_factory(6, nspec, nwave, dead_fiber=1)
    assert np.all(p["fluxweight"].reshape(nspec, nwave)[1] == 0)
    out = _run(p, nspec, nwave, mode)
    for a in (out.flux, out.ivar, out.resolution, out.xflux):
        assert np.all(np.isfinite(np.asarray(a)))
    assert np.all(np.asarray(out.ivar)[1] == 0)
    assert np.all(np.asarray(out.ivar)[[0, 2]] > 0)

    q = patch_factory(6, nspec, nwave, dead_patch=True)
    assert not np.any(q["fluxweight"])
    out = _run(q, nspec, nwave, mode)
    for a in (out.flux, out.ivar, out.resolution, out.xflux):
        assert np.all(np.isfinite(np.asarray(a)))
    assert not np.any(np.asarray(out.ivar))
    assert not np.any(np.asarray(out.flux))


def _small_problem(seed=11, nspec=2, nwave=5):
    rng = np.random.default_rng(seed)
    n = nspec * nwave
    B = rng.standard_normal((n, n)) + 2.0 * np.eye(n)
    y = rng.standard_normal(n)
    fw = rng.uniform(1.0, 2.0, n)
    fw[0] = 1e-3  # one low-weight bin, regularised
    return B, y, fw


def test_check_grads():
    B, y, fw = _small_problem()
    valid = np.ones(B.shape[0], bool)

    @jax.jit
    def f(B, y):
        Q = B @ B.T + 0.5 * jnp.eye(B.shape[0])
        res = []
        for mode in ("signal", "full"):
            out = solve_patch(Q, y, fw, valid, 2, 5, 2, decorrelate=mode, regularize=0.1)
            res += [out.flux, out.ivar]
        return res

    check_grads(f, (B, y), order=1, modes=("fwd", "rev"))


def test_grads_finite_with_padding_and_dead_fiber(patch_factory):
    nspec, nwave = 3, 12
    valid = np.ones(nspec * nwave, bool)
    valid[-3:] = False
    live = patch_factory(6, nspec, nwave, dead_fiber=1, low_rows=6)
    dead = patch_factory(6, nspec, nwave, dead_patch=True)

    @jax.jit
    def grad(Q, y, fw):
        def loss(Q, y):
            tot = 0.0
            for mode in ("signal", "full"):
                o = solve_patch(Q, y, fw, valid, nspec, nwave, 3, decorrelate=mode)
                tot = tot + jnp.sum(o.flux) + jnp.sum(o.ivar) + jnp.sum(o.resolution)
            return tot

        return jax.grad(loss, argnums=(0, 1))(Q, y)

    for p in (live, dead):
        for g in grad(p["Q"], p["y"], p["fluxweight"]):
            assert np.all(np.isfinite(np.asarray(g)))


def test_newton_schulz_method(patch_factory):
    nspec, nwave = 2, 10
    p = patch_factory(8, nspec, nwave)
    valid = np.ones(nspec * nwave, bool)
    for mode in ("signal", "full"):
        kw = dict(nspec=nspec, nwave=nwave, ndiag=3, decorrelate=mode)
        a = jsolve(p["Q"], p["y"], p["fluxweight"], valid, method="newton_schulz", **kw)
        b = jsolve(p["Q"], p["y"], p["fluxweight"], valid, **kw)
        for name in ("flux", "ivar", "resolution"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12)


def test_jit_vmap_matches_loop(patch_factory):
    nspec, nwave = 3, 24
    ps = [patch_factory(s, nspec, nwave, low_rows=4 * (s % 2)) for s in range(3)]
    Q, y, fw = (np.stack([p[k] for p in ps]) for k in ("Q", "y", "fluxweight"))
    valid = np.ones((3, nspec * nwave), bool)
    valid[2, -5:] = False  # one patch with padding at its end
    for mode in ("signal", "full"):
        fn = functools.partial(solve_patch, nspec=nspec, nwave=nwave, ndiag=NDIAG, decorrelate=mode)
        batched = jax.jit(jax.vmap(lambda q, yy, w, v: fn(q, yy, w, v, regularize=0.1)))(Q, y, fw, valid)
        for i in range(3):
            single = jsolve(Q[i], y[i], fw[i], valid[i], nspec=nspec, nwave=nwave, ndiag=NDIAG,
                            decorrelate=mode, regularize=0.1)
            for name in ("flux", "ivar", "resolution", "xflux"):
                b = np.asarray(getattr(single, name))
                np.testing.assert_allclose(getattr(batched, name)[i], b, rtol=1e-11,
                                           atol=1e-11 * np.abs(b).max())


def test_bad_arguments():
    with pytest.raises(ValueError):
        solve_patch(jnp.eye(6), jnp.zeros(6), jnp.ones(6), jnp.ones(6, bool), 2, 4, 1)
    with pytest.raises(ValueError):
        solve_patch(jnp.eye(6), jnp.zeros(6), jnp.ones(6), jnp.ones(6, bool), 2, 3, 1, decorrelate="x")
