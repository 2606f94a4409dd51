"""Projection inside one patch: spots placed in the patch's pixel box.

The projection matrix A (pixels x unknowns) of a patch is never formed densely:
each column is one spot, a (ny, nx) stamp at an integer corner of the box.  The
normal equations are assembled from pairs of overlapping stamps:

    Q[i, j] = sum_p S_i(p) W(p) S_j(p)      y[i] = sum_p S_i(p) W(p) P(p)

where only pairs of spots whose stamps can share a pixel are visited (every fiber
of the patch, bins within ``band`` of each other).  All functions here work on one
patch and are vmapped over patches by the caller; shapes are static.

Box coordinates: the patch's pixel box is gathered with a margin of one stamp on
every side, so a stamp whose corner lies in ``[0, NY + ny] x [0, NX + nx]`` of the
margin box never needs clipping; pixels outside the real box carry zero weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


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
) -> tuple[Float[Array, "n n"], Float[Array, " n"], Float[Array, " n"]]:
    """``Q = A^T W A``, ``y = A^T W p`` and fluxweight (column sums of ``W A``).

    Args:
        stamps: spots of the patch's F fibers x K bins (zero for padding).
        cy, cx: stamp corners in margin-box coordinates.
        valid: False for padding unknowns.
        image, ivar: the patch's margin box (ivar 0 outside the real box).
        band: bins further apart than this never share a pixel.

    Returns:
        Q (n, n), y (n,), fluxweight (n,) with n = F * K, unknowns fiber-major.
    """
    nf, nk, ny, nx = stamps.shape
    n = nf * nk
    s = jnp.where(valid[..., None, None], stamps, 0.0).reshape(n, ny, nx)
    cy = cy.reshape(n)
    cx = cx.reshape(n)
    w = _windows(ivar, cy, cx, (ny, nx))
    p = _windows(image, cy, cx, (ny, nx))
    sw = s * w
    rhs = jnp.sum(sw * p, axis=(1, 2))
    fluxweight = jnp.sum(sw, axis=(1, 2))

    # stamps padded by one stamp each side: a shifted copy is a plain slice
    spad = jnp.pad(s, ((0, 0), (ny, ny), (nx, nx)))
    kk = jnp.arange(n) % nk
    offsets = jnp.stack(
        jnp.meshgrid(jnp.arange(nf), jnp.arange(-band, band + 1), indexing="ij"), axis=-1
    ).reshape(-1, 2)

    def overlap(_, off):
        fj, dk = off[0], off[1]
        kj = kk + dk
        ok = (kj >= 0) & (kj < nk)
        j = fj * nk + jnp.clip(kj, 0, nk - 1)
        oy = cy[j] - cy
        ox = cx[j] - cx
        ok = ok & (jnp.abs(oy) < ny) & (jnp.abs(ox) < nx)
        shifted = jax.vmap(lambda jj, a, b: jax.lax.dynamic_slice(spad[jj], (a, b), (ny, nx)))(
            j, jnp.clip(ny - oy, 0, 2 * ny), jnp.clip(nx - ox, 0, 2 * nx)
        )
        vals = jnp.where(ok, jnp.sum(sw * shifted, axis=(1, 2)), 0.0)
        return None, vals

    _, vals = jax.lax.scan(overlap, None, offsets)  # (F * (2 band + 1), n)
    vals = vals.reshape(nf, 2 * band + 1, nf, nk)  # [fj, dk, fi, ki]

    # dense Q[fi, ki, fj, kj] = vals[fj, kj - ki + band, fi, ki] where |kj - ki| <= band
    ki = jnp.arange(nk)[:, None]
    kj = jnp.arange(nk)[None, :]
    d = kj - ki + band
    inband = (d >= 0) & (d <= 2 * band)
    dcl = jnp.clip(d, 0, 2 * band)
    v = jnp.transpose(vals, (2, 3, 0, 1))  # [fi, ki, fj, dk]
    q = jnp.take_along_axis(
        v[:, :, :, None, :],  # [fi, ki, fj, 1, dk]
        jnp.broadcast_to(dcl[None, :, None, :, None], (nf, nk, nf, nk, 1)),
        axis=4,
    )[..., 0]  # [fi, ki, fj, kj]
    q = jnp.where(inband[None, :, None, :], q, 0.0).reshape(n, n)
    q = 0.5 * (q + q.T)
    return q, rhs, fluxweight


def model_box(
    stamps: Float[Array, "F K ny nx"],
    cy: Int[Array, "F K"],
    cx: Int[Array, "F K"],
    flux: Float[Array, "F K"],
    shape: tuple[int, int],
) -> Float[Array, "NYm NXm"]:
    """The model image ``A f`` of the patch in its margin box."""
    nf, nk, ny, nx = stamps.shape
    rows = cy[..., None, None] + jnp.arange(ny)[:, None]
    cols = cx[..., None, None] + jnp.arange(nx)[None, :]
    vals = stamps * flux[..., None, None]
    return jnp.zeros(shape, stamps.dtype).at[rows, cols].add(vals, mode="drop")


def pixel_diagnostics(
    stamps: Float[Array, "F K ny nx"],
    cy: Int[Array, "F K"],
    cx: Int[Array, "F K"],
    image: Float[Array, "NYm NXm"],
    ivar: Float[Array, "NYm NXm"],
    model: Float[Array, "NYm NXm"],
    psferr: float | Float[Array, ""],
) -> tuple[Float[Array, "F K"], Float[Array, "F K"]]:
    """Per-bin ``chi2pix`` and ``pixmask_fraction``, as the established code defines them.

    chi2pix: mean of chi^2 over the bin's pixels, weighted by its spot, where the
    pixel variance adds the PSF model error ``(psferr * model)^2`` to ``1/ivar``.
    pixmask_fraction: the part of the bin's spot that falls on pixels with
    ivar 0 (masked, or outside the patch).
    """
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
