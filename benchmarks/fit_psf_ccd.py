"""Time a full-CCD PSF fit (all 500 fibers of r0, 20 bundles x 8 wavelength blocks).

Perturbs the real PSF (trace shifts 0.2-0.4 px, sigma scales ~5%, GH offsets ~0.01,
the same for every fiber's block), simulates a full-CCD arc and flat with the true
PSF, fits with :func:`jaxspec._fit.fit_psf_ccd`, and reports the wall time (first
patch, i.e. compilation, separately), the chi2, and how well the traces were
recovered (RMS of fitted - true x, y over fibers and wavelengths).

    python benchmarks/fit_psf_ccd.py [--psf PATH] [--small]   # --small: 2 bundles x 2 blocks (CPU)
"""

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxspec  # noqa: E402
from jaxspec._simulation.calib import arc_lines, simulate_arc, simulate_flat  # noqa: E402
from jaxspec._fit.fit import DEFAULT_GH_TERMS, apply_psf_params, fit_psf_ccd  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--psf", default="../shared/data/psf/psf-r0-00067784.fits")
ap.add_argument("--small", action="store_true", help="2 bundles x 2 wavelength blocks over 300 A (CPU)")
args = ap.parse_args()

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
