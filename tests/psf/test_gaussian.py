import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import erf

from jaxspec.psf import GaussianPSF


def test_geometry_and_spots():
    psf = GaussianPSF.create(nspec=5, wave0=5000.0, dispersion=0.5, npix_y=300, sigma_x=1.0)
    np.testing.assert_allclose(psf.x(np.arange(5), 5050.0), 12.3 + 7.4 * np.arange(5))
    np.testing.assert_allclose(psf.y(2, 5050.0), 100.0)
    np.testing.assert_allclose(psf.wavelength(2, 100.0), 5050.0)
    assert psf.wmin == 5000.0 - 0.25 and psf.wmax == 5000.0 + 299.5 * 0.5
    xmin, ymin, st = psf.spots(1, 5050.2)
    x, y = 12.3 + 7.4, 100.4
    ny, nx = psf.stamp_shape
    gx = np.diff(erf((int(xmin) - 0.5 + np.arange(nx + 1) - x) / np.sqrt(2)))
    gy = np.diff(erf((int(ymin) - 0.5 + np.arange(ny + 1) - y) / (np.sqrt(2) * 1.2)))
    ref = np.outer(gy, gx)
    np.testing.assert_allclose(st, ref / ref.sum(), atol=1e-15)
    np.testing.assert_allclose(psf.ysigma(1, 5050.0), 1.2)
    assert 2 <= psf.ndiag(0.5) <= 6


def test_differentiable():
    psf = GaussianPSF.create(nspec=3)

    def f(sx, sy):
        p = jax.tree_util.tree_map(lambda a: a, psf)
        import equinox as eqx

        p = eqx.tree_at(lambda q: (q.sigma_x, q.sigma_y), p, (sx, sy))
        return jnp.sum(p.spots(jnp.arange(3), 5650.3)[2][:, 4, 4])

    g = jax.jit(jax.grad(f, argnums=(0, 1)))(psf.sigma_x, psf.sigma_y)
    assert all(np.isfinite(float(v)) and float(v) != 0 for v in g)
