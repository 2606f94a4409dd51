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


def _region_patch(seed, spacing=5, nf=4, nk=16, ny=6, nx=9, shape=(50, 44)):
    """Stamps for :func:`normal_equations_regions`: ~0.7 rows per bin, fibers ``spacing``
    px apart (5: 4-column overlaps of neighbours, 7: 3), some corners at the margin
    box's edges, padding unknowns and an all-zero (parked) stamp."""
    rng = np.random.default_rng(seed)
    stamps = rng.random((nf, nk, ny, nx))
    cx = (spacing * np.arange(nf))[:, None] + rng.integers(0, 2, (nf, nk))
    cy = (0.7 * np.arange(nk)).astype(int)[None, :] + rng.integers(0, 2, (nf, nk))
    cx[0, :3] = 0  # at the box's left / lower edge
    cy[:, 0] = 0
    cy[-1, -1] = shape[0] - ny  # at the far edge
    cx[-1, -1] = shape[1] - nx
    valid = np.ones((nf, nk), bool)
    valid[-1, -3:-1] = False  # padding unknowns
    stamps[1, 5] = 0.0  # a spot parked far away
    image = rng.normal(size=shape)
    ivar = rng.random(shape) + 0.5
    return stamps, cy, cx, valid, image, ivar


@pytest.mark.parametrize("sizes", [None, ((2, 4, 6), (3, 5, 9)), ((6,), (9,))])
@pytest.mark.parametrize("seed", [0, 1])
def test_normal_equations_regions_equal_the_general_assembly(seed, sizes):
    """The CPU's assembly over the stamps' overlap equals normal_equations with all
    offsets in one step to 1e-13, with every size class (and the all-zero branch) hit."""
    from jaxspec._extraction.projection import normal_equations_regions, region_sizes

    hs, ws = (region_sizes(6), region_sizes(9)) if sizes is None else sizes
    band = 9
    hit = set()
    for spacing in (5, 7):
        stamps, cy, cx, valid, image, ivar = (jnp.asarray(a) for a in _region_patch(seed, spacing))
        ref = jax.jit(normal_equations, static_argnums=(6, 7))(stamps, cy, cx, valid, image, ivar, band, 2)
        fn = jax.jit(normal_equations_regions, static_argnums=(6, 7, 8))
        got = fn(stamps, cy, cx, valid, image, ivar, band, 2, sizes)
        scale = np.abs(np.asarray(ref[0])).max()
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-13 * scale)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-13, atol=1e-13)
        # under vmap the switch runs every branch and selects: the same values
        vm = jax.vmap(lambda s: normal_equations_regions(s, cy, cx, valid, image, ivar, band, 2, sizes))(
            jnp.stack([stamps, 2 * stamps]))
        np.testing.assert_allclose(vm[0][0], ref[0], rtol=0, atol=1e-13 * scale)
        np.testing.assert_allclose(vm[0][1], 4 * np.asarray(ref[0]), rtol=0, atol=4e-13 * scale)
        h, w = _union_windows(*(np.asarray(a) for a in (stamps, cy, cx, valid)), band, 2)
        assert np.any((h == 0) | (w == 0))  # the zero branch
        hit |= {(int(np.searchsorted(hs, a)), int(np.searchsorted(ws, b))) for a, b in zip(h, w) if a > 0 and b > 0}
    # every size class is hit by some offset's union window
    assert hit == {(i, k) for i in range(len(hs)) for k in range(len(ws))}, hit


def test_region_sizes_end_with_the_whole_axis():
    from jaxspec._extraction.projection import region_sizes

    assert region_sizes(11) == (3, 7, 11)
    assert region_sizes(17) == (5, 10, 17)
    assert region_sizes(1) == (1,)


def _union_windows(stamps, cy, cx, valid, band, fband):
    """Height and width of every offset's union of live overlaps (NumPy, as the kernel does)."""
    from jaxspec._extraction.projection import _offsets

    nf, nk, ny, nx = stamps.shape
    live = valid & np.any(stamps != 0, axis=(2, 3))
    hs, ws = [], []
    for df, dk in _offsets(fband, band):
        f, k = np.meshgrid(np.arange(nf), np.arange(nk), indexing="ij")
        fj, kj = f + df, k + dk
        ok = (fj < nf) & (kj >= 0) & (kj < nk)
        fj, kj = np.clip(fj, 0, nf - 1), np.clip(kj, 0, nk - 1)
        oy, ox = cy[fj, kj] - cy, cx[fj, kj] - cx
        ok &= live & live[fj, kj] & (np.abs(oy) < ny) & (np.abs(ox) < nx)
        if not ok.any():
            hs.append(0)
            ws.append(0)
            continue
        hs.append(np.minimum(ny + oy, ny)[ok].max() - np.maximum(oy, 0)[ok].min())
        ws.append(np.minimum(nx + ox, nx)[ok].max() - np.maximum(ox, 0)[ok].min())
    return np.asarray(hs), np.asarray(ws)
