"""Calibrate a PSF from simulated arc + flat exposures, then extract with it.

Perturbs the real DESI r0 PSF (traces shifted 0.2-0.4 pixel, GHSIGX/GHSIGY scaled by
~5%, five Gauss-Hermite terms offset by ~0.01), simulates an arc and a flat of bundle 0
with the true PSF, fits the perturbed PSF back, and compares the extraction pulls of a
science frame with the fitted and the perturbed PSF.  Writes fit_psf.png.

    python examples/fit_psf.py [path/to/psf-r0-00067784.fits]
"""

import pathlib
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import jaxspec  # noqa: E402
from jaxspec import arc_lines, simulate_arc, simulate_flat  # noqa: E402
from jaxspec import DEFAULT_GH_TERMS, apply_psf_params, fit_psf  # noqa: E402

# the PSF: argv[1], else ../shared beside the repository (found from this file, so the
# example runs from any working directory)
_here = pathlib.Path(__file__).resolve().parent
path = sys.argv[1] if len(sys.argv) > 1 else str(_here.parent.parent / "shared/data/psf/psf-r0-00067784.fits")
psf = jaxspec.read_psf(path)
nf, fibers, waverange = 25, np.arange(25), (6320.0, 6480.0)

# --- a perturbed starting PSF
rng = np.random.default_rng(42)
shift = lambda: rng.choice([-1, 1], (nf, 1)) * rng.uniform(0.2, 0.4, (nf, 1))  # noqa: E731
pert = dict(dx=shift(), dy=shift(), log_sigx=rng.normal(0, 0.05, nf), log_sigy=rng.normal(0, 0.05, nf),
            gh=rng.normal(0, 0.01, len(DEFAULT_GH_TERMS)))
psf_init = apply_psf_params(psf, {k: jnp.asarray(v) for k, v in pert.items()}, fibers)

# --- calibration exposures made with the true PSF
lines = arc_lines("r")
box = list(psf.xyrange((0, nf), (waverange[0] - 40, waverange[1] + 40)))
box = (max(box[0] - 6, 0), box[1] + 6, box[2], box[3])
arc = simulate_arc(psf, lines, specmin=0, nspec=nf, xyrange=box, seed=1)
flat = simulate_flat(psf, specmin=0, nspec=nf, xyrange=box, seed=2)

# --- the fit
t0 = time.perf_counter()
res = fit_psf(psf_init, [arc], [flat], lines=lines, fibers=fibers, waverange=waverange,
              callback=lambda it, c, s, lam: print(f"  iter {it:2d}  chi2 {c:12.1f}  step {s:9.3g} sigma"))
print(f"fit: {res.niter} iterations, chi2/dof {res.reduced_chi2:.4f}, {time.perf_counter() - t0:.1f} s")
truth = {k: -np.asarray(v) for k, v in pert.items()}
pulls = res.pulls(truth)
allp = np.concatenate([np.ravel(p) for p in pulls.values()])
print(f"parameter pulls (fitted - true) / sigma: max |pull| {np.abs(allp).max():.2f}, std {allp.std():.3f}")
for k in pulls:
    print(f"  {k:9s} typical sigma {np.median(res.errors[k]):.2e}")

# --- extraction of a science frame with the fitted and the perturbed PSF
dw = 0.8
wave = np.arange(waverange[0] + 10, waverange[1] - 10, dw)
wext = np.arange(wave[0] - 30 * dw, wave[-1] + 30.5 * dw, dw)
rng = np.random.default_rng(3)
flux = 300 + 200 * np.sin(wext / 37.0)[None, :] * rng.uniform(0.5, 1, (nf, 1))
for w in rng.uniform(wext[0], wext[-1], 6):
    flux = flux + 3000 * np.exp(-0.5 * ((wext - w) / 0.6) ** 2)[None, :] * rng.uniform(0.3, 1, (nf, 1))
sbox = list(psf.xyrange((0, nf), (wave[0], wave[-1])))
sbox = (max(sbox[0] - 6, 0), sbox[1] + 6, sbox[2] - 30, sbox[3] + 30)
image, ivar, _ = jaxspec.simulate(psf, wext, flux, specmin=0, xyrange=sbox, seed=4)
i0 = np.searchsorted(wext, wave[0] - 1e-6)
truth_flux = flux[:, i0:i0 + len(wave)]
ext_pulls = {}
for name, p in (("fitted", res.psf), ("perturbed", psf_init.with_traces()), ("true", psf)):
    ex = jaxspec.extract(image, ivar, p, wave, specmin=0, nspec=nf, xyrange=sbox)
    conv = np.asarray(jaxspec.apply_resolution(ex.resolution, truth_flux))
    ext_pulls[name] = ((np.asarray(ex.flux) - conv) * np.sqrt(np.asarray(ex.ivar)))[:, 10:-10]
    print(f"extraction pulls with the {name:9s} PSF: mean {ext_pulls[name].mean():+.3f} std {ext_pulls[name].std():.3f}")

# --- figure: chi2 history, parameter pulls, residuals of the arc, extraction pulls
fig, ax = plt.subplots(2, 2, figsize=(10, 8))
ax[0, 0].semilogy(res.chi2_history, "o-")
ax[0, 0].set(xlabel="iteration", ylabel="pixel chi2", title="Levenberg-Marquardt")
for k, p in pulls.items():
    ax[0, 1].plot(np.ravel(p), "o", ms=3, label=k)
ax[0, 1].axhspan(-3, 3, color="0.9")
ax[0, 1].set(xlabel="fiber (or GH term)", ylabel="(fit - truth) / sigma", title="recovered corrections")
ax[0, 1].legend(fontsize=7)
r = (res.data[0] - res.model[0]) * np.sqrt(res.ivar[0])
x0, x1, y0, y1 = res.xyrange
ax[1, 0].imshow(r, origin="lower", cmap="RdBu_r", vmin=-4, vmax=4, aspect="auto",
                extent=(x0 - 0.5, x1 - 0.5, y0 - 0.5, y1 - 0.5))
ax[1, 0].set(title="arc residual / sigma", xlabel="x", ylabel="y")
bins = np.linspace(-6, 6, 61)
for name in ("fitted", "perturbed"):
    ax[1, 1].hist(ext_pulls[name].ravel(), bins, histtype="step", density=True, label=name)
ax[1, 1].plot(bins, np.exp(-0.5 * bins**2) / np.sqrt(2 * np.pi), "k:", label="N(0, 1)")
ax[1, 1].set(xlabel="extraction pull", title="science frame")
ax[1, 1].legend()
fig.tight_layout()
fig.savefig("fit_psf.png", dpi=90)
print("wrote fit_psf.png")
