"""The one atomic writer: every file jaxspec writes goes through :func:`atomic_write`.

Frames, model images, preproc files, PSF files, PNG figures, job lists, failure
lists and JSON summaries are all published the same way:

* the destination is checked first (:func:`check_output_path`): its folder exists
  and is writable, and an existing file is only replaced with ``overwrite=True``;
* the bytes go to a hidden temporary file beside the destination,
  ``.<name>.<12 hex>.tmp``, created with ``O_EXCL`` and mode 0666 so that the
  umask applies as for any ordinary file (0644 under the usual umask 022);
* the temporary file is flushed, fsynced and then published: with
  ``overwrite=True`` by :func:`os.replace`; otherwise by a hard link, which fails
  if the destination appeared in the meantime (a racing writer), so nothing is
  ever replaced without ``overwrite``;
* on any error, or SIGTERM (:func:`terminate_cleanly`), the temporary file is
  removed; after a SIGKILL the next run of any command removes it
  (:func:`clean_stale_temps`).

Plain Python; nothing here imports JAX or astropy.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import IO

__all__ = ["atomic_write", "check_output_path", "clean_stale_temps", "temp_name", "terminate_cleanly"]

#: The temporary name of a file being written: ``.<name>.<12 hex digits>.tmp``.
_TEMP_RE = r"\.{name}\.[0-9a-f]{{12}}\.tmp"

#: Temporary files being written by this process (removed on SIGTERM).
_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()


def temp_name(path: str) -> str:
    """A fresh temporary name beside ``path`` (absolute), in the writer's pattern."""
    outdir, base = os.path.split(os.path.abspath(path))
    return os.path.join(outdir, f".{base}.{uuid.uuid4().hex[:12]}.tmp")


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> str:
    """Validate an output file path before any work is done.

    Args:
        path: the file to be written.
        overwrite: whether an existing file may be replaced.

    Returns:
        The absolute path, as a string.

    Raises:
        IsADirectoryError: ``path`` is an existing directory.
        FileNotFoundError: the output directory does not exist.
        NotADirectoryError: the parent of ``path`` is not a directory.
        PermissionError: the output directory is not writable.
        FileExistsError: ``path`` exists and ``overwrite`` is False (the
            message says to use --overwrite).
    """
    apath = os.path.abspath(os.fspath(path))
    if os.path.isdir(apath):
        raise IsADirectoryError(f"output path {apath} is a directory, not a file")
    outdir = os.path.dirname(apath)
    if not os.path.exists(outdir):
        raise FileNotFoundError(f"output directory {outdir} does not exist (cannot write {apath})")
    if not os.path.isdir(outdir):
        raise NotADirectoryError(f"output directory {outdir} is not a directory (cannot write {apath})")
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {outdir} is not writable (cannot write {apath})")
    if os.path.lexists(apath) and not overwrite:
        raise FileExistsError(f"output file {apath} already exists; use --overwrite to replace it")
    return apath


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], object],
    *,
    overwrite: bool = False,
) -> str:
    """Write a file atomically: ``write(fh)`` fills a temporary file that is then published.

    Args:
        path: the destination.
        write: called once with a binary file object open for writing.
        overwrite: replace an existing destination (otherwise it is refused, also
            when it appears while ``write`` runs).

    Returns:
        The absolute path written.

    Raises:
        FileExistsError: the destination exists and ``overwrite`` is False.
        OSError: the folder is missing or not writable, or the disk is full (the
            message names the file); the destination is then untouched.
    """
    apath = check_output_path(path, overwrite)
    tmp = temp_name(apath)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with _LIVE_LOCK:
        _LIVE.add(tmp)
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as err:
            raise OSError(err.errno, f"cannot write {apath}: {err.strerror or err}") from err
        _publish(tmp, apath, overwrite)
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(tmp)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return apath


def _publish(tmp: str, apath: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, apath)
        return
    exists = FileExistsError(f"output file {apath} already exists; use --overwrite to replace it")
    try:
        os.link(tmp, apath)  # fails if the destination appeared meanwhile
    except FileExistsError:
        raise exists from None
    except OSError:  # a filesystem without hard links: best effort
        if os.path.lexists(apath):
            raise exists from None
        os.replace(tmp, apath)


def clean_stale_temps(outputs: Iterable[str | os.PathLike]) -> int:
    """Remove temporary files that a killed writer left beside these outputs.

    Only names of the writer's own pattern for exactly these outputs are touched.

    Returns:
        The number of files removed.
    """
    n = 0
    by_dir: dict[str, set[str]] = {}
    for out in outputs:
        d, base = os.path.split(os.path.abspath(os.fspath(out)))
        by_dir.setdefault(d, set()).add(base)
    for d, names in by_dir.items():
        if not os.path.isdir(d):
            continue
        pats = [re.compile(_TEMP_RE.format(name=re.escape(b)) + "$") for b in names]
        for entry in os.listdir(d):
            if entry.startswith(".") and entry.endswith(".tmp") and any(p.match(entry) for p in pats):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(d, entry))
                    n += 1
    return n


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """Inside: SIGTERM removes the temporary files being written and exits with status 143.

    Installed by the commands (main thread only); a no-op elsewhere.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):  # pragma: no cover - exercised through a subprocess test
        with _LIVE_LOCK:
            for tmp in list(_LIVE):
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        os._exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
