"""``jaxspec extract-batch``: many frames across devices and MPI ranks, resumable.

Wired into the command line by :func:`jaxspec._cli.main.build_parser` through
:func:`add_parser`.  The work is done by :func:`jaxspec._pipeline.batch.run_batch` (each
frame the one frame job of :mod:`jaxspec._pipeline.job`); ranks and GPUs come from
:mod:`jaxspec._pipeline.devices`.  Exit status: 0 when every frame was
extracted or skipped, 1 when any failed, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import logging
import os

from .common import Progress, UsageError, add_extraction_options, frame_options

log = logging.getLogger("jaxspec")


_usage_error = UsageError


def _jobs(args):
    from .._pipeline import batch as _batch

    if args.glob is not None:
        if args.lists:
            raise _usage_error("give job list files or --glob, not both")
        if args.psf is None or args.output is None:
            raise _usage_error("--glob needs --psf TEMPLATE and --output TEMPLATE (fields {dir} {name} {stem} {tag})")
        try:
            return _batch.glob_jobs(args.glob, args.psf, args.output)
        except (FileNotFoundError, ValueError) as err:
            raise _usage_error(str(err)) from None
    if not args.lists:
        raise _usage_error("give one or more job list files (lines 'IMAGE PSF OUTPUT') or --glob PATTERN")
    if args.psf is not None or args.output is not None:
        raise _usage_error("--psf and --output are templates for --glob; a job list names them per frame")
    jobs = []
    for path in args.lists:
        try:
            jobs.extend(_batch.read_job_list(path))
        except (FileNotFoundError, ValueError) as err:
            raise _usage_error(str(err)) from None
    if not jobs:
        raise _usage_error(f"no jobs in {', '.join(args.lists)}")
    return jobs


def _check_reports(args, jobs) -> None:
    """``--failures`` and ``--summary-json``: writable, not an input or a job list, not replaced without --overwrite."""
    from .._io.atomic import check_output_path

    inputs = {os.path.abspath(p) for p in (args.lists or [])}
    if jobs:
        inputs |= {os.path.abspath(p) for j in jobs for p in (j.image, j.psf, j.output)}
    for flag, path in (("--failures", args.failures), ("--summary-json", args.summary_json)):
        if path is None:
            continue
        if os.path.abspath(path) in inputs:
            raise _usage_error(f"{flag} {path} is a job list, an input or an output of the batch; choose another name")
        try:
            check_output_path(path, args.overwrite)
        except OSError as err:
            raise _usage_error(f"{flag}: {err}") from None
    if args.failures is not None and args.summary_json is not None and \
            os.path.abspath(args.failures) == os.path.abspath(args.summary_json):
        raise _usage_error("--failures and --summary-json name the same file; choose two names")


def check(args) -> None:
    """Options, the job list and the report paths, before JAX starts (rank 0 reads the list)."""
    args._options = frame_options(args)
    args._jobs = _jobs(args)
    _check_reports(args, args._jobs)


def _bind_before_jax(args) -> None:
    """Give this rank its GPUs (``CUDA_VISIBLE_DEVICES``) before anything starts JAX.

    Called by ``jaxspec._cli.common.setup_jax`` ahead of ``--device``'s JAX calls; idempotent.
    """
    from .._pipeline import devices as _distribute

    if getattr(args, "_world", None) is not None:
        return
    try:
        args._world = _distribute.world(args.mpi)
    except RuntimeError as err:
        raise _usage_error(str(err)) from None
    try:
        if args.gpus_per_rank is not None and args.gpus_per_rank < 1:
            raise _usage_error(f"--gpus-per-rank must be >= 1, got {args.gpus_per_rank}")
        _distribute.bind_gpus(args._world, gpus_per_rank=args.gpus_per_rank, device_map=args.device_map)
    except ValueError as err:
        raise _usage_error(f"--device-map: {err}") from None


def cmd_extract_batch(args) -> int:
    """Run ``jaxspec extract-batch``."""
    from .._pipeline import batch as _batch

    from .._io.atomic import atomic_write

    _bind_before_jax(args)
    w = args._world
    opts = args._options
    jobs = args._jobs if w.root else None
    bar = Progress("extract-batch", args.quiet or not w.root, unit="frame")
    try:
        summary = _batch.run_batch(jobs, opts, overwrite=args.overwrite, overlap=not args.no_overlap, world=w,
                                   progress=bar)
    except ValueError as err:  # bad job list (duplicate outputs, ...)
        raise _usage_error(str(err)) from None
    except BaseException:
        if not w.serial:  # one rank failing must not leave the others waiting
            log.exception("rank %d: batch aborted", w.rank)
            w.comm.Abort(3)
        raise
    finally:
        bar.close()
    if w.root:
        print(summary.text())
        if args.failures is not None:
            failed = summary.failures()
            path = _batch.write_job_list(
                args.failures, [_batch.FrameJob(r["image"], jobs[r["index"]].psf, r["output"]) for r in failed],
                comments=[r["error"] for r in failed], overwrite=args.overwrite,
            )
            print(f"{len(failed)} failed job(s) listed in {path}")
        if args.summary_json is not None:
            data = _batch.summary_json(summary).encode("utf-8")
            atomic_write(args.summary_json, lambda fh: fh.write(data), overwrite=args.overwrite)
    return 1 if summary.failed else 0


def add_parser(subparsers, common) -> argparse.ArgumentParser:
    """Add the ``extract-batch`` subcommand to ``subparsers``; ``common(p)`` adds the shared options."""
    p = subparsers.add_parser(
        "extract-batch", help="extract many frames across GPUs and MPI ranks (resumable)",
        description="Extract many (image, PSF, output) triples: from job list files (one 'IMAGE PSF OUTPUT' "
                    "per line) or --glob with --psf/--output templates.  Outputs that exist are skipped, so a "
                    "killed run resumes where it stopped; a failed frame is recorded and the others go on; "
                    "the exit status is 1 when any failed.  Under mpirun/srun the ranks share the frames "
                    "(see docs/cluster.md).",
        epilog="examples:\n"
               "  jaxspec extract-batch jobs.txt\n"
               "  jaxspec extract-batch --glob 'preproc/preproc-*.fits' --psf 'psf/psf-{tag}.fits' "
               "--output 'frames/frame-{tag}.fits'\n"
               "  srun -n 8 --gpus-per-task 1 jaxspec extract-batch jobs.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("lists", nargs="*", metavar="LIST", help="job list file(s): lines 'IMAGE PSF OUTPUT'")
    p.add_argument("--glob", default=None, metavar="PATTERN", help="preproc files to extract, e.g. 'preproc-*.fits'")
    p.add_argument("--psf", default=None, metavar="TEMPLATE",
                   help="with --glob: PSF path template, fields {dir} {name} {stem} {tag} of the input")
    p.add_argument("-o", "--output", default=None, metavar="TEMPLATE",
                   help="with --glob: output path template, e.g. 'frames/frame-{tag}.fits'")
    add_extraction_options(p)
    p.add_argument("--no-overlap", action="store_true",
                   help="read, extract and write one frame after another (default: reading and writing "
                        "run in threads beside the extraction)")
    p.add_argument("--mpi", choices=["auto", "on", "off"], default="auto",
                   help="use MPI ranks: auto (when started by mpirun/srun, default), on, off")
    p.add_argument("--gpus-per-rank", type=int, default=None,
                   help="GPUs each rank takes (default: the node's GPUs shared out evenly; ranks share a "
                        "GPU when there are more ranks than GPUs)")
    p.add_argument("--device-map", default=None,
                   help="GPU per local rank, e.g. '0,0,1,1' (two ranks per GPU) or '0,1;2,3' (two GPUs each)")
    p.add_argument("--failures", default=None, metavar="FILE",
                   help="write the failed jobs to FILE as a job list (with the errors as comments)")
    p.add_argument("--summary-json", default=None, metavar="FILE",
                   help="write the summary with per-frame timings to FILE (JSON)")
    common(p)
    p.set_defaults(func=cmd_extract_batch, check=check, before_jax=_bind_before_jax, _world=None)
    return p
