"""The full PSF model of one bundle (jaxspec._fit.bundle, the `pc` parametrisation of issue 18).

* the structured J^T J, J^T r of the full model (trace coefficients with k > 0
  and shape coefficients spread over the bundle's fiber Legendre series) equal
  dense ``jax.jacfwd``; their assembly by einsums equals the scatter-add it replaced; the
  Gauss-Hermite columns in closed form (no tail terms) equal the forward-mode ones;
* the gather placement of stamps into fiber bands equals a plain scatter;
* the bundle's pixels that only the next bundle's fibers light get no weight;
* from another night's PSF (psf-r0-00051060) to an arc + flat simulated from
  psf-r0-00067784: a few fibers over 6300-6500 A (CPU budget), every GHSIGX,
  GHSIGY, GH-i-j coefficient and the traces fitted at once.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec._fit.patch import _normal_equations, calib_patch, without_idle_tails
from jaxspec._simulation.calib import arc_lines, simulate_arc, simulate_flat


def _box(psf, nf, wr, pad_wave):
    box = list(psf.xyrange((0, nf), (wr[0] - pad_wave, wr[1] + pad_wave)))
    box[0] = max(box[0] - 10, 0)
    box[1] += 10
    return tuple(box)


@pytest.mark.slow
def test_full_model_normal_equations_match_dense_autodiff(psf_path):
    psf = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    nf, wr = 3, (6375.0, 6410.0)
    lines = arc_lines("r")
    box = _box(psf, nf, wr, 20.0)
    arc = simulate_arc(psf, lines, specmin=0, nspec=nf, xyrange=box, seed=5)
    flat = simulate_flat(psf, specmin=0, nspec=nf, xyrange=box, seed=6)
    patch, _ = calib_patch(psf, [arc], [flat], lines=lines, fibers=np.arange(nf), waverange=wr,
                           what=("xtrace", "ytrace", "shape"), trace_deg=2,
                           shape_terms=("GHSIGX", "GHSIGY", "GH-1-1", "GH-2-0"), legdeg_fiber=1, legdeg_wave=1)
    assert patch.layout.shapes["pc"] == (4, 2, 2)
    rng = np.random.default_rng(0)
    theta = jnp.asarray(rng.normal(0, 1e-3, patch.layout.size))
    lin = np.where(patch.layout.mask(("line_flux", "flat_amp")))[0]
    theta = theta.at[lin].set(1000.0)
    chi2, jtj, jtr = (np.asarray(a) for a in _normal_equations(patch, theta))

    def resid(t):
        return patch.residuals(patch.unflatten(t)).reshape(-1)

    r = np.asarray(resid(theta))
    J = -np.asarray(jax.jacfwd(resid)(theta))
    np.testing.assert_allclose(chi2, r @ r, rtol=1e-12)
    scale = np.sqrt(np.outer(np.diag(J.T @ J), np.diag(J.T @ J))) + 1e-300
    np.testing.assert_allclose(jtj / scale, (J.T @ J) / scale, atol=1e-10)
    np.testing.assert_allclose(jtr, J.T @ r, rtol=1e-8, atol=1e-8 * np.abs(J.T @ r).max())


def _scatter_assembly(patch, jtr_f, blocks):
    """Reference: the scatter-add assembly the module used up to 2026-12-02 (every fiber-pair
    block added into the dense J^T J at its theta indices, with its fiber-Legendre weights)."""
    s = patch.static
    idx, wts = patch._index_map()
    n = patch.layout.size
    jtr = np.zeros(n)
    np.add.at(jtr, idx, jtr_f[:, :, None] * wts)
    jtj = np.zeros((n, n))
    for d in range(s.dmax + 1):
        for f in range(s.nf - d):
            gw = (blocks[d, f][:, None, :, None] * wts[f][:, :, None, None] * wts[f + d][None, None, :, :])
            ii, jj = idx[f][:, :, None, None], idx[f + d][None, None, :, :]
            np.add.at(jtj, (np.broadcast_to(ii, gw.shape), np.broadcast_to(jj, gw.shape)), gw)
            if d > 0:
                np.add.at(jtj, (np.broadcast_to(jj, gw.shape), np.broadcast_to(ii, gw.shape)), gw)
    return jtj, jtr


@pytest.mark.parametrize("what,kw", [
    (("xtrace", "ytrace", "shape"), dict(trace_deg=2, shape_terms=("GHSIGX", "GHSIGY", "GH-1-1"), legdeg_wave=1)),
    (("xtrace", "ytrace", "sigma", "gh"), dict(trace_deg=1)),  # GH terms shared by the fibers
    (("xtrace", "ytrace", "sigma", "gh"), dict(trace_deg=1, per_fiber_gh=True)),
])
def test_einsum_assembly_equals_the_scatter(psf_path, what, kw):
    """CalibPatch._assemble (einsums over the fiber Legendre weights, one-hot placement of the
    fiber-pair blocks, a static gather) equals the scatter-add it replaced, to 1e-12, on random
    blocks (symmetric for d = 0, as J_f^T J_f is) of a 5-fiber patch with bands overlapping
    up to dmax."""
    psf = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    nf, wr = 5, (6380.0, 6400.0)
    lines = arc_lines("r")
    box = _box(psf, nf, wr, 15.0)
    arc = simulate_arc(psf, lines, specmin=0, nspec=nf, xyrange=box, seed=1)
    flat = simulate_flat(psf, specmin=0, nspec=nf, xyrange=box, seed=2)
    patch, _ = calib_patch(psf, [arc], [flat], lines=lines, fibers=np.arange(nf), waverange=wr, what=what, **kw)
    s = patch.static
    assert s.dmax >= 2
    na = patch._index_map()[0].shape[1]
    rng = np.random.default_rng(7)
    blocks = rng.normal(size=(s.dmax + 1, nf, na, na))
    blocks[0] += np.swapaxes(blocks[0], 1, 2)
    jtr_f = rng.normal(size=(nf, na))
    want_a, want_b = _scatter_assembly(patch, jtr_f, blocks)
    assemble = eqx.filter_jit(lambda p, a, b: p._assemble(a, b))
    got_a, got_b = (np.asarray(v) for v in assemble(patch, jnp.asarray(jtr_f), jnp.asarray(blocks)))
    assert np.abs(want_a).max() > 1
    np.testing.assert_allclose(got_a, want_a, rtol=0, atol=1e-12 * np.abs(want_a).max())
    np.testing.assert_allclose(got_b, want_b, rtol=0, atol=1e-12 * np.abs(want_b).max())


@pytest.mark.slow
def test_gh_derivatives_in_closed_form_equal_forward_mode(psf_path):
    """Without tail terms (without_idle_tails: TAILAMP is 0 in the file) the band Jacobian's
    Gauss-Hermite columns are computed in closed form; they equal the forward-mode ones of the
    PSF with its tails to 1e-13 (full model and per-fiber GH offsets, a broken fiber), and the
    bands are the same."""
    psf = jaxspec.read_psf(psf_path("psf-r0-00051060.fits"))
    nf, wr = 4, (6380.0, 6400.0)
    lines = arc_lines("r")
    box = _box(psf, nf, wr, 15.0)
    arc = simulate_arc(psf, lines, specmin=0, nspec=nf, xyrange=box, seed=1)
    flat = simulate_flat(psf, specmin=0, nspec=nf, xyrange=box, seed=2)
    jac = eqx.filter_jit(lambda q, t: q.band_jacobian(q.unflatten(t)))
    for what, kw in [(("xtrace", "ytrace", "shape"), dict(trace_deg=1, legdeg_wave=1,
                                                         shape_terms=("GHSIGX", "GHSIGY", "GH-1-1", "GH-0-3"))),
                     (("xtrace", "sigma", "gh"), dict(per_fiber_gh=True))]:
        patch, _ = calib_patch(psf, [arc], [flat], lines=lines, fibers=np.arange(nf), waverange=wr, what=what,
                               broken_fibers=[2], **kw)
        bare = dataclasses.replace(patch, psf=without_idle_tails(patch.psf))
        assert patch.psf.has_tails and not bare.psf.has_tails
        rng = np.random.default_rng(3)
        theta = jnp.asarray(rng.normal(0, 1e-3, patch.layout.size))
        theta = theta.at[np.where(patch.layout.mask(("line_flux", "flat_amp")))[0]].set(1000.0)
        b0, j0 = (np.asarray(v) for v in jac(patch, theta))
        b1, j1 = (np.asarray(v) for v in jac(bare, theta))
        np.testing.assert_array_equal(b1, b0)
        np.testing.assert_allclose(j1, j0, rtol=0, atol=1e-13 * np.abs(j0).max())


def test_apply_psf_params_full_model_is_a_fiber_legendre_series(psf_path):
    """pc offsets are linear in fiber for legdeg_fiber = 1: fiber f gets c0 + c1 t_f."""
    psf = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    terms = ("GHSIGX", "GH-2-2")
    pc = np.zeros((2, 2, 2))
    pc[0, 0, 0], pc[0, 1, 0], pc[1, 0, 1] = 0.1, 0.05, 0.01
    out = jaxspec.apply_psf_params(psf, {"pc": jnp.asarray(pc)}, np.arange(5), shape_terms=terms)
    t = np.linspace(-1, 1, 5)
    r = psf.param_index("GHSIGX")
    np.testing.assert_allclose(np.asarray(out.params[r, :5, 0] - psf.params[r, :5, 0]), 0.1 + 0.05 * t, atol=1e-15)
    r2 = psf.param_index("GH-2-2")
    np.testing.assert_allclose(np.asarray(out.params[r2, :5, 1] - psf.params[r2, :5, 1]), 0.01, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(out.params[:, 5:]), np.asarray(psf.params[:, 5:]))


@pytest.mark.slow
def test_full_fit_from_another_night(psf_path, tmp_path):
    """Start psf-r0-00051060, truth psf-r0-00067784: 5 fibers, 6300-6500 A, arc + flat.

    One bundle of the full model on the CPU: 208 s on the loaded 2-core machine since the
    closed-form GH derivatives and chi2_atol (e95a947; 553-714 s before, then marked long).
    Measured (CPU, 2026-12-02, the joint stopping rule, before chi2_atol): chi2/dof 3.16 -> 1.0069
    in 15 iterations (not converged: the next step is still 2.6 sigma), x trace
    RMS 0.060 -> 0.0068 px, y trace RMS 0.134 -> 0.034 px (5 arc lines in range),
    worst spot difference 0.0098 -> 0.0040.  The issue's acceptance (0.01 px,
    1e-3) is NOT met here.

    With the alignment (default since issue 18 item 3: the start's mean trace offset measured on
    the images and removed first; measured dx +0.067, dy +0.135 px): chi2/dof 1.050 at the aligned
    start -> 1.0070, converged in 10 iterations (81 s); x trace RMS 0.060 (the file) -> 0.0085 (aligned)
    -> 0.0040 px, y 0.134 -> 0.0056 -> 0.027 px (within its noise: 0.033 px, see docs/fitting.md),
    worst spot difference 0.0098 -> 0.0014 -> 0.0036.
    """
    truth = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    start = jaxspec.read_psf(psf_path("psf-r0-00051060.fits"))
    nf, wr = 5, (6300.0, 6500.0)
    lines = arc_lines("r")
    box = _box(truth, nf, wr, 30.0)
    arc = simulate_arc(truth, lines, specmin=0, nspec=nf, xyrange=box, seed=1)
    flat = simulate_flat(truth, specmin=0, nspec=nf, xyrange=box, seed=2)
    res = jaxspec.fit_bundle(start, [arc], [flat], lines=lines, fibers=np.arange(nf), waverange=wr,
                             trace_deg=2, legdeg_wave=1, maxiter=15)
    assert abs(res.offset.dy) > 0.1  # the nights' y offset, removed before the fit
    assert res.chi2_history[0] > 1.02 * res.chi2  # 3.16 / 1.007 without the alignment
    assert np.all(np.diff(res.chi2_history) <= 0)
    assert abs(res.reduced_chi2 - 1) < 0.01
    rng = np.random.default_rng(0)
    f = rng.integers(0, nf, 100)
    w = rng.uniform(wr[0] + 10, wr[1] - 10, 100)
    out = {}
    for name, p in (("start", start), ("fit", res.psf)):
        dx = np.asarray(p.x(f, w) - truth.x(f, w))
        dy = np.asarray(p.y(f, w) - truth.y(f, w))
        xa, ya, a = (np.asarray(v) for v in p.spots(f, w))
        xb, yb, b = (np.asarray(v) for v in truth.spots(f, w))
        same = (xa == xb) & (ya == yb)
        out[name] = (np.sqrt(np.mean(dx**2)), np.sqrt(np.mean(dy**2)), np.abs(a - b)[same].max())
    assert out["fit"][0] < 0.01 and out["start"][0] > 0.05
    assert out["fit"][1] < 0.06 and out["start"][1] > 0.1
    assert out["fit"][2] < 0.006 and out["start"][2] > 0.009
    # the round trip keeps every fitted coefficient
    assert res.psf.param_names == start.param_names
    # the residuals of the fitted PSF over its middle block (what fit-psf --model full --plot draws):
    # at the noise, where the start's are not
    from jaxspec._fit.bundle import bundle_residuals
    from jaxspec._plots import plot_fit_residuals

    r_fit = bundle_residuals(res, [arc], [flat], lines=lines)
    r_start = bundle_residuals(res, [arc], [flat], lines=lines, psf=start)
    assert r_fit.niter == 0 and r_fit.xyrange[2] == res.boxes[len(res.boxes) // 2][2]
    assert abs(r_fit.reduced_chi2 - 1) < 0.05 < r_start.reduced_chi2 - 1
    assert [k for k in r_fit.kinds] == ["arc", "flat"] and r_fit.model[0].shape == r_fit.data[0].shape
    png = plot_fit_residuals(str(tmp_path / "resid.png"), [r_fit])
    assert (tmp_path / "resid.png").stat().st_size > 10_000 and png.endswith("resid.png")


@pytest.mark.slow
def test_full_model_flux_jacobian_and_propagation(psf_path):
    """A small full-model fit (3 fibers, 3 shape terms): d flux / d (dx, dy, pc) against central
    differences of the extraction, and diag(J C J^T) from its covariance."""
    psf = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    nf, wr = 3, (6380.0, 6420.0)
    lines = arc_lines("r")
    box = _box(psf, nf, wr, 20.0)
    arc = simulate_arc(psf, lines, specmin=0, nspec=nf, xyrange=box, seed=5)
    flat = simulate_flat(psf, specmin=0, nspec=nf, xyrange=box, seed=6)
    res = jaxspec.fit_bundle(psf, [arc], [flat], lines=lines, fibers=np.arange(nf), waverange=wr, trace_deg=1,
                             shape_terms=("GHSIGX", "GHSIGY", "GH-1-1"), legdeg_wave=0, maxiter=5,
                             rows_per_block=32, patches_per_call=4)
    assert abs(res.reduced_chi2 - 1) < 0.05
    npsf = res.cov.shape[0]
    assert npsf == 2 * nf * 2 + 3 * 2 * 1
    c = res.psf_cov
    np.testing.assert_allclose(c, c.T)
    assert np.all(np.linalg.eigvalsh(c) > 0)
    wave = np.arange(6385.0, 6412.0, 0.8)
    rng = np.random.default_rng(11)
    flux = 500 + 200 * rng.uniform(size=(nf, len(wave)))
    ebox = _box(psf, nf, (wave[0], wave[-1]), 15.0)
    image, ivar, _ = jaxspec.simulate(res.psf, wave, flux, specmin=0, xyrange=ebox, seed=8)
    ex, jac = jaxspec.flux_jacobian(res, image, ivar, wave, xyrange=ebox, nwavestep=len(wave))
    assert jac.shape == (nf, len(wave), npsf)
    v = rng.normal(size=npsf) * np.sqrt(np.diag(c))
    keys = ("dx", "dy", "pc")
    p0 = np.concatenate([np.ravel(res.params[k]) for k in keys])

    def extracted(p):
        d, i = {}, 0
        for k in keys:
            n = np.size(res.params[k])
            d[k] = jnp.asarray(p[i:i + n].reshape(np.shape(res.params[k])))
            i += n
        ps = jaxspec.apply_psf_params(res.psf_init, d, res.fibers, shape_terms=res.shape_terms).with_traces()
        return np.asarray(jaxspec.extract(image, ivar, ps, wave, specmin=0, nspec=nf, xyrange=ebox,
                                          options=jaxspec.ExtractOptions(bundlesize=nf, nsubbundles=1,
                                                                         nwavestep=len(wave))).flux)

    eps = 1e-3  # the direction is 1 sigma of poorly constrained coefficients: stay in the linear regime
    fd = (extracted(p0 + eps * v) - extracted(p0 - eps * v)) / (2 * eps)
    np.testing.assert_allclose(jac @ v, fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max())
    var = jaxspec.propagate_psf_uncertainty(jac, c)
    assert var.shape == (nf, len(wave)) and np.all(var > 0)


def test_band_placement_by_gathers_equals_a_scatter(psf_path):
    """CalibPatch._scatter_sum (gathers, nq slots per band row) against a plain loop adding every
    weighted stamp into its fiber's band; more stamps on one row than slots gives NaN."""
    psf = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    nf, wr = 3, (6380.0, 6400.0)
    lines = arc_lines("r")
    box = _box(psf, nf, wr, 15.0)
    flat = simulate_flat(psf, specmin=0, nspec=nf, xyrange=box, seed=3)
    patch, _ = calib_patch(psf, [], [flat], fibers=np.arange(nf), waverange=wr, what=("xtrace",))
    s = patch.static
    xmin, ymin, _ = psf.spots(patch.fibers[:, None], patch.fwave[None, :])
    xmin, ymin = np.asarray(xmin), np.asarray(ymin)
    rng = np.random.default_rng(4)
    st = rng.uniform(size=(nf, s.nsamp) + psf.stamp_shape)
    wts = rng.uniform(size=(2, nf, s.nsamp))
    args = (jnp.asarray(xmin), jnp.asarray(ymin), jnp.asarray(st), jnp.asarray(wts))
    got = np.asarray(patch._scatter_sum("flat", *args))
    valid = np.asarray(patch._valid("flat"))
    want = np.zeros((2, nf, s.H, s.Wb))
    x0 = s.pad - int(patch.x0) - np.asarray(patch.xlo)
    for e in range(2):
        for f in range(nf):
            for k in np.where(valid)[0]:
                for j in range(st.shape[2]):
                    h = ymin[f, k] - int(patch.y0) + j
                    c = xmin[f, k] + x0[f] + np.arange(st.shape[3])
                    ok = (c >= 0) & (c < s.Wb)
                    if 0 <= h < s.H:
                        want[e, f, h, c[ok]] += wts[e, f, k] * st[f, k, j, ok]
    assert np.abs(want).max() > 1
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    few = dataclasses.replace(s, nq=4)  # fewer slots than stamps on a row
    bad = dataclasses.replace(patch, static=few)
    out = bad._scatter_sum("flat", *args)
    assert np.all(np.isnan(np.asarray(out)))


