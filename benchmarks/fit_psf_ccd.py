"""Time a full-CCD PSF fit (all 500 fibers of r0, 20 bundles x 8 wavelength blocks).

Perturbs the real PSF (trace shifts 0.2-0.4 px, sigma scales ~5%, GH offsets ~0.01,
the same for every fiber's block), simulates a full-CCD arc and flat with the true
PSF, fits with :func:`jaxspec.fit_psf_ccd`, and reports the wall time (first
patch, i.e. compilation, separately), the chi2, and how well the traces were
recovered (RMS of fitted - true x, y over fibers and wavelengths).

    python benchmarks/fit_psf_ccd.py [--psf PATH] [--small]   # --small: 2 bundles x 2 blocks (CPU)

``--full`` times the full model instead (:func:`jaxspec.fit_psf_full`, issue 18):
from another night's PSF (``--start``, default psf-r0-00051060.fits) to an arc and a
flat simulated with ``--psf``, every bundle of ``--nspec`` fibers over ``--wavelength``
fitted together (all GHSIGX, GHSIGY, GH-i-j and trace coefficients), reporting
compilation apart, per-bundle status and chi2, and the trace and spot errors at 100
random (fiber, wavelength) points per bundle:

    python benchmarks/fit_psf_ccd.py --full [--nspec 500] [--wavelength 5610,7730] [--out DIR]
        [--arc-photons 6e4 --arc-exposures 5]

and, at the same points, whether the fit knows how right it is: the propagated
1-sigma of x, y and every spot pixel (:func:`jaxspec._fit.uncertainty.trace_spot_sigma`,
from ``BundleFit.cov``) and the errors in those units; the truth expressed in the
fit's own parameters (:func:`truth_in_fit_params`), what it leaves of the spots
(the parametrisation's floor) and the fraction of fitted coefficients within 3
sigma of it (coverage); and an extraction of a frame simulated with the true PSF,
with the fitted and with the starting PSF: pulls ``(flux - R truth) sqrt(ivar)``.
A compact table of all this is printed last.  ``--arc-exposures N`` fits the sum of
N arcs of ``--arc-photons`` each (one image: N times the photons, sqrt(N) times the
read noise); the default, five of 6e4, is DESI's nightly set of five 5 s arcs (see
:func:`jaxspec.simulate_arc`); ``--arc-photons 3e4 --arc-exposures 1`` is the
library's default single arc, which the runs before 2026-12-02 03:30 used.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import time

import logging

import jax

logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
logging.getLogger("jaxspec.fit").setLevel(logging.INFO)
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxspec  # noqa: E402
from jaxspec import DEFAULT_GH_TERMS, apply_psf_params, arc_lines, fit_psf_ccd, simulate_arc, simulate_flat  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_data = pathlib.Path(__file__).resolve().parent.parent.parent / "shared/data/psf"
ap.add_argument("--psf", default=str(_data / "psf-r0-00067784.fits"), help="the true PSF")
ap.add_argument("--small", action="store_true", help="2 bundles x 2 wavelength blocks over 300 A (CPU)")
ap.add_argument("--full", action="store_true", help="the full model (fit_psf_full) from --start")
ap.add_argument("--start", default=str(_data / "psf-r0-00051060.fits"), help="--full: the starting PSF")
ap.add_argument("--nspec", type=int, default=None, help="--full: fibers 0..nspec-1 (default all)")
ap.add_argument("--bundlesize", type=int, default=25)
ap.add_argument("--wavelength", default=None,
                help="--full: wmin,wmax (default the camera's DESI extraction range inside the PSF's common range)")
ap.add_argument("--legdeg-wave", type=int, default=None, help="--full: wavelength degree (default the file's)")
ap.add_argument("--trace-deg", type=int, default=None, help="--full: trace degree (default the file's)")
ap.add_argument("--legdeg-fiber", type=int, default=1, help="--full: the shape series' degree over a bundle's fibers")
ap.add_argument("--no-project-start", action="store_true",
                help="--full: add the series to the start's coefficients as they are (fit_psf_full(project_start=False))")
ap.add_argument("--maxiter", type=int, default=20)
ap.add_argument("--step-tol", type=float, default=0.1, help="--full: stop below this step [sigma]")
ap.add_argument("--rows-per-block", type=int, default=128)
ap.add_argument("--patches-per-call", type=int, default=64)
ap.add_argument("--out", default=None, help="--full: write summary.json (and the fitted PSF) here")
ap.add_argument("--arc-photons", type=float, default=6e4,
                help="--full: photons of the brightest line per arc (6e4: one DESI 5 s arc; see simulate_arc)")
ap.add_argument("--arc-exposures", type=int, default=5,
                help="--full: arcs summed into the fitted image (5: DESI's nightly set)")
ap.add_argument("--no-extract", action="store_true", help="--full: skip the extraction-pull check")
args = ap.parse_args()


def _legfit(t, values, deg):
    """Least-squares Legendre coefficients ``(..., deg + 1)`` of ``values (..., n)`` at abscissae ``t (n,)``."""
    v = np.polynomial.legendre.legvander(t, deg)
    return np.linalg.lstsq(v, np.moveaxis(values, -1, 0).reshape(len(t), -1), rcond=None)[0].T.reshape(
        values.shape[:-1] + (deg + 1,))


def truth_in_fit_params(fr, truth, wr, ngrid=400):
    """The true PSF in the fit's own parameters (least squares over the fitted range).

    ``dx``, ``dy``: the true trace minus the start's, as the fit's first ``trace_deg + 1``
    Legendre coefficients per fiber; ``pc``: every shape term of the truth (each GH-i-j
    times GH-0-0 of the start over GH-0-0 of the truth, which leaves the unit-sum spots
    unchanged, as the fit holds GH-0-0 fixed) minus the start's, projected on the
    bundle's fiber-Legendre x wavelength-Legendre basis.
    """
    from jaxspec._fit.params import fiber_legendre
    start, fib = fr.psf_init, np.asarray(fr.fibers)
    live = np.ones(len(fib), bool) if fr.live is None else np.asarray(fr.live)
    wg = np.linspace(wr[0], wr[1], ngrid)
    F, W = fib[:, None], wg[None, :]
    out = {}
    for name, dom in (("x", start.xdomain), ("y", start.ydomain)):
        d = np.asarray(getattr(truth, name)(F, W) - getattr(start, name)(F, W))
        t = (wg - dom[0]) * (2.0 / (dom[1] - dom[0])) - 1.0
        out["d" + name] = _legfit(t, d, fr.params["d" + name].shape[1] - 1) * live[:, None]
    nterm, nl, nk = fr.params["pc"].shape
    pf = fiber_legendre(len(fib), nl - 1)[live]
    t = (wg - start.pdomain[0]) * (2.0 / (start.pdomain[1] - start.pdomain[0])) - 1.0
    a = np.kron(pf, np.polynomial.legendre.legvander(t, nk - 1))
    ratio = np.asarray(start.param("GH-0-0", F, W) / truth.param("GH-0-0", F, W))
    pc = np.zeros((nterm, nl, nk))
    for i, n in enumerate(fr.shape_terms):
        tv = np.asarray(truth.param(n, F, W)) * (ratio if n.startswith("GH-") else 1.0)
        d = (tv - np.asarray(start.param(n, F, W)))[live]
        pc[i] = np.linalg.lstsq(a, d.reshape(-1), rcond=None)[0].reshape(nl, nk)
    out["pc"] = pc
    return out


def _conditional_cov(cov, fixed):
    """The covariance of the other parameters with ``fixed`` held at their values (those rows zeroed)."""
    c = np.where(np.isfinite(cov), cov, 0.0)
    act = np.diag(c) > 0
    info = np.linalg.inv(c[np.ix_(act, act)])  # the reduced normal matrix
    free = ~fixed[act]
    out = np.zeros_like(c)
    idx = np.where(act)[0][free]
    out[np.ix_(idx, idx)] = np.linalg.inv(info[np.ix_(free, free)])
    return out


def bundle_checks(fr, truth, f, w, wr):
    """Sigmas, errors in sigma units, the parametrisation's floor and the coefficient coverage of one bundle."""
    from jaxspec._fit.uncertainty import trace_spot_sigma
    sig = trace_spot_sigma(fr, f, w)
    out = {}
    for name in ("x", "y"):
        e = np.asarray(getattr(fr.psf, name)(f, w) - getattr(truth, name)(f, w))
        p = e / sig[name]
        out.update({f"err_{name}_rms": float(np.sqrt(np.mean(e**2))), f"sig_{name}_rms": float(np.sqrt(np.mean(
            sig[name]**2))), f"pull_{name}_rms": float(np.sqrt(np.mean(p**2))), f"pull_{name}_max": float(
            np.abs(p).max()), f"pull_{name}_mean": float(p.mean())})
    # what the traces' sigma would be with shape terms held fixed (all of them; those odd in x / y):
    # how much of it is the trace traded against the shape
    nsh = len(fr.shape_terms)
    odd = {"x": np.array([n.startswith("GH-") and int(n.split("-")[1]) % 2 == 1 for n in fr.shape_terms]),
           "y": np.array([n.startswith("GH-") and int(n.split("-")[2]) % 2 == 1 for n in fr.shape_terms])}
    npc = fr.params["pc"].size
    per = npc // nsh
    for tag, held in (("noshape", {"x": np.ones(nsh, bool), "y": np.ones(nsh, bool)}), ("noodd", odd)):
        for name in ("x", "y"):
            fixed = np.zeros(fr.cov.shape[0], bool)
            fixed[-npc:] = np.repeat(held[name], per)
            out[f"sig_{name}_{tag}_rms"] = float(np.sqrt(np.mean(trace_spot_sigma(
                dataclasses.replace(fr, cov=_conditional_cov(fr.cov, fixed)), f, w)[name]**2)))
    xa, ya, a = (np.asarray(v) for v in fr.psf.spots(f, w))
    xb, yb, b = (np.asarray(v) for v in truth.spots(f, w))
    same = ((xa == xb) & (ya == yb))[:, None, None] & (sig["spots"] > 1e-6)
    d = (a - b)[same]
    p = d / sig["spots"][same]
    out.update(spot_err_max=float(np.abs(d).max()), spot_sig_max=float(sig["spots"].max()),
               pull_spot_rms=float(np.sqrt(np.mean(p**2))), pull_spot_max=float(np.abs(p).max()),
               same_corners=float(((xa == xb) & (ya == yb)).mean()))
    # the truth in the fit's parameters: what the parametrisation can reach
    tp = truth_in_fit_params(fr, truth, wr)
    proj = apply_psf_params(fr.psf_init, {k: jnp.asarray(v) for k, v in tp.items()}, fr.fibers,
                            shape_terms=fr.shape_terms, live=fr.live)
    xc, yc, c = (np.asarray(v) for v in proj.spots(f, w))
    s_bc = (xb == xc) & (yb == yc)
    out.update(floor_spot_max=float(np.abs(c - b)[s_bc].max()),
               floor_x_rms=float(np.sqrt(np.mean(np.asarray(proj.x(f, w) - truth.x(f, w))**2))),
               floor_y_rms=float(np.sqrt(np.mean(np.asarray(proj.y(f, w) - truth.y(f, w))**2))))
    s_ac = ((xa == xc) & (ya == yc))[:, None, None] & (sig["spots"] > 1e-6)
    dp = (a - c)[s_ac]
    out.update(spot_vs_proj_max=float(np.abs(dp).max()),
               pull_proj_rms=float(np.sqrt(np.mean((dp / sig["spots"][s_ac])**2))))
    allp = []
    for k in ("dx", "dy", "pc"):
        e = np.asarray(fr.errors[k])
        ok = np.isfinite(e) & (e > 0)
        pk = ((np.asarray(fr.params[k]) - tp[k])[ok] / e[ok]).ravel()
        allp.append(pk)
        out[f"cover_{k}"] = float(np.mean(np.abs(pk) < 3))
        out[f"pull_{k}_rms"] = float(np.sqrt(np.mean(pk**2)))
    allp = np.concatenate(allp)
    out.update(cover_all=float(np.mean(np.abs(allp) < 3)), pull_coef_max=float(np.abs(allp).max()),
               ncoef=int(allp.size))
    return out


