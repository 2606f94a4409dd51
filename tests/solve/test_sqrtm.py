"""sqrtm_sym / inv_sqrtm_sym / inv_sym: values, specter clipping, custom JVP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.test_util import check_grads

from jaxspec.solve import eigen_threshold, inv_sqrtm_sym, inv_sym, sqrtm_sym

N = 7  # one matrix size throughout, so each jitted function compiles once


@jax.jit
def _all_three(M):
    return sqrtm_sym(M), inv_sqrtm_sym(M), inv_sym(M)


@jax.jit
def _all_three_ns(M):
    kw = dict(method="newton_schulz", iters=30)
    return sqrtm_sym(M, **kw), inv_sqrtm_sym(M, **kw), inv_sym(M, **kw)


def _spd(seed, n=N, shift=1.0):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((n, n))
    return B @ B.T / n + shift * np.eye(n)


def _repeated(seed=0):
    """Block-diagonal: a random SPD block and a 3x3 multiple of the identity."""
    M = np.zeros((N, N))
    M[:4, :4] = _spd(seed, 4)
    M[4:, 4:] = 2.0 * np.eye(3)
    return M


MATRICES = {"generic": _spd(2), "repeated": _repeated(), "identity": np.eye(N)}


def test_values():
    M = _spd(1)
    S, Z, C = map(np.asarray, _all_three(M))
    np.testing.assert_allclose(S, scipy.linalg.sqrtm(M).real, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(S @ S, M, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(Z @ M @ Z, np.eye(N), atol=1e-12)
    np.testing.assert_allclose(C, np.linalg.inv(M), rtol=1e-12, atol=1e-13)


def test_clipping_matches_specter(specter):
    # diagonal input: eigh is exact, so the clipping rule itself is compared
    w = np.array([1e-40, -1e-18, 1e-31, 1e-28, 1e-15, 0.5, 2.0])
    M = np.diag(w[np.random.default_rng(3).permutation(N)])
    ww, vv = scipy.linalg.eigh(M)
    refs = [specter.eigen_compose(ww, vv, sqr=True),
            specter.eigen_compose(ww, vv, invert=True, sqr=True),
            specter.eigen_compose(ww, vv, invert=True)]
    for got, ref in zip(_all_three(M), refs):
        np.testing.assert_allclose(got, ref, rtol=1e-13, atol=0)
    # specter's sqrt compares w itself (not sqrt(w)) with sqrt(wmax)*threshold
    lim = np.sqrt(2.0) * eigen_threshold(np.float64)
    d = np.diag(np.asarray(_all_three(np.diag([1e-15, 1e-14, 2.0, 1, 1, 1, 1]))[0]))
    np.testing.assert_allclose(d[:3], [lim, 1e-7, np.sqrt(2.0)], rtol=1e-13)
    assert eigen_threshold(np.float64) == pytest.approx(2.220446049250313e-15)


@pytest.mark.parametrize("which", list(MATRICES))
def test_check_grads(which):
    check_grads(_all_three, (MATRICES[which],), order=1, modes=("fwd", "rev"))


def test_jvp_matches_finite_difference_on_repeated():
    M = _repeated(4)
    D = np.random.default_rng(5).standard_normal(M.shape)
    D = D + D.T
    _, tangents = jax.jit(lambda m, d: jax.jvp(_all_three, (m,), (d,)))(M, D)
    h = 1e-6
    plus, minus = _all_three(M + h * D), _all_three(M - h * D)
    for t, a, b in zip(tangents, plus, minus):
        fd = (np.asarray(a) - np.asarray(b)) / (2 * h)
        np.testing.assert_allclose(t, fd, rtol=1e-6, atol=1e-8)


@jax.jit
def _grad_all(M):
    return jax.grad(lambda M: sum(jnp.sum(x**2) for x in _all_three(M)))(M)


def test_grads_finite_on_identity_block_and_clipped():
    for M in (_repeated(), np.eye(N), np.diag([1.0, 0.5, 0.0, 0.0, 2.0, 3.0, 1e-20])):
        assert np.all(np.isfinite(np.asarray(_grad_all(M))))


def test_newton_schulz():
    M = _spd(7, shift=0.5)
    for ns, ev in zip(_all_three_ns(M), _all_three(M)):
        np.testing.assert_allclose(ns, ev, rtol=1e-10, atol=1e-11)
    check_grads(_all_three_ns, (M,), order=1, modes=("rev",))


def test_vmap_jit():
    Ms = np.stack([_spd(s) for s in range(4)] + [np.eye(N)])
    out = jax.jit(jax.vmap(_all_three))(Ms)
    for i in range(len(Ms)):
        for a, b in zip(out, _all_three(Ms[i])):
            np.testing.assert_allclose(a[i], b, rtol=1e-13, atol=1e-14)


def test_bad_method():
    with pytest.raises(ValueError):
        sqrtm_sym(np.eye(2), method="nope")