@pytest.mark.slow
def test_neighbour_mask_removes_the_next_bundles_light(psf_path):
    """Fibers 0-24 near the top of the CCD (rows 3923-4051), fibers 0-27 lit: the next bundle's
    first fiber reaches the bundle's box there.  With the true PSF and the fluxes at their
    optimum, chi2 per pixel is 18 without the mask (measured) and 1 within 0.01 with it."""
    from jaxspec._fit.patch import _chi2, neighbour_mask

    psf = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    lines = arc_lines("r")
    block = (103, 305, 3923, 4051)
    sim = (60, 350, 3890, 4090)
    arc = simulate_arc(psf, lines, specmin=0, nspec=28, xyrange=sim, seed=1)
    flat = simulate_flat(psf, specmin=0, nspec=28, xyrange=sim, seed=2)
    keep = neighbour_mask(psf, 0, 25, block)
    x25 = float(psf.x(25, float(psf.wavelength(25, 3990.0))))
    assert keep[:, int(np.ceil(x25)) - 5 - block[0]:].max() == 0 and keep[:, :150].min() == 1
    out = {}
    for mask in (False, True):
        patch, _ = calib_patch(psf, [arc], [flat], lines=lines, fibers=np.arange(25), xyrange=block,
                               what=("xtrace",), allow_no_lines=True, mask_neighbours=mask)
        theta = jnp.zeros(patch.layout.size)
        for _ in range(2):  # the fluxes (linear) at their optimum; the trace offsets stay 0
            _, a, b = (np.asarray(v) for v in _normal_equations(patch, theta))
            lin = patch.layout.mask(("line_flux", "flat_amp")) & (np.diag(a) > 0)
            step = np.zeros(len(b))
            step[lin] = np.linalg.solve(a[np.ix_(lin, lin)], b[lin])
            theta = theta + step
        out[mask] = float(_chi2(patch, theta)) / np.count_nonzero(np.asarray(patch.sqw))
    assert out[False] > 5
    assert abs(out[True] - 1) < 0.01


