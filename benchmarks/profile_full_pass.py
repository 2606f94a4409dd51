"""Where one pass of the full-model fit (issue 18, :func:`jaxspec.fit_psf_full`) spends its time.

Sets up the blocks of one bundle (``--nspec`` fibers from fiber 0; 25 fibers over the common
range: 32 blocks, one call of ``--patches-per-call``) from another night's PSF, as
``benchmarks/fit_psf_ccd.py --full`` does, puts the fluxes at their optimum, and times each
compiled piece of a pass on its own (vmapped over the call's blocks, ``block_until_ready``,
median of ``--reps`` after a first call that compiles):

* ``band_jacobian``: the model bands and the band Jacobian ``(nimg, nf, H, Wb, na)``, then
  the rest of ``pair_products`` in three pieces: the weights and ``(nf, R, Wb, na)`` layout,
  the shifted partner bands (the ``pair_cols`` columns that can overlap), the fiber-pair GEMMs;
* ``pair_products``: that and the per-fiber ``J^T r`` and fiber-pair ``J_f^T J_{f+d}`` blocks;
* ``assemble scatter`` / ``assemble einsum``: the blocks onto theta, by the scatter-add this
  module used to do and by the einsums + static gather of ``CalibPatch._assemble``;
* ``normal eq.``: both; ``schur``: the reduced systems of a call (``_schur_chunk``);
* ``trial``: the chi2 of a step (``_trial_chunk``);

and the host's share: the checks and set-up of the bundle's blocks, the per-bundle damped
solves of 750 x 750 systems.  Ceilings: a float64 matrix product and a device copy.
``--fit-nspec N`` then fits fibers ``0 .. N-1`` once per ``--atols`` value (``chi2_atol`` of the
stopping rule; 0: the step rule alone) and prints the benchmark's per-bundle accuracy figures.

    python benchmarks/profile_full_pass.py --psf .devdata/psf-r0-00067784.fits --start .devdata/psf-r0-00051060.fits
"""

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxspec  # noqa: E402
from jaxspec._fit import bundle as fb  # noqa: E402
from jaxspec._simulation.calib import arc_lines, simulate_arc, simulate_flat  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--psf", required=True)
ap.add_argument("--start", required=True)
ap.add_argument("--nspec", type=int, default=25)
ap.add_argument("--wavelength", default=None)
ap.add_argument("--legdeg-wave", type=int, default=None)
ap.add_argument("--trace-deg", type=int, default=None)
ap.add_argument("--patches-per-call", type=int, default=32)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--skip", default="", help="comma-separated stages to leave out")
ap.add_argument("--fit-nspec", type=int, default=0, help="then fit fibers 0..N-1 once per --atols value")
ap.add_argument("--atols", default="0,0.1", help="chi2_atol values of those fits")
ap.add_argument("--maxiter", type=int, default=30)
args = ap.parse_args()
skip = set(filter(None, args.skip.split(",")))


def old_assemble(patch, jtr_f, blocks):
    """The scatter-add assembly the module used before (2026-12-02): every fiber-pair block
    added into the dense n x n J^T J at its theta indices."""
    s = patch.static
    idx_np, wts_np = patch._index_map()
    n = patch.layout.size
    na, nw = blocks.shape[-1], wts_np.shape[-1]
    idx = jnp.asarray(idx_np)
    wts = jnp.asarray(wts_np, blocks.dtype)
    idx_pad = jnp.concatenate([idx, jnp.zeros((s.dmax, na, nw), idx.dtype)])
    wts_pad = jnp.concatenate([wts, jnp.zeros((s.dmax, na, nw), wts.dtype)])
    jtr = jnp.zeros((n,), blocks.dtype).at[idx].add(jtr_f[:, :, None] * wts)
    jtj = jnp.zeros((n, n), blocks.dtype)
    for d in range(s.dmax + 1):
        g = blocks[d]
        ii = idx[:, :, :, None, None]
        jj = idx_pad[d:d + s.nf][:, None, None, :, :]
        gw = g[:, :, None, :, None] * wts[:, :, :, None, None] * wts_pad[d:d + s.nf][:, None, None, :, :]
        jtj = jtj.at[ii, jj].add(gw)
        if d > 0:
            jtj = jtj.at[jj, ii].add(gw)
    return jtj, jtr


