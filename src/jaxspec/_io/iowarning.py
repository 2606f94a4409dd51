"""The file layer's warning class, in a module of its own: no astropy, no NumPy.

The command line routes it to the log (:class:`jaxspec._cli.common.LogWarnings`) before
any file is read, and so before astropy (0.4-1.7 s to import) is imported: that import
then overlaps the start of JAX's backend (docs/performance.md, "Compilation: once per
machine").  :mod:`jaxspec._io.frames` re-exports it.
"""

from __future__ import annotations

__all__ = ["FrameIOWarning"]


class FrameIOWarning(UserWarning):
    """Data were altered on read or write (non-finite or negative ivar masked)."""
