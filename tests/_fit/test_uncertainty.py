"""PSF covariance into trace and spot uncertainties (jaxspec._fit.uncertainty.trace_spot_sigma).

* x and y are linear in the trace offsets: their propagated sigma equals the
  Legendre basis through the offsets' covariance block exactly;
* the spot pixels' sigma against the scatter of spots drawn from the covariance
  (Monte Carlo, 4000 draws);
* a broken fiber's parameters (non-finite variance) add nothing.

The fit is a :class:`BundleFit` made by hand around a real PSF with a chosen
covariance: this tests the propagation, not a fit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec._fit.bundle import BundleFit
from jaxspec._fit.params import _Layout, apply_psf_params
from jaxspec._fit.uncertainty import trace_spot_sigma

TERMS = ("GHSIGX", "GHSIGY", "GH-1-1")


@pytest.fixture(scope="module")
def fit(psf_path):
    psf = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    fibers = np.arange(3)
    rng = np.random.default_rng(0)
    params = {"dx": rng.normal(0, 0.02, (3, 2)), "dy": rng.normal(0, 0.02, (3, 2)),
              "pc": rng.normal(0, 1e-3, (3, 2, 1))}
    lay = _Layout({k: v.shape for k, v in params.items()})
    # per-parameter scales: traces 3e-3 px, widths 1e-3 px, GH-1-1 3e-3; random correlations
    scale = np.concatenate([np.full(12, 3e-3), np.full(4, 1e-3), np.full(2, 3e-3)])
    a = rng.normal(size=(lay.size, lay.size))
    corr = a @ a.T + lay.size * np.eye(lay.size)
    d = np.sqrt(np.diag(corr))
    cov = corr / np.outer(d, d) * np.outer(scale, scale)
    p = apply_psf_params(psf, {k: jnp.asarray(v) for k, v in params.items()}, fibers, shape_terms=TERMS)
    err = {k: np.sqrt(np.diag(cov))[lay.slices[k]].reshape(lay.shapes[k]) for k in params}
    return BundleFit(psf=p.with_traces(), params=params, errors=err, cov=cov, chi2=0.0, ndata=1, npar=1, niter=0,
                     converged=True, chi2_history=[], fibers=fibers, boxes=[], shape_terms=TERMS, psf_init=psf,
                     live=np.ones(3, bool))


def test_trace_sigma_is_the_legendre_basis_through_the_covariance(fit):
    ispec = np.array([0, 1, 2, 2, 0])
    wave = np.array([5700.0, 6200.0, 6400.0, 7500.0, 7700.0])
    out = trace_spot_sigma(fit, ispec, wave, chunk=2)  # chunks of 2: the last one padded
    lay = _Layout({k: np.shape(v) for k, v in fit.params.items()})
    for name, dom in (("x", fit.psf.xdomain), ("y", fit.psf.ydomain)):
        t = (wave - dom[0]) * (2.0 / (dom[1] - dom[0])) - 1.0
        basis = np.stack([np.ones_like(t), t], axis=1)  # P_0, P_1 (2 offsets per fiber)
        idx = np.arange(lay.size)[lay.slices["d" + name]].reshape(3, 2)[ispec]
        want = np.sqrt([b @ fit.cov[np.ix_(i, i)] @ b for b, i in zip(basis, idx)])
        np.testing.assert_allclose(out[name], want, rtol=1e-12)
    xmin, ymin, _ = fit.psf.spots(ispec, wave)
    np.testing.assert_array_equal(out["xmin"], np.asarray(xmin))
    np.testing.assert_array_equal(out["ymin"], np.asarray(ymin))
    assert out["spots"].shape == (5,) + fit.psf.stamp_shape


def test_spot_sigma_matches_monte_carlo(fit):
    ispec = np.array([0, 1, 2])
    wave = np.array([6000.0, 6500.0, 7200.0])
    out = trace_spot_sigma(fit, ispec, wave)
    lay = _Layout({k: np.shape(v) for k, v in fit.params.items()})
    p0 = lay.flatten(fit.params)
    draws = np.random.default_rng(1).multivariate_normal(p0, fit.cov, 4000)

    @jax.jit
    def spots(p):
        psf = apply_psf_params(fit.psf_init, lay.unflatten(p), fit.fibers, shape_terms=TERMS)
        return psf.spots(jnp.asarray(ispec), jnp.asarray(wave))[2]

    mc = np.asarray(jax.lax.map(spots, jnp.asarray(draws))).std(axis=0, ddof=1)
    big = out["spots"] > 0.1 * out["spots"].max()
    assert big.sum() > 30
    ratio = mc[big] / out["spots"][big]
    # 4000 draws: statistical scatter of the ratio ~1.1%; the spots are nearly linear at 1 sigma
    assert 0.95 < np.median(ratio) < 1.05 and 0.9 < ratio.min() and ratio.max() < 1.1, (ratio.min(), ratio.max())


def test_broken_fiber_parameters_add_nothing(fit):
    """Fiber 1 broken: its offsets have a NaN variance (as fit_bundle leaves them) and are not applied."""
    lay = _Layout({k: np.shape(v) for k, v in fit.params.items()})
    cov = fit.cov.copy()
    for k in ("dx", "dy"):
        i = np.arange(lay.size)[lay.slices[k]].reshape(3, 2)[1]
        cov[i, :] = cov[:, i] = np.nan
    broken = BundleFit(**{**fit.__dict__, "cov": cov, "live": np.array([True, False, True])})
    out = trace_spot_sigma(broken, np.array([0, 1]), np.array([6400.0, 6400.0]))
    assert np.all(np.isfinite(out["x"])) and np.all(np.isfinite(out["spots"]))
    assert out["x"][1] == 0 and out["y"][1] == 0 and np.all(out["spots"][1] == 0)
    assert out["x"][0] > 0
    with pytest.raises(ValueError, match="one shape"):
        trace_spot_sigma(fit, np.array([0, 1]), np.array([6400.0]))
