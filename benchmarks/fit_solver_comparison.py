"""jaxspec's Levenberg-Marquardt against optimistix's on one full-model PSF patch.

The same problem for both: a few fibers of psf-r0-00067784 (the truth) over a short
wavelength range, an arc and a flat simulated from it, and the full model (traces,
GHSIGX, GHSIGY and every GH-i-j as fiber x wavelength Legendre series, line fluxes and
flat amplitudes) fitted from another night's PSF (psf-r0-00051060).  Both start from the
same point, the linear parameters already solved at the start PSF (the first thing
jaxspec's solver does), and minimise the same chi2 (``CalibPatch.residuals``).

* jaxspec: ``_fit_patch`` (host LM on the compiled, structured ``J^T W J``: graph-coloured
  forward-mode derivatives, fiber-band products; Marquardt's diagonal damping);
* optimistix: ``optimistix.least_squares`` with ``optimistix.LevenbergMarquardt`` on the
  residual vector (a generic solver: it linearises the residuals and solves each damped
  step with lineax), the whole loop compiled.

Printed per solver: iterations, wall time after compilation (the minimum of ``--repeat``
runs), compilation, the final chi2/dof, and how far each one's parameters are from the
other's in units of jaxspec's uncertainties.

    python benchmarks/fit_solver_comparison.py [--shared ../shared] [--nfib 5] [--wave 6300,6500]
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxspec  # noqa: E402
from jaxspec._fit.params import LIN_KEYS  # noqa: E402
from jaxspec._fit.patch import _normal_equations, calib_patch  # noqa: E402
from jaxspec._fit.solver import _fit_patch, _solve_scaled  # noqa: E402
from jaxspec._simulation.calib import arc_lines, simulate_arc, simulate_flat  # noqa: E402

print = functools.partial(print, flush=True)  # noqa: A001  (progress shows while it runs)


def problem(shared: Path, nf: int, wr: tuple[float, float], trace_deg: int):
    """(patch, meta, theta0): the patch of the comparison and its start (linear parameters solved)."""
    truth = jaxspec.read_psf(shared / "data" / "psf" / "psf-r0-00067784.fits")
    start = jaxspec.read_psf(shared / "data" / "psf" / "psf-r0-00051060.fits")
    lines = arc_lines("r")
    box = list(truth.xyrange((0, nf), (wr[0] - 30.0, wr[1] + 30.0)))
    box = (max(box[0] - 10, 0), box[1] + 10, box[2], box[3])
    arc = simulate_arc(truth, lines, specmin=0, nspec=nf, xyrange=box, seed=1)
    flat = simulate_flat(truth, specmin=0, nspec=nf, xyrange=box, seed=2)
    patch, meta = calib_patch(start, [arc], [flat], lines=lines, fibers=np.arange(nf), waverange=wr,
                              what=("xtrace", "ytrace", "shape"), trace_deg=trace_deg, legdeg_fiber=1,
                              legdeg_wave=1)
    theta = np.zeros(patch.layout.size)
    _, jtj, jtr = (np.asarray(a) for a in _normal_equations(patch, jnp.asarray(theta)))
    active = np.diag(jtj) > 0
    theta = theta + _solve_scaled(jtj, jtr, active & patch.layout.mask(LIN_KEYS))
    return patch, meta, theta


def run_jaxspec(patch, meta, maxiter: int):
    """jaxspec's solver from its own start (it solves the linear parameters first, as above)."""
    t0 = time.perf_counter()
    res = _fit_patch(patch, meta, maxiter=maxiter, callback=lambda *a: None)
    return res, time.perf_counter() - t0


def make_optimistix(patch, theta0, scale, rtol: float, atol: float, max_steps: int):
    """The compiled optimistix fit from ``theta0``: ``() -> (theta, steps, result code)``.

    Its variables are ``u`` with ``theta = theta0 + scale * u`` (``scale`` 1: the plain
    parameters; ``1 / sqrt(diag J^T W J)`` at the start: each of unit curvature, the
    scaling jaxspec's solver applies to every step).
    """
    import optimistix as optx

    def residuals(u, p):
        return p.residuals(p.unflatten(theta0 + scale * u)).reshape(-1)

    solver = optx.LevenbergMarquardt(rtol=rtol, atol=atol)

    @jax.jit
    def fit(p):
        sol = optx.least_squares(residuals, solver, jnp.zeros_like(theta0), args=p, max_steps=max_steps,
                                 throw=False)
        return theta0 + scale * sol.value, sol.stats["num_steps"], sol.result._value

    return lambda: fit(patch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--nfib", type=int, default=5)
    ap.add_argument("--wave", default="6300,6500", help="wavelength range [A], 'wmin,wmax'")
    ap.add_argument("--trace-deg", type=int, default=2)
    ap.add_argument("--maxiter", type=int, default=30, help="jaxspec's most iterations")
    ap.add_argument("--max-steps", type=int, default=1000, help="optimistix's most steps")
    ap.add_argument("--rtol", type=float, default=1e-8, help="optimistix's rtol (and atol)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    wr = tuple(float(v) for v in args.wave.split(","))
    t0 = time.perf_counter()
    patch, meta, theta0 = problem(Path(args.shared), args.nfib, wr, args.trace_deg)
    print(f"problem set up in {time.perf_counter() - t0:.1f} s")
    lay = patch.layout
    npix = int(np.count_nonzero(np.asarray(patch.sqw)))
    print(f"device: {jax.devices()[0]}, jax {jax.__version__}; {args.nfib} fibers, {wr[0]:.0f}-{wr[1]:.0f} A, "
          f"{lay.size} parameters ({int((~lay.mask(LIN_KEYS)).sum())} PSF), {npix} weighted pixels")

    def chi2(theta):
        return float(jaxspec._fit.patch._chi2(patch, jnp.asarray(theta)))

    dof = max(npix - lay.size, 1)
    print(f"start (linear parameters solved): chi2/dof {chi2(theta0) / dof:.4f}")

    # jaxspec: first call compiles, then the minimum of the repeats
    res, first = run_jaxspec(patch, meta, args.maxiter)
    warm = min(run_jaxspec(patch, meta, args.maxiter)[1] for _ in range(args.repeat))
    sig = np.sqrt(np.diag(res.cov))
    print(f"jaxspec LM:    {res.niter:3d} iterations, converged {res.converged}, chi2/dof {res.chi2 / dof:.6f}, "
          f"{warm:.2f} s (first call {first:.2f} s, with compilation)")

    ok = np.isfinite(sig) & (sig > 0)
    _, jtj, _ = (np.asarray(a) for a in _normal_equations(patch, jnp.asarray(theta0)))
    d = np.diag(jtj)
    scales = {"plain": np.ones_like(theta0), "scaled": np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 1.0)}
    for tag, scale in scales.items():
        fit = make_optimistix(patch, jnp.asarray(theta0), jnp.asarray(scale), args.rtol, args.rtol, args.max_steps)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fit())
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fit())
            times.append(time.perf_counter() - t0)
        theta_o, steps, code = (np.asarray(v) for v in out)
        c_o = chi2(theta_o)
        dist = np.abs(theta_o - res.theta)[ok] / sig[ok]
        print(f"optimistix LM ({tag} parameters): {int(steps):3d} steps, result code {int(code)} (0: successful), "
              f"chi2/dof {c_o / dof:.6f}, {min(times):.2f} s (first call {first:.2f} s, with compilation); "
              f"from jaxspec's minimum: chi2 {c_o - res.chi2:+.4g}, parameters median {np.median(dist):.3g}, "
              f"max {dist.max():.3g} sigma")

if __name__ == "__main__":
    main()
