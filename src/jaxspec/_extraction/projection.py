"""Projection inside one patch: spots placed in the patch's pixel box.

The projection matrix A (pixels x unknowns) of a patch is never formed densely:
each column is one spot, a (ny, nx) stamp at an integer corner of the box.  The
normal equations are assembled from pairs of overlapping stamps:

    Q[i, j] = sum_p S_i(p) W(p) S_j(p)      y[i] = sum_p S_i(p) W(p) P(p)

where only pairs of spots whose stamps can share a pixel are visited (fibers within
``fiber_band`` and bins within ``band`` of each other), and Q comes out as its lower
block band over fibers (what :func:`jaxspec.solve.solve_patch` factors).  All
functions here work on one patch and are vmapped over patches by the caller; shapes
are static.

Box coordinates: the patch's pixel box is gathered with a margin of one stamp on
every side, so a stamp whose corner lies in ``[0, NY + ny] x [0, NX + nx]`` of the
margin box never needs clipping; pixels outside the real box carry zero weight.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int


def gather_box(
    canvas: Float[Array, "H W"],
    y0: Int[Array, ""],
    x0: Int[Array, ""],
    shape: tuple[int, int],
) -> Float[Array, "NYm NXm"]:
    """The ``shape`` window of ``canvas`` whose lower-left pixel is (y0, x0)."""
    return jax.lax.dynamic_slice(canvas, (y0, x0), shape)


def _windows(box: Float[Array, "NYm NXm"], cy: Int[Array, " n"], cx: Int[Array, " n"], stamp_shape: tuple[int, int]) -> Float[Array, "n ny nx"]:
    """The (ny, nx) window of ``box`` under every stamp."""
    return jax.vmap(lambda a, b: jax.lax.dynamic_slice(box, (a, b), stamp_shape))(cy, cx)


def normal_equations(
    stamps: Float[Array, "F K ny nx"],
    cy: Int[Array, "F K"],
    cx: Int[Array, "F K"],
    valid: Bool[Array, "F K"],
    image: Float[Array, "NYm NXm"],
    ivar: Float[Array, "NYm NXm"],
    band: int,
    fiber_band: int | None = None,
    offset_group: int | None = None,
) -> tuple[Float[Array, "F w1 K K"], Float[Array, " n"], Float[Array, " n"]]:
    """``Q = A^T W A`` as its lower block band, ``y = A^T W p`` and fluxweight (column sums of ``W A``).

    Args:
        stamps: spots of the patch's F fibers x K bins (zero for padding).
        cy, cx: stamp corners in margin-box coordinates.
        valid: False for padding unknowns.
        image, ivar: the patch's margin box (ivar 0 outside the real box).
        band: static; bins further apart than this never share a pixel.
        fiber_band: static; fibers further apart than this never share a pixel
            (default: any two fibers of the patch may).
        offset_group: static; (fiber, bin) offsets evaluated together in one step
            (default: all of them, one fused gather and product, whose intermediate
            XLA does not form); smaller groups loop over them.  H200, reference
            settings, s per frame: all 0.075, 29 (two steps) 0.073, 4 0.088, 1 0.143.
            XLA:CPU is the other way round (2-core machine, reference case f000-024,
            20 patches per call: 1 0.43 s, all 0.71 s); its kernel is
            :func:`normal_equations_regions`.

    Returns:
        Qb (F, w + 1, K, K) with ``Qb[f, d] = Q[fiber f, fiber f - d]`` and
        w = fiber_band (:mod:`jaxspec.solve._banded` storage;
        :func:`jaxspec.solve.dense_from_band` gives the dense (n, n)), y (n,),
        fluxweight (n,), n = F * K, unknowns fiber-major.

    Each unordered pair of unknowns within (fiber_band, band) of each other is
    visited once, as one (fiber offset, bin offset) of every unknown: the partner's
    stamp is cut, shifted by the two corners' difference, from a zero-padded copy.
    With every offset in one step each unknown's stamp serves all its partners from
    cache (the offsets one at a time re-read every stamp from memory per offset).
    """
    nf, nk, ny, nx = stamps.shape
    n = nf * nk
    fband = nf - 1 if fiber_band is None else min(int(fiber_band), nf - 1)
    s, cy, cx, sw, rhs, fluxweight = _weighted_stamps(stamps, cy, cx, valid, image, ivar)

    offsets = _offsets(fband, band)
    noff = len(offsets)
    group = noff if offset_group is None else max(1, min(int(offset_group), noff))
    ngroup = -(-noff // group)
    # groups of equal size: the last is filled with offsets that pair nothing
    padded = np.concatenate([offsets, np.tile([[nf, 0]], (ngroup * group - noff, 1))]).astype(np.int32)
    # stamps padded by one stamp each side: a shifted copy is a plain slice
    spad = jnp.pad(s, ((0, 0), (ny, ny), (nx, nx)))
    fi = jnp.arange(n, dtype=jnp.int32) // nk
    ki = jnp.arange(n, dtype=jnp.int32) % nk

    def overlaps(off):  # off (G, 2) -> (G, n) values of Q[partner, unknown]
        j, oy, ox, ok = _partners(off, fi, ki, nf, nk, cy, cx, (ny, nx))
        cut = lambda jj, a, b: jax.lax.dynamic_slice(spad, (jj, a, b), (1, ny, nx))[0]  # noqa: E731
        shifted = jax.vmap(jax.vmap(cut))(j, jnp.clip(ny - oy, 0, 2 * ny), jnp.clip(nx - ox, 0, 2 * nx))
        return jnp.where(ok, jnp.sum(sw[None] * shifted, axis=(2, 3)), 0.0)

    groups = jnp.asarray(padded.reshape(ngroup, group, 2))
    vals = overlaps(groups[0]) if ngroup == 1 else jax.lax.map(overlaps, groups).reshape(ngroup * group, n)
    return _to_band(vals, nf, nk, fband, band), rhs, fluxweight


def _partners(off, fi, ki, nf: int, nk: int, cy, cx, stamp_shape: tuple[int, int]):
    """Each unknown's partner at each (fiber, bin) offset ``off`` (G, 2): its flat index
    ``j`` (G, n), the corners' difference ``oy``, ``ox`` (G, n) and ``ok`` (G, n): the
    partner exists and the two stamps can share a pixel."""
    ny, nx = stamp_shape
    fj = fi[None, :] + off[:, :1]
    kj = ki[None, :] + off[:, 1:]
    ok = (fj < nf) & (kj >= 0) & (kj < nk)
    j = jnp.clip(fj, 0, nf - 1) * nk + jnp.clip(kj, 0, nk - 1)
    oy = (cy[j] - cy[None, :]).astype(jnp.int32)
    ox = (cx[j] - cx[None, :]).astype(jnp.int32)
    return j, oy, ox, ok & (jnp.abs(oy) < ny) & (jnp.abs(ox) < nx)


def _to_band(vals, nf, nk, fband, band):
    """The (noff, n) values of every offset and unknown, as the lower block band (nf, fband + 1, nk, nk)."""
    flat = jnp.concatenate([vals.reshape(-1), jnp.zeros((1,), vals.dtype)])
    return flat[_band_index(nf, nk, fband, band)]


def region_sizes(n: int) -> tuple[int, ...]:
    """The static window lengths along a stamp axis of ``n`` pixels that
    :func:`normal_equations_regions` picks from: about 0.3 n, 0.6 n and n
    (11 rows: 3, 7, 11; 17 columns: 5, 10, 17).  The last is the whole axis, so
    every overlap fits one."""
    return tuple(sorted({max(1, int(round(0.3 * n))), max(1, int(round(0.6 * n))), int(n)}))


def normal_equations_regions(
    stamps: Float[Array, "F K ny nx"],
    cy: Int[Array, "F K"],
    cx: Int[Array, "F K"],
    valid: Bool[Array, "F K"],
    image: Float[Array, "NYm NXm"],
    ivar: Float[Array, "NYm NXm"],
    band: int,
    fiber_band: int | None = None,
    sizes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> tuple[Float[Array, "F w1 K K"], Float[Array, " n"], Float[Array, " n"]]:
    """:func:`normal_equations`, one (fiber, bin) offset per step, each over the stamps' overlap only.

    The CPU's assembly (the same results to rounding; arguments and returns as
    :func:`normal_equations`).  At one offset every unknown's stamp meets its
    partner's shifted by (oy, ox): they share a window of ``ny - |oy|`` rows by
    ``nx - |ox|`` columns, most often much less than the whole stamp.  Each step
    takes the union of those windows over the patch's live pairs (both unknowns
    valid with a non-zero stamp, close enough to overlap), rounds its height and
    width up to the next of ``sizes`` (static; default :func:`region_sizes` of
    each axis, the largest the whole stamp) and multiplies only that window of
    every unknown's ``S W`` with its partner's shifted stamp: a ``lax.switch``
    over the size classes, and a branch of exact zeros for an offset with no live
    pair.  Outside the union the products are zero (at least one stamp is zero
    there), so the sums are those over the whole stamps.

    Under ``vmap`` the switch becomes a select over all branches (correct, slower):
    run patches one after another (``lax.map``) to keep it a branch.
    """
    nf, nk, ny, nx = stamps.shape
    n = nf * nk
    fband = nf - 1 if fiber_band is None else min(int(fiber_band), nf - 1)
    hs, ws = (region_sizes(ny), region_sizes(nx)) if sizes is None else (tuple(sizes[0]), tuple(sizes[1]))
    if max(hs) != ny or max(ws) != nx:
        raise ValueError(f"the largest region sizes {max(hs), max(ws)} must be the stamp's {ny, nx}")
    s, cy, cx, sw, rhs, fluxweight = _weighted_stamps(stamps, cy, cx, valid, image, ivar)
    live = valid.reshape(n) & jnp.any(s != 0, axis=(1, 2))
    spad = jnp.pad(s, ((0, 0), (ny, ny), (nx, nx)))

    fi = jnp.arange(n, dtype=jnp.int32) // nk
    ki = jnp.arange(n, dtype=jnp.int32) % nk
    # every offset's partners at once (noff, n)
    j, oy, ox, ok = _partners(jnp.asarray(_offsets(fband, band)), fi, ki, nf, nk, cy, cx, (ny, nx))
    pair = ok & live[None, :] & live[j]
    # the union of the live pairs' overlaps, in the unknown's stamp coordinates
    big = jnp.int32(4 * (ny + nx))
    r0 = jnp.min(jnp.where(pair, jnp.maximum(oy, 0), big), axis=1)
    r1 = jnp.max(jnp.where(pair, jnp.minimum(ny + oy, ny), -big), axis=1)
    c0 = jnp.min(jnp.where(pair, jnp.maximum(ox, 0), big), axis=1)
    c1 = jnp.max(jnp.where(pair, jnp.minimum(nx + ox, nx), -big), axis=1)
    hcls = jnp.searchsorted(jnp.asarray(hs, jnp.int32), r1 - r0, side="left").astype(jnp.int32)
    wcls = jnp.searchsorted(jnp.asarray(ws, jnp.int32), c1 - c0, side="left").astype(jnp.int32)
    branch = jnp.where(jnp.any(pair, axis=1), 1 + hcls * len(ws) + wcls, 0)
    # partner rows / columns of the stamp's row / column 0 in the padded stamps
    py = jnp.clip(ny - oy, 0, 2 * ny)
    px = jnp.clip(nx - ox, 0, 2 * nx)

    def region(h, w):
        def run(a):
            jj, pyy, pxx, okk, r, c = a
            r = jnp.clip(r, 0, ny - h)
            c = jnp.clip(c, 0, nx - w)
            win = jax.lax.dynamic_slice(sw, (jnp.int32(0), r, c), (n, h, w))
            cut = lambda q, b, d: jax.lax.dynamic_slice(spad, (q, b + r, d + c), (1, h, w))[0]  # noqa: E731
            shifted = jax.vmap(cut)(jj, pyy, pxx)
            return jnp.where(okk, jnp.sum(win * shifted, axis=(1, 2)), 0.0)
        return run

    def nothing(a):  # exact zeros, typed as the other branches (shard_map: varying over its axis)
        return jnp.where(a[3], jnp.sum(sw[:, :0, :0], axis=(1, 2)), 0.0)

    branches = [nothing] + [region(h, w) for h in hs for w in ws]

    def step(carry, a):
        b = a[0]
        return carry, jax.lax.switch(b, branches, a[1:])

    _, vals = jax.lax.scan(step, None, (branch, j, py, px, ok, r0, c0))
    return _to_band(vals, nf, nk, fband, band), rhs, fluxweight


def _weighted_stamps(stamps, cy, cx, valid, image, ivar):
    """The flat (n, ny, nx) stamps S (padding zeroed), corners (n,), ``S W`` and its sums:
    ``y = sum S W p`` and fluxweight ``= sum S W`` (n,) each."""
    nf, nk, ny, nx = stamps.shape
    n = nf * nk
    s = jnp.where(valid[..., None, None], stamps, 0.0).reshape(n, ny, nx)
    cy = cy.reshape(n)
    cx = cx.reshape(n)
    w = _windows(ivar, cy, cx, (ny, nx))
    p = _windows(image, cy, cx, (ny, nx))
    sw = s * w
    return s, cy, cx, sw, jnp.sum(sw * p, axis=(1, 2)), jnp.sum(sw, axis=(1, 2))


def _offsets(fband: int, band: int) -> np.ndarray:
    """Half of the (fiber offset, bin offset) plane: df > 0, or df == 0 and dk >= 0 (noff, 2)."""
    pairs = [(df, dk) for df in range(0, fband + 1) for dk in range(-band, band + 1) if df > 0 or dk >= 0]
    return np.asarray(pairs, dtype=np.int32)


@functools.lru_cache(maxsize=32)
def _band_index(nf: int, nk: int, fband: int, band: int) -> np.ndarray:
    """Where each entry of the block band (nf, fband + 1, nk, nk) sits in the flat (offset, unknown) values.

    Entry ``[r, d, a, c]`` is ``Q[(r, a), (r - d, c)]``: the value of unknown
    ``(r - d, c)`` at offset ``(d, a - c)``; on the diagonal blocks the entries above
    the diagonal are the mirror ``[r, 0, c, a]``.  Entries no offset reaches (too far
    apart, or ``r - d < 0``) point at the trailing zero, ``len(offsets) * n``.
    """
    n = nf * nk
    offsets = _offsets(fband, band)
    where = {(int(df), int(dk)): o for o, (df, dk) in enumerate(offsets)}
    r, d, a, c = np.meshgrid(np.arange(nf), np.arange(fband + 1), np.arange(nk), np.arange(nk), indexing="ij")
    upper = (d == 0) & (a < c)
    a, c = np.where(upper, c, a), np.where(upper, a, c)
    o = np.full(r.shape, -1)
    for (df, dk), k in where.items():
        o[(d == df) & (a - c == dk)] = k
    ok = (o >= 0) & (r - d >= 0)
    return np.where(ok, o * n + (r - d) * nk + c, len(offsets) * n)


def model_box(
    stamps: Float[ArrayLike, "F K ny nx"],
    cy: Int[ArrayLike, "F K"],
    cx: Int[ArrayLike, "F K"],
    flux: Float[ArrayLike, "F K"],
    shape: tuple[int, int],
) -> Float[Array, "NYm NXm"]:
    """The model image ``A f`` of the patch in its margin box."""
    stamps, cy, cx, flux = (jnp.asarray(a) for a in (stamps, cy, cx, flux))
    nf, nk, ny, nx = stamps.shape
    lead = (1,) * cy.ndim
    rows = cy[..., None, None] + jnp.arange(ny, dtype=cy.dtype).reshape(lead + (ny, 1))
    cols = cx[..., None, None] + jnp.arange(nx, dtype=cx.dtype).reshape(lead + (1, nx))
    vals = stamps * flux[..., None, None]
    return jnp.zeros(shape, stamps.dtype).at[rows, cols].add(vals, mode="drop")


def pixel_diagnostics(
    stamps: Float[ArrayLike, "F K ny nx"],
    cy: Int[ArrayLike, "F K"],
    cx: Int[ArrayLike, "F K"],
    image: Float[ArrayLike, "NYm NXm"],
    ivar: Float[ArrayLike, "NYm NXm"],
    model: Float[ArrayLike, "NYm NXm"],
    psferr: float | Float[ArrayLike, ""],
) -> tuple[Float[Array, "F K"], Float[Array, "F K"]]:
    """Per-bin ``chi2pix`` and ``pixmask_fraction``, as the established code defines them.

    chi2pix: mean of chi^2 over the bin's pixels, weighted by its spot, where the
    pixel variance adds the PSF model error ``(psferr * model)^2`` to ``1/ivar``.
    pixmask_fraction: the part of the bin's spot that falls on pixels with
    ivar 0 (masked, or outside the patch).
    """
    stamps, cy, cx, image, ivar, model = (jnp.asarray(a) for a in (stamps, cy, cx, image, ivar, model))
    nf, nk, ny, nx = stamps.shape
    n = nf * nk
    s = stamps.reshape(n, ny, nx)
    cyf, cxf = cy.reshape(n), cx.reshape(n)
    good = ivar > 0
    model_var = (model * psferr) ** 2 + 1e-64
    tot_ivar = jnp.where(good, 1.0 / (model_var + 1.0 / jnp.where(good, ivar, 1.0)), 0.0)
    chi2 = (image - model) ** 2 * tot_ivar
    w_chi2 = _windows(chi2, cyf, cxf, (ny, nx))
    w_good = _windows((tot_ivar > 0).astype(s.dtype), cyf, cxf, (ny, nx))
    w_unmasked = _windows(good.astype(s.dtype), cyf, cxf, (ny, nx))
    psfweight = jnp.sum(s * w_good, axis=(1, 2))
    chi2pix = jnp.where(psfweight > 0, jnp.sum(s * w_chi2, axis=(1, 2)) / jnp.where(psfweight > 0, psfweight, 1.0), 0.0)
    pixmask = 1.0 - jnp.sum(s * w_unmasked, axis=(1, 2))
    return chi2pix.reshape(nf, nk), pixmask.reshape(nf, nk)