def extraction_pulls(truth, start, fitted, nspec, wr, dw=0.8):
    """A frame simulated with the true PSF over the fitted range, extracted with the fitted and the start PSF.

    Continuum 300 + 200 sin(w / 37) photons / A times 0.5-1 per fiber, plus an emission line
    (peak 3000 photons / A, sigma 0.6 A) every ~25 A; pulls ``(flux - R truth) sqrt(ivar)`` with
    ``R`` the extraction's resolution matrix, 10 bins dropped at each end.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(3)
    wave = np.arange(wr[0] + 10, wr[1] - 10, dw)
    wext = np.arange(wave[0] - 30 * dw, wave[-1] + 30.5 * dw, dw)
    wext = wext[(wext > truth.wmin_all) & (wext < truth.wmax_all)]
    flux = 300 + 200 * np.sin(wext / 37.0)[None, :] * rng.uniform(0.5, 1, (nspec, 1))
    for c in rng.uniform(wext[0], wext[-1], max(1, int((wext[-1] - wext[0]) / 25))):
        flux = flux + 3000 * np.exp(-0.5 * ((wext - c) / 0.6) ** 2)[None, :] * rng.uniform(0.3, 1, (nspec, 1))
    box = list(truth.xyrange((0, nspec), (wave[0], wave[-1])))
    box = (max(box[0] - 6, 0), min(box[1] + 6, truth.npix_x), max(box[2] - 30, 0), min(box[3] + 30, truth.npix_y))
    image, ivar, _ = jaxspec.simulate(truth, wext, flux, specmin=0, xyrange=box, seed=4)
    i0 = np.searchsorted(wext, wave[0] - 1e-6)
    ref = flux[:, i0:i0 + len(wave)]
    out = {}
    for name, psf in (("fitted", fitted), ("start", start), ("truth", truth)):
        ex = jaxspec.extract(image, ivar, psf, wave, specmin=0, nspec=nspec, xyrange=box)
        conv = np.asarray(jaxspec.apply_resolution(ex.resolution, ref))
        p = ((np.asarray(ex.flux) - conv) * np.sqrt(np.asarray(ex.ivar)))[:, 10:-10]
        out[name] = dict(mean=float(p.mean()), std=float(p.std()), max=float(np.abs(p).max()))
    out["seconds"] = time.perf_counter() - t0
    out["shape"] = [int(nspec), int(len(wave))]
    print("extraction pulls (flux - R truth) sqrt(ivar), " + ", ".join(
        f"{k} PSF: mean {v['mean']:+.4f} std {v['std']:.4f}" for k, v in out.items() if isinstance(v, dict))
        + f" ({nspec} fibers x {len(wave)} bins, {out['seconds']:.1f} s)", flush=True)
    return out


def print_table(rows, checks, ext, t_chk):
    """The compact summary: per bundle errors, sigmas, errors / sigma, floor and coverage."""
    print(f"\nsummary (checks {t_chk:.1f} s): per bundle, at 100 random (fiber, wavelength) points", flush=True)
    print("bnd st it | x err  sig   e/s rms max | y err  sig   e/s rms max | spot err  sig    e/s rms  floor   "
          "fit-flr | cover dx    dy    pc    all", flush=True)
    byb = {r["bundle"]: r for r in rows}
    for c in checks:
        r = byb[c["bundle"]]
        print(f"{c['bundle']:3d} {r['status']:2d} {r['niter']:2d} | {c['err_x_rms']:.4f} {c['sig_x_rms']:.4f} "
              f"{c['pull_x_rms']:4.2f} {c['pull_x_max']:4.1f} | {c['err_y_rms']:.4f} {c['sig_y_rms']:.4f} "
              f"{c['pull_y_rms']:4.2f} {c['pull_y_max']:4.1f} | {c['spot_err_max']:.2e} {c['spot_sig_max']:.1e} "
              f"{c['pull_spot_rms']:5.2f} {c['floor_spot_max']:.1e} {c['spot_vs_proj_max']:.1e} | "
              f"{c['cover_dx']:.3f} {c['cover_dy']:.3f} {c['cover_pc']:.3f} {c['cover_all']:.3f}", flush=True)
    if checks:
        med = {k: float(np.median([c[k] for c in checks])) for k in checks[0] if k != "bundle"}
        print(f"median    | {med['err_x_rms']:.4f} {med['sig_x_rms']:.4f} {med['pull_x_rms']:4.2f} "
              f"{med['pull_x_max']:4.1f} | {med['err_y_rms']:.4f} {med['sig_y_rms']:.4f} {med['pull_y_rms']:4.2f} "
              f"{med['pull_y_max']:4.1f} | {med['spot_err_max']:.2e} {med['spot_sig_max']:.1e} "
              f"{med['pull_spot_rms']:5.2f} {med['floor_spot_max']:.1e} {med['spot_vs_proj_max']:.1e} | "
              f"{med['cover_dx']:.3f} {med['cover_dy']:.3f} {med['cover_pc']:.3f} {med['cover_all']:.3f}", flush=True)
        allcov = np.sum([c["cover_all"] * c["ncoef"] for c in checks]) / np.sum([c["ncoef"] for c in checks])
        print(f"coefficients within 3 sigma of the truth, all bundles: {allcov:.4f} (target 0.99)", flush=True)
    if ext:
        print("extraction pulls: " + "; ".join(f"{k} PSF mean {v['mean']:+.4f} std {v['std']:.4f}"
                                               for k, v in ext.items() if isinstance(v, dict))
              + " (target |mean| < 0.02, std 0.97-1.03)", flush=True)


#: DESI's standard extraction grids [A] (b, r, z): the range the spectra are extracted over
DESI_RANGES = {"b": (3600.0, 5800.0), "r": (5760.0, 7620.0), "z": (7520.0, 9824.0)}


def desi_range(psf) -> tuple[float, float]:
    """The camera's standard extraction range inside the PSF's common range (the camera whose grid overlaps it most).

    The PSF files reach 150-200 A beyond it (r: 5608-7736 A on every fiber), where no arc line
    falls (r's lines span 5764-7695 A): there the y traces are extrapolated (measured up to
    0.06 px off at 5608 A, fit of 2026-12-02), so the fit is judged where the spectra are extracted.
    """
    lo, hi = float(psf.wmin_all), float(psf.wmax_all)
    best = max(DESI_RANGES.values(), key=lambda r: min(r[1], hi) - max(r[0], lo))
    return max(best[0], lo), min(best[1], hi)


def full_model():
    """The full model from another night's PSF; prints and returns a summary."""
    truth = jaxspec.read_psf(args.psf)
    start = jaxspec.read_psf(args.start)
    nspec = truth.nspec if args.nspec is None else args.nspec
    wr = (desi_range(truth) if args.wavelength is None
          else tuple(float(v) for v in args.wavelength.split(",")))
    print(f"device: {jax.devices()[0]}; full model, {nspec} fibers, {wr[0]:.0f}-{wr[1]:.0f} A, start {args.start}",
          flush=True)
    t0 = time.perf_counter()
    box = truth.xyrange((0, nspec), (wr[0] - 50, wr[1] + 50))
    box = (0, min(box[1] + 12, truth.npix_x), max(box[2] - 20, 0), min(box[3] + 20, truth.npix_y))
    lines = arc_lines("r")
    n_arc = max(int(args.arc_exposures), 1)
    arc = simulate_arc(truth, lines, specmin=0, nspec=nspec, xyrange=box, seed=1, readnoise=3.0 * np.sqrt(n_arc),
                       peak_photons=args.arc_photons * n_arc)
    flat = simulate_flat(truth, specmin=0, nspec=nspec, xyrange=box, seed=2)
    t_sim = time.perf_counter() - t0
    print(f"simulated arc + flat {arc.image.shape} in {t_sim:.1f} s (arc: {n_arc} exposure(s), brightest line "
          f"{arc.line_photons.max():.3g} photons in all)", flush=True)

    def bundle_done(st, n):
        print(f"  bundle {st.bundle:2d} fibers {st.fibers[0]:3d}-{st.fibers[-1]:3d}: status {st.status} "
              f"chi2/dof {st.reduced_chi2:.4f}", flush=True)

    t0 = time.perf_counter()

    def iteration(b, it, c, st, lam):
        if b == 0:
            print(f"  {time.perf_counter() - t0:7.1f} s: bundle 0 iteration {it:2d} chi2 {c:.6g} step {st:.3g} sigma "
                  f"lambda {lam:.1e}", flush=True)

    res = jaxspec.fit_psf_full(start, [arc], [flat], lines=lines, specmin=0, nspec=nspec,
                               bundlesize=args.bundlesize, waverange=wr, legdeg_wave=args.legdeg_wave,
                               legdeg_fiber=args.legdeg_fiber, project_start=not args.no_project_start,
                               trace_deg=args.trace_deg, maxiter=args.maxiter, step_tol=args.step_tol,
                               rows_per_block=args.rows_per_block,
                               patches_per_call=args.patches_per_call, bundle_progress=bundle_done,
                               callback=iteration)
    total = time.perf_counter() - t0
    fits = [f for f in res.fits if f is not None]
    comp = max(f.compile_seconds for f in fits) if fits else float("nan")
    rng = np.random.default_rng(0)
    rows, points = [], {}
    for st, fr in zip(res.bundles, res.fits):
        f = rng.integers(st.fibers[0], st.fibers[-1] + 1, 100)
        w = rng.uniform(wr[0] + 5, wr[1] - 5, 100)
        points[st.bundle] = (f, w)
        out = {}
        for name, p in (("start", start), ("fit", res.psf)):
            dx = np.asarray(p.x(f, w) - truth.x(f, w))
            dy = np.asarray(p.y(f, w) - truth.y(f, w))
            xa, ya, a = (np.asarray(v) for v in p.spots(f, w))
            xb, yb, b = (np.asarray(v) for v in truth.spots(f, w))
            same = (xa == xb) & (ya == yb)
            out[name] = [float(np.sqrt(np.mean(dx**2))), float(np.sqrt(np.mean(dy**2))),
                         float(np.abs(a - b)[same].max()), float(same.mean())]
        rows.append(dict(bundle=st.bundle, status=st.status, rchi2=st.reduced_chi2,
                         niter=None if fr is None else fr.niter, start=out["start"], fit=out["fit"]))
        print(f"  bundle {st.bundle:2d}: x rms {out['start'][0]:.4f} -> {out['fit'][0]:.4f} px, y rms "
              f"{out['start'][1]:.4f} -> {out['fit'][1]:.4f} px, max |spot diff| {out['start'][2]:.2e} -> "
              f"{out['fit'][2]:.2e}" + ("" if fr is None else f", {fr.niter} iterations"), flush=True)
    t_chk = time.perf_counter()
    checks = []
    for st, fr in zip(res.bundles, res.fits):
        if fr is None:
            continue
        f, w = points[st.bundle]  # the same 100 points as above
        c = bundle_checks(fr, truth, f, w, wr)
        c["bundle"] = st.bundle
        checks.append(c)
        print(f"  bundle {st.bundle:2d}: sigma x {c['sig_x_rms']:.4f} y {c['sig_y_rms']:.4f} px; err/sigma x rms "
              f"{c['pull_x_rms']:.2f} max {c['pull_x_max']:.2f}, y rms {c['pull_y_rms']:.2f} max "
              f"{c['pull_y_max']:.2f}; "
              f"spots: max |diff| {c['spot_err_max']:.2e}, max sigma {c['spot_sig_max']:.2e}, err/sigma rms "
              f"{c['pull_spot_rms']:.2f} max {c['pull_spot_max']:.1f}; floor {c['floor_spot_max']:.2e} (x "
              f"{c['floor_x_rms']:.1e}, y {c['floor_y_rms']:.1e} px); fit - floor: max {c['spot_vs_proj_max']:.2e}, "
              f"err/sigma rms {c['pull_proj_rms']:.2f}; within 3 sigma: dx {c['cover_dx']:.3f} dy {c['cover_dy']:.3f} "
              f"pc {c['cover_pc']:.3f} all {c['cover_all']:.3f} (|pull| max {c['pull_coef_max']:.1f}); sigma with the "
              f"shape held: x {c['sig_x_noshape_rms']:.4f} y {c['sig_y_noshape_rms']:.4f} px, with the GH terms odd "
              f"in x / y held: x {c['sig_x_noodd_rms']:.4f} y {c['sig_y_noodd_rms']:.4f} px", flush=True)
    t_chk = time.perf_counter() - t_chk
    ext = None if args.no_extract else extraction_pulls(truth, start, res.psf, nspec, wr)
    summary = dict(device=str(jax.devices()[0]), nspec=nspec, waverange=wr, total_s=total, compile_s=comp,
                   after_compile_s=total - comp, simulate_s=t_sim, bundles=rows, checks=checks, checks_s=t_chk,
                   extraction=ext, arc_exposures=n_arc, arc_peak_photons=float(arc.line_photons.max()))
    print(f"full-model fit: {len(res.bundles)} bundles in {total:.1f} s, compilation {comp:.1f} s, "
          f"after compilation {total - comp:.1f} s", flush=True)
    fit = np.array([r["fit"] for r in rows])
    print(f"worst bundle: x rms {fit[:, 0].max():.4f} px, y rms {fit[:, 1].max():.4f} px, max |spot diff| "
          f"{fit[:, 2].max():.2e} (median bundle {np.median(fit[:, 0]):.4f}, {np.median(fit[:, 1]):.4f} px, "
          f"{np.median(fit[:, 2]):.2e}); statuses {sorted({r['status'] for r in rows})}, iterations "
          f"{[r['niter'] for r in rows]}, chi2/dof {min(r['rchi2'] for r in rows):.4f}-"
          f"{max(r['rchi2'] for r in rows):.4f}", flush=True)
    print_table(rows, checks, ext, t_chk)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
        jaxspec.write_psf(os.path.join(args.out, "psf-fit.fits"), res.psf, overwrite=True, header=res.header())
    return summary


