"""What every subcommand shares: the usage error, set-up, the one progress bar, option parsers.

Nothing here imports JAX at module level: ``jaxspec --help`` and an argument error
print before JAX starts (:func:`setup` starts it, once the work is about to begin).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import warnings

from .._extraction.options import DECORRELATE_MODES, ExtractOptions, OptionError, wave_grid_size

log = logging.getLogger("jaxspec")


class UsageError(Exception):
    """A problem with the command line or its inputs, reported without a traceback (exit 2)."""


# ---------------------------------------------------------------- set-up
def cpu_pool_env() -> None:
    """Size XLA's CPU thread pool before JAX starts (the CLI's job, never the library's).

    jaxlib 0.10's batched CPU LAPACK kernels (Cholesky, triangular solves, eigh) wait on
    that pool; with one thread per core, two of them running at once can deadlock on a
    2-core machine.  Twice the cores (``PJRT_NPROC``, unless set) leaves them room.
    """
    os.environ.setdefault("PJRT_NPROC", str(2 * (os.cpu_count() or 1)))


def setup_logging(args: argparse.Namespace) -> None:
    """jaxspec's messages from ``--loglevel`` up; other libraries' from WARNING (all at DEBUG)."""
    level = getattr(logging, str(getattr(args, "loglevel", "INFO")).upper(), logging.INFO)
    logging.basicConfig(level=logging.DEBUG if level <= logging.DEBUG else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(level)


def setup_jax(args: argparse.Namespace) -> None:
    """Device, float64 and the persistent compilation cache: the CLI (never the library) sets JAX's config.

    Called once the inputs have been checked, right before the work starts.  A
    subcommand that sets ``args.jax_in_background`` (``extract``) gets the backend's
    start (the devices, the first transfer: ~0.8 s on a GPU) in a thread,
    :class:`BackendStart` in ``args.jax_start``; it imports what it needs meanwhile
    and calls :func:`wait_jax` before its first use of JAX.
    """
    from .._config import config

    device = getattr(args, "device", None)
    pre = getattr(args, "before_jax", None)
    if pre is not None:  # e.g. extract-batch binds each MPI rank to its GPUs before JAX starts
        pre(args)
    for name, value in getattr(args, "jax_environ", {}).items():  # the subcommand's; the user's own win
        os.environ.setdefault(name, value)
    import jax

    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
        # where JAX already started (in-process use), make the CPU the default device too
        jax.config.update("jax_default_device", jax.devices("cpu")[0])
    jax.config.update("jax_enable_x64", True)
    # XLA:CPU's asynchronous dispatch can deadlock when eager ops queue behind a running
    # program (jax-ml/jax#25861); the CPU gains nothing from it here.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    cache = getattr(args, "compilation_cache", None)
    cache = config().compilation_cache if cache is None else (None if cache.lower() == "off" else cache)
    args.compilation_cache_dir = cache  # the folder in use, or None (e.g. for the exported kernel)
    if cache is not None:
        try:
            os.makedirs(cache, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--compilation-cache {cache}: cannot create the folder ({err.strerror}); "
                             "give another folder or 'off'") from None
        jax.config.update("jax_compilation_cache_dir", cache)
        # every program, the small ones too: a fresh process otherwise recompiles ~40 of
        # them (traces, canvas, stitching), seconds in all (docs/performance.md)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if getattr(args, "jax_in_background", False) and device != "cpu":
        args.jax_start = BackendStart(device)
        return
    if device == "gpu":
        _use_gpu(_gpus())


def _gpus():
    """JAX's GPUs, or the UsageError of ``--device gpu`` without any (returned, not raised)."""
    import jax

    try:
        return jax.devices("gpu")
    except Exception as err:  # RuntimeError, or an assertion inside JAX without any GPU plugin
        return UsageError(
            f"--device gpu: no GPU is available to JAX ({type(err).__name__}: {err}); "
            "install jax[cuda12] or use --device cpu"
        )


def _use_gpu(gpus) -> None:
    import jax

    if isinstance(gpus, UsageError):
        raise gpus
    jax.config.update("jax_default_device", gpus[0])


