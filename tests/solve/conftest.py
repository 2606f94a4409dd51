"""Fixtures for tests/solve: synthetic patches and a NumPy/SciPy port of specter's solve."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg


# --------------------------------------------------------------------------
# Reference: specter ex2d_patch (from Q, y, fluxweight) + resolution_from_icov
# --------------------------------------------------------------------------
def _ref_eigen_compose(w, v, invert=False, sqr=False):
    thr = 10.0 * sys.float_info.epsilon
    wmax = np.max(w)
    if invert and sqr:
        lim = np.sqrt(wmax) * thr
        root = np.sqrt(np.clip(w, 0, None))
        scaled = np.where(root > lim, 1.0 / np.where(root > lim, root, 1.0), 1.0 / lim)
    elif invert:
        lim = wmax * thr
        scaled = np.where(w > lim, 1.0 / np.where(w > lim, w, 1.0), 1.0 / lim)
    elif sqr:
        lim = np.sqrt(wmax) * thr
        scaled = np.where(w > lim, np.sqrt(np.clip(w, 0, None)), lim)
    else:
        lim = wmax * thr
        scaled = np.where(w > lim, w, lim)
    return (v * scaled) @ v.T


def ref_resolution_from_icov(icov, blocks=None):
    icov = 0.5 * (icov + icov.T)
    w, v = scipy.linalg.eigh(icov)
    root = np.zeros_like(icov)
    if blocks is not None:
        cov = _ref_eigen_compose(w, v, invert=True)
        start = 0
        for size in blocks:
            sl = slice(start, start + size)
            bw, bv = scipy.linalg.eigh(cov[sl, sl])
            root[sl, sl] = _ref_eigen_compose(bw, bv, invert=True, sqr=True)
            start += size
    else:
        root = _ref_eigen_compose(w, v, sqr=True)
    rowsum = root.sum(axis=1)
    return root / rowsum[:, None], rowsum**2


def ref_patch(Q, y, fluxweight, nspec, nwave, regularize=0.0, ndecorr=False,
              minweight_frac=0.01):
    """specter's ex2d_patch arithmetic given Q = A^T W A, y = A^T W p."""
    minweight = minweight_frac * np.max(fluxweight)
    low = fluxweight < minweight
    extra = regularize * np.ones(nspec * nwave)
    extra[low] = minweight - fluxweight[low]
    icov = Q + np.diag(extra**2)
    xflux = scipy.linalg.solve(icov, y, assume_a="pos")
    if ndecorr:
        R, ivar = ref_resolution_from_icov(icov)
    else:
        R, ivar = ref_resolution_from_icov(icov, blocks=[nwave] * nspec)
    flux = R @ xflux
    return dict(flux=flux.reshape(nspec, nwave), ivar=ivar.reshape(nspec, nwave),
                R=R, xflux=xflux.reshape(nspec, nwave))


def ref_diagonals(Rb, ndiag):
    m = Rb.shape[0]
    out = np.zeros((2 * ndiag + 1, m))
    for j in range(m):
        for d in range(2 * ndiag + 1):
            i = j + d - ndiag
            if 0 <= i < m:
                out[d, j] = Rb[i, j]
    return out


# --------------------------------------------------------------------------
# Synthetic patch: Gaussian spots on a pixel grid, fibers overlapping in x
# --------------------------------------------------------------------------
def make_patch(seed, nspec, nwave, *, dead_fiber=None, low_rows=0, dead_patch=False):
    """Return dict(Q, y, fluxweight) of a random spot-like patch (float64)."""
    rng = np.random.default_rng(seed)
    dy, dx = 2.0, 3.2
    ny, nx = int(dy * nwave) + 6, int(dx * nspec) + 6
    yy, xx = np.mgrid[0:ny, 0:nx]
    cols = []
    for s in range(nspec):
        for k in range(nwave):
            y0 = 3 + dy * k + 0.3 * rng.standard_normal()
            x0 = 3 + dx * s + 0.2 * rng.standard_normal()
            sy, sx = 1.1 + 0.2 * rng.random(), 1.0 + 0.2 * rng.random()
            spot = np.exp(-0.5 * ((yy - y0) / sy) ** 2 - 0.5 * ((xx - x0) / sx) ** 2)
            spot[spot < 1e-6] = 0.0
            if dead_fiber is not None and s == dead_fiber:
                spot[:] = 0.0
            cols.append(spot.ravel() / spot.sum() if spot.sum() > 0 else spot.ravel())
    A = np.stack(cols, axis=1)
    ivar = rng.uniform(0.5, 2.0, size=(ny, nx))
    if low_rows:
        ivar[:low_rows] = 0.0  # masked rows: edge bins get (very) low weight
    if dead_patch:
        ivar[:] = 0.0
    truth = rng.uniform(10.0, 100.0, size=nspec * nwave)
    pix = A @ truth + rng.standard_normal(ny * nx) / np.sqrt(np.where(ivar > 0, ivar, 1.0)).ravel()
    WA = ivar.ravel()[:, None] * A
    return dict(Q=A.T @ WA, y=WA.T @ pix, fluxweight=WA.sum(axis=0))


@pytest.fixture
def specter():
    """NumPy/SciPy reference of specter's per-patch maths."""
    return SimpleNamespace(patch=ref_patch, resolution_from_icov=ref_resolution_from_icov,
                           eigen_compose=_ref_eigen_compose, diagonals=ref_diagonals)


@pytest.fixture
def patch_factory():
    """Factory ``(seed, nspec, nwave, **kw) -> dict(Q, y, fluxweight)``."""
    return make_patch
