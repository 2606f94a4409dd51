"""Extract a sub-image of a CCD in Python and plot the spectra.

Usage::

    python examples/extract_subimage.py PREPROC PSF [--fibers 0 25] [--wave 5800 6000] [-o subimage.png]
    python examples/extract_subimage.py --demo        # no files: a simulated DESI-like image
    python examples/extract_subimage.py --demo --overwrite   # replace an existing subimage.png

Cuts the pixels that fibers ``[fmin, fmax)`` at wavelengths ``[wmin, wmax]`` fall on out of
the preproc image (``psf.xyrange`` gives the box), extracts them with ``xyrange`` telling
jaxspec where the sub-image sits on the CCD, and writes a PNG with the image, model and pull
panels and the spectra with their error bands.  The top and bottom rows of the box also get
light from wavelengths just outside the grid, which the model does not contain: the pull
panel shows it there, and the first and last few bins of each spectrum are less certain.
"""

from __future__ import annotations

import argparse
import os

import jax

jax.config.update("jax_enable_x64", True)  # a script may set JAX's config; the library never does

import numpy as np  # noqa: E402

import jaxspec  # noqa: E402
from jaxspec import plot_extraction  # noqa: E402


def load(args):
    """(image, ivar, psf, truth-or-None) from files, or a simulated full CCD with --demo."""
    if args.demo:
        wave = np.arange(args.wave[0] - 20, args.wave[1] + 20.1, 0.8)
        psf = jaxspec.desi_like_psf(nspec=50, wmin=wave[0] + 5, wmax=wave[-1] - 5)
        wave = wave[(wave >= psf.wmin) & (wave <= psf.wmax)]
        rng = np.random.default_rng(0)
        truth = 80.0 + 40.0 * rng.random((psf.nspec, 1)) + 1500.0 * np.exp(
            -0.5 * ((wave - rng.uniform(wave[0], wave[-1], (psf.nspec, 1))) / 0.9) ** 2)
        image, ivar, _ = jaxspec.simulate(psf, wave, truth, seed=1)
        return image, ivar, psf, dict(wave=wave, flux=truth)
    pre = jaxspec.read_preproc(args.preproc)
    return pre.image, pre.ivar, jaxspec.read_psf(args.psf), pre.truth


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preproc", nargs="?", help="preproc FITS file")
    p.add_argument("psf", nargs="?", help="PSF FITS file")
    p.add_argument("--demo", action="store_true", help="simulate the image instead of reading files")
    p.add_argument("--fibers", type=int, nargs=2, default=(0, 25), metavar=("FMIN", "FMAX"),
                   help="fibers [FMIN, FMAX), a multiple of 25 wide (default 0 25)")
    p.add_argument("--wave", type=float, nargs=2, default=(5700.0, 5780.0), metavar=("WMIN", "WMAX"),
                   help="wavelength range [A] (default 5700 5780)")
    p.add_argument("-o", "--output", default="subimage.png", help="PNG to write (default subimage.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output PNG")
    args = p.parse_args(argv)
    if not args.demo and (args.preproc is None or args.psf is None):
        p.error("give PREPROC and PSF, or --demo")
    if os.path.exists(args.output) and not args.overwrite:  # before any work
        p.error(f"{args.output} exists; use --overwrite to replace it")

    image, ivar, psf, truth = load(args)
    fmin, fmax = args.fibers
    wave = np.arange(args.wave[0], args.wave[1] + 0.4, 0.8)

    # the pixel box that the spots of these fibers and wavelengths cover
    xyrange = xmin, xmax, ymin, ymax = psf.xyrange((fmin, fmax), (wave[0], wave[-1]))
    sub, subivar = image[ymin:ymax, xmin:xmax], ivar[ymin:ymax, xmin:xmax]
    print(f"sub-image {sub.shape} at x {xmin}..{xmax}, y {ymin}..{ymax} of a {image.shape} CCD")

    ex = jaxspec.extract(sub, subivar, psf, wave, specmin=fmin, nspec=fmax - fmin, xyrange=xyrange, model=True)
    flux_true = None
    if truth is not None:  # the truth on the extraction grid, for the plot
        t_wave, t_flux = np.asarray(truth["wave"]), np.asarray(truth["flux"])
        off = int(truth.get("specmin", 0))
        flux_true = np.stack([np.interp(wave, t_wave, t_flux[f - off]) for f in range(fmin, fmax)])
    n = fmax - fmin
    plot_extraction(args.output, ex, image=sub, ivar=subivar, truth=flux_true, fibers=(0, n // 2, n - 1),
                    title=f"fibers {fmin}-{fmax - 1}, {wave[0]:.0f}-{wave[-1]:.0f} A", overwrite=args.overwrite)
    good = np.asarray(ex.ivar) > 0
    print(f"{n} spectra x {len(wave)} wavelengths; median S/N "
          f"{np.median(np.asarray(ex.flux)[good] * np.sqrt(np.asarray(ex.ivar)[good])):.1f}; "
          f"median chi2pix {np.median(np.asarray(ex.chi2pix)):.2f}")
    print(f"plot: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