def _with_tailamp(psf, amp):
    """``psf`` with TAILAMP = ``amp`` (a constant) for every fiber."""
    r = psf.param_index("TAILAMP")
    return eqx.tree_at(lambda p: p.params, psf, psf.params.at[r].set(0.0).at[r, :, 0].set(amp))


def test_tail_and_continuum_options_checked(psf_path):
    """fit_tails needs TAIL* parameters, fit_continuum an arc and a degree >= 0: ValueErrors before any set-up;
    a patch's cont_deg is checked too."""
    psf = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    bare = without_idle_tails(psf)
    with pytest.raises(ValueError, match="fit_tails"):
        jaxspec.fit_bundle(bare, [], [object()], fibers=np.arange(3), fit_tails=True)
    with pytest.raises(ValueError, match="fit_continuum.*arc"):
        jaxspec.fit_bundle(psf, [], [object()], fibers=np.arange(3), fit_continuum=True)
    with pytest.raises(ValueError, match="cont_deg"):
        jaxspec.fit_psf_full(psf, [object()], [], lines=arc_lines("r"), nspec=3, fit_continuum=True, cont_deg=-1)
    box = _box(psf, 2, (6380.0, 6400.0), 10.0)
    arc = simulate_arc(psf, arc_lines("r"), specmin=0, nspec=2, xyrange=box, seed=1)
    with pytest.raises(ValueError, match="cont_deg"):
        calib_patch(psf, [arc], lines=arc_lines("r"), fibers=np.arange(2), xyrange=box, what=("xtrace",),
                    cont_deg=-1)


