"""regularize_normal: specter's low-weight / regularisation diagonal, padding, no-weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.solve import SPECTER_MINWEIGHT_FRAC
from jaxspec.solve import regularize_normal as _regularize_normal

regularize_normal = jax.jit(_regularize_normal, static_argnames=("square_lowweight",))


def _setup(seed=0, n=12):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((n, n))
    Q = B @ B.T
    fw = rng.uniform(1.0, 2.0, n)
    fw[[2, 7]] = [1e-3, 0.0]
    return Q, fw


@pytest.mark.parametrize("reg", [0.0, 0.5])
@pytest.mark.parametrize("square", [True, False])
def test_diagonal_terms(reg, square):
    Q, fw = _setup()
    out = np.asarray(regularize_normal(Q, fw, np.ones(12, bool), reg, 0.01, square_lowweight=square))
    minweight = 0.01 * fw.max()
    low = fw < minweight
    if square:  # specter: Idiag = regularize | (minweight - fw); Q += Idiag**2
        extra = np.where(low, (minweight - fw) ** 2, reg**2)
    else:  # gpu_specter: regularize**2 | (minweight - fw)
        extra = np.where(low, minweight - fw, reg**2)
    np.testing.assert_allclose(out, Q + np.diag(extra), rtol=1e-14, atol=1e-14)


def test_padding_decoupled_with_max_real_diagonal():
    Q, fw = _setup()
    valid = np.ones(12, bool)
    valid[[4, 9]] = False
    Qg = Q.copy()
    Qg[4, :] = Qg[:, 4] = 123.0  # garbage in padding must be ignored
    out = np.asarray(regularize_normal(Qg, fw, valid, 0.1))
    ref = np.asarray(regularize_normal(Q[np.ix_(valid, valid)], fw[valid], np.ones(10, bool), 0.1))
    np.testing.assert_array_equal(out[np.ix_(valid, valid)], ref)
    dmax = np.max(np.diag(ref))
    for k in (4, 9):
        row = out[k].copy()
        assert row[k] == dmax
        row[k] = 0
        assert not row.any() and not out[:, k][valid].any()


def test_no_weight_patch_is_positive_definite():
    out = np.asarray(regularize_normal(jnp.zeros((6, 6)), jnp.zeros(6), jnp.ones(6, bool), 0.0))
    np.testing.assert_array_equal(out, np.eye(6))
    assert np.all(np.isfinite(np.linalg.cholesky(out)))


def test_jit_vmap():
    Qs, fws = zip(*[_setup(s) for s in range(3)])
    Qs, fws = np.stack(Qs), np.stack(fws)
    valid = np.ones((3, 12), bool)
    f = jax.jit(jax.vmap(lambda q, w, v: _regularize_normal(q, w, v, 0.2)))
    out = f(Qs, fws, valid)
    for i in range(3):
        np.testing.assert_allclose(out[i], regularize_normal(Qs[i], fws[i], valid[i], 0.2), rtol=1e-15)


def test_specter_minweight_frac_is_specters():
    # specter's ex2d_patch uses minweight = 1e-4 * max(fluxweight) (0.01 only before 2018),
    # and solve_patch defaults to it
    import inspect

    from jaxspec.solve import solve_patch

    assert SPECTER_MINWEIGHT_FRAC == 1e-4
    assert inspect.signature(solve_patch).parameters["minweight_frac"].default == SPECTER_MINWEIGHT_FRAC
