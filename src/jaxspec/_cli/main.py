"""The ``jaxspec`` command: extract, extract-batch, simulate, demo, plot, fit-psf, simulate-calib.

Everything a pipeline operator runs.  Each subcommand lives in its own module of this
package and is listed here explicitly.  A run goes: parse -> the subcommand's ``check``
(options and paths, before JAX starts) -> :func:`~jaxspec._cli.common.setup_jax` ->
the work.  Errors of the user's making are one line on stderr and exit status 2 (the
traceback only with ``--loglevel DEBUG``); outputs are written atomically and nothing is
overwritten without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .._version import __version__
from . import batch, extract, fit, plot, simulate
from .common import LogWarnings, UsageError, add_common, cpu_pool_env, setup_jax, setup_logging

log = logging.getLogger("jaxspec")

__all__ = ["UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxspec`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="jaxspec",
        description="Spectro-perfectionism extraction of fiber spectra in JAX (CPU or GPU).",
    )
    parser.add_argument("--version", action="version", version=f"jaxspec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    extract.add_parser(sub, add_common)
    batch.add_parser(sub, add_common)
    simulate.add_parsers(sub, add_common)
    plot.add_parser(sub, add_common)
    fit.add_parser(sub, add_common)
    return parser


def _clean_stale_temps(args: argparse.Namespace) -> None:
    """Remove temporary files a killed run of any command left beside this run's outputs."""
    from .._io.atomic import clean_stale_temps

    outputs = [getattr(args, name, None) for name in ("output", "model", "failures", "summary_json")]
    outputs = [o for o in outputs if isinstance(o, str) and "{" not in o]
    n = clean_stale_temps(outputs)
    if n:
        log.warning("removed %d temporary file(s) left by an interrupted run", n)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    cpu_pool_env()
    parser = build_parser()
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    if args.command is None:
        parser.print_help()
        return 0
    from .._io.atomic import terminate_cleanly

    try:
        setup_logging(args)
        with LogWarnings(), terminate_cleanly():
            _clean_stale_temps(args)
            check = getattr(args, "check", None)
            if check is not None:
                check(args)
            if getattr(args, "needs_jax", True):  # e.g. plot draws files and needs none
                setup_jax(args)
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
