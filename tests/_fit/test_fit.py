"""PSF calibration by Gauss-Newton / Levenberg-Marquardt (jaxspec._fit).

The acceptance case of issue 7: the real r0 PSF with its parameters perturbed
(traces shifted by 0.2-0.4 pixel, GHSIGX/GHSIGY scaled by ~5%, five GH terms
offset by ~0.01), simulated arc + flat of bundle 0 (fibers 0-24) over
6320-6480 A, fitted from the perturbed PSF: the fit must recover the true
corrections within 3 of their fitted sigmas, and the extraction of a science
frame with the fitted PSF must give unbiased pulls, while the perturbed PSF's
are biased.  Smaller patches check the Gauss-Newton pieces against dense
autodiff, gradients against finite differences, and the flux Jacobian.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec._simulation.calib import arc_lines, simulate_arc, simulate_flat
from jaxspec import (
    DEFAULT_GH_TERMS,
    apply_psf_params,
    calib_patch,
    fit_psf,
    flux_jacobian,
    propagate_psf_uncertainty,
)
from jaxspec._fit.patch import _normal_equations

PSF_NAME = "psf-r0-00067784.fits"
WAVERANGE = (6320.0, 6480.0)


def perturbation(nf: int, seed: int = 42) -> dict:
    """Seeded PSF perturbation of issue 7: ~0.3 px trace shifts, ~5% sigmas, GH offsets."""
    rng = np.random.default_rng(seed)
    shift = lambda: rng.choice([-1, 1], (nf, 1)) * rng.uniform(0.2, 0.4, (nf, 1))  # noqa: E731
    return dict(
        dx=shift(), dy=shift(), log_sigx=rng.normal(0, 0.05, nf), log_sigy=rng.normal(0, 0.05, nf),
        gh=rng.normal(0, 0.01, len(DEFAULT_GH_TERMS)),
    )


def calib_box(psf, nf, waverange, pad_wave=40.0):
    box = list(psf.xyrange((0, nf), (waverange[0] - pad_wave, waverange[1] + pad_wave)))
    box[0] = max(box[0] - 6, 0)
    box[1] += 6
    return tuple(box)


def pulls_of(ex, truth):
    conv = np.asarray(jaxspec.apply_resolution(ex.resolution, truth))
    return ((np.asarray(ex.flux) - conv) * np.sqrt(np.asarray(ex.ivar)))[:, 10:-10]


@pytest.fixture(scope="module")
def psf_true(psf_path):
    return jaxspec.read_psf(psf_path(PSF_NAME))


@pytest.fixture(scope="module")
def bundle_fit(psf_true):
    nf = 25
    fibers = np.arange(nf)
    pert = perturbation(nf)
    psf_init = apply_psf_params(psf_true, {k: jnp.asarray(v) for k, v in pert.items()}, fibers)
    lines = arc_lines("r")
    box = calib_box(psf_true, nf, WAVERANGE)
    arc = simulate_arc(psf_true, lines, specmin=0, nspec=nf, xyrange=box, seed=1)
    flat = simulate_flat(psf_true, specmin=0, nspec=nf, xyrange=box, seed=2)
    history = []
    res = fit_psf(psf_init, [arc], [flat], lines=lines, fibers=fibers, waverange=WAVERANGE,
                  callback=lambda it, c, s, lam: history.append((it, c, s)))
    truth = {k: -np.asarray(v) for k, v in pert.items()}  # corrections that undo the perturbation
    return dict(res=res, truth=truth, psf_init=psf_init, nf=nf, history=history)


@pytest.mark.slow  # 30-80 s on 2 cores (stop 22 durations)
def test_bundle_fit_recovers_parameters_within_3_sigma(bundle_fit):
    """Every fitted correction (105 of them) within 3 sigma of the truth; pulls ~ N(0, 1)."""
    res = bundle_fit["res"]
    assert res.converged and res.niter <= 12
    assert abs(res.reduced_chi2 - 1) < 0.02
    pulls = np.concatenate([np.ravel(p) for p in res.pulls(bundle_fit["truth"]).values()])
    assert pulls.size == 4 * 25 + 5
    assert np.all(np.abs(pulls) < 3.0), np.abs(pulls).max()
    assert 0.75 < pulls.std() < 1.25
    assert abs(pulls.mean()) < 0.3
    # and the uncertainties are small: 1e-3 pixel-level traces, 1e-3-level sigmas
    assert np.all(res.errors["dx"] < 2e-3) and np.all(res.errors["dy"] < 1e-2)
    assert np.all(res.errors["log_sigx"] < 1e-3) and np.all(res.errors["log_sigy"] < 5e-3)
    # progress was reported per iteration, chi2 never rising
    chi2 = [c for _, c, _ in bundle_fit["history"]]
    assert len(chi2) == res.niter + 1
    assert np.all(np.diff(chi2) <= 0)


@pytest.mark.slow  # 30-80 s on 2 cores (stop 22 durations)
def test_fitted_psf_extracts_unbiased_and_perturbed_does_not(bundle_fit, psf_true):
    """Pulls of a science frame: std 0.97-1.03 with the fitted PSF, biased with the perturbed one."""
    nf = bundle_fit["nf"]
    rng = np.random.default_rng(3)
    dw = 0.8
    wave = np.arange(WAVERANGE[0] + 10, WAVERANGE[1] - 10, dw)
    wext = np.arange(wave[0] - 30 * dw, wave[-1] + 30.5 * dw, dw)
    flux = 300 + 200 * np.sin(wext / 37.0)[None, :] * rng.uniform(0.5, 1, (nf, 1))
    for w in rng.uniform(wext[0], wext[-1], 6):
        flux = flux + 3000 * np.exp(-0.5 * ((wext - w) / 0.6) ** 2)[None, :] * rng.uniform(0.3, 1, (nf, 1))
    box = list(psf_true.xyrange((0, nf), (wave[0], wave[-1])))
    box = (max(box[0] - 6, 0), box[1] + 6, box[2] - 30, box[3] + 30)
    image, ivar, _ = jaxspec.simulate(psf_true, wext, flux, specmin=0, xyrange=box, seed=4)
    i0 = np.searchsorted(wext, wave[0] - 1e-6)
    truth = flux[:, i0:i0 + len(wave)]
    out = {}
    for name, psf in (("fitted", bundle_fit["res"].psf), ("perturbed", bundle_fit["psf_init"].with_traces())):
        ex = jaxspec.extract(image, ivar, psf, wave, specmin=0, nspec=nf, xyrange=box)
        out[name] = pulls_of(ex, truth)
    fitted, perturbed = out["fitted"], out["perturbed"]
    assert 0.97 < fitted.std() < 1.03, fitted.std()
    assert abs(fitted.mean()) < 0.03, fitted.mean()
    # the perturbed PSF: measured mean -0.86, std 1.63 on this frame
    assert abs(perturbed.mean()) > 0.5 and perturbed.std() > 1.3, (perturbed.mean(), perturbed.std())


@pytest.mark.slow  # 30-80 s on 2 cores (stop 22 durations)
def test_fitted_psf_file_round_trips(bundle_fit, tmp_path):
    """write_psf -> read_psf gives back the fitted coefficients and spots exactly."""
    psf = bundle_fit["res"].psf
    path = jaxspec.write_psf(tmp_path / "psf-fit.fits", psf)
    back = jaxspec.read_psf(path)
    for name in ("xcoef", "ycoef", "params", "wcoef", "ylim"):
        np.testing.assert_array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(psf, name)), err_msg=name)
    assert back.param_names == psf.param_names and back.legdeg == psf.legdeg
    fib = np.array([0, 7, 24])[:, None]
    wav = np.array([6330.0, 6400.0, 6470.0])[None, :]
    for a, b in zip(back.spots(fib, wav), psf.spots(fib, wav)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # fibers outside the fit are untouched
    init = bundle_fit["res"].psf_init
    np.testing.assert_array_equal(np.asarray(back.xcoef[25:]), np.asarray(init.xcoef[25:]))
    np.testing.assert_array_equal(np.asarray(back.params[:, 25:]), np.asarray(init.params[:, 25:]))


# --------------------------------------------------------------------------- small patches
@pytest.fixture(scope="module")
def small(psf_true):
    """Three fibers, ~90 rows around two lines, perturbed; arc + flat."""
    nf = 3
    fibers = np.arange(nf)
    pert = {k: v[:nf] if k != "gh" else v for k, v in perturbation(25, seed=7).items()}
    psf_init = apply_psf_params(psf_true, {k: jnp.asarray(v) for k, v in pert.items()}, fibers)
    lines = arc_lines("r")
    wr = (6375.0, 6410.0)
    box = calib_box(psf_true, nf, wr, pad_wave=20.0)
    arc = simulate_arc(psf_true, lines, specmin=0, nspec=nf, xyrange=box, seed=5)
    flat = simulate_flat(psf_true, specmin=0, nspec=nf, xyrange=box, seed=6)
    patch, meta = calib_patch(psf_init, [arc], [flat], lines=lines, fibers=fibers, waverange=wr)
    res = fit_psf(psf_init, [arc], [flat], lines=lines, fibers=fibers, waverange=wr)
    return dict(patch=patch, meta=meta, res=res, arc=arc, flat=flat, psf_init=psf_init, wr=wr)


def test_normal_equations_match_dense_autodiff(small):
    """J^T J and J^T r from the coloured band Jacobian equal those of dense jax.jacfwd, which
    matches finite differences."""
    patch = small["patch"]
    theta = jnp.asarray(small["res"].theta) + 1e-3  # away from the minimum: residuals non-zero
    chi2, jtj, jtr = (np.asarray(a) for a in _normal_equations(patch, theta))

    def resid(t):
        return patch.residuals(patch.unflatten(t)).reshape(-1)

    r = np.asarray(resid(theta))
    J = -np.asarray(jax.jacfwd(resid)(theta))  # d model / d theta, weighted
    np.testing.assert_allclose(chi2, r @ r, rtol=1e-12)
    scale = np.sqrt(np.outer(np.diag(J.T @ J), np.diag(J.T @ J))) + 1e-300
    np.testing.assert_allclose(jtj / scale, (J.T @ J) / scale, atol=1e-10)
    np.testing.assert_allclose(jtr, J.T @ r, rtol=1e-8, atol=1e-8 * np.abs(J.T @ r).max())
    # the autodiff Jacobian against central finite differences of the residuals, along
    # random directions in the PSF corrections (their natural units: pixels, log-scale, GH)
    psf_mask = patch.layout.mask(("dx", "dy", "log_sigx", "log_sigy", "gh"))
    rng = np.random.default_rng(0)
    resid_j = jax.jit(resid)
    for _ in range(3):
        v = np.where(psf_mask, rng.normal(size=len(theta)), 0.0)
        eps = 1e-4
        fd = (np.asarray(resid_j(theta + eps * v)) - np.asarray(resid_j(theta - eps * v))) / (2 * eps)
        np.testing.assert_allclose(-J @ v, fd, rtol=1e-5, atol=1e-5 * np.abs(fd).max())


def test_compiled_model_equals_eager(small):
    """Guards against miscompilation: the jitted model images equal the eager ones."""
    patch = small["patch"]
    params = patch.unflatten(jnp.asarray(small["res"].theta))
    eager = np.asarray(patch.model(params))
    jitted = np.asarray(eqx.filter_jit(lambda p, q: p.model(q))(patch, params))
    np.testing.assert_allclose(jitted, eager, rtol=1e-12, atol=1e-9)
    # and the model is the projection of the fitted PSF (same spots, same pixels)
    res = small["res"]
    lines = res.lines
    flux = np.asarray(params["line_flux"][0, :, : len(lines)])
    proj = np.asarray(jaxspec.project(res.psf, lines.wave, flux, specmin=0, xyrange=res.xyrange))
    np.testing.assert_allclose(eager[0], proj, rtol=1e-10, atol=1e-8 * proj.max())


def test_small_fit_converges_and_psf_cov_is_positive(small):
    res = small["res"]
    assert res.converged
    c = res.psf_cov
    assert c.shape == (4 * 3 + 5,) * 2
    np.testing.assert_allclose(c, c.T)
    assert np.all(np.linalg.eigvalsh(c) > 0)
    # the padding line columns are inactive: zero flux, infinite error
    nl = len(res.lines)
    assert np.all(res.params["line_flux"][..., nl:] == 0) and np.all(np.isinf(res.errors["line_flux"][..., nl:]))


@pytest.mark.slow  # 30-80 s on 2 cores (stop 22 durations)
def test_flux_jacobian_matches_finite_differences_and_propagates(small):
    """d flux / d PSF parameters from forward mode against central differences along a direction."""
    res = small["res"]
    psf = res.psf
    wave = np.arange(6380.0, 6405.0, 0.8)
    rng = np.random.default_rng(11)
    flux = 500 + 200 * rng.uniform(size=(3, len(wave)))
    box = calib_box(psf, 3, (wave[0], wave[-1]), pad_wave=15.0)
    image, ivar, _ = jaxspec.simulate(psf, wave, flux, specmin=0, xyrange=box, seed=8)
    ex, jac = flux_jacobian(res, image, ivar, wave, xyrange=box, nwavestep=len(wave))
    npsf = int(res.psf_mask.sum())
    assert jac.shape == (3, len(wave), npsf)
    v = rng.normal(size=npsf) * np.sqrt(np.diag(res.psf_cov))  # a 1-sigma-scaled direction
    keys = [k for k in ("dx", "dy", "log_sigx", "log_sigy", "gh") if k in res.params]
    p0 = np.concatenate([np.ravel(res.params[k]) for k in keys])

    def extracted(p):
        d, i = {}, 0
        for k in keys:
            n = np.size(res.params[k])
            d[k] = jnp.asarray(p[i:i + n].reshape(np.shape(res.params[k])))
            i += n
        ps = apply_psf_params(res.psf_init, d, res.fibers, gh_terms=res.gh_terms).with_traces()
        return np.asarray(jaxspec.extract(image, ivar, ps, wave, specmin=0, nspec=3, xyrange=box,
                                          options=jaxspec.ExtractOptions(bundlesize=3, nsubbundles=1,
                                                                         nwavestep=len(wave))).flux)

    eps = 1e-2
    fd = (extracted(p0 + eps * v) - extracted(p0 - eps * v)) / (2 * eps)
    jv = jac @ v
    np.testing.assert_allclose(jv, fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max())
    var = propagate_psf_uncertainty(jac, res.psf_cov)
    assert var.shape == (3, len(wave))
    np.testing.assert_allclose(var[1, 5], jac[1, 5] @ res.psf_cov @ jac[1, 5], rtol=1e-12)
    assert np.all(var > 0)
    with pytest.raises(ValueError, match="does not match"):
        propagate_psf_uncertainty(jac, np.eye(npsf + 1))


def test_fit_psf_rejects_bad_input(psf_true, small):
    with pytest.raises(ValueError, match="at least one arc or flat"):
        fit_psf(psf_true, [], [], fibers=[0, 1])
    with pytest.raises(ValueError, match="line list"):
        fit_psf(psf_true, [small["arc"]], [], fibers=[0, 1])
    with pytest.raises(ValueError, match="unknown 'what'"):
        fit_psf(psf_true, [], [small["flat"]], fibers=[0, 1], what=("xtrace", "wings"))
    with pytest.raises(ValueError, match="consecutive"):
        fit_psf(psf_true, [], [small["flat"]], fibers=[0, 2])
    with pytest.raises(ValueError, match="fibers"):
        fit_psf(psf_true, [], [small["flat"]], fibers=[498, 499, 500])
    # a bad range and bad broken-fiber lists: refused before any fitting (issue 18)
    with pytest.raises(ValueError, match="waverange .* inside the PSF's"):
        fit_psf(psf_true, [], [small["flat"]], fibers=[0, 1, 2], waverange=(5000.0, 5100.0))
    with pytest.raises(ValueError, match="waverange"):
        fit_psf(psf_true, [], [small["flat"]], fibers=[0, 1, 2], waverange=(6400.0, 6390.0))
    for broken, match in (([3], r"fiber\(s\) 3 outside the fitted fibers 0..2"), ([1.0], "not a fiber number"),
                          ([1, 1], "more than once"), ([0, 1, 2], "every fitted fiber")):
        with pytest.raises(ValueError, match=match):
            fit_psf(psf_true, [], [small["flat"]], fibers=[0, 1, 2], broken_fibers=broken)
