"""The ``jaxspec`` command: extract, simulate, demo, plot, fit-psf, extract-batch.

Everything a pipeline operator runs.  Options are checked before any work, with
messages that say what to change; outputs are written to a temporary file and
renamed, and nothing is overwritten without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

from .._version import __version__

log = logging.getLogger("jaxspec")


class UsageError(Exception):
    """A problem with the command line or its inputs, reported without a traceback."""


# ---------------------------------------------------------------- set-up
def _setup(args: argparse.Namespace) -> None:
    """Logging, device and float64: the CLI (never the library) sets JAX's config.

    jaxspec's own messages are shown from ``--loglevel`` up; other libraries' (JAX's
    start-up chatter) only from WARNING, unless ``--loglevel DEBUG``.
    """
    level = getattr(logging, str(getattr(args, "loglevel", "INFO")).upper(), logging.INFO)
    logging.basicConfig(level=logging.DEBUG if level <= logging.DEBUG else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(level)
    device = getattr(args, "device", None)
    pre = getattr(args, "before_jax", None)
    if pre is not None:  # e.g. extract-batch binds each MPI rank to its GPUs before JAX starts
        pre(args)
    import jax

    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
        # where JAX already started (in-process use), make the CPU the default device too
        jax.config.update("jax_default_device", jax.devices("cpu")[0])
    jax.config.update("jax_enable_x64", True)
    # XLA:CPU's asynchronous dispatch can deadlock when eager ops queue behind a running
    # program (jax-ml/jax#25861); the CPU gains nothing from it here.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if device == "gpu":
        try:
            gpus = jax.devices("gpu")
        except Exception as err:  # RuntimeError, or an assertion inside JAX without any GPU plugin
            raise UsageError(
                f"--device gpu: no GPU is available to JAX ({type(err).__name__}: {err}); "
                "install jax[cuda12] or use --device cpu"
            ) from None
        jax.config.update("jax_default_device", gpus[0])


class _LogWarnings(warnings.catch_warnings):
    """Inside: warnings (e.g. NaN pixels masked on read, every time) go to the jaxspec log."""

    def __enter__(self):
        out = super().__enter__()
        from .._io.frames import FrameIOWarning

        warnings.simplefilter("always", FrameIOWarning)

        def show(message, category, filename, lineno, file=None, line=None):
            if category.__name__ == "FrameIOWarning":
                log.warning("%s", message)
            else:
                log.warning("%s: %s", category.__name__, message)

        warnings.showwarning = show
        return out


def _parse_wavelength(text: str | None):
    """'wmin,wmax,dw' -> (wmin, wmax, dw) or None."""
    if text is None:
        return None
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--wavelength {text!r}: expected three numbers wmin,wmax,dw (e.g. 5760,7620,0.8)") from None
    if len(parts) != 3 or parts[2] <= 0 or parts[1] <= parts[0]:
        raise UsageError(f"--wavelength {text!r}: expected wmin,wmax,dw with wmin < wmax and dw > 0")
    return tuple(parts)


def wave_grid(psf, spec: tuple[float, float, float] | None):
    """The extraction grid: ``--wavelength`` or the PSF's common range at 0.8 A."""
    import numpy as np

    if spec is None:
        wmin = np.ceil(psf.wmin_all)
        wmax = np.floor(psf.wmax_all)
        dw = 0.8
    else:
        wmin, wmax, dw = spec
    n = int(np.floor((wmax - wmin) / dw + 1e-6)) + 1
    return wmin + dw * np.arange(n)


class _Progress:
    """A tqdm bar when stderr is a terminal (and not --quiet); silent otherwise."""

    def __init__(self, desc: str, quiet: bool):
        self.bar = None
        self.desc = desc
        self.enabled = not quiet and sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="patch", leave=True, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- extract
