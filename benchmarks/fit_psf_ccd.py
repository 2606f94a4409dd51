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
"""

import argparse
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
ap.add_argument("--wavelength", default=None, help="--full: wmin,wmax (default the common range)")
ap.add_argument("--legdeg-wave", type=int, default=None, help="--full: wavelength degree (default the file's)")
ap.add_argument("--trace-deg", type=int, default=None, help="--full: trace degree (default the file's)")
ap.add_argument("--maxiter", type=int, default=20)
ap.add_argument("--step-tol", type=float, default=0.1, help="--full: stop below this step [sigma]")
ap.add_argument("--rows-per-block", type=int, default=128)
ap.add_argument("--patches-per-call", type=int, default=64)
ap.add_argument("--out", default=None, help="--full: write summary.json (and the fitted PSF) here")
args = ap.parse_args()


def full_model():
    """The full model from another night's PSF; prints and returns a summary."""
    truth = jaxspec.read_psf(args.psf)
    start = jaxspec.read_psf(args.start)
    nspec = truth.nspec if args.nspec is None else args.nspec
    wr = ((truth.wmin_all, truth.wmax_all) if args.wavelength is None
          else tuple(float(v) for v in args.wavelength.split(",")))
    print(f"device: {jax.devices()[0]}; full model, {nspec} fibers, {wr[0]:.0f}-{wr[1]:.0f} A, start {args.start}",
          flush=True)
    t0 = time.perf_counter()
    box = truth.xyrange((0, nspec), (wr[0] - 50, wr[1] + 50))
    box = (0, min(box[1] + 12, truth.npix_x), max(box[2] - 20, 0), min(box[3] + 20, truth.npix_y))
    lines = arc_lines("r")
    arc = simulate_arc(truth, lines, specmin=0, nspec=nspec, xyrange=box, seed=1)
    flat = simulate_flat(truth, specmin=0, nspec=nspec, xyrange=box, seed=2)
    t_sim = time.perf_counter() - t0
    print(f"simulated arc + flat {arc.image.shape} in {t_sim:.1f} s", flush=True)

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
                               trace_deg=args.trace_deg, maxiter=args.maxiter, step_tol=args.step_tol,
                               rows_per_block=args.rows_per_block,
                               patches_per_call=args.patches_per_call, bundle_progress=bundle_done,
                               callback=iteration)
    total = time.perf_counter() - t0
    fits = [f for f in res.fits if f is not None]
    comp = max(f.compile_seconds for f in fits) if fits else float("nan")
    rng = np.random.default_rng(0)
    rows = []
    for st, fr in zip(res.bundles, res.fits):
        f = rng.integers(st.fibers[0], st.fibers[-1] + 1, 100)
        w = rng.uniform(wr[0] + 5, wr[1] - 5, 100)
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
    summary = dict(device=str(jax.devices()[0]), nspec=nspec, waverange=wr, total_s=total, compile_s=comp,
                   after_compile_s=total - comp, simulate_s=t_sim, bundles=rows)
    print(f"full-model fit: {len(res.bundles)} bundles in {total:.1f} s, compilation {comp:.1f} s, "
          f"after compilation {total - comp:.1f} s", flush=True)
    fit = np.array([r["fit"] for r in rows])
    print(f"worst bundle: x rms {fit[:, 0].max():.4f} px, y rms {fit[:, 1].max():.4f} px, max |spot diff| "
          f"{fit[:, 2].max():.2e} (median bundle {np.median(fit[:, 0]):.4f}, {np.median(fit[:, 1]):.4f} px, "
          f"{np.median(fit[:, 2]):.2e}); statuses {sorted({r['status'] for r in rows})}, iterations "
          f"{[r['niter'] for r in rows]}, chi2/dof {min(r['rchi2'] for r in rows):.4f}-"
          f"{max(r['rchi2'] for r in rows):.4f}", flush=True)
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
