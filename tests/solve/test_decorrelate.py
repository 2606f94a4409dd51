"""decorrelate_signal / decorrelate_full against a port of specter's resolution_from_icov."""

import jax
import numpy as np
import pytest

from jaxspec.solve import cholesky_factor, decorrelate_full, decorrelate_signal

NSPEC, NWAVE = 3, 16


def _icov(seed, patch_factory):
    p = patch_factory(seed, NSPEC, NWAVE)
    return p["Q"], np.linalg.solve(p["Q"], p["y"])


@jax.jit
def _signal(Q, x):
    return decorrelate_signal(cholesky_factor(Q), x, NSPEC, NWAVE)


@jax.jit
def _full(Q, x):
    return decorrelate_full(Q, x)


@pytest.mark.parametrize("seed", [0, 1])
def test_signal_matches_specter(specter, patch_factory, seed):
    Q, x = _icov(seed, patch_factory)
    Rref, ivref = specter.resolution_from_icov(Q, blocks=[NWAVE] * NSPEC)
    flux, ivar, R = map(np.asarray, _signal(Q, x))
    np.testing.assert_allclose(ivar.ravel(), ivref, rtol=1e-10)
    for b in range(NSPEC):
        sl = slice(b * NWAVE, (b + 1) * NWAVE)
        np.testing.assert_allclose(R[b], Rref[sl, sl], rtol=1e-10, atol=1e-12)
        # signal mode: R is block diagonal
        assert np.all(Rref[sl, :][:, np.r_[0 : sl.start, sl.stop : NSPEC * NWAVE]] == 0)
    np.testing.assert_allclose(flux.ravel(), Rref @ x, rtol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_full_matches_specter(specter, patch_factory, seed):
    Q, x = _icov(seed, patch_factory)
    Rref, ivref = specter.resolution_from_icov(Q)
    flux, ivar, R = map(np.asarray, _full(Q, x))
    np.testing.assert_allclose(ivar, ivref, rtol=1e-10)
    np.testing.assert_allclose(R, Rref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(flux, Rref @ x, rtol=1e-10)
    np.testing.assert_allclose(R.sum(axis=1), 1.0, rtol=1e-13)