def timed(name, fn, *a, reps=args.reps):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*a))
    first = time.perf_counter() - t
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append(time.perf_counter() - t)
    med = float(np.median(ts))
    rows.append((name, first, med, min(ts), max(ts)))
    print(f"  {name:24s} first {first:8.3f} s  median {med * 1e3:9.2f} ms  (min {min(ts) * 1e3:.2f}, "
          f"max {max(ts) * 1e3:.2f})", flush=True)
    return out


rows = []
print(f"device: {jax.devices()[0]}", flush=True)
# ceilings (skipped on a CPU: too slow there)
if jax.devices()[0].platform == "cpu":
    skip |= {"ceilings"}
if "ceilings" not in skip:
    x = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.float64)
    mm = jax.jit(lambda a, b: a @ b)
    timed("dgemm 8192^3", mm, x, y)
    big = jax.random.normal(jax.random.key(2), (2 ** 29,), jnp.float64)  # 4 GiB
    cp = jax.jit(lambda a: a * 1.0000001)
    timed("copy 4 GiB", cp, big)
    del x, y, big
    t_mm, t_cp = rows[0][2], rows[1][2]
    print(f"  -> float64 matmul {2 * 8192 ** 3 / t_mm / 1e12:.1f} TFLOP/s, copy {2 * 2 ** 32 / t_cp / 1e12:.2f} TB/s",
          flush=True)

truth = jaxspec.read_psf(args.psf)
start = jaxspec.read_psf(args.start)
nspec = args.nspec
wr = ((truth.wmin_all, truth.wmax_all) if args.wavelength is None
      else tuple(float(v) for v in args.wavelength.split(",")))
box = truth.xyrange((0, nspec), (wr[0] - 50, wr[1] + 50))
box = (0, min(box[1] + 12, truth.npix_x), max(box[2] - 20, 0), min(box[3] + 20, truth.npix_y))
lines = arc_lines("r")
arc = simulate_arc(truth, lines, specmin=0, nspec=nspec, xyrange=box, seed=1)
flat = simulate_flat(truth, specmin=0, nspec=nspec, xyrange=box, seed=2)
r = fb._resolve(start, waverange=wr, rows_per_block=128, trace_deg=args.trace_deg, shape_terms=None, legdeg_fiber=1,
                legdeg_wave=args.legdeg_wave)
bundles = [np.arange(s, min(s + 25, nspec)) for s in range(0, nspec, 25)]
none = [np.zeros(0, int)] * len(bundles)
for rep in range(2):  # the second: no first-call costs
    t = time.perf_counter()
    for fib in bundles:
        fb._check_bundle(start, [arc], [flat], fib, none[0], lines=lines, waverange=r["waverange"],
                         rows_per_block=128, trace_deg=r["trace_deg"], flat_deg=2, legdeg_fiber=1)
    t_check = time.perf_counter() - t
    t = time.perf_counter()
    chunks, owner, nper, boxes, npix = fb._setup_blocks(
        start, [arc], [flat], bundles, none, lines=lines, waverange=r["waverange"], rows_per_block=128,
        trace_deg=r["trace_deg"], sterms=r["sterms"], legdeg_fiber=1, legdeg_wave=args.legdeg_wave, flat_deg=2,
        patches_per_call=args.patches_per_call)
    jax.block_until_ready(chunks)
    t_setup = time.perf_counter() - t
    print(f"host: {len(bundles)} bundle(s) checked in {t_check:.2f} s, {len(owner)} blocks set up in {t_setup:.2f} s",
          flush=True)