@pytest.mark.slow
def test_tails_and_continuum_normal_equations_match_dense_autodiff(psf_path):
    """TAILAMP among the shape terms (tails on: the forward-mode path, no closed form) and an arc
    continuum (cont_amp): J^T J, J^T r equal dense jax.jacfwd to 1e-10 (measured 2.4e-15, 1.1e-15);
    a step making TAILAMP negative at a modelled spot gives a non-finite chi2 (refused)."""
    from jaxspec._fit.patch import _chi2

    psf = _with_tailamp(jaxspec.read_psf(psf_path("psf-r0-00067784.fits")), 0.005)
    nf, wr = 3, (6375.0, 6410.0)
    lines = arc_lines("r")
    box = _box(psf, nf, wr, 20.0)
    arc = simulate_arc(psf, lines, specmin=0, nspec=nf, xyrange=box, seed=5, continuum=20.0)
    flat = simulate_flat(psf, specmin=0, nspec=nf, xyrange=box, seed=6)
    patch, _ = calib_patch(psf, [arc], [flat], lines=lines, fibers=np.arange(nf), waverange=wr,
                           what=("xtrace", "ytrace", "shape"), trace_deg=1,
                           shape_terms=("GHSIGX", "GHSIGY", "GH-1-1", "TAILAMP"), legdeg_fiber=1, legdeg_wave=1,
                           cont_deg=1)
    assert patch.psf.has_tails and patch.layout.shapes["cont_amp"] == (1, nf, 2)
    rng = np.random.default_rng(0)
    theta = jnp.asarray(rng.normal(0, 1e-3, patch.layout.size))
    theta = theta.at[np.where(patch.layout.mask(("line_flux", "flat_amp", "cont_amp")))[0]].set(1000.0)
    chi2, jtj, jtr = (np.asarray(a) for a in _normal_equations(patch, theta))

    def resid(t):
        return patch.residuals(patch.unflatten(t)).reshape(-1)

    r = np.asarray(resid(theta))
    J = -np.asarray(jax.jacfwd(resid)(theta))
    np.testing.assert_allclose(chi2, r @ r, rtol=1e-12)
    d = np.diag(J.T @ J)
    assert d[patch.layout.slices["cont_amp"]].min() > 0 and d[patch.layout.slices["pc"]][-4:].min() > 0
    scale = np.sqrt(np.outer(d, d)) + 1e-300
    np.testing.assert_allclose(jtj / scale, (J.T @ J) / scale, atol=1e-10)
    np.testing.assert_allclose(jtr, J.T @ r, rtol=1e-8, atol=1e-8 * np.abs(J.T @ r).max())
    # TAILAMP's constant coefficient (row 3 of pc, fiber and wavelength term 0) down by 0.006: negative
    i0 = patch.layout.slices["pc"].start + 3 * 2 * 2
    assert np.isfinite(float(_chi2(patch, theta)))
    assert not np.isfinite(float(_chi2(patch, theta.at[i0].add(-0.006))))


