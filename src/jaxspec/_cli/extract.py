"""``jaxspec extract``: one preproc image and its PSF into a DESI frame file.

The work is the one frame job (:func:`jaxspec._pipeline.job.run_frame`), the same
that ``extract-batch`` runs for each of its frames.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from .common import Progress, UsageError, add_common, add_extraction_options, frame_options

log = logging.getLogger("jaxspec")


def check(args: argparse.Namespace) -> None:
    """Everything that can be checked before JAX starts: options and paths."""
    from .._pipeline.job import FrameJob, check_paths

    args._options = frame_options(args)
    args._job = FrameJob(args.input, args.psf, args.output, args.model)
    check_paths(args._job, args.overwrite)


def cmd_extract(args: argparse.Namespace) -> int:
    """Run ``jaxspec extract``."""
    from .._extraction.options import OptionError
    from .._pipeline.job import run_frame

    t0 = time.perf_counter()
    bar = Progress(os.path.basename(str(args.input)), args.quiet)
    try:
        info = run_frame(args._job, args._options, overwrite=args.overwrite, progress=bar)
    except OptionError as err:
        raise UsageError(err.flag()) from None
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    log.info("wrote %s", info["output"])
    print(
        f"jaxspec extract: 1 frame, {info['nspec']} spectra x {info['nwave']} wavelengths in {dt:.1f} s "
        f"({info['nspec'] / dt:.1f} spectra/s) -> {info['output']}"
    )
    return 0


def extract_file(input, psf, output, *, model=None, wavelength=None, specmin=0, nspec=None, overwrite=False,
                 quiet=True, **extraction) -> dict:
    """Extract one preproc file with one PSF file into a DESI frame file (``jaxspec extract`` in Python).

    Args:
        input, psf, output, model: the files (``model`` optional).
        wavelength: ``(wmin, wmax, dw)`` [A] or None for the PSF's range.
        specmin, nspec: the fibers (``nspec`` None: to the PSF's last).
        overwrite: replace existing outputs.
        quiet: no progress bar.
        **extraction: :class:`~jaxspec._extraction.options.ExtractOptions` fields
            (``nwavestep``, ``chunk_size``, ...).

    Returns:
        ``{"output", "nspec", "nwave", "seconds"}``.
    """
    from .._extraction.options import ExtractOptions
    from .._pipeline.job import FrameJob, FrameOptions, run_frame

    options = FrameOptions(wavelength=wavelength, specmin=specmin, nspec=nspec,
                           extraction=ExtractOptions(**extraction))
    bar = Progress(os.path.basename(str(input)), quiet)
    try:
        return run_frame(FrameJob(str(input), str(psf), str(output), None if model is None else str(model)),
                         options, overwrite=overwrite, progress=bar)
    finally:
        bar.close()


def add_parser(subparsers, common=add_common) -> argparse.ArgumentParser:
    """Add ``extract`` to ``subparsers``."""
    p = subparsers.add_parser("extract", help="extract a preproc image into a DESI frame file",
                              description="Extract the spectra of a DESI preproc image with a PSF into a frame file.")
    p.add_argument("-i", "--input", required=True, help="preproc FITS file (IMAGE, IVAR, MASK, FIBERMAP)")
    p.add_argument("-p", "--psf", required=True, help="PSF FITS file")
    p.add_argument("-o", "--output", required=True, help="output frame FITS file")
    p.add_argument("-m", "--model", default=None, help="also write the model image to this FITS file")
    add_extraction_options(p)
    common(p)
    p.set_defaults(func=cmd_extract, check=check)
    return p
