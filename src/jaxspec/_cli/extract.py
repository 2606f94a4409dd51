"""``jaxspec extract``: one preproc image and its PSF into a DESI frame file.

The work is the one frame job (:func:`jaxspec._pipeline.job.run_frame`), the same
that ``extract-batch`` runs for each of its frames.  Under ``mpirun``/``srun`` (or
with ``--mpi``) the frame's bundles are split over the ranks and rank 0 writes the
one frame (:func:`jaxspec._pipeline.ranks.run_frame_ranks`).  The options are
desi_extract_spectra's, with its names and defaults (docs/cli.md has the table).

A fresh process starts quickly (docs/performance.md, "Compilation: once per machine"):
once the options and paths are checked, JAX's backend starts in a thread
(:class:`~jaxspec._cli.common.BackendStart`) while the job's modules are imported and
the preproc file is read ahead (:class:`~jaxspec._pipeline.job.ReadAhead`; the PSF and
the options are still checked first); the device's memory is taken as needed
(``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless set), and the kernel comes from its
export in the compilation cache's folder (:mod:`jaxspec._pipeline.exported`), so
nothing is traced that the cache holds compiled.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from .common import Progress, UsageError, add_common, add_extraction_options, frame_options, wait_jax

log = logging.getLogger("jaxspec")


def check(args: argparse.Namespace) -> None:
    """Everything that can be checked before JAX starts: options, paths and the MPI ranks."""
    from .._pipeline.devices import world
    from .._pipeline.job import FrameJob, check_paths

    args._options = frame_options(args)
    args._job = FrameJob(args.input, args.psf, args.output, args.model)
    check_paths(args._job, args.overwrite)
    try:
        args._world = world(args.mpi)
    except RuntimeError as err:
        raise UsageError(f"--mpi {args.mpi}: {err}") from None
    if not args._world.serial:
        args.before_jax = _bind_gpus
    else:  # JAX's backend starts in a thread while cmd_extract imports the job's modules and reads
        args.jax_in_background = True
        # one frame needs ~10 GB of the device, not the 75% JAX takes by default: reserving
        # (and at exit releasing) that pool is seconds of a cold process on a GPU
        args.jax_environ = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def _import_the_job() -> None:
    """The modules a frame job runs (astropy, the PSF readers, the extraction), imported up front.

    Plain Python work (0.7-2 s in a fresh process): :func:`cmd_extract` does it while
    JAX's backend starts in its thread (:class:`~jaxspec._cli.common.BackendStart`),
    instead of after it, inside the first read.
    """
    from .._extraction import extract  # noqa: F401
    from .._io import frames  # noqa: F401
    from ..psf import _io  # noqa: F401


def _bind_gpus(args: argparse.Namespace) -> None:
    """Each rank takes its share of the node's GPUs before JAX starts (nothing on CPU-only nodes)."""
    from .._pipeline.devices import bind_gpus

    if args.device != "cpu":
        bind_gpus(args._world)


def _kernel(args: argparse.Namespace):
    """The kernel exported into the compilation cache's folder (:mod:`jaxspec._pipeline.exported`), or None."""
    folder = getattr(args, "compilation_cache_dir", None)
    if folder is None:
        return None
    from .._pipeline.exported import ExportedSolve

    return ExportedSolve(folder)


def cmd_extract(args: argparse.Namespace) -> int:
    """Run ``jaxspec extract``."""
    from .._extraction.options import OptionError
    from .._pipeline.job import ReadAhead, run_frame

    t0 = time.perf_counter()
    w = getattr(args, "_world", None)
    ranks = w is not None and not w.serial
    _import_the_job()
    # the preproc file (NumPy, astropy) read while the backend starts; prepare() still
    # checks the PSF and the options first and gives the read's errors and warnings after
    ahead = None if ranks else ReadAhead(args._job.image, args._options.mask_rule)
    wait_jax(args)
    bar = Progress(os.path.basename(str(args.input)), args.quiet or (ranks and not w.root))
    try:
        if ranks:
            from .._pipeline.ranks import run_frame_ranks

            info = run_frame_ranks(args._job, args._options, w, overwrite=args.overwrite, progress=bar)
        else:
            info = run_frame(args._job, args._options, overwrite=args.overwrite, progress=bar,
                             solve_chunk=_kernel(args), read_preproc=ahead)
    except OptionError as err:
        raise UsageError(err.flag()) from None
    except RuntimeError as err:  # another rank failed: its message, one line, on this rank too
        from .._pipeline.ranks import RankError

        if not isinstance(err, RankError):
            raise
        raise UsageError(f"another MPI rank failed: {err}") from None
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    if ranks and not w.root:
        return 0
    log.info("wrote %s", info["output"])
    on = f" on {w.size} ranks" if ranks else ""
    print(
        f"jaxspec extract: 1 frame, {info['nspec']} spectra x {info['nwave']} wavelengths in {dt:.1f} s{on} "
        f"({info['nspec'] / dt:.1f} spectra/s) -> {info['output']}"
    )
    return 0


def extract_file(input, psf, output, *, model=None, wavelength=None, specmin=0, nspec=None, overwrite=False,
                 quiet=True, fibermap=None, barycentric=False, scores=True, mask_rule="desispec",
                 **extraction) -> dict:
    """Extract one preproc file with one PSF file into a DESI frame file (``jaxspec extract`` in Python).

    Args:
        input, psf, output, model: the files (``model`` optional).
        wavelength: ``(wmin, wmax, dw)`` [A] or None for the camera's grid (the
            PSF's range when the camera is unknown).
        specmin, nspec: the fibers (``nspec`` None: to the PSF's last).
        overwrite: replace existing outputs.
        quiet: no progress bar.
        fibermap, barycentric, scores, mask_rule: as
            :class:`~jaxspec._pipeline.job.FrameOptions`.
        **extraction: :class:`~jaxspec._extraction.options.ExtractOptions` fields
            (``nwavestep``, ``chunk_size``, ...).

    Returns:
        ``{"output", "nspec", "nwave", "seconds"}``.
    """
    from .._extraction.options import ExtractOptions
    from .._pipeline.job import FrameJob, FrameOptions, run_frame

    options = FrameOptions(wavelength=wavelength, specmin=specmin, nspec=nspec,
                           extraction=ExtractOptions(**extraction), fibermap=fibermap, barycentric=barycentric,
                           scores=scores, mask_rule=mask_rule)
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
    p.add_argument("-f", "--fibermap", default=None,
                   help="file whose FIBERMAP to write into the frame (default: the preproc's, else none); rows "
                        "matched by FIBER, else from row --specmin")
    p.add_argument("--mpi", nargs="?", const="on", choices=["auto", "on", "off"], default="auto",
                   help="split the frame's bundles over MPI ranks, rank 0 writes: auto (default: when started by "
                        "mpirun/srun), on (--mpi alone, as desi_extract_spectra), off")
    add_extraction_options(p)
    common(p)
    p.set_defaults(func=cmd_extract, check=check)
    return p
