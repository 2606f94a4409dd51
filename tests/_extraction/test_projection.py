"""The sparse assembly of the normal equations equals the dense A^T W A."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec._extraction.projection import model_box, normal_equations, pixel_diagnostics
from jaxspec.solve import dense_from_band


def _random_patch(seed, nf=3, nk=12, ny=5, nx=7, shape=(40, 30)):
    rng = np.random.default_rng(seed)
    stamps = rng.random((nf, nk, ny, nx))
    stamps /= stamps.sum(axis=(2, 3), keepdims=True)
    # traces: fiber columns 4 px apart, ~1.4 rows per bin, with jitter
    cx = (nx + 2 + 4 * np.arange(nf))[:, None] + rng.integers(0, 2, (nf, nk))
    cy = (ny + (1.4 * np.arange(nk)).astype(int))[None, :] + rng.integers(0, 2, (nf, nk))
    valid = np.ones((nf, nk), bool)
    valid[-1, -2:] = False
    image = rng.normal(size=shape)
    ivar = rng.random(shape) + 0.5
    ivar[:ny, :] = 0  # margin rows carry no weight
    return stamps, cy, cx, valid, image, ivar


def _dense_a(stamps, cy, cx, valid, shape):
    nf, nk, ny, nx = stamps.shape
    a = np.zeros(shape + (nf * nk,))
    for f in range(nf):
        for k in range(nk):
            if valid[f, k]:
                a[cy[f, k]:cy[f, k] + ny, cx[f, k]:cx[f, k] + nx, f * nk + k] = stamps[f, k]
    return a.reshape(-1, nf * nk)


@pytest.mark.parametrize("group", [None, 1, 7])
@pytest.mark.parametrize("fiber_band", [None, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_normal_equations_match_dense(seed, fiber_band, group):
    # fibers 4 px apart, 7-px stamps: only neighbours share pixels, so fiber_band 1 is exact
    stamps, cy, cx, valid, image, ivar = _random_patch(seed)
    a = _dense_a(stamps, cy, cx, valid, image.shape)
    w = ivar.ravel()
    q_ref = a.T @ (w[:, None] * a)
    y_ref = a.T @ (w * image.ravel())
    fw_ref = (w[:, None] * a).sum(axis=0)
    band = 5  # 1.4 rows per bin, 5-row stamps: 4 bins apart can still share a row
    fn = jax.jit(normal_equations, static_argnums=(6, 7, 8))
    qb, y, fw = fn(stamps, cy, cx, valid, image, ivar, band, fiber_band, group)
    nf = stamps.shape[0]
    assert qb.shape == (nf, (nf - 1 if fiber_band is None else fiber_band) + 1) + stamps.shape[1:2] * 2
    np.testing.assert_allclose(dense_from_band(qb), q_ref, atol=1e-13)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(fw, fw_ref, rtol=1e-12, atol=1e-13)
    assert np.all(np.asarray(qb)[0, 1:] == 0)  # blocks before the first fiber: unused, zero


def test_model_and_diagnostics_match_dense():
    stamps, cy, cx, valid, image, ivar = _random_patch(3)
    stamps = np.where(valid[..., None, None], stamps, 0.0)
    a = _dense_a(stamps, cy, cx, valid, image.shape)
    flux = np.random.default_rng(4).random(stamps.shape[:2])
    model = model_box(stamps, cy, cx, flux, image.shape)
    np.testing.assert_allclose(np.asarray(model).ravel(), a @ flux.ravel(), rtol=1e-12, atol=1e-13)

    psferr = 0.01
    chi2pix, pixmask = pixel_diagnostics(stamps, cy, cx, image, ivar, model, psferr)
    m = np.asarray(model).ravel()
    iv = ivar.ravel()
    tot = np.where(iv > 0, 1 / (1 / iv + (m * psferr + 1e-32) ** 2), 0.0)
    chi = (image.ravel() - m) * np.sqrt(tot)
    psfw = a.T @ (tot > 0)
    ref = np.where(psfw > 0, (a.T @ chi**2) / np.where(psfw > 0, psfw, 1), 0)
    ok = valid.ravel()
    np.testing.assert_allclose(np.asarray(chi2pix).ravel()[ok], ref[ok], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(pixmask).ravel()[ok], (1 - a.T @ (iv > 0))[ok], atol=1e-12)
