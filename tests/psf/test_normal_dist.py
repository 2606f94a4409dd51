import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads
from scipy.special import ndtr

from jaxspec.psf._normal_dist import normal_cdf_pdf


def test_matches_scipy_everywhere():
    u = np.concatenate([np.linspace(-40.0, 40.0, 200_001), [-8.6, 8.6, -1e-300, 0.0, 1e-300]])
    cdf, phi = normal_cdf_pdf(jnp.asarray(u))
    # the spots are differences of cdf at pixel edges: absolute accuracy is what counts
    np.testing.assert_allclose(cdf, ndtr(u), rtol=0, atol=5e-16)
    np.testing.assert_allclose(phi, np.exp(-0.5 * u * u) / np.sqrt(2 * np.pi), rtol=1e-15, atol=1e-300)
    assert np.all(np.diff(np.asarray(cdf)[:200_001]) >= 0)  # monotonic
    # relative accuracy in the lower tail (limited by exp(-u^2 / 2) rounding, ~u^2 eps / 2)
    t = np.linspace(-8.6, -0.5, 5001)
    np.testing.assert_allclose(normal_cdf_pdf(jnp.asarray(t))[0], ndtr(t), rtol=3e-14)


def test_derivatives_are_exact():
    u = jnp.linspace(-6.0, 6.0, 25)
    d_cdf = jax.vmap(jax.grad(lambda v: normal_cdf_pdf(v)[0]))(u)
    d_phi = jax.vmap(jax.grad(lambda v: normal_cdf_pdf(v)[1]))(u)
    phi = np.exp(-0.5 * np.asarray(u) ** 2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(d_cdf, phi, rtol=1e-15)
    np.testing.assert_allclose(d_phi, -np.asarray(u) * phi, rtol=1e-15, atol=1e-300)
    check_grads(lambda v: normal_cdf_pdf(v)[0], (u,), order=2, modes=("fwd", "rev"))
