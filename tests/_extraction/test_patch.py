"""The CPU kernel's helpers: the BLAS thread limit and the chunk size."""

import jax
import numpy as np

from jaxspec._extraction import patch


def test_blas_threads_limits_and_restores_the_count():
    import scipy.linalg

    scipy.linalg.cholesky(np.eye(3))  # scipy's BLAS loaded
    controls = patch._blas_thread_controls()
    before = [get() for _, get in controls]
    with patch.blas_threads(1):
        assert all(get() == 1 for _, get in controls)
    assert [get() for _, get in controls] == before
    # restored on an error too, and None leaves everything alone
    try:
        with patch.blas_threads(1):
            raise RuntimeError
    except RuntimeError:
        pass
    assert [get() for _, get in controls] == before
    with patch.blas_threads(None):
        assert [get() for _, get in controls] == before


def test_blas_threads_with_no_known_blas(monkeypatch):
    """A BLAS it does not know (nothing found) is left alone; the block still runs."""
    monkeypatch.setattr(patch, "_blas_thread_controls", lambda: [])
    monkeypatch.setattr(patch, "_has_threadpoolctl", lambda: False)
    ran = []
    with patch.blas_threads(1):
        ran.append(1)
    assert ran == [1]


def test_default_chunk_size():
    expect = 512 if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else 32
    assert patch.default_chunk_size() == expect