if args.full:
    full_model()
    raise SystemExit(0)

psf = jaxspec.read_psf(args.psf)
nspec, nblocks = (50, 2) if args.small else (psf.nspec, 8)
waverange = (6200.0, 6500.0) if args.small else (psf.wmin_all, psf.wmax_all)
fibers = np.arange(nspec)
rng = np.random.default_rng(42)
shift = lambda: rng.choice([-1, 1], (nspec, 1)) * rng.uniform(0.2, 0.4, (nspec, 1))  # noqa: E731
pert = dict(dx=shift(), dy=shift(), log_sigx=rng.normal(0, 0.05, nspec), log_sigy=rng.normal(0, 0.05, nspec),
            gh=rng.normal(0, 0.01, (len(DEFAULT_GH_TERMS), nspec)))
psf_init = apply_psf_params(psf, {k: jnp.asarray(v) for k, v in pert.items()}, fibers).with_traces()

print(f"device: {jax.devices()[0]}; {nspec} fibers x {nblocks} blocks over {waverange[0]:.0f}-{waverange[1]:.0f} A")
t0 = time.perf_counter()
box = psf.xyrange((0, nspec), (waverange[0] - 50, waverange[1] + 50))
box = (0, min(box[1] + 10, psf.npix_x), max(box[2] - 20, 0), min(box[3] + 20, psf.npix_y))
lines = arc_lines("r")
arc = simulate_arc(psf, lines, specmin=0, nspec=nspec, xyrange=box, seed=1)
flat = simulate_flat(psf, specmin=0, nspec=nspec, xyrange=box, seed=2)
print(f"simulated arc + flat {arc.image.shape} in {time.perf_counter() - t0:.1f} s")