def _check_extract_options(args, psf) -> tuple[int, int]:
    """Validate fibers and patch options against the PSF; return (specmin, nspec).

    Every message names the option and says what to change.
    """
    specmin = args.specmin
    if specmin < 0 or specmin >= psf.nspec:
        raise UsageError(f"--specmin {specmin}: the PSF has fibers 0..{psf.nspec - 1}; choose a first fiber in that range")
    nspec = psf.nspec - specmin if args.nspec is None else args.nspec
    if nspec < 1 or specmin + nspec > psf.nspec:
        raise UsageError(
            f"--specmin {specmin} --nspec {nspec} asks for fibers {specmin}..{specmin + nspec - 1} "
            f"but the PSF has fibers 0..{psf.nspec - 1}; use --nspec {psf.nspec - specmin} or less"
        )
    if args.bundlesize < 1:
        raise UsageError(f"--bundlesize {args.bundlesize}: must be a positive number of fibers (DESI: 25)")
    if args.nsubbundles < 1:
        raise UsageError(f"--nsubbundles {args.nsubbundles}: must be positive (DESI: 5)")
    if nspec % args.bundlesize:
        lo = max(args.bundlesize, nspec - nspec % args.bundlesize)
        raise UsageError(
            f"--nspec {nspec} must be a multiple of --bundlesize {args.bundlesize}; "
            f"use --nspec {lo} or change --bundlesize"
        )
    if args.bundlesize % args.nsubbundles:
        raise UsageError(
            f"--bundlesize {args.bundlesize} must be a multiple of --nsubbundles {args.nsubbundles}; "
            f"choose --nsubbundles among {[d for d in range(1, args.bundlesize + 1) if args.bundlesize % d == 0]}"
        )
    if specmin % args.bundlesize:
        log.warning("--specmin %d does not start a bundle of %d fibers", specmin, args.bundlesize)
    if args.nwavestep < 1:
        raise UsageError(f"--nwavestep {args.nwavestep}: must be a positive number of wavelength bins (default 50)")
    for name in ("wavepad_frac", "pixpad_frac", "regularize", "psferr"):
        value = getattr(args, name, None)
        if value is not None and not (value >= 0 and value < float("inf")):
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be a finite number >= 0")
    chunk = getattr(args, "chunk_size", None)
    if chunk is not None and chunk < 1:
        raise UsageError(f"--chunk-size {chunk}: must be a positive number of patches")
    return specmin, nspec


def _same_file(a, b) -> bool:
    a, b = os.path.abspath(os.fspath(a)), os.path.abspath(os.fspath(b))
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _pick_fibermap(fibermap, specmin: int, nspec: int, input):
    """The FIBERMAP rows of fibers specmin..specmin+nspec-1 (desispec slices rows), or None."""
    if fibermap is None:
        return None
    n = len(fibermap)
    if n == nspec:
        return fibermap
    if n >= specmin + nspec:
        return fibermap[specmin:specmin + nspec]
    log.warning(
        "FIBERMAP of %s has %d rows, too few for fibers %d..%d: the frame is written without FIBERMAP",
        input, n, specmin, specmin + nspec - 1,
    )
    return None


