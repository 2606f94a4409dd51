"""Propagate a fitted PSF's uncertainty into extracted flux, and check it by Monte Carlo.

Fits 5 fibers' PSF corrections from an arc + flat (a short fit), extracts a frame,
computes d flux / d PSF parameters by forward-mode autodiff through the extraction
(:func:`flux_jacobian`), and the flux variance ``J C J^T`` from the PSF covariance
(:func:`propagate_psf_uncertainty`); then draws PSF parameters from their covariance,
re-extracts, and compares the scatter of the flux with the propagated sigma.

    python examples/psf_uncertainty.py [path/to/psf-r0-00067784.fits]
"""

import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxspec  # noqa: E402
from jaxspec import arc_lines, simulate_arc, simulate_flat  # noqa: E402
from jaxspec import apply_psf_params, fit_psf, flux_jacobian, propagate_psf_uncertainty  # noqa: E402

# the PSF: argv[1], else ../shared beside the repository (found from this file, so the
# example runs from any working directory)
_here = pathlib.Path(__file__).resolve().parent
path = sys.argv[1] if len(sys.argv) > 1 else str(_here.parent.parent / "shared/data/psf/psf-r0-00067784.fits")
psf = jaxspec.read_psf(path)
nf, fibers, wr = 5, np.arange(5), (6370.0, 6420.0)
box = list(psf.xyrange((0, nf), (wr[0] - 30, wr[1] + 30)))
box = (max(box[0] - 6, 0), box[1] + 6, box[2], box[3])
# a faint arc + flat: PSF errors large enough to matter
lines = arc_lines("r")
arc = simulate_arc(psf, lines, specmin=0, nspec=nf, xyrange=box, seed=1, peak_photons=3e3)
flat = simulate_flat(psf, specmin=0, nspec=nf, xyrange=box, seed=2, level=300.0)
res = fit_psf(psf, [arc], [flat], lines=lines, fibers=fibers, waverange=wr)
print(f"fit: chi2/dof {res.reduced_chi2:.3f}; sigma(dx) ~ {np.median(res.errors['dx']):.4f} px")

wave = np.arange(6380.0, 6410.0, 0.8)
flux = 2e4 * np.ones((nf, len(wave)))  # a bright continuum: photon noise small vs PSF error
image, ivar, _ = jaxspec.simulate(psf, wave, flux, specmin=0, xyrange=box, seed=3)
ex, jac = flux_jacobian(res, image, ivar, wave, xyrange=box, nwavestep=len(wave))
var_psf = propagate_psf_uncertainty(jac, res.psf_cov)
sig_psf = np.sqrt(var_psf)
sig_phot = 1 / np.sqrt(np.asarray(ex.ivar))
print(f"median flux sigma: photon {np.median(sig_phot):.1f}, PSF {np.median(sig_psf):.1f} photons/A")

# Monte Carlo: PSF corrections drawn from N(fit, C)
rng = np.random.default_rng(0)
keys = [k for k in ("dx", "dy", "log_sigx", "log_sigy", "gh") if k in res.params]
p0 = np.concatenate([np.ravel(res.params[k]) for k in keys])
L = np.linalg.cholesky(res.psf_cov)
draws = []
for i in range(40):
    p = p0 + L @ rng.normal(size=len(p0))
    d, j = {}, 0
    for k in keys:
        n = np.size(res.params[k])
        d[k] = jnp.asarray(p[j:j + n].reshape(np.shape(res.params[k])))
        j += n
    ps = apply_psf_params(res.psf_init, d, fibers, gh_terms=res.gh_terms).with_traces()
    draws.append(np.asarray(jaxspec.extract(image, ivar, ps, wave, specmin=0, nspec=nf, xyrange=box,
                                            options=jaxspec.ExtractOptions(bundlesize=nf, nsubbundles=1,
                                                                           nwavestep=len(wave))).flux))
mc = np.std(draws, axis=0, ddof=1)
ratio = mc[:, 5:-5] / sig_psf[:, 5:-5]
print(f"Monte Carlo sigma / propagated sigma: median {np.median(ratio):.3f} "
      f"(expected 1 within ~{1 / np.sqrt(2 * 39):.2f})")
