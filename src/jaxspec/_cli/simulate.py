"""``jaxspec simulate`` (a noisy preproc image with truth) and ``jaxspec demo`` (the whole job, no inputs)."""

from __future__ import annotations

import os
import time

from .common import Progress, add_common, parse_wavelength

# ---------------------------------------------------------------- simulate
def cmd_simulate(args) -> int:
    import numpy as np

    from .._io import frames as _frameio
    from .._pipeline.job import wave_grid
    from .._simulation.project import simulate
    from ..psf import read_psf

    _frameio.check_output_path(args.output, args.overwrite)
    psf = read_psf(args.psf)
    nspec = psf.nspec - args.specmin if args.nspec is None else args.nspec
    psf.check_fibers(args.specmin, nspec)
    wave = wave_grid(psf, parse_wavelength(args.wavelength))
    psf.check_wavelengths(wave)
    rng = np.random.default_rng(args.seed)
    flux = continuum_and_lines(wave, nspec, rng)
    image, ivar, _ = simulate(psf, wave, flux, specmin=args.specmin, readnoise=args.readnoise, seed=args.seed)
    header = {"CAMERA": args.camera, "FLAVOR": "science", "NIGHT": 20201214, "EXPID": 1, "EXPTIME": 900.0}
    _frameio.write_preproc(
        args.output, np.asarray(image), np.asarray(ivar), header=header,
        truth=dict(wave=wave, flux=flux, specmin=args.specmin), overwrite=args.overwrite,
    )
    print(f"jaxspec simulate: {nspec} fibers x {len(wave)} wavelengths -> {os.path.abspath(args.output)}")
    return 0


def continuum_and_lines(wave, nspec: int, rng):
    """Smooth continua plus a few emission lines, photons per Angstrom (nspec, nwave)."""
    import numpy as np

    x = (wave - wave.mean()) / (np.ptp(wave) / 2 + 1e-9)
    cont = 60.0 + 40.0 * rng.random((nspec, 1)) * (1 + 0.3 * x[None, :])
    flux = cont.copy()
    nlines = max(3, len(wave) // 60)
    centres = rng.uniform(wave[0], wave[-1], (nspec, nlines))
    amps = rng.uniform(100.0, 1500.0, (nspec, nlines))
    for j in range(nlines):
        flux += amps[:, j:j + 1] * np.exp(-0.5 * ((wave[None, :] - centres[:, j:j + 1]) / 0.9) ** 2)
    return flux


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    import numpy as np

    from .._io import frames as _frameio
    from .._extraction.extract import extract
    from .._simulation.project import simulate
    from ..psf import desi_like_psf

    outdir = os.path.abspath(args.outdir)
    os.makedirs(outdir, exist_ok=True)
    frame_path = os.path.join(outdir, "frame-demo.fits")
    png_path = os.path.join(outdir, "demo.png")
    preproc_path = os.path.join(outdir, "preproc-demo.fits")
    for p in (frame_path, png_path, preproc_path):
        _frameio.check_output_path(p, args.overwrite)

    t0 = time.perf_counter()
    nspec = 25
    wave = 5600.0 + 0.8 * np.arange(300)
    psf = desi_like_psf(nspec=nspec, wmin=wave[0] - 10, wmax=wave[-1] + 10)
    flux = continuum_and_lines(wave, nspec, np.random.default_rng(args.seed))
    xyrange = (0, psf.npix_x, 0, psf.npix_y)
    image, ivar, _ = simulate(psf, wave, flux, readnoise=3.0, seed=args.seed)
    image, ivar = np.asarray(image), np.asarray(ivar)
    _frameio.write_preproc(
        preproc_path, image, ivar, header={"CAMERA": "r0", "FLAVOR": "science"},
        truth=dict(wave=wave, flux=flux, specmin=0), overwrite=args.overwrite,
    )
    print(f"simulated {nspec} fibers x {len(wave)} wavelengths on a {image.shape[0]} x {image.shape[1]} pixel image")
    bar = Progress("demo", args.quiet)
    ex = extract(image, ivar, psf, wave, specmin=0, nspec=nspec, xyrange=xyrange, model=True, progress=bar)
    bar.close()
    _frameio.write_frame(
        frame_path, wave=np.asarray(ex.wave), flux=np.asarray(ex.flux), ivar=np.asarray(ex.ivar),
        resolution=np.asarray(ex.resolution), chi2pix=np.asarray(ex.chi2pix),
        header={"CAMERA": "r0", "FLAVOR": "science"}, specmin=0, input_path=preproc_path,
        psf_path="desi_like_psf()", overwrite=args.overwrite,
    )
    pulls = _pulls(ex, flux)
    from .._plots import plot_extraction

    plot_extraction(png_path, ex, image=image, ivar=ivar, truth=flux, fibers=(0, 12, 24), overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    print(f"extracted in {dt:.1f} s; pulls vs truth: mean {pulls.mean():+.3f}, std {pulls.std():.3f}")
    print(f"frame: {frame_path}")
    print(f"plot:  {png_path}")
    return 0


def _pulls(ex, truth_flux):
    """(flux - R truth) sqrt(ivar), ignoring 10 bins at each end."""
    import numpy as np

    from ..solve import apply_resolution

    conv = np.asarray(apply_resolution(ex.resolution, truth_flux))
    pull = (np.asarray(ex.flux) - conv) * np.sqrt(np.asarray(ex.ivar))
    return pull[:, 10:-10]


def add_parsers(subparsers, common=add_common) -> None:
    """Add ``simulate`` and ``demo`` to ``subparsers``."""
    p = subparsers.add_parser("simulate", help="simulate a preproc image from a PSF",
                              description="Simulate a DESI preproc image (Poisson + read noise) with truth spectra.")
    p.add_argument("--psf", required=True, help="PSF FITS file")
    p.add_argument("-o", "--output", required=True, help="output preproc FITS file")
    p.add_argument("-s", "--specmin", type=int, default=0, help="first fiber (default 0)")
    p.add_argument("-n", "--nspec", type=int, default=None, help="number of fibers (default all)")
    p.add_argument("-w", "--wavelength", default=None, help="wmin,wmax,dw (default: the PSF's range at 0.8 A)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--readnoise", type=float, default=3.0, help="read noise [electrons] (default 3)")
    p.add_argument("--camera", default="r0", help="CAMERA header key (default r0)")
    common(p)
    p.set_defaults(func=cmd_simulate)

    p = subparsers.add_parser("demo", help="simulate, extract and plot a small frame (no inputs needed)",
                              description="The whole job on an embedded default: a DESI-like PSF built in code, "
                                          "25 fibers x 300 wavelengths simulated, extracted, written and plotted.")
    p.add_argument("--outdir", default="jaxspec-demo", help="output folder (default ./jaxspec-demo)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    common(p)
    p.set_defaults(func=cmd_demo)
