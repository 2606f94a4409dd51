"""Time evaluating every spot of a full DESI r-camera frame on the CPU.

500 fibers x 2326 wavelengths (5760-7620 A at 0.8 A) of psf-r0-00067784.fits.
Usage: python benchmarks/psf_spots.py [--psf PATH] [--repeat N] [--float32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "psf" / "psf-r0-00067784.fits"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--psf", default=str(DEFAULT))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--float32", action="store_true", help="run in float32 (default float64)")
    args = ap.parse_args()
    if not args.float32:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from jaxspec.psf import read_psf

    psf = read_psf(args.psf)
    wave = jnp.arange(5760.0, 7620.0 + 0.4, 0.8)
    ispec = jnp.arange(psf.nspec)

    @jax.jit
    def all_spots(psf, ispec, wave):
        return psf.spots(ispec[:, None], wave[None, :])

    t0 = time.perf_counter()
    out = jax.block_until_ready(all_spots(psf, ispec, wave))
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = jax.block_until_ready(all_spots(psf, ispec, wave))
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    nspot = out[2].shape[0] * out[2].shape[1]
    print(f"device: {jax.devices()[0]}  dtype: {out[2].dtype}")
    print(f"spots: {out[2].shape} ({nspot} spots, {out[2].nbytes / 1e9:.2f} GB)")
    print(f"compile + first run: {first:.3f} s")
    print(f"median of {args.repeat} runs after compilation: {med:.3f} s "
          f"({med / nspot * 1e9:.1f} ns per spot); min {min(times):.3f} s")


if __name__ == "__main__":
    main()
