"""Time ``patch_geometry`` for a full DESI r frame (host NumPy, per PSF).

500 fibers x 2326 wavelengths (5760-7620 A at 0.8 A), DESI's patch sizes (bundles
of 25, 5 subbundles, 50 bins per block), PSF ``psf-r0-00067784.fits``; every call
gets a fresh PSF object (no per-PSF cache can help).  One warm-up call (JAX
compiles the trace evaluations), then the median of ``--repeat`` calls.

    .venv/bin/python benchmarks/geometry.py [--psf PATH] [--repeat 5]

Run it against another checkout's code with ``PYTHONPATH=<checkout>/src``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

import jaxspec  # noqa: E402
from jaxspec._extraction.geometry import patch_geometry  # noqa: E402

SHARED = Path(os.environ.get("JAXSPEC_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--psf", default=str(SHARED / "data" / "psf" / "psf-r0-00067784.fits"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    psf0 = jaxspec.read_psf(args.psf)
    wave = 5760.0 + 0.8 * np.arange(2326)

    def once() -> tuple[float, object]:
        psf = jax.tree_util.tree_map(lambda a: a, psf0)  # a fresh PSF object
        t0 = time.perf_counter()
        geom = patch_geometry(psf, wave, 0, 500, bundlesize=25, nsubbundles=5, nwavestep=50)
        return time.perf_counter() - t0, geom

    once()  # warm-up: compiles the trace evaluations
    times = []
    for _ in range(args.repeat):
        dt, geom = once()
        times.append(dt)
    print(f"patch_geometry, 500 fibers x {len(wave)} wavelengths, {geom.npatch} patches: "
          f"median {statistics.median(times):.3f} s, min {min(times):.3f} s over {args.repeat} calls "
          f"(jax {jax.__version__}, {jax.default_backend()})")
    print(f"  box_shape {geom.box_shape}, nbin {geom.nbin}, band {geom.band}, fiber_band {geom.fiber_band}, "
          f"box checksum {int(np.asarray(geom.box, dtype=np.int64).sum())}")


if __name__ == "__main__":
    main()