times = []


def progress(done, total, fr):
    times.append(time.perf_counter())
    print(f"  patch {done:3d}/{total}: fibers {fr.fibers[0]:3d}-{fr.fibers[-1]:3d} rows {fr.xyrange[2]}-"
          f"{fr.xyrange[3]} iters {fr.niter} chi2/dof {fr.reduced_chi2:.4f} {fr.seconds:.2f} s", flush=True)


t0 = time.perf_counter()
fitted, fits = fit_psf_ccd(psf_init, [arc], [flat], lines=lines, specmin=0, nspec=nspec, nblocks=nblocks,
                           waverange=waverange, per_fiber_gh=True, progress=progress)
total = time.perf_counter() - t0
first = times[0] - t0
print(f"full fit: {len(fits)} patches in {total:.1f} s (first patch incl. compilation {first:.1f} s; "
      f"the rest {(total - first) / max(len(fits) - 1, 1):.2f} s per patch)")
w = np.linspace(waverange[0] + 20, waverange[1] - 20, 25)[None, :]
f = fibers[:, None]
for name in ("x", "y"):
    d0 = np.asarray(getattr(psf_init, name)(f, w) - getattr(psf, name)(f, w))
    d1 = np.asarray(getattr(fitted, name)(f, w) - getattr(psf, name)(f, w))
    print(f"trace {name}: RMS error {np.sqrt(np.mean(d0**2)):.3f} px before, {np.sqrt(np.mean(d1**2)):.4f} px after")
