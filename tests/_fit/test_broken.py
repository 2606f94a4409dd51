"""Broken fibers (specex's ``--broken-fibers``) and bad inputs of the PSF fits (issue 18, item 4).

A small simulated calibration from the real r0 PSF: fibers 0-9 over 6380-6415 A, an arc
and a flat in which fiber 2 is dead (zero throughput) and fibers 5-9 are dark, and the
same exposures with fiber 2 lit.  Fitted from a perturbed start, fibers 0-4 as a bundle:

* with ``broken_fibers=[2]`` the other fibers fit as well as when fiber 2 is lit (their
  corrections within 3 sigma of the truth, their uncertainties within the tolerances
  stated in each test), and fiber 2's coefficients are the start's, bit for bit (with the
  bundle fits' alignment, its traces shifted with its bundle's: ``apply_trace_offsets``);
* without it, the dead fiber is refused before any fitting, naming ``--broken-fibers``;
* in a CCD fit, a bundle without lamp light is flagged and the others go on, a bundle all
  of whose fibers are broken is flagged ``STATUS_BROKEN``, and the written PSF says which
  fibers were broken.
"""

import time

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec._fit import (
    STATUS_BROKEN,
    STATUS_FAILED,
    BundleInputError,
    calib_patch,
    check_broken_fibers,
    fit_bundle,
    fit_psf,
    fit_psf_ccd,
    fit_psf_full,
    propagate_psf_uncertainty,
)
from jaxspec._fit.align import apply_trace_offsets
from jaxspec._fit.patch import _normal_equations
from jaxspec._simulation.calib import arc_lines, simulate_arc, simulate_flat

PSF_NAME = "psf-r0-00067784.fits"
WR = (6380.0, 6415.0)
DEAD = 2
GOOD = np.array([0, 1, 3, 4])
FULL_KW = dict(trace_deg=1, shape_terms=("GHSIGX", "GHSIGY", "GH-1-1"), legdeg_wave=0, maxiter=8,
               rows_per_block=32, patches_per_call=4)


@pytest.fixture(scope="module")
def sim(psf_path):
    truth = jaxspec.read_psf(psf_path(PSF_NAME))
    nf = 5
    fibers = np.arange(nf)
    rng = np.random.default_rng(7)
    shift = rng.choice([-1, 1], (nf, 1)) * rng.uniform(0.2, 0.4, (nf, 1))
    pert = dict(dx=shift, dy=-shift, log_sigx=rng.normal(0, 0.05, nf), log_sigy=rng.normal(0, 0.05, nf))
    init = jaxspec.apply_psf_params(truth, {k: jnp.asarray(v) for k, v in pert.items()}, fibers)
    # the full model's fiber series is smooth over the bundle: a start off in the traces only
    init_full = jaxspec.apply_psf_params(truth, {"dx": jnp.asarray(0.5 * shift), "dy": jnp.asarray(-0.5 * shift)},
                                         fibers)
    lines = arc_lines("r")
    box = list(truth.xyrange((0, 10), (WR[0] - 20, WR[1] + 20)))
    box = (max(box[0] - 10, 0), box[1] + 10, box[2], box[3])
    tp = np.array([1.0, 0.95, 0.0, 1.05, 1.0, 0, 0, 0, 0, 0])  # fiber 2 dead, fibers 5-9 dark
    lit = np.where(np.arange(10) == DEAD, 1.0, tp)
    out = dict(truth=truth, init=init, init_full=init_full, lines=lines,
               truth_corr={k: -np.asarray(v) for k, v in pert.items()})
    for name, t in (("dead", tp), ("lit", lit)):
        arc = simulate_arc(truth, lines, specmin=0, nspec=10, xyrange=box, seed=5, throughput=t)
        flat = simulate_flat(truth, specmin=0, nspec=10, xyrange=box, seed=6, throughput=t)
        out[name] = ([arc], [flat])
    return out


def _same_rows(a, b, fibers, skip_rows=()):
    """Traces and every parameter row but ``skip_rows`` of ``fibers`` identical, bit for bit."""
    keep = [i for i in range(len(a.param_names)) if a.param_names[i] not in skip_rows]
    for name in ("xcoef", "ycoef"):
        x, y = np.asarray(getattr(a, name))[fibers], np.asarray(getattr(b, name))[fibers]
        assert x.tobytes() == y.tobytes(), name
    x, y = np.asarray(a.params)[keep][:, fibers], np.asarray(b.params)[keep][:, fibers]
    assert x.tobytes() == y.tobytes(), "params"