def extract_file(
    input, psf, output, *, model=None, wavelength=None, specmin=0, nspec=None, bundlesize=25,
    nsubbundles=5, nwavestep=50, wavepad_frac=0.2, pixpad_frac=0.8, regularize=0.0, psferr=None,
    decorrelate="signal", overwrite=False, quiet=True, chunk_size=None,
):
    """Extract one preproc file with one PSF file into a DESI frame file.

    The function behind ``jaxspec extract`` (and each frame of ``extract-batch``).
    Everything that can be checked is checked before the extraction starts: the
    output paths, the options against the PSF, the input file and its HDUs.
    Returns a dict with the output path, the number of spectra and the seconds spent.
    """
    import numpy as np

    from .._io import frames as _frameio
    from .._extraction.extract import extract
    from ..psf import read_psf

    ns = argparse.Namespace(
        specmin=specmin, nspec=nspec, bundlesize=bundlesize, nsubbundles=nsubbundles, nwavestep=nwavestep,
        wavepad_frac=wavepad_frac, pixpad_frac=pixpad_frac, regularize=regularize, psferr=psferr,
        chunk_size=chunk_size,
    )
    if decorrelate not in ("signal", "full"):
        raise UsageError(f"--decorrelate {decorrelate!r}: choose signal or full")
    t0 = time.perf_counter()
    if not os.path.exists(psf):
        raise UsageError(f"--psf {psf}: no such file")
    if not os.path.exists(input):
        raise UsageError(f"--input {input}: no such file")
    for option, path in (("--output", output), ("--model", model)):
        if path is None:
            continue
        for other_option, other in (("--input", input), ("--psf", psf)):
            if _same_file(path, other):
                raise UsageError(f"{option} {path} is the {other_option} file; choose another output name")
    if model is not None and _same_file(model, output):
        raise UsageError(f"--model {model} is the --output file; choose another name for the model image")
    _frameio.check_output_path(output, overwrite)
    if model is not None:
        _frameio.check_output_path(model, overwrite)
    psf_model = read_psf(psf)
    specmin, nspec = _check_extract_options(ns, psf_model)
    wave = wave_grid(psf_model, wavelength)
    try:
        psf_model.check_wavelengths(wave)
    except ValueError as err:
        raise UsageError(
            f"--wavelength: {err}; choose wmin,wmax inside {psf_model.wmin:.1f},{psf_model.wmax:.1f} "
            f"(or leave --wavelength out for the PSF's common range)"
        ) from None
    pre = _frameio.read_preproc(input)
    ccd = (psf_model.npix_y, psf_model.npix_x)
    if pre.image.shape[0] > ccd[0] or pre.image.shape[1] > ccd[1]:
        raise UsageError(
            f"--input {input}: IMAGE is {pre.image.shape[0]} x {pre.image.shape[1]} pixels, larger than the "
            f"{ccd[0]} x {ccd[1]} CCD of --psf {psf}; is this the PSF of this camera?"
        )
    if pre.image.shape != ccd:
        log.warning("IMAGE of %s is %d x %d pixels, the PSF's CCD %d x %d: treating it as the lower-left "
                    "sub-image (pixels beyond it count as masked)", input, *pre.image.shape, *ccd)
    cam_in = _frameio.header_camera(pre.header)
    cam_psf = _frameio.psf_camera(psf)
    if cam_in and cam_psf and cam_in != cam_psf:
        log.warning("--input %s is camera %s but --psf %s is camera %s", input, cam_in, psf, cam_psf)
    if not np.any(pre.ivar > 0):
        log.warning("%s: every pixel is masked (IVAR 0); the frame will have ivar 0 everywhere", input)
    fibermap = _pick_fibermap(pre.fibermap, specmin, nspec, input)
    xyrange = (0, pre.image.shape[1], 0, pre.image.shape[0])
    log.info("extracting fibers %d-%d, %d wavelengths %.1f-%.1f A from %s",
             specmin, specmin + nspec - 1, len(wave), wave[0], wave[-1], input)
    bar = _Progress(os.path.basename(str(input)), quiet)
    try:
        ex = extract(
            pre.image, pre.ivar, psf_model, wave, specmin=specmin, nspec=nspec, xyrange=xyrange,
            bundlesize=bundlesize, nsubbundles=nsubbundles, wavesize=nwavestep, wavepad_frac=wavepad_frac,
            pixpad_frac=pixpad_frac, regularize=regularize, decorrelate=decorrelate, psferr=psferr,
            model=model is not None, chunk_size=chunk_size, progress=bar,
        )
        flux = np.asarray(ex.flux)
        ivar = np.asarray(ex.ivar)
    finally:
        bar.close()
    dead = np.flatnonzero(~np.any(ivar > 0, axis=1))
    if dead.size:
        log.warning("%d of %d fibers have no unmasked pixels (ivar 0, MASK set in the frame): %s",
                    dead.size, nspec, _ranges(specmin + dead))
    options = dict(
        bundlesize=bundlesize, nsubbundles=nsubbundles, nwavestep=nwavestep, wavepad_frac=wavepad_frac,
        pixpad_frac=pixpad_frac, regularize=regularize,
        psferr=psf_model.psferr if psferr is None else psferr, decorrelate=decorrelate,
    )
    _frameio.write_frame(
        output, wave=np.asarray(ex.wave), flux=flux, ivar=ivar,
        resolution=np.asarray(ex.resolution), chi2pix=np.asarray(ex.chi2pix), fibermap=fibermap,
        header=pre.header, specmin=specmin, input_path=input, psf_path=psf, options=options,
        overwrite=overwrite,
    )
    if model is not None:
        _frameio.write_model(model, np.asarray(ex.model), header=pre.header, overwrite=overwrite)
    return dict(output=os.path.abspath(output), nspec=nspec, nwave=len(wave), seconds=time.perf_counter() - t0)


def _ranges(values) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out = []
    vals = [int(v) for v in values]
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ", ".join(out)


def cmd_extract(args) -> int:
    t0 = time.perf_counter()
    info = extract_file(
        args.input, args.psf, args.output, model=args.model, wavelength=_parse_wavelength(args.wavelength),
        specmin=args.specmin, nspec=args.nspec, bundlesize=args.bundlesize, nsubbundles=args.nsubbundles,
        nwavestep=args.nwavestep, wavepad_frac=args.wavepad_frac, pixpad_frac=args.pixpad_frac,
        regularize=args.regularize, psferr=args.psferr, decorrelate=args.decorrelate,
        overwrite=args.overwrite, quiet=args.quiet, chunk_size=args.chunk_size,
    )
    dt = time.perf_counter() - t0
    log.info("wrote %s", info["output"])
    print(
        f"jaxspec extract: 1 frame, {info['nspec']} spectra x {info['nwave']} wavelengths in {dt:.1f} s "
        f"({info['nspec'] / dt:.1f} spectra/s) -> {info['output']}"
    )
    return 0