@pytest.mark.slow
def test_full_fit_recovers_the_tail_amplitude(psf_path):
    """Truth psf-r0-00067784 with TAILAMP 0.005; start TAILAMP 0.002, GHSIGX 3% wide, x traces
    0.05 px off: 3 fibers, 6370-6420 A, arc + flat, GHSIGX/GHSIGY/TAILAMP constant offsets.

    Measured (CPU, 2 cores): with fit_tails TAILAMP 0.00496 +- 0.000036 (-1.1 sigma), chi2/dof
    1.016, 22 s; without it chi2/dof 1.90 and GHSIGX biased (its offset -0.0122 for -0.0314, 48 sigma).
    """
    base = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    truth = _with_tailamp(base, 0.005)
    nf, wr = 3, (6370.0, 6420.0)
    lines = arc_lines("r")
    box = _box(truth, nf, wr, 30.0)
    arc = simulate_arc(truth, lines, specmin=0, nspec=nf, xyrange=box, seed=1)
    flat = simulate_flat(truth, specmin=0, nspec=nf, xyrange=box, seed=2)
    fib = np.arange(nf)
    start = jaxspec.apply_psf_params(_with_tailamp(base, 0.002), {"dx": jnp.full((nf, 1), 0.05),
                                                                  "log_sigx": jnp.full(nf, 0.03)}, fib).with_traces()
    kw = dict(lines=lines, fibers=fib, waverange=wr, trace_deg=1, shape_terms=("GHSIGX", "GHSIGY"), legdeg_fiber=0,
              legdeg_wave=0, project_start=False, maxiter=15)
    res = jaxspec.fit_bundle(start, [arc], [flat], fit_tails=True, **kw)
    assert res.shape_terms == ("GHSIGX", "GHSIGY", "TAILAMP")
    got = np.asarray(res.psf.param("TAILAMP", fib[:, None], np.linspace(*wr, 5)[None, :]))
    sig = float(res.errors["pc"][2, 0, 0])
    assert sig < 2e-4
    assert np.abs(got - 0.005).max() < 3 * sig
    assert abs(res.reduced_chi2 - 1) < 0.03
    # the spots: GHSIGX back to the truth's
    sx = np.asarray(res.psf.xsigma(fib[:, None], np.linspace(*wr, 5)[None, :]) /
                    truth.xsigma(fib[:, None], np.linspace(*wr, 5)[None, :]))
    assert np.abs(sx - 1).max() < 2e-3
    off = jaxspec.fit_bundle(start, [arc], [flat], **kw)
    assert off.reduced_chi2 > 1.5
    assert abs(off.params["pc"][0, 0, 0] - res.params["pc"][0, 0, 0]) > 10 * off.errors["pc"][0, 0, 0]


