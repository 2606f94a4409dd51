"""resolution_diagonals: DESI banded convention."""

import jax
import numpy as np
import pytest
import scipy.sparse

from jaxspec.solve import resolution_diagonals, resolution_offsets


@pytest.mark.parametrize("m,ndiag", [(12, 3), (5, 4), (9, 0)])
def test_against_loop_and_dia_matrix(specter, m, ndiag):
    rng = np.random.default_rng(m)
    R = rng.standard_normal((m, m))
    d = np.asarray(resolution_diagonals(R, ndiag))
    assert d.shape == (2 * ndiag + 1, m)
    np.testing.assert_array_equal(d, specter.diagonals(R, ndiag))
    band = scipy.sparse.dia_matrix((d, resolution_offsets(ndiag)), shape=(m, m)).toarray()
    i, j = np.indices((m, m))
    np.testing.assert_array_equal(band, np.where(np.abs(i - j) <= ndiag, R, 0.0))


def test_vmap():
    R = np.random.default_rng(0).standard_normal((4, 10, 10))
    out = jax.vmap(lambda r: resolution_diagonals(r, 2))(R)
    for b in range(4):
        np.testing.assert_array_equal(out[b], resolution_diagonals(R[b], 2))