def fit_rules():
    """Fit fibers 0 .. fit_nspec - 1 once per chi2_atol; per bundle the benchmark's accuracy figures."""
    # the stopping rules on a few bundles: the old (step < step_tol or a relative chi2 change) and
    # with chi2_atol; per bundle the benchmark's accuracy figures (100 random points each)
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("jaxspec.fit").setLevel(logging.INFO)
    n = args.fit_nspec
    box = truth.xyrange((0, n), (wr[0] - 50, wr[1] + 50))
    box = (0, min(box[1] + 12, truth.npix_x), max(box[2] - 20, 0), min(box[3] + 20, truth.npix_y))
    arc = simulate_arc(truth, lines, specmin=0, nspec=n, xyrange=box, seed=1)
    flat = simulate_flat(truth, specmin=0, nspec=n, xyrange=box, seed=2)
    for atol in [float(v) for v in args.atols.split(",")]:
        t = time.perf_counter()
        res = jaxspec.fit_psf_full(start, [arc], [flat], lines=lines, specmin=0, nspec=n, waverange=wr,
                                   legdeg_wave=args.legdeg_wave, trace_deg=args.trace_deg, maxiter=args.maxiter,
                                   patches_per_call=args.patches_per_call, chi2_atol=atol,
                                   callback=lambda *a: None)
        el = time.perf_counter() - t
        rng = np.random.default_rng(0)
        print(f"chi2_atol {atol}: {len(res.bundles)} bundles in {el:.1f} s (compilation "
              f"{max(f.compile_seconds for f in res.fits if f is not None):.1f} s)")
        for st, fr in zip(res.bundles, res.fits):
            f = rng.integers(st.fibers[0], st.fibers[-1] + 1, 100)
            w = rng.uniform(wr[0] + 5, wr[1] - 5, 100)
            dx = np.asarray(res.psf.x(f, w) - truth.x(f, w))
            dy = np.asarray(res.psf.y(f, w) - truth.y(f, w))
            xa, ya, a = (np.asarray(v) for v in res.psf.spots(f, w))
            xb, yb, b = (np.asarray(v) for v in truth.spots(f, w))
            same = (xa == xb) & (ya == yb)
            print(f"  bundle {st.bundle:2d}: status {st.status} chi2/dof {st.reduced_chi2:.5f} x rms "
                  f"{np.sqrt(np.mean(dx**2)):.4f} y rms {np.sqrt(np.mean(dy**2)):.4f} px, max |spot diff| "
                  f"{np.abs(a - b)[same].max():.2e}, {None if fr is None else fr.niter} iterations", flush=True)


if "stages" in skip and args.fit_nspec:
    fit_rules()
    raise SystemExit(0)
patch = chunks[0]
C = args.patches_per_call
lay = patch.layout
npsf = lay.slices["pc"].stop
nloc = lay.size - npsf
s = patch.static
print(f"blocks: {s.nf} fibers x {s.H} rows, Wb {s.Wb}, dmax {s.dmax}, {len(s.colors)} colours, theta {lay.size} "
      f"({npsf} PSF), {C} per call", flush=True)
seg = jnp.zeros((C,), jnp.int32)
tg = jnp.zeros((C, npsf))
tl = jnp.zeros((C, nloc))
out = fb._schur_chunk(patch, tg, tl, seg, 2)
tl = tl + out[4]  # the fluxes at their optimum (the PSF columns scale with them)
th = jnp.concatenate([tg, tl], axis=1)


@eqx.filter_jit
def f_bj(p, t):
    return jax.vmap(lambda q, u: q.band_jacobian(q.unflatten(u)))(p, t)


@eqx.filter_jit
def f_pp(p, t):
    return jax.vmap(lambda q, u: q.pair_products(q.unflatten(u)))(p, t)


@eqx.filter_jit
def f_asm_old(p, jl, bl):
    return jax.vmap(old_assemble)(p, jl, bl)


@eqx.filter_jit
def f_asm_new(p, jl, bl):
    return jax.vmap(lambda q, a, b: q._assemble(a, b))(p, jl, bl)