# --------------------------------------------------------------------------- checks
def test_check_broken_fibers_refuses_bad_lists():
    """Non-integers, duplicates, fibers outside the fitted range, every fiber broken: each a
    clear message naming --broken-fibers."""
    cases = [([2.5], "2.5 is not a fiber number"), (["3"], "'3' is not a fiber number"),
             ([True], "True is not a fiber number"), (np.array([1.0, 2.0]), "is not a fiber number"),
             ("3,4", "expected a list"), ([3, 1, 3], "fiber\\(s\\) 3 given more than once"),
             ([7], "fiber\\(s\\) 7 outside the fitted fibers 0..4"), ([-1, 2], "-1 outside"),
             ([0, 1, 2, 3, 4], "every fitted fiber \\(0..4\\) is broken")]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            check_broken_fibers(bad, 0, 5)
        assert "--broken-fibers" in str(err.value)
    np.testing.assert_array_equal(check_broken_fibers(np.array([4, 1]), 0, 5), [1, 4])
    np.testing.assert_array_equal(check_broken_fibers(jnp.asarray([3]), 0, 5), [3])
    np.testing.assert_array_equal(check_broken_fibers([np.int32(27)], 25, 25), [27])
    assert check_broken_fibers(None, 0, 5).size == 0 and check_broken_fibers([], 0, 5).size == 0


def test_apply_psf_params_leaves_broken_fibers_bit_for_bit(psf_path):
    """``live=False`` rows keep the input exactly (also a -0.0 coefficient), the others get the offsets."""
    psf = jaxspec.read_psf(psf_path(PSF_NAME))
    psf = eqx.tree_at(lambda p: p.xcoef, psf, psf.xcoef.at[1, -1].set(-0.0))
    live = np.array([True, False, True])
    pc = jnp.asarray(np.array([0.01, 0.002])[None, :, None] * np.ones((2, 1, 1)))  # c0 + c1 t, t = -1, 0, 1
    out = jaxspec.apply_psf_params(psf, {"dx": jnp.full((3, 2), 0.3), "pc": pc}, np.arange(3),
                                   shape_terms=("GHSIGX", "GH-1-1"), live=live)
    _same_rows(out, psf, [1])
    assert np.signbit(np.asarray(out.xcoef)[1, -1])
    np.testing.assert_allclose(np.asarray(out.xcoef[[0, 2], :2] - psf.xcoef[[0, 2], :2]), 0.3, atol=1e-12)
    r = psf.param_index("GHSIGX")
    assert np.all(np.asarray(out.params[r, [0, 2], 0] != psf.params[r, [0, 2], 0]))


