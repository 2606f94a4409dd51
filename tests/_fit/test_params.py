"""The start of the full model (jaxspec._fit.params.bundle_series_start).

* a PSF that already is one (fiber, wavelength) Legendre series per bundle comes back
  unchanged; another night's PSF comes back as the least-squares series (residuals
  orthogonal to the fiber basis, wavelength coefficients above the degree zero), with
  broken fibers, other parameters and the traces bit for bit;
* specex's own PSF (psf-r0-00067784, fitted with LEGDEGX = LEGDEGW = 1) is such a series
  to 1e-4 in its spots: the fitted family holds DESI's PSFs.
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np

import jaxspec
from jaxspec._fit.params import bundle_series_start, fiber_legendre, shape_terms_of


def test_a_series_is_its_own_projection(psf_path):
    psf = jaxspec.read_psf(psf_path("psf-r0-00051060.fits"))
    terms = shape_terms_of(psf)
    fib = np.arange(25, 50)
    rows = [psf.param_index(n) for n in ("GH-0-0",) + terms]
    rng = np.random.default_rng(4)
    pars = np.array(psf.params)
    coef = rng.normal(size=(len(rows), 2, 2))  # (term, fiber degree 1, wavelength degree 1)
    series = np.einsum("fa,tak->tfk", fiber_legendre(25, 1), coef)
    pars[np.ix_(rows, fib, [0, 1])] = series
    pars[np.ix_(rows, fib, [2, 3])] = 0.0
    exact = eqx.tree_at(lambda p: p.params, psf, jnp.asarray(pars))
    out = bundle_series_start(exact, [fib], terms, 1, 1)
    np.testing.assert_allclose(np.asarray(out.params), pars, rtol=0, atol=1e-13)


def test_projection_of_another_nights_psf(psf_path):
    psf = jaxspec.read_psf(psf_path("psf-r0-00051060.fits"))
    terms = shape_terms_of(psf)
    bundles = [np.arange(0, 25), np.arange(25, 50)]
    broken = [30]
    out = bundle_series_start(psf, bundles, terms, 1, 1, broken=broken)
    a, b = np.asarray(psf.params), np.asarray(out.params)
    rows = [psf.param_index(n) for n in ("GH-0-0",) + terms]
    others = [r for r in range(a.shape[0]) if r not in rows]
    np.testing.assert_array_equal(b[others], a[others])
    np.testing.assert_array_equal(b[:, 30], a[:, 30])
    np.testing.assert_array_equal(b[:, 50:], a[:, 50:])
    np.testing.assert_array_equal(np.asarray(out.xcoef), np.asarray(psf.xcoef))
    np.testing.assert_array_equal(np.asarray(out.ycoef), np.asarray(psf.ycoef))
    assert np.all(b[np.ix_(rows, np.arange(50), [2, 3])][:, np.arange(50) != 30] == 0.0)
    assert np.abs(b[rows] - a[rows]).max() > 1e-3  # the start did bend across its bundles
    for fib in bundles:
        live = fib != 30
        basis = fiber_legendre(25, 1)[live]
        resid = (a - b)[np.ix_(rows, fib[live], [0, 1])]
        # least squares: the residuals are orthogonal to the fiber basis
        np.testing.assert_allclose(np.einsum("fa,tfk->tak", basis, resid), 0.0, atol=1e-12)


def test_specex_psf_is_a_bundle_series(psf_path):
    truth = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    bundles = [np.arange(s, s + 25) for s in (0, 100, 250, 475)]
    proj = bundle_series_start(truth, bundles, shape_terms_of(truth), 1, 1)
    rng = np.random.default_rng(0)
    for fib in bundles:
        f = rng.choice(fib, 100)
        w = rng.uniform(truth.wmin + 5, truth.wmax - 5, 100)
        xa, ya, a = (np.asarray(v) for v in truth.spots(f, w))
        xb, yb, b = (np.asarray(v) for v in proj.spots(f, w))
        same = (xa == xb) & (ya == yb)
        assert same.mean() > 0.9
        assert np.abs(a - b)[same].max() < 1e-4  # measured 4.5e-6 median, 7.8e-5 worst over all 20 bundles
