"""Throughput of a full DESI frame extraction (GPU or CPU), float64.

Simulates an r-camera frame (500 fibers, 5760-7620 A at 0.8 A = 2326 bins) through
``psf-r0-00067784.fits`` (``--camera z``: a 2881-bin grid over the PSF's whole range,
~0.78 A steps, the z camera's number of bins), then
extracts it with

* ``ref``: the reference settings (``jaxspec.extract`` defaults: nwavestep 50,
  wavepad_frac 0.2, pixpad_frac 0.8), and
* ``gpu``: the established GPU code's benchmark settings (nwavestep 30,
  wavepad_frac 0, pixpad_frac 0),

and prints, per setting: seconds per frame after compilation (median of
``--repeat`` frames) with the patch geometry given (cut once per PSF, as the
night's pipeline does in its reader threads; ``extract(..., geometry=...)``),
compile time (first call minus a warm call), frames per GPU-hour, the device's peak
memory, and the geometry's own host time (``geom s``: median of 3 cuts on the
default device; ``--geometry-per-frame`` times ``extract`` cutting it in every call
instead, as a lone ``jaxspec.extract`` call does).  ``--check`` extracts a slice (one bundle
x 200 wavelengths) on the accelerator and on the CPU backend and prints the
largest relative difference (must be <= 1e-10).  ``--stages`` times spots /
normal equations / solve (block-band factor and solve, inverse blocks, inverse
square roots) / diagnostics separately on one chunk; ``--scaling`` times three sizes.

Examples::

    python benchmarks/frame_throughput.py                       # full frame, both settings
    python benchmarks/frame_throughput.py --nspec 25 --nwave 200 --settings ref --stages
    python benchmarks/frame_throughput.py --scaling --settings gpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

_HERE = Path(__file__).resolve()
_CANDIDATES = [
    _HERE.parents[1] / ".devdata" / "psf-r0-00067784.fits",
    _HERE.parents[2] / "shared" / "data" / "psf" / "psf-r0-00067784.fits",
]
SETTINGS = {
    "ref": dict(nwavestep=50, wavepad_frac=0.2, pixpad_frac=0.8),
    "gpu": dict(nwavestep=30, wavepad_frac=0.0, pixpad_frac=0.0),
}


def _options(setting: str, chunk_size: int | None = None):
    import jaxspec

    return jaxspec.ExtractOptions(chunk_size=chunk_size, **SETTINGS[setting])


def _default_psf() -> str:
    for p in _CANDIDATES:
        if p.exists():
            return str(p)
    return str(_CANDIDATES[-1])


def make_frame(psf, nspec: int, nwave: int, seed: int = 0):
    """Noisy simulated image of fibers 0..nspec-1 on a wavelength grid of nwave bins."""
    import jaxspec

    wave = 5760.0 + 0.8 * np.arange(nwave)
    if wave[-1] > psf.wmax - 10.0:
        # more bins than the r PSF holds at 0.8 A (the z-camera-sized grid): the same
        # number of bins, spread over the PSF's range
        lo, hi = psf.wmin + 10.0, psf.wmax - 10.0
        wave = lo + (hi - lo) / (nwave - 1) * np.arange(nwave)
    rng = np.random.default_rng(seed)
    # continuum + emission lines, photons / A
    flux = 50.0 + 30.0 * rng.random((nspec, 1)) * np.ones((1, nwave))
    lines = rng.integers(0, nwave, size=40)
    for k in lines:
        flux[:, k] += 2000.0 * rng.random(nspec)
    ny, nx = psf.stamp_shape
    xy = psf.xyrange((0, nspec), wave) if hasattr(psf, "xyrange") else None
    image, ivar, _ = jaxspec.simulate(psf, wave, flux, specmin=0, xyrange=xy, seed=seed)
    return wave, image, ivar, xy


def _peak_bytes() -> int | None:
    try:
        st = jax.devices()[0].memory_stats()
    except Exception:  # CPU backend has none
        return None
    return None if not st else int(st.get("peak_bytes_in_use", 0))


def time_extract(psf, wave, image, ivar, xy, nspec, setting, chunk_size, repeat, geometry_per_frame=False):
    import jaxspec
    from jaxspec._extraction.extract import patch_geometry_for

    opts = _options(setting, chunk_size)
    img = jnp.asarray(image)
    iv = jnp.asarray(ivar)
    geom_times = []
    for _ in range(3):  # the first cut compiles the PSF's small helpers
        t0 = time.perf_counter()
        geom = patch_geometry_for(psf, wave, 0, nspec, opts)
        geom_times.append(time.perf_counter() - t0)
    given = None if geometry_per_frame else geom

    def run():
        ex = jaxspec.extract(img, iv, psf, wave, specmin=0, nspec=nspec, xyrange=xy, options=opts, geometry=given)
        jax.block_until_ready((ex.flux, ex.ivar, ex.resolution, ex.chi2pix))
        return ex

    t0 = time.perf_counter()
    ex = run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ex = run()
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return ex, dict(first_s=first, median_s=med, min_s=float(min(times)), compile_s=first - med,
                    frames_per_hour=3600.0 / med, times=times, geometry_per_frame=geometry_per_frame,
                    geometry_s=float(np.median(geom_times[1:])), geometry_times=geom_times)


def check_slice(psf, setting, nspec=25, nwave=200, chunk_size=None):
    """Largest relative difference between accelerator and CPU on one bundle x nwave."""
    import jaxspec

    wave, image, ivar, xy = make_frame(psf, nspec, nwave, seed=1)
    opts = _options(setting, chunk_size)
    out = {}
    devs = [("default", jax.devices()[0])]
    if jax.devices()[0].platform != "cpu":
        devs.append(("cpu", jax.devices("cpu")[0]))
    for name, dev in devs:
        with jax.default_device(dev):
            p = jax.device_put(psf, dev)
            ex = jaxspec.extract(jax.device_put(jnp.asarray(image), dev), jax.device_put(jnp.asarray(ivar), dev),
                                 p, wave, specmin=0, nspec=nspec, xyrange=xy, options=opts)
            out[name] = {k: np.asarray(getattr(ex, k)) for k in ("flux", "ivar", "resolution", "xflux", "chi2pix")}
    if len(out) == 1:
        return {"note": "CPU only: nothing to compare"}
    res = {}
    for k in out["cpu"]:
        a, b = out["default"][k], out["cpu"][k]
        res[k] = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))
    # where the flux differs most, in units of its error, and how well measured that bin is
    a, b, iv = out["default"]["flux"], out["cpu"]["flux"], out["cpu"]["ivar"]
    d = np.abs(a - b)
    i = np.unravel_index(np.argmax(d), d.shape)
    res["flux_max_sigma"] = float(np.max(d * np.sqrt(iv)))
    res["flux_argmax"] = [int(i[0]), int(i[1])]
    res["flux_argmax_ivar_over_median"] = float(iv[i] / np.median(iv))
    ok = iv > 1e-3 * np.median(iv)
    res["flux_rel_well_measured"] = float(np.max(d[ok]) / np.max(np.abs(b[ok])))
    return res


def stage_times(psf, wave, image, ivar, xy, nspec, setting, chunk_size, repeat, method="eigh", offset_group=None):
    """Time each stage of the per-patch function on the first chunk (block_until_ready)."""
    from jaxspec import patch_geometry
    from jaxspec._extraction.extract import _canvas
    from jaxspec._extraction.patch import _patch_inputs, _round_up, default_chunk_size
    from jaxspec._extraction.projection import gather_box, model_box, normal_equations, pixel_diagnostics
    from jaxspec.solve import band_factor, band_inverse_blocks, band_solve, regularize_band
    from jaxspec.solve._decorrelate import _inv_sqrt_from_precision
    from jaxspec.solve._sqrtm import inv_sqrtm_sym

    kw = SETTINGS[setting]
    geom = patch_geometry(psf, wave, 0, nspec, 25, 5, kw["nwavestep"], kw["wavepad_frac"], kw["pixpad_frac"])
    ny, nx = psf.stamp_shape
    img, ivr, origin = _canvas(jnp.asarray(image), jnp.asarray(ivar), xy, geom, psf)
    nbin = _round_up(geom.nbin, 4)
    box = (_round_up(geom.box_shape[0], 8) + 2 * ny, _round_up(geom.box_shape[1], 8) + 2 * nx)
    img = jnp.pad(img, ((0, box[0] + ny), (0, box[1] + nx)))
    ivr = jnp.pad(ivr, ((0, box[0] + ny), (0, box[1] + nx)))
    inputs = _patch_inputs(geom, origin, (ny, nx), nbin)
    chunk = min(chunk_size or default_chunk_size(), geom.npatch)
    sel = np.arange(chunk) % geom.npatch
    inp = {k: jnp.asarray(v[sel]) for k, v in inputs.items()}
    nf = geom.nfiber

    def spots(inp):
        xmin, ymin, st = psf.spots(inp["fibers"][:, None], inp["wave"][None, :])
        valid = inp["fiber_valid"][:, None] & inp["wave_valid"][None, :]
        st = jnp.where(valid[..., None, None], st, 0.0)
        cy = jnp.clip(ymin - inp["box_ylo"] + ny, 0, box[0] - ny)
        cx = jnp.clip(xmin - inp["box_xlo"] + nx, 0, box[1] - nx)
        return st, cy, cx, valid

    def pixels(inp):
        a = gather_box(img, inp["y0"], inp["x0"], box)
        b = gather_box(ivr, inp["y0"], inp["x0"], box)
        rows = jnp.arange(box[0])[:, None]
        cols = jnp.arange(box[1])[None, :]
        inside = (rows >= ny) & (rows < ny + inp["box_ny"]) & (cols >= nx) & (cols < nx + inp["box_nx"])
        return jnp.where(inside, a, 0.0), jnp.where(inside, b, 0.0)

    def normal(st, cy, cx, valid, a, b):
        return normal_equations(st, cy, cx, valid, a, b, geom.band, geom.fiber_band, offset_group)

    def factor(q, y, fw, valid):  # as solve_patch does it: the block-band factor, then the solve
        v = valid.reshape(-1)
        F = band_factor(regularize_band(q, fw, v, 0.0, 1e-4, True))
        return F, band_solve(F, jnp.where(v, y, 0.0))

    def invblocks(F):
        return band_inverse_blocks(F)

    def isqrt(C):  # as solve_patch does it: eigh of the precision block, or Newton-Schulz
        if method == "eigh":
            return jax.vmap(lambda B: _inv_sqrt_from_precision(B, None))(C)
        return jax.vmap(lambda B: inv_sqrtm_sym(B, method=method))(C)

    def diag(st, cy, cx, xflux, a, b):
        m = model_box(st, cy, cx, xflux.reshape(nf, nbin), box)
        return pixel_diagnostics(st, cy, cx, a, b, m, psf.psferr)

    V = jax.vmap
    fns = {
        "spots": (jax.jit(V(spots)), lambda r: (inp,)),
        "pixels": (jax.jit(V(pixels)), lambda r: (inp,)),
        "normal_equations": (jax.jit(V(normal)), lambda r: (*r["spots"][:4], *r["pixels"])),
        "factor+solve": (jax.jit(V(factor)), lambda r: (*r["normal_equations"], r["spots"][3])),
        "inverse_blocks": (jax.jit(V(invblocks)), lambda r: (r["factor+solve"][0],)),
        "inv_sqrt": (jax.jit(V(isqrt)), lambda r: (r["inverse_blocks"],)),
        "diagnostics": (jax.jit(V(diag)), lambda r: (*r["spots"][:3], r["factor+solve"][1], *r["pixels"])),
    }
    res, out = {}, {}
    for name, (fn, args) in fns.items():
        a = args(res)
        t0 = time.perf_counter()
        res[name] = jax.block_until_ready(fn(*a))
        first = time.perf_counter() - t0
        ts = []
        for _ in range(max(repeat, 3)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t0)
        med = float(np.median(ts))
        out[name] = dict(chunk_s=med, per_patch_us=med / chunk * 1e6,
                         frame_s=med / chunk * geom.npatch, compile_s=first - med)
    meta = dict(npatch=geom.npatch, chunk=chunk, nfiber=nf, nbin=nbin, box=box, band=geom.band,
                fiber_band=geom.fiber_band, offset_group=offset_group)
    return meta, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--psf", default=_default_psf())
    ap.add_argument("--camera", choices=("r", "z"), default="r", help="r: 2326 bins; z: 2881 bins")
    ap.add_argument("--nspec", type=int, default=500)
    ap.add_argument("--nwave", type=int, default=None)
    ap.add_argument("--settings", choices=("ref", "gpu", "both"), default="both")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stages", action="store_true", help="per-stage timing on one chunk")
    ap.add_argument("--stage-method", default="eigh", help="inv_sqrt method in --stages (eigh | newton_schulz)")
    ap.add_argument("--offset-group", type=int, default=None,
                    help="normal equations in --stages: offsets evaluated together (default: the kernel's)")
    ap.add_argument("--no-frame", action="store_true", help="skip the whole-frame timing")
    ap.add_argument("--check", action="store_true", help="accelerator vs CPU on one bundle x 200 bins")
    ap.add_argument("--scaling", action="store_true", help="time 3 sizes (fibers x wavelengths)")
    ap.add_argument("--geometry-per-frame", action="store_true",
                    help="extract cuts the patch geometry in every call (default: cut once, given)")
    ap.add_argument("--json", default=None, help="write all numbers to this file")
    args = ap.parse_args()

    from jaxspec import read_psf

    psf = read_psf(args.psf)
    nwave = args.nwave or (2326 if args.camera == "r" else 2881)
    settings = ["ref", "gpu"] if args.settings == "both" else [args.settings]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, x64 {jax.config.jax_enable_x64}")
    report = dict(device=str(dev.device_kind), jax=jax.__version__, nspec=args.nspec, nwave=nwave, results={})

    if args.check:
        for s in settings:
            r = check_slice(psf, s, chunk_size=args.chunk_size)
            report["results"][f"check_{s}"] = r
            print(f"[check {s}] max relative |accel - cpu| per output: {json.dumps(r)}")

    t0 = time.perf_counter()
    wave, image, ivar, xy = make_frame(psf, args.nspec, nwave)
    print(f"simulated {args.nspec} fibers x {nwave} bins, image {image.shape}, xyrange {xy} "
          f"in {time.perf_counter() - t0:.1f} s")

    rows = []
    for s in settings:
        if args.stages:
            meta, st = stage_times(psf, wave, image, ivar, xy, args.nspec, s, args.chunk_size, args.repeat,
                                   method=args.stage_method, offset_group=args.offset_group)
            report["results"][f"stages_{s}"] = dict(meta=meta, stages=st)
            print(f"[stages {s}] {meta}")
            for name, v in st.items():
                print(f"  {name:18s} {v['per_patch_us']:9.1f} us/patch  -> {v['frame_s']:8.3f} s/frame"
                      f"  (chunk {v['chunk_s'] * 1e3:8.2f} ms, compile {v['compile_s']:.2f} s)")
        if not args.no_frame:
            ex, r = time_extract(psf, wave, image, ivar, xy, args.nspec, s, args.chunk_size, args.repeat,
                                 geometry_per_frame=args.geometry_per_frame)
            r["peak_bytes"] = _peak_bytes()
            r["finite"] = bool(np.isfinite(np.asarray(ex.flux)).all())
            report["results"][f"frame_{s}"] = r
            rows.append((s, r))
        if args.scaling:
            sc = []
            for ns, nw in ((max(25, args.nspec // 4), nwave // 2), (max(25, args.nspec // 2), nwave // 2),
                           (args.nspec, nwave)):
                w2, im2, iv2, xy2 = make_frame(psf, ns, nw, seed=2)
                _, r2 = time_extract(psf, w2, im2, iv2, xy2, ns, s, args.chunk_size, args.repeat)
                sc.append((ns, nw, r2["median_s"]))
                print(f"[scaling {s}] {ns:4d} fibers x {nw:5d} bins: {r2['median_s']:.3f} s "
                      f"({r2['median_s'] / (ns * nw) * 1e6:.3f} us per fiber-bin)")
            report["results"][f"scaling_{s}"] = sc

    if rows:
        how = "cut in every extract call" if args.geometry_per_frame else "cut once per PSF, given to extract"
        print(f"\npatch geometry: {how}")
        print(f"{'setting':8s} {'s/frame':>9s} {'min':>8s} {'frames/GPU-h':>13s} {'compile s':>10s} {'peak GB':>8s}"
              f" {'geom s':>7s}")
        for s, r in rows:
            pk = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 1e9:.2f}"
            print(f"{s:8s} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['frames_per_hour']:13.0f} "
                  f"{r['compile_s']:10.2f} {pk:>8s} {r['geometry_s']:7.3f}   finite={r['finite']}")
        print("established GPU code: 144 frames per GPU-hour (A100), 30.8 s/frame on one H100; target 7200 (0.5 s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
