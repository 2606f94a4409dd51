"""CPU time of jaxspec on the specter reference cases, next to specter's own (EXTIME).

Each case (25 fibers x 200 wavelengths of psf-r0-00067784.fits) is extracted
``--repeat`` + 1 times: the first call includes compilation; the median and the
minimum of the others are the warm times compared with the EXTIME that specter
recorded on the same machine class (on a shared machine, quote the minimum).

    python benchmarks/reference_cases.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_enable_async_dispatch", False)  # see docs/precision.md

import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402

import jaxspec  # noqa: E402

CASES = ("specter-r0-67784-f000-024.fits", "specter-r0-67784-f100-124.fits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    shared = Path(args.shared)
    psf = jaxspec.read_psf(shared / "data" / "psf" / "psf-r0-00067784.fits")
    print(f"device: {jax.devices()[0]}, jax {jax.__version__}")
    for name in CASES:
        with fits.open(shared / "reference" / name) as h:
            hdr = h[0].header
            img = h["IMAGE"].data.astype(float)
            ivar = h["IVAR"].data.astype(float)
            wave = h["WAVELENGTH"].data.astype(float)
        xy = (hdr["XMIN"], hdr["XMIN"] + img.shape[1], hdr["YMIN"], hdr["YMIN"] + img.shape[0])
        times = []
        for _ in range(args.repeat + 1):
            t0 = time.perf_counter()
            ex = jaxspec.extract(img, ivar, psf, wave, specmin=hdr["SPECMIN"], nspec=hdr["NSPEC"], xyrange=xy)
            jax.block_until_ready(ex.flux)
            times.append(time.perf_counter() - t0)
        warm = float(np.median(times[1:]))
        best = float(min(times[1:]))
        spec = float(hdr["EXTIME"])
        # on a shared machine the minimum is the figure (the median carries the neighbours' load)
        print(f"{name}: first (with compilation) {times[0]:.2f} s, warm median {warm:.2f} s, min {best:.2f} s; "
              f"specter {spec:.2f} s -> {spec / warm:.1f}x faster (median), {spec / best:.1f}x (min)")


if __name__ == "__main__":
    main()
