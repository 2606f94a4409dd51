import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial import legendre as L

from jaxspec.psf._legendre import fit_inverse, legval, legvander, traceset_eval, traceset_eval_many


def test_legval_matches_numpy():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(6, 8))
    t = rng.uniform(-1.2, 1.2, size=6)
    ref = np.array([L.legval(t[i], c[i]) for i in range(6)])
    np.testing.assert_allclose(legval(t, c), ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(legvander(t, 7), L.legvander(t, 7), rtol=0, atol=1e-14)
    np.testing.assert_allclose(legval(0.3, np.asarray([2.0])), 2.0)


def test_traceset_broadcast_and_many():
    rng = np.random.default_rng(2)
    c = rng.normal(size=(3, 5, 4))
    ispec = np.arange(5)[:, None]
    w = np.linspace(100.0, 200.0, 7)[None, :]
    many = traceset_eval_many(c, (90.0, 210.0), ispec, w)
    assert many.shape == (5, 7, 3)
    for p in range(3):
        np.testing.assert_allclose(many[..., p], traceset_eval(c[p], (90.0, 210.0), ispec, w), atol=1e-13)


def test_fit_inverse_matches_legfit():
    rng = np.random.default_rng(3)
    a, b = 5000.0, 6000.0
    c = np.zeros((4, 3))
    c[:, 0] = 1000.0 + rng.normal(size=4)
    c[:, 1] = 900.0
    c[:, 2] = rng.normal(size=4)
    inv, lim = fit_inverse(c, (a, b))
    w = np.linspace(a, b, 1000)
    t = (w - a) * (2 / (b - a)) - 1
    ys = np.array([L.legval(t, c[i]) for i in range(4)])
    ymin, ymax = ys[:, [0, -1]].min(), ys[:, [0, -1]].max()
    np.testing.assert_allclose(lim, [ymin, ymax], rtol=1e-14)
    for i in range(4):
        ref = L.legfit((ys[i] - ymin) * (2 / (ymax - ymin)) - 1, w, 5)
        np.testing.assert_allclose(inv[i], ref, atol=1e-8)
    back = traceset_eval(inv, (lim[0], lim[1]), np.arange(4)[:, None], ys)
    np.testing.assert_allclose(back, np.broadcast_to(w, back.shape), atol=1e-6)


def test_jit_grad_vmap():
    c = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 0.3]])
    f = jax.jit(lambda c, w: traceset_eval(c, (0.0, 10.0), jnp.array([0, 1]), w).sum())
    g = jax.grad(f)(c, 3.0)
    t = 3.0 * 0.2 - 1
    np.testing.assert_allclose(g, np.tile([1.0, t, 0.5 * (3 * t * t - 1)], (2, 1)), atol=1e-14)
    v = jax.vmap(lambda w: traceset_eval(c, (0.0, 10.0), 1, w))(jnp.linspace(0, 10, 5))
    assert v.shape == (5,)
    gi = jax.grad(lambda c: fit_inverse(c, (0.0, 10.0))[0].sum())(c + jnp.array([[0, 5.0, 0]]))
    assert np.all(np.isfinite(gi))