class BackendStart:
    """JAX's backend started in a thread: the devices (``--device gpu``: the GPUs) and a first transfer.

    Creating the backend's client (the CUDA context, the memory pool) releases the GIL,
    so the main thread's imports (astropy, the PSF readers, the extraction: GIL-bound
    Python) run meanwhile.  JAX's configuration is complete before the thread starts,
    and the main thread uses no JAX before :meth:`wait`, so nothing depends on which
    thread gets there first.
    """

    def __init__(self, device: str | None):
        self.device = device
        self.gpus = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        # not a daemon: an interpreter that exits early waits for the backend's start
        # instead of tearing it down half made
        self._thread = threading.Thread(target=self._run, name="jaxspec-backend-start")
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            import jax
            import numpy as np

            if self.device == "gpu":
                self.gpus = _gpus()
                if isinstance(self.gpus, UsageError):
                    return
            # the process's first transfer (on a GPU: the device's start, ~0.7 s)
            jax.block_until_ready(jax.device_put(np.zeros(1)))
        except BaseException as err:  # re-raised by wait(), in the main thread
            self.error = err
        finally:
            self.seconds = time.perf_counter() - t0

    def wait(self) -> None:
        """Join the start; raise its error (``--device gpu`` without a GPU: the UsageError)."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        if self.device == "gpu":
            _use_gpu(self.gpus)
        log.debug("JAX's backend started in %.2f s (in a thread)", self.seconds)


def wait_jax(args: argparse.Namespace) -> None:
    """Wait for :class:`BackendStart` when :func:`setup_jax` started one (else nothing)."""
    start = getattr(args, "jax_start", None)
    if start is not None:
        args.jax_start = None
        start.wait()


class LogWarnings(warnings.catch_warnings):
    """Inside: warnings (e.g. NaN pixels masked on read, every time) go to the jaxspec log."""

    def __enter__(self):
        out = super().__enter__()
        from .._io.iowarning import FrameIOWarning  # not frames: astropy is imported later, while JAX starts

        warnings.simplefilter("always", FrameIOWarning)

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, FrameIOWarning):
                log.warning("%s", message)
            else:
                log.warning("%s: %s", category.__name__, message)

        warnings.showwarning = show
        return out


class Progress:
    """The one progress bar: tqdm on a terminal (and not --quiet), silent otherwise.

    Called as ``progress(done, total)``, the callback of :func:`jaxspec.extract` and
    of the batch runner.
    """

    def __init__(self, desc: str, quiet: bool, unit: str = "patch"):
        self.bar = None
        self.desc = desc
        self.unit = unit
        self.enabled = not quiet and sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, leave=True, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- parsers
def add_common(p: argparse.ArgumentParser) -> None:
    """Options every subcommand has."""
    p.add_argument("--loglevel", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging level (default INFO)")
    p.add_argument("--device", choices=["cpu", "gpu"], default=None,
                   help="run on the CPU or the GPU (default: JAX's default device)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache folder, or 'off' (default: $JAXSPEC_COMPILATION_CACHE, "
                        "else ~/.cache/jaxspec/jax)")


def parse_wavelength(text: str | None, option: str = "--wavelength") -> tuple[float, float, float] | None:
    """'wmin,wmax,dw' -> (wmin, wmax, dw), checked (finite, increasing, a sane number of bins), or None."""
    if text is None:
        return None
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected three numbers wmin,wmax,dw (e.g. 5760,7620,0.8)") from None
    if len(parts) != 3:
        raise UsageError(f"{option} {text!r}: expected three numbers wmin,wmax,dw (e.g. 5760,7620,0.8)")
    try:
        wave_grid_size(*parts)
    except OptionError as err:
        raise UsageError(f"{option} {text!r}: {err.message}") from None
    return tuple(parts)


def add_extraction_options(p: argparse.ArgumentParser) -> None:
    """The extraction options (fibers, grid, patches), shared by ``extract`` and ``extract-batch``.

    Names and defaults as DESI's ``desi_extract_spectra``; the defaults are
    :class:`~jaxspec._extraction.options.ExtractOptions`'.
    """
    d = ExtractOptions()
    p.add_argument("-w", "--wavelength", default=None,
                   help="wmin,wmax,dw in Angstrom, end point included (default: the camera's grid as desi_proc "
                        "passes it, b 3600,5800,0.8 r 5760,7620,0.8 z 7520,9824,0.8; the PSF's range at 0.8 A "
                        "when the camera is unknown)")
    p.add_argument("-s", "--specmin", type=int, default=0, help="first fiber (default 0)")
    p.add_argument("-n", "--nspec", type=int, default=None, help="number of fibers (default: all of the PSF's)")
    p.add_argument("--bundlesize", type=int, default=d.bundlesize, help=f"fibers per bundle (default {d.bundlesize})")
    p.add_argument("--nsubbundles", type=int, default=d.nsubbundles,
                   help=f"subbundles per bundle (default {d.nsubbundles})")
    p.add_argument("--nwavestep", type=int, default=d.nwavestep,
                   help=f"core wavelength bins per patch (default {d.nwavestep})")
    p.add_argument("--wavepad-frac", type=float, default=d.wavepad_frac,
                   help=f"extra wavelength padding, fraction of the spot (default {d.wavepad_frac})")
    p.add_argument("--pixpad-frac", type=float, default=d.pixpad_frac,
                   help=f"extra pixel rows, fraction of the spot (default {d.pixpad_frac})")
    p.add_argument("-r", "--regularize", type=float, default=d.regularize, help="regularisation (default 0)")
    p.add_argument("--psferr", type=float, default=None, help="fractional PSF error for chi2pix (default: the PSF's)")
    p.add_argument("--decorrelate", choices=list(DECORRELATE_MODES), default=d.decorrelate,
                   help="decorrelation: per fiber (signal, default) or whole patch (full)")
    p.add_argument("--decorrelate-fibers", action="store_true",
                   help="desi_extract_spectra's name of --decorrelate full (not recommended)")
    p.add_argument("--barycentric-correction", action="store_true",
                   help="extract at wave / HELIOCOR and write HELIOCOR (pointing and MJD-OBS from the preproc "
                        "header; astropy, offline)")
    p.add_argument("--no-scores", action="store_true", help="do not write the SCORES table")
    p.add_argument("--strict-mask", action="store_true",
                   help="ivar 0 wherever the preproc MASK is nonzero (default: only desispec's extraction bits "
                        "BAD HOT DEAD SATURATED COSMIC PIXFLATZERO PIXFLATLOW HIGHVAR BADAMP)")
    p.add_argument("--no-gpu", action="store_true", help="desi_extract_spectra's name of --device cpu")
    p.add_argument("-v", "--verbose", action="store_const", const="DEBUG", dest="loglevel", default=argparse.SUPPRESS,
                   help="desi_extract_spectra's name of --loglevel DEBUG")
    for flag, instead in REFUSED_OPTIONS.items():
        p.add_argument(flag, nargs="?", action=_Refused, instead=instead, help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=None, help="patches per compiled call (default by device)")
    p.add_argument("--allow-camera-mismatch", action="store_true",
                   help="extract even when the preproc's CAMERA differs from the PSF's (default: refuse)")


def frame_options(args: argparse.Namespace):
    """The :class:`~jaxspec._pipeline.job.FrameOptions` of the command line, checked (UsageError names the flag).

    desi_extract_spectra's names resolve here: ``--decorrelate-fibers`` to
    ``--decorrelate full`` (with a warning), ``--no-gpu`` to ``--device cpu``.
    """
    from .._pipeline.job import FrameOptions

    decorrelate = args.decorrelate
    if getattr(args, "decorrelate_fibers", False):
        log.warning("--decorrelate-fibers is not recommended (desispec: the full-patch decorrelation mixes "
                    "neighbouring fibers); extracting with --decorrelate full")
        decorrelate = "full"
    if getattr(args, "no_gpu", False):
        if getattr(args, "device", None) == "gpu":
            raise UsageError("--no-gpu with --device gpu: give one of them")
        args.device = "cpu"
    try:
        extraction = ExtractOptions(
            bundlesize=args.bundlesize, nsubbundles=args.nsubbundles, nwavestep=args.nwavestep,
            wavepad_frac=args.wavepad_frac, pixpad_frac=args.pixpad_frac, regularize=args.regularize,
            psferr=args.psferr, decorrelate=decorrelate, chunk_size=args.chunk_size,
        )
        if args.nspec is not None and args.nspec < 1:
            raise OptionError("nspec", args.nspec, "must be a positive number of fibers")
        fibermap = getattr(args, "fibermap", None)
        if fibermap is not None and not os.path.isfile(fibermap):
            raise UsageError(f"--fibermap {fibermap}: no such file")
        return FrameOptions(wavelength=parse_wavelength(args.wavelength), specmin=args.specmin, nspec=args.nspec,
                            extraction=extraction, allow_camera_mismatch=args.allow_camera_mismatch,
                            fibermap=fibermap, barycentric=bool(getattr(args, "barycentric_correction", False)),
                            scores=not getattr(args, "no_scores", False),
                            mask_rule="any" if getattr(args, "strict_mask", False) else "desispec")
    except OptionError as err:
        raise UsageError(err.flag()) from None


#: desi_extract_spectra options jaxspec refuses, with what to use instead.
REFUSED_OPTIONS: dict[str, str] = {
    "--use-specter": "jaxspec is the extraction (it replaces specter and gpu_specter); leave --use-specter out, "
                     "or run desi_extract_spectra for specter itself",
    "--fibermap-first-row": "fibermap rows are matched by their FIBER column (else taken from row --specmin); "
                            "give -f/--fibermap and -s/--specmin",
    "--fibermap-index": "fibermap rows are matched by their FIBER column (else taken from row --specmin); "
                        "give -f/--fibermap and -s/--specmin",
}


class _Refused(argparse.Action):
    """A desi_extract_spectra option jaxspec does not take: an argparse error that says what to use instead."""

    def __init__(self, option_strings, dest, instead: str = "", **kwargs):
        self.instead = instead
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not supported: {self.instead}")