@pytest.mark.slow
def test_full_fit_with_the_arc_continuum(psf_path):
    """An arc with a continuum of 100 photons / A per fiber under its lines; start GHSIGX 3% wide, x
    traces 0.05 px off (GHSIGY true): 3 fibers, 6370-6420 A, arc + flat.

    Measured (CPU, 2 cores): without fit_continuum chi2/dof 2.32 and GHSIGY biased by +0.0209
    (9.2 sigma); with it chi2/dof 1.017 (1.011 for the same fit of an arc without continuum),
    GHSIGY -0.0013 (0.5 sigma), the CONT row within 4% of the truth's electrons per row; 15-19 s a fit.
    """
    truth = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    nf, wr = 3, (6370.0, 6420.0)
    lines = arc_lines("r")
    box = _box(truth, nf, wr, 30.0)
    arc = simulate_arc(truth, lines, specmin=0, nspec=nf, xyrange=box, seed=1, continuum=100.0)
    flat = simulate_flat(truth, specmin=0, nspec=nf, xyrange=box, seed=2)
    fib = np.arange(nf)
    start = jaxspec.apply_psf_params(truth, {"dx": jnp.full((nf, 1), 0.05), "log_sigx": jnp.full(nf, 0.03)},
                                     fib).with_traces()
    kw = dict(lines=lines, fibers=fib, waverange=wr, trace_deg=1, shape_terms=("GHSIGX", "GHSIGY"), legdeg_fiber=0,
              legdeg_wave=0, project_start=False, maxiter=15)
    out = {fc: jaxspec.fit_bundle(start, [arc], [flat], fit_continuum=fc, cont_deg=1, **kw) for fc in (False, True)}
    off, on = out[False], out[True]
    assert off.reduced_chi2 > 1.5 and off.cont_coef is None
    assert abs(off.params["pc"][1, 0, 0]) > 5 * off.errors["pc"][1, 0, 0]
    assert abs(on.reduced_chi2 - 1) < 0.03
    assert abs(on.params["pc"][1, 0, 0]) < 3 * on.errors["pc"][1, 0, 0]
    w = np.linspace(wr[0] + 5, wr[1] - 5, 7)
    dx = np.asarray(on.psf.x(fib[:, None], w[None, :]) - truth.x(fib[:, None], w[None, :]))
    assert np.abs(dx).max() < 0.005
    # CONT: electrons per CCD row, 100 * throughput * dlambda / dy along each trace
    want = 100.0 * (arc.flux[:, :1] / 100.0) * np.array([truth.angstroms_per_pixel(int(f), w) for f in fib])
    got = np.asarray(on.psf.param("CONT", fib[:, None], w[None, :]))
    np.testing.assert_allclose(got, want, rtol=0.06)
    np.testing.assert_array_equal(on.cont_coef, np.asarray(on.psf.params[on.psf.param_index("CONT"), :nf]))