@eqx.filter_jit
def f_ne_old(p, t):
    def one(q, u):
        c, jl, bl = q.pair_products(q.unflatten(u))
        return (c,) + old_assemble(q, jl, bl)
    return jax.vmap(one)(p, t)


@eqx.filter_jit
def f_ne_new(p, t):
    return jax.vmap(lambda q, u: q.normal_equations(q.unflatten(u)))(p, t)


@eqx.filter_jit
def f_elim(a, b):
    def one(a, b):
        agg, agl, all_ = a[:npsf, :npsf], a[:npsf, npsf:], a[npsf:, npsf:]
        d = jnp.diagonal(all_)
        active = d > 0
        sc = jnp.where(active, 1.0 / jnp.sqrt(jnp.where(active, d, 1.0)), 0.0)
        als = all_ * sc[:, None] * sc[None, :] + jnp.diag(jnp.where(active, 0.0, 1.0))
        rhs = jnp.concatenate([agl.T * sc[:, None], (b[npsf:] * sc)[:, None]], axis=1)
        x = jnp.linalg.solve(als, rhs) * sc[:, None]
        return agg - agl @ x[:, :npsf], b[:npsf] - agl @ x[:, npsf]
    return jax.vmap(one)(a, b)


@eqx.filter_jit
def f_layout(p, bands, jac):
    """pair_products' first part: residuals, weights, the (nf, R, Wb, na) layout."""
    def one(q, bands, jac):
        s = q.static
        cols = q._cols()
        resid = (q.data - q._to_image(bands)) * q.sqw
        wfull = s.W + 2 * s.pad
        inside = (cols < wfull)[None, :, None, :]
        cl = jnp.clip(cols, 0, wfull - 1)
        sqw_b = jnp.where(inside, jnp.moveaxis(q.sqw[:, :, cl], 2, 1), 0.0)
        jw = jac * sqw_b[..., None]
        return jnp.moveaxis(jw, 1, 0).reshape(s.nf, -1, s.Wb, jw.shape[-1])
    return jax.vmap(one)(p, bands, jac)


@eqx.filter_jit
def f_shift(p, jf):
    """pair_products' partner bands for d >= 1 (pad + dynamic slices of pair_cols[d] columns)."""
    def one(q, jf):
        s = q.static
        jpad = jnp.pad(jf, ((0, s.dmax), (0, 0), (s.Wb, 0), (0, 0)))
        xl = jnp.concatenate([q.xlo, jnp.full((s.dmax,), q.xlo[-1] + 10 * s.Wb, q.xlo.dtype)])
        out = []
        for d in range(1, s.dmax + 1):
            w = s.pair_cols[d]
            o = jnp.clip(xl[d:d + s.nf] - q.xlo, 0, s.Wb)
            out.append(jax.vmap(lambda jj, oo: jax.lax.dynamic_slice_in_dim(jj, 2 * s.Wb - w - oo, w, axis=1))(
                jpad[d:d + s.nf], o))
        return tuple(out)
    return jax.vmap(one)(p, jf)


@eqx.filter_jit
def f_gemm(p, jf, others):
    """pair_products' fiber-pair products alone (the batched GEMMs)."""
    s = p.static
    out = [jnp.einsum("pfrca,pfrcb->pfab", jf, jf)]
    for d, o in enumerate(others, start=1):
        out.append(jnp.einsum("pfrca,pfrcb->pfab", jf[:, :, :, s.Wb - s.pair_cols[d]:], o))
    return out