# ---------------------------------------------------------------- simulate
def cmd_simulate(args) -> int:
    import numpy as np

    from .._io import frames as _frameio
    from .._simulation.project import simulate
    from ..psf import read_psf

    _frameio.check_output_path(args.output, args.overwrite)
    psf = read_psf(args.psf)
    nspec = psf.nspec - args.specmin if args.nspec is None else args.nspec
    psf.check_fibers(args.specmin, nspec)
    wave = wave_grid(psf, _parse_wavelength(args.wavelength))
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
    bar = _Progress("demo", args.quiet)
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

    plot_extraction(png_path, ex, image=image, ivar=ivar, truth=flux, fibers=(0, 12, 24))
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


# ---------------------------------------------------------------- parser
def add_extraction_options(p: argparse.ArgumentParser) -> None:
    """The established extraction options (fibers and patch geometry), shared by
    ``extract`` and ``extract-batch``; names and defaults as DESI's tools."""
    p.add_argument("-s", "--specmin", type=int, default=0, help="first fiber (default 0)")
    p.add_argument("-n", "--nspec", type=int, default=None, help="number of fibers (default: all of the PSF's)")
    p.add_argument("--bundlesize", type=int, default=25, help="fibers per bundle (default 25)")
    p.add_argument("--nsubbundles", type=int, default=5, help="subbundles per bundle (default 5)")
    p.add_argument("--nwavestep", type=int, default=50, help="wavelength bins per patch (default 50)")
    p.add_argument("--wavepad-frac", type=float, default=0.2,
                   help="extra wavelength padding, fraction of the spot (default 0.2)")
    p.add_argument("--pixpad-frac", type=float, default=0.8, help="extra pixel rows, fraction of the spot (default 0.8)")
    p.add_argument("-r", "--regularize", type=float, default=0.0, help="regularisation (default 0)")
    p.add_argument("--psferr", type=float, default=None, help="fractional PSF error for chi2pix (default: the PSF's)")
    p.add_argument("--decorrelate", choices=["signal", "full"], default="signal",
                   help="decorrelation: per fiber (signal, default) or whole patch (full)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxspec",
        description="Spectro-perfectionism extraction of fiber spectra in JAX (CPU or GPU).",
    )
    parser.add_argument("--version", action="version", version=f"jaxspec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p):
        p.add_argument("--loglevel", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="logging level (default INFO)")
        p.add_argument("--device", choices=["cpu", "gpu"], default=None,
                       help="run on the CPU or the GPU (default: JAX's default device)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")

    p = sub.add_parser("extract", help="extract a preproc image into a DESI frame file",
                       description="Extract the spectra of a DESI preproc image with a PSF into a frame file.")
    p.add_argument("-i", "--input", required=True, help="preproc FITS file (IMAGE, IVAR, MASK, FIBERMAP)")
    p.add_argument("-p", "--psf", required=True, help="PSF FITS file")
    p.add_argument("-o", "--output", required=True, help="output frame FITS file")
    p.add_argument("-m", "--model", default=None, help="also write the model image to this FITS file")
    p.add_argument("-w", "--wavelength", default=None,
                   help="wmin,wmax,dw in Angstrom (default: the PSF's range at 0.8 A)")
    add_extraction_options(p)
    p.add_argument("--chunk-size", type=int, default=None, help="patches per compiled call (default by device)")
    common(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("simulate", help="simulate a preproc image from a PSF",
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

    p = sub.add_parser("demo", help="simulate, extract and plot a small frame (no inputs needed)",
                       description="The whole job on an embedded default: a DESI-like PSF built in code, "
                                   "25 fibers x 300 wavelengths simulated, extracted, written and plotted.")
    p.add_argument("--outdir", default="jaxspec-demo", help="output folder (default ./jaxspec-demo)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    common(p)
    p.set_defaults(func=cmd_demo)

    # the other subcommands, each in its own module (an explicit list: no scan)
    from . import batch, fit, plot

    for module in (batch, fit, plot):
        module.add_parser(sub, common)
    return parser


def cpu_pool_env() -> None:
    """Size XLA's CPU thread pool before JAX starts (the CLI's job, never the library's).

    jaxlib 0.10's batched CPU LAPACK kernels (Cholesky, triangular solves, eigh) wait on
    that pool; with one thread per core, two of them running at once can deadlock on a
    2-core machine.  Twice the cores (``PJRT_NPROC``, unless set) leaves them room.
    """
    os.environ.setdefault("PJRT_NPROC", str(2 * (os.cpu_count() or 1)))


def main(argv: list[str] | None = None) -> int:
    cpu_pool_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        _setup(args)
        with _LogWarnings():
            return int(args.func(args) or 0)
    except (UsageError, FileExistsError, FileNotFoundError, PermissionError, ValueError, OSError) as err:
        # one line for the user (as argparse does), the traceback only at --loglevel DEBUG
        log.debug("jaxspec %s failed", args.command, exc_info=True)
        print(f"jaxspec {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        print("interrupted; no partial output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