def test_propagation_leaves_out_fixed_parameters():
    """Parameters held fixed (infinite or NaN variance: a broken fiber's) add nothing to the flux variance."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    c = a @ a.T + np.eye(3)
    jac = rng.normal(size=(4, 5, 4))
    cov = np.zeros((4, 4))
    cov[np.ix_([0, 1, 3], [0, 1, 3])] = c
    cov[2, 2] = np.inf
    want = np.einsum("...i,ij,...j->...", jac[..., [0, 1, 3]], c, jac[..., [0, 1, 3]])
    np.testing.assert_allclose(propagate_psf_uncertainty(jac, cov), want, rtol=1e-12)
    cov[2, :] = cov[:, 2] = np.nan
    np.testing.assert_allclose(propagate_psf_uncertainty(jac, cov), want, rtol=1e-12)


def test_dead_fiber_without_broken_fibers_is_refused_before_fitting(sim):
    """Fiber 2 has no light and is not declared: every fit refuses it at once, naming it and
    --broken-fibers (a message, not a silently wrong PSF)."""
    arcs, flats = sim["dead"]
    kw = dict(lines=sim["lines"], waverange=WR)
    t0 = time.perf_counter()
    for call in (lambda: fit_psf(sim["init"], arcs, flats, fibers=np.arange(5), **kw),
                 lambda: fit_bundle(sim["init_full"], arcs, flats, fibers=np.arange(5), **kw, **FULL_KW),
                 lambda: fit_psf_ccd(sim["init"], arcs, flats, specmin=0, nspec=5, bundlesize=5, nblocks=1, **kw),
                 lambda: fit_psf_full(sim["init_full"], arcs, flats, specmin=0, nspec=5, bundlesize=5, **kw,
                                      **FULL_KW)):
        with pytest.raises(ValueError, match=r"fiber\(s\) 2 \(0%\) show no light in arc 0.*--broken-fibers"):
            call()
    # flats alone say so too
    with pytest.raises(BundleInputError, match=r"fiber\(s\) 2 \(0%\) show no light in flat 0"):
        fit_psf(sim["init"], [], flats, fibers=np.arange(5), **kw)
    assert time.perf_counter() - t0 < 20.0  # no fitting happened
    # a fiber listed as broken in a patch must be one of its fibers
    with pytest.raises(ValueError, match="outside the fitted fibers 0..4"):
        fit_psf(sim["init"], arcs, flats, fibers=np.arange(5), broken_fibers=[5], **kw)


# --------------------------------------------------------------------------- fits
@pytest.mark.slow
def test_broken_fiber_blocks_model(sim):
    """fit_psf with broken_fibers=[2] on the dead-fiber exposures against fit_psf on the lit ones.

    Tolerances: every correction of fibers 0, 1, 3, 4 within 3 sigma of the truth (as with
    fiber 2 lit; measured largest |pull| 1.28), their uncertainties within 5% of the lit fit's
    (measured 0.994-1.023 times);
    fiber 2 not fitted (corrections 0, errors inf, fluxes 0) and its coefficients the start's.
    """
    kw = dict(lines=sim["lines"], fibers=np.arange(5), waverange=WR, what=("xtrace", "ytrace", "sigma"))
    res = fit_psf(sim["init"], *sim["dead"], broken_fibers=[DEAD], **kw)
    ref = fit_psf(sim["init"], *sim["lit"], **kw)
    assert res.converged and ref.converged
    assert abs(res.reduced_chi2 - 1) < 0.03
    for k in ("dx", "dy", "log_sigx", "log_sigy"):
        truth = sim["truth_corr"][k]
        pull = (res.params[k] - truth) / res.errors[k]
        assert np.all(np.abs(pull[GOOD]) < 3.0), (k, pull)
        assert np.all(np.abs((ref.params[k] - truth) / ref.errors[k]) < 3.0), k
        ratio = res.errors[k][GOOD] / ref.errors[k][GOOD]
        assert np.all(np.abs(ratio - 1) < 0.05), (k, ratio)
        assert np.all(res.params[k][DEAD] == 0) and np.all(np.isinf(res.errors[k][DEAD]))
    assert np.all(res.params["line_flux"][:, DEAD] == 0) and np.all(res.params["flat_amp"][:, DEAD] == 0)
    assert res.live.tolist() == [True, True, False, True, True]
    _same_rows(res.psf, sim["init"], [DEAD])
    # the broken fiber's Jacobian columns are zero: its rows of J^T J and J^T r vanish exactly
    patch, _ = calib_patch(sim["init"], *sim["dead"], lines=sim["lines"], fibers=np.arange(5), waverange=WR,
                           what=("xtrace", "ytrace", "sigma"), broken_fibers=[DEAD])
    _, jtj, jtr = (np.asarray(a) for a in _normal_equations(patch, jnp.asarray(res.theta)))
    dead = patch.dead_mask()
    assert dead.sum() == 4 + patch.static.nline + patch.static.nbasis  # dx, dy, log_sigx, log_sigy, fluxes
    assert np.all(jtj[dead] == 0) and np.all(jtj[:, dead] == 0) and np.all(jtr[dead] == 0)
    psf_live = ~dead & ~patch.layout.mask(("line_flux", "flat_amp"))
    assert np.all(np.diag(jtj)[psf_live] > 0)


@pytest.mark.slow
def test_broken_fiber_full_model(sim):
    """fit_bundle (every trace coefficient and three shape terms as a linear series over the
    bundle's fibers) with broken_fibers=[2], against the lit exposures.

    Tolerances: x traces of fibers 0, 1, 3, 4 within 0.01 px of the truth and y traces within
    0.05 px (measured 0.0015 and 0.017 px; lit 0.0016 and 0.021), their trace uncertainties
    within 5% of the lit fit's (measured 0.997-1.017 times), the shape series' 0.95-1.25 times
    (one fiber's data of five fewer: up to sqrt(5/4) = 1.12 expected; measured 1.00-1.13).  The series keeps its
    abscissa over the whole bundle: the fitted GHSIGX coefficients of fibers 0, 1, 3, 4 (the
    start projected on the series plus the fitted series, ``project_start``) are one straight
    line in fiber number.
    """
    kw = dict(lines=sim["lines"], fibers=np.arange(5), waverange=WR, **FULL_KW)
    res = fit_bundle(sim["init_full"], *sim["dead"], broken_fibers=[DEAD], **kw)
    ref = fit_bundle(sim["init_full"], *sim["lit"], **kw)
    assert abs(res.reduced_chi2 - 1) < 0.03
    truth = sim["truth"]
    f, w = GOOD[:, None], np.linspace(WR[0] + 5, WR[1] - 5, 5)[None, :]
    for fit in (res, ref):
        assert np.abs(np.asarray(fit.psf.x(f, w) - truth.x(f, w))).max() < 0.01
        assert np.abs(np.asarray(fit.psf.y(f, w) - truth.y(f, w))).max() < 0.05
    for k in ("dx", "dy"):
        ratio = res.errors[k][GOOD] / ref.errors[k][GOOD]
        assert np.all(np.abs(ratio - 1) < 0.05), (k, ratio)
        assert np.all(res.params[k][DEAD] == 0) and np.all(np.isinf(res.errors[k][DEAD]))
    ratio = res.errors["pc"] / ref.errors["pc"]
    assert np.all((ratio > 0.95) & (ratio < 1.25)), ratio
    # the broken fiber keeps the start's coefficients, its traces shifted with its bundle's (the alignment)
    _same_rows(res.psf, apply_trace_offsets(sim["init_full"], [res.offset]), [DEAD])
    r = truth.param_index("GHSIGX")
    coef = np.asarray(res.psf.params[r, :5, 0])
    np.testing.assert_allclose(np.diff(coef[GOOD]) / np.diff(GOOD), (coef[4] - coef[0]) / 4, rtol=1e-9, atol=1e-15)
    assert np.abs(coef - np.asarray(sim["init_full"].params[r, :5, 0]))[GOOD].max() > 0  # the coefficients do move
    assert res.live.tolist() == [True, True, False, True, True]


@pytest.mark.slow
def test_ccd_fit_flags_bundles_and_writes_broken_fibers(sim, tmp_path):
    """fit_psf_full over fibers 0-9 in bundles of 5 (fibers 5-9 dark): undeclared, bundle 1 is
    flagged before fitting (status 2) and bundle 0 is fitted; declared broken, bundle 1 gets
    status 3.  The written PSF: STATUS 3 for broken fibers, NBROKEN / BROKEN in its header,
    their coefficients the input's, read back exactly (astropy and fitsio)."""
    from astropy.io import fits

    start = sim["init_full"]
    kw = dict(lines=sim["lines"], specmin=0, nspec=10, bundlesize=5, waverange=WR, **FULL_KW)
    seen = []
    res = fit_psf_full(start, *sim["dead"], broken_fibers=[DEAD], bundle_progress=lambda st, n: seen.append(st), **kw)
    st0, st1 = res.bundles
    assert st0.status in (0, 1) and st1.status == STATUS_FAILED and "no lamp light" in st1.message
    assert res.fits[1] is None and res.fits[0] is not None
    assert seen[0] is st1  # flagged (and reported) before any fitting
    _same_rows(res.psf, start, np.arange(5, 10), skip_rows=("STATUS",))

    broken = [DEAD, 5, 6, 7, 8, 9]
    res = fit_psf_full(start, *sim["dead"], broken_fibers=broken, **kw)
    assert res.bundles[1].status == STATUS_BROKEN and res.bundles[0].status in (0, 1)
    np.testing.assert_array_equal(res.broken, broken)
    hdr = res.header()
    assert hdr["NBROKEN"] == 6 and hdr["BROKEN"] == "2,5,6,7,8,9" and hdr["B01STAT"] == STATUS_BROKEN
    path = jaxspec.write_psf(tmp_path / "psf.fits", res.psf, header=hdr)
    back = jaxspec.read_psf(path)
    assert res.offsets[1] is None and res.offsets[0] is not None  # bundle 1: every fiber broken, not aligned
    _same_rows(back, apply_trace_offsets(start, res.offsets), broken, skip_rows=("STATUS",))
    status = np.asarray(back.params[back.param_index("STATUS"), :12, 0])
    np.testing.assert_array_equal(status[broken], STATUS_BROKEN)
    np.testing.assert_array_equal(status[GOOD], res.bundles[0].status)
    with fits.open(path) as h:
        assert h["PSF"].header["BROKEN"] == "2,5,6,7,8,9" and h["PSF"].header["NBROKEN"] == 6
    fitsio = pytest.importorskip("fitsio")
    assert fitsio.read_header(str(path), ext="PSF")["BROKEN"] == "2,5,6,7,8,9"

    # every bundle without light and undeclared: nothing to fit, refused before fitting
    with pytest.raises(ValueError, match="no lamp light"):
        fit_psf_full(start, *sim["dead"], **{**kw, "specmin": 5, "nspec": 5})
