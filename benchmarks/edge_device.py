"""Extract the shared edge cases on the default JAX device and save the results.

The four reference cases of issue 14 (the CCD's top and bottom rows, the first
and last bundles, NSUB 4) are extracted with DESI's settings on whatever device
JAX picks (``JAX_PLATFORMS=cpu`` forces the CPU); flux, ivar, resolution, xflux
and chi2pix are written to ``<out>/<case>.npz``.  ``--compare A B`` then reports
the largest difference between two such folders (GPU against CPU), relative to
each array's largest value.

    .venv/bin/python benchmarks/edge_device.py --out /tmp/edges-cpu            # here
    python3 benchmarks/edge_device.py --data .devdata/h1 --out $OUT              # on the device
    .venv/bin/python benchmarks/edge_device.py --compare /tmp/edges-cpu <files_at>
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("PJRT_NPROC", str(2 * (os.cpu_count() or 1)))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

CASES = [
    "specter-r0-51060-f475-499-edge.fits",
    "specter-r0-67784-f200-224-edge.fits",
    "specter-r0-67784-f000-024-edge.fits",
    "specter-r0-51060-f060-084-nsub4.fits",
]
KEYS = ("flux", "ivar", "resolution", "xflux", "chi2pix")
SHARED = Path(__file__).resolve().parents[2] / "shared"


def _find(data: Path | None, name: str, sub: str) -> Path:
    for d in ([data] if data else []) + [SHARED / sub]:
        if d is not None and (d / name).exists():
            return d / name
    raise FileNotFoundError(f"{name}: not in {data} nor {SHARED / sub}")


def run(data: Path | None, out: Path) -> None:
    from astropy.io import fits

    import jaxspec

    out.mkdir(parents=True, exist_ok=True)
    print(f"device: {jax.devices()[0]} (jax {jax.__version__})")
    for name in CASES:
        with fits.open(_find(data, name, "reference")) as h:
            hdr = dict(h[0].header)
            d = {k: np.asarray(h[k].data, dtype=float) for k in ("IMAGE", "IVAR", "WAVELENGTH", "REF_FLUX", "REF_IVAR")}
        psf = jaxspec.read_psf(_find(data, hdr["PSF"], "data/psf"))
        opts = jaxspec.ExtractOptions(nwavestep=hdr["WAVESIZE"], nsubbundles=hdr["NSUB"])
        t0 = time.perf_counter()
        ex = jaxspec.extract(d["IMAGE"], d["IVAR"], psf, d["WAVELENGTH"], specmin=hdr["SPECMIN"],
                             nspec=hdr["NSPEC"], xyrange=(hdr["XMIN"], hdr["XMAX"], hdr["YMIN"], hdr["YMAX"]),
                             options=opts)
        res = {k: np.asarray(getattr(ex, k)) for k in KEYS}
        dt = time.perf_counter() - t0
        dsig = np.abs(res["flux"] - d["REF_FLUX"]) * np.sqrt(d["REF_IVAR"])
        np.savez(out / (Path(name).stem + ".npz"), **res)
        print(f"{name}: {dt:.1f} s; vs specter: {np.mean(dsig < 0.01):.4%} within 0.01 sigma, max {dsig.max():.2e}, "
              f"NaN {sum(int(np.isnan(v).sum()) for v in res.values())}")


def compare(a: Path, b: Path) -> float:
    worst = 0.0
    for name in CASES:
        fa, fb = np.load(a / (Path(name).stem + ".npz")), np.load(b / (Path(name).stem + ".npz"))
        parts = []
        for k in KEYS:
            scale = max(float(np.abs(fa[k]).max()), 1e-300)
            rel = float(np.abs(fa[k] - fb[k]).max()) / scale
            worst = max(worst, rel)
            parts.append(f"{k} {rel:.1e}")
        print(f"{name}: max |A - B| / max |A|: " + ", ".join(parts))
    print(f"largest: {worst:.2e} ({'within' if worst <= 1e-10 else 'NOT within'} 1e-10)")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="folder holding the reference files and PSFs")
    ap.add_argument("--out", type=Path, help="folder for the .npz results")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = ap.parse_args()
    if args.compare:
        compare(*args.compare)
    else:
        run(args.data, args.out)


if __name__ == "__main__":
    main()