print("device, one call of", C, "blocks:", flush=True)
if "bj" not in skip:
    bands, jac = timed("band_jacobian", f_bj, patch, th)
    jf = timed("weights + layout", f_layout, patch, bands, jac)
    del bands, jac
    half = max(C // 2, 1)  # memory: the shifted copies are (dmax + 1) x J
    jf = jf[:half]
    sub = jax.tree.map(lambda v: v[:half], patch)
    others = timed(f"shifted copies /{half}", f_shift, sub, jf)
    g = timed(f"fiber-pair GEMMs /{half}", f_gemm, sub, jf, others)
    nfl = 2 * np.prod(jf.shape) * jf.shape[-1] * sum(patch.static.pair_cols) / patch.static.Wb
    print(f"  GEMMs: {nfl:.3g} flop, {nfl / rows[-1][2] / 1e12:.1f} TFLOP/s; J {jf.nbytes / 1e9:.2f} GB, "
          f"shifted copies {sum(o.nbytes for o in others) / 1e9:.2f} GB ({half} blocks; columns per fiber "
          f"distance {patch.static.pair_cols})", flush=True)
    del jf, others, g, sub
_, jl, bl = timed("pair_products", f_pp, patch, th)
a_old, b_old = timed("assemble scatter", f_asm_old, patch, jl, bl)
a_new, b_new = timed("assemble einsum", f_asm_new, patch, jl, bl)
err = float(jnp.max(jnp.abs(a_new - a_old)) / jnp.max(jnp.abs(a_old)))
errb = float(jnp.max(jnp.abs(b_new - b_old)) / jnp.max(jnp.abs(b_old)))
print(f"  einsum vs scatter assembly: max |diff| / max |J^T J| {err:.2e}, J^T r {errb:.2e}", flush=True)
if "ne_old" not in skip:
    timed("normal eq. (scatter)", f_ne_old, patch, th)
del jl, bl
_, a, b = timed("normal eq. (einsum)", f_ne_new, patch, th)
timed("eliminate fluxes", f_elim, a, b)
timed("schur (call)", fb._schur_chunk, patch, tg, tl, seg, 2)
out = fb._schur_chunk(patch, tg, tl, seg, 2)
dg = jnp.asarray(np.random.default_rng(0).normal(0, 1e-4, (C, npsf)))
timed("trial (call)", fb._trial_chunk, patch, tg, dg, tl, out[3], out[4])

# the per-bundle damped solves and step lengths of one pass (20 bundles of npsf parameters):
# on the host one at a time (as the module did before) and batched on the device (as now)
rng = np.random.default_rng(1)
Bn = 21
M = rng.normal(size=(Bn, npsf, npsf + 50))
S = np.einsum("bij,bkj->bik", M, M)
R = rng.normal(size=(Bn, npsf))
t = time.perf_counter()
for bb in range(Bn - 1):
    d = np.diag(S[bb])
    on = d > 1e-300
    aa = S[bb][np.ix_(on, on)] + 1e-3 * np.diag(d[on])
    sc = 1.0 / np.sqrt(np.diag(aa))
    np.linalg.solve(aa * sc[:, None] * sc[None, :], R[bb, on] * sc)
    sc = 1.0 / np.sqrt(d[on])
    g = np.linalg.solve(S[bb][np.ix_(on, on)] * sc[:, None] * sc[None, :], R[bb, on] * sc)
    np.sqrt(max(float(g @ (R[bb, on] * sc)), 0.0))
t_host = time.perf_counter() - t
print(f"host: {Bn - 1} damped solves + step lengths of {npsf} x {npsf}: {t_host:.3f} s", flush=True)
Sd, Rd, lamd = jnp.asarray(S), jnp.asarray(R), jnp.full((Bn,), 1e-3)
timed("LM steps (device, 21)", fb._lm_steps, Sd, Rd, lamd)
timed("step lengths (device, 21)", fb._distances, Sd, Rd)
print("\nstage                       first [s]   median [ms]   per block [ms]")
for name, first, med, lo, hi in rows:
    nb = int(name.split("/")[-1]) if "/" in name else args.patches_per_call
    per = med / nb * 1e3 if name not in ("dgemm 8192^3", "copy 4 GiB") and "device, 21" not in name else float("nan")
    print(f"{name:26s} {first:9.2f}   {med * 1e3:11.2f}   {per:9.3f}")
print(f"host: checks {t_check:.2f} s + set-up {t_setup:.2f} s for {len(bundles)} bundle(s); solves {t_host:.3f} s "
      f"a pass (20 bundles)")

if args.fit_nspec:
    fit_rules()
