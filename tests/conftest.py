"""Shared test set-up: float64 everywhere, and the reference data in ../shared."""

import os
import sys
from pathlib import Path

# helpers shared by test modules in several folders (``import _frames``)
sys.path.insert(0, str(Path(__file__).resolve().parent))

# XLA's CPU pool must outnumber the batched LAPACK kernels that can run at once
# (jaxlib 0.10 deadlocks otherwise on 2 cores); set before JAX starts. The CLI does the same.
os.environ.setdefault("PJRT_NPROC", str(2 * (os.cpu_count() or 1)))
# the commands run in-process here: no persistent compilation cache left behind in ~/.cache
os.environ.setdefault("JAXSPEC_COMPILATION_CACHE", "off")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
# no silent dtype or rank promotion anywhere in the library (as equinox tests itself)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# XLA:CPU's asynchronous dispatch can deadlock when eager ops are queued behind a
# running compiled program (jax-ml/jax#25861; seen here with jax 0.10.2): run synchronously.
jax.config.update("jax_cpu_enable_async_dispatch", False)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXSPEC_SHARED", REPO.parent / "shared"))
PSF_DIR = SHARED / "data" / "psf"
REF_DIR = SHARED / "reference"


def shared_file(*parts: str) -> Path:
    """Path of a file under ../shared, skipping the test cleanly when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not available: {path}")
    return path


@pytest.fixture(scope="session")
def psf_path():
    """Factory: path of a PSF file in ../shared/data/psf (skips when absent)."""
    return lambda name: shared_file("data", "psf", name)


@pytest.fixture(scope="session")
def ref_path():
    """Factory: path of a reference file in ../shared/reference (skips when absent)."""
    return lambda name: shared_file("reference", name)
