"""The one atomic writer, through every writer that uses it: modes, no overwrite, kills mid-write.

Each writer (frame, model, preproc, PSF, PNG, job list, JSON summary) is run in a
child process that is killed while its bytes are written (SIGKILL or SIGTERM from
inside ``fsync``, i.e. after the data went to the temporary file and before it is
published).  After SIGKILL the destination must not exist and the temporary file
is cleaned by the next command; after SIGTERM nothing is left at all.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from jaxspec._io.atomic import atomic_write, check_output_path, clean_stale_temps

#: Python code that writes ``dest`` with one of the writers.
WRITERS = {
    "frame": """
        import numpy as np
        from jaxspec._io.frames import write_frame
        z = np.zeros((2, 5))
        write_frame(dest, wave=np.arange(5.0), flux=z, ivar=z + 1, resolution=np.zeros((2, 3, 5)))
    """,
    "model": """
        import numpy as np
        from jaxspec._io.frames import write_model
        write_model(dest, np.zeros((4, 4)))
    """,
    "preproc": """
        import numpy as np
        from jaxspec._io.frames import write_preproc
        write_preproc(dest, np.zeros((4, 4)), np.ones((4, 4)))
    """,
    "psf": """
        import jaxspec
        jaxspec.write_psf(dest, jaxspec.desi_like_psf(nspec=5, wmin=5600.0, wmax=5700.0))
    """,
    "png": """
        import numpy as np
        import jaxspec
        from jaxspec._io.frames import write_frame
        z = np.ones((2, 30))
        frame = dest + "-frame.fits"
        write_frame(frame, wave=5600 + np.arange(30.0), flux=z, ivar=z, resolution=np.zeros((2, 3, 30)),
                    overwrite=True)
        from jaxspec._plots import plot_frame
        plot_frame(dest, jaxspec.read_frame(frame))
    """,
    "joblist": """
        from jaxspec._pipeline.batch import FrameJob, write_job_list
        write_job_list(dest, [FrameJob("a.fits", "b.fits", "c.fits")])
    """,
    "json": """
        from jaxspec._io.atomic import atomic_write
        atomic_write(dest, lambda fh: fh.write(b'{"done": 1}'))
    """,
}

_KILLER = """
import os, signal, sys
dest = sys.argv[1]
sig = getattr(signal, sys.argv[2]) if len(sys.argv) > 2 else None
if sig is not None:
    real_fsync = os.fsync
    def fsync(fd):  # kill only while the destination's own temporary file is written
        real_fsync(fd)
        if os.path.basename(os.readlink(f"/proc/self/fd/{{fd}}")).startswith("." + os.path.basename(dest) + "."):
            os.kill(os.getpid(), sig)
    os.fsync = fsync
from jaxspec._io.atomic import terminate_cleanly
with terminate_cleanly():
{body}
"""


def _run(kind: str, dest, sig: str | None = None, umask: int = 0o022):
    body = textwrap.indent(textwrap.dedent(WRITERS[kind]).strip(), "    ")
    code = _KILLER.format(body=body)
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    args = [sys.executable, "-c", code, str(dest)] + ([sig] if sig else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env,
                          preexec_fn=lambda: os.umask(umask))


def _temps(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".tmp"))


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_every_writer_is_atomic(kind, tmp_path):
    dest = tmp_path / f"out-{kind}"
    # written whole, mode 0644 under the usual umask, and never replaced without overwrite
    res = _run(kind, dest)
    assert res.returncode == 0, res.stderr[-3000:]
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o644
    before = dest.read_bytes()
    res = _run(kind, dest)
    assert res.returncode != 0 and "already exists" in res.stderr, res.stderr[-3000:]
    assert dest.read_bytes() == before
    dest.unlink()
    # the umask is respected
    res = _run(kind, dest, umask=0o077)
    assert res.returncode == 0 and stat.S_IMODE(os.stat(dest).st_mode) == 0o600, res.stderr[-3000:]
    dest.unlink()
    # SIGKILL mid-write: no destination; the temporary file is cleaned by the next run
    res = _run(kind, dest, "SIGKILL")
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert not dest.exists()
    left = [f for f in _temps(tmp_path) if f.startswith(f".{dest.name}.")]
    assert len(left) == 1, _temps(tmp_path)
    assert clean_stale_temps([dest]) == 1
    assert not any(f.startswith(f".{dest.name}.") for f in _temps(tmp_path))
    # SIGTERM mid-write: exit 143, nothing left at all
    res = _run(kind, dest, "SIGTERM")
    assert res.returncode == 128 + signal.SIGTERM, (res.returncode, res.stderr[-3000:])
    assert not dest.exists()
    assert [f for f in _temps(tmp_path) if f.startswith(f".{dest.name}.")] == []


def test_a_racing_file_is_not_replaced(tmp_path):
    dest = tmp_path / "x.txt"

    def write(fh):
        fh.write(b"mine")
        dest.write_bytes(b"theirs")  # another writer published meanwhile

    with pytest.raises(FileExistsError, match="already exists; use --overwrite"):
        atomic_write(dest, write)
    assert dest.read_bytes() == b"theirs" and _temps(tmp_path) == []
    atomic_write(dest, lambda fh: fh.write(b"mine"), overwrite=True)
    assert dest.read_bytes() == b"mine"


def test_a_failed_write_leaves_nothing(tmp_path):
    dest = tmp_path / "x.txt"

    def write(fh):
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=f"cannot write {dest}: No space left on device"):
        atomic_write(dest, write)
    assert not dest.exists() and _temps(tmp_path) == []


def test_output_path_checks(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "x.fits")
    with pytest.raises(IsADirectoryError):
        check_output_path(tmp_path)
    (tmp_path / "x.fits").write_bytes(b"")
    with pytest.raises(FileExistsError, match="use --overwrite"):
        check_output_path(tmp_path / "x.fits")
    assert check_output_path(tmp_path / "x.fits", overwrite=True) == str(tmp_path / "x.fits")


def test_only_our_own_temp_names_are_cleaned(tmp_path):
    dest = tmp_path / "frame.fits"
    ours = tmp_path / ".frame.fits.0123456789ab.tmp"
    other = [tmp_path / ".frame.fits.tmp", tmp_path / ".other.fits.0123456789ab.tmp", tmp_path / "frame.fits.tmp"]
    for f in [ours, *other]:
        f.write_bytes(b"")
    assert clean_stale_temps([dest]) == 1
    assert not ours.exists() and all(f.exists() for f in other)


def test_a_full_disk_is_a_clean_error(tmp_path):
    """A frame larger than the file-size limit (as a full disk): OSError naming the file, nothing left."""
    code = textwrap.dedent("""
        import resource, signal, sys
        import numpy as np
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        from jaxspec._io.frames import write_frame
        z = np.zeros((20, 500))
        try:
            write_frame(sys.argv[1], wave=np.arange(500.0), flux=z, ivar=z + 1, resolution=np.zeros((20, 11, 500)))
        except OSError as err:
            print("OSError:", err)
    """)
    dest = tmp_path / "frame.fits"
    res = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"cannot write {dest}: File too large" in res.stdout, res.stdout
    assert not dest.exists() and _temps(tmp_path) == []
