"""Patch geometry: how a frame is cut into overlapping patches (host-side NumPy).

A *patch* is a block of fibers (a subbundle plus one neighbour on each side inside
its bundle) times a block of wavelengths (``nwavestep`` core bins plus padding on
each side), with the CCD pixel box that covers them.  The rules reproduce the
established code (specter ``ex2d``) so that jaxspec solves exactly the same
sub-problems, at the CCD's edges too; only the centre of each patch is kept when
stitching.

Everything here is decided once on the host from the PSF's traces, for all patches
at once (NumPy over patches, no loop over fibers or patches), and becomes static
shapes (the largest patch) plus index arrays, so that all patches of a frame go
through one compiled, vmapped solve.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from ..psf import PSF


def split_bundle(bundlesize: int, nsub: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split a bundle of ``bundlesize`` fibers into ``nsub`` subbundles, as specter does.

    Returns ``(core, extract)``: the fiber offsets each subbundle owns, and the
    offsets it extracts (its own plus one neighbour each side inside the bundle).
    The sizes are ``np.array_split``'s, with one pass that moves the larger ones
    outward, so the smaller subbundles sit in the middle when ``bundlesize % nsub``.

    Raises:
        ValueError: unless ``1 <= nsub <= bundlesize``.
    """
    bundlesize, nsub = int(bundlesize), int(nsub)
    if not 1 <= nsub <= bundlesize:
        raise ValueError(f"nsubbundles ({nsub}) must be between 1 and the bundle's size ({bundlesize})")
    sizes = [len(a) for a in np.array_split(np.arange(bundlesize), nsub)]
    for i in range(nsub - 1):  # bubble the larger sizes outward (one pass)
        if sizes[i] > sizes[i + 1]:
            sizes[i], sizes[i + 1] = sizes[i + 1], sizes[i]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    core = [np.arange(a, a + n) for a, n in zip(starts, sizes)]
    extract = [np.arange(max(c[0] - 1, 0), min(c[-1] + 2, bundlesize)) for c in core]
    return core, extract


@dataclasses.dataclass(frozen=True)
class PatchGeometry:
    """Index arrays describing every patch of one extraction (P patches).

    Attributes:
        wave: (nwave,) output wavelength grid [A], linear with step ``dw``.
        dw: grid step [A].
        pad_lo: number of padding bins before ``wave[0]`` in the extended grid.
        wave_ext: (next,) extended grid: ``wave_ext[pad_lo + j] == wave[j]``.
        fibers: (P, F) absolute fiber index of each patch fiber slot.
        fiber_valid: (P, F) False for unused slots (their unknowns are padding).
        wave_start: (P,) index in ``wave_ext`` of each patch's first bin.
        nwave_patch: (P,) number of real bins of each patch (<= K).
        box: (P, 4) CCD pixel box ``(xlo, xhi, ylo, yhi)``, upper bounds exclusive.
        out_fiber: (P, F) output row (fiber - specmin) a slot is kept into, or -1.
        keep_lo: (P,) first kept local bin (the patch's lower padding, nlo).
        keep_n: (P,) number of kept bins.
        out_wave: (P,) output index of the first kept bin.
        nfiber: F, fiber slots per patch.
        nbin: K, bins per patch (the largest patch).
        box_shape: (NY, NX), the largest pixel box.
        ndiag: resolution half-band kept in the output.
        band: largest wavelength-index distance at which two spots of one
            fiber still share a CCD row (pairs further apart do not couple).
        fiber_band: largest fiber-slot distance at which two spots of one patch
            can share a CCD column (fibers further apart do not couple).
        specmin, nspec: the fibers extracted.
    """

    wave: np.ndarray
    dw: float
    pad_lo: int
    wave_ext: np.ndarray
    fibers: np.ndarray
    fiber_valid: np.ndarray
    wave_start: np.ndarray
    nwave_patch: np.ndarray
    box: np.ndarray
    out_fiber: np.ndarray
    keep_lo: np.ndarray
    keep_n: np.ndarray
    out_wave: np.ndarray
    nfiber: int
    nbin: int
    box_shape: tuple[int, int]
    ndiag: int
    band: int
    specmin: int
    nspec: int
    fiber_band: int = -1

    @property
    def npatch(self) -> int:
        """Number of patches."""
        return int(self.fibers.shape[0])


def _check_grid(wave: np.ndarray) -> float:
    wave = np.asarray(wave, dtype=float)
    if wave.ndim != 1 or wave.size < 2:
        raise ValueError("wave must be a 1D grid of at least 2 wavelengths")
    dw = float(wave[1] - wave[0])
    if dw <= 0 or not np.allclose(np.diff(wave), dw, rtol=1e-6, atol=1e-9):
        raise ValueError("wave must be a linear, increasing grid (constant step)")
    return dw


def _subbundles(specmin: int, nspec: int, bundlesize: int, nsub: int) -> np.ndarray:
    """(S, 4) ``(extract_lo, extract_hi, keep_lo, keep_hi)`` absolute fibers of every
    subbundle, bundle by bundle (specter's order).  A last, partial bundle of ``m``
    fibers is split with specter's rule into ``min(nsub, m)`` subbundles."""
    starts = np.arange(specmin, specmin + nspec, bundlesize)
    sizes = np.minimum(bundlesize, specmin + nspec - starts)
    parts, keys = [], []
    for m in np.unique(sizes):  # at most two sizes: full bundles and a last partial one
        core, ext = split_bundle(int(m), min(nsub, int(m)))
        rel = np.array([(e[0], e[-1] + 1, c[0], c[-1] + 1) for c, e in zip(core, ext)])  # (nsub_m, 4)
        b = starts[sizes == m]
        parts.append((b[:, None, None] + rel[None]).reshape(-1, 4))
        keys.append(np.broadcast_to(b[:, None], (len(b), len(rel))).ravel())
    rows, key = np.concatenate(parts), np.concatenate(keys)
    return rows[np.lexsort((rows[:, 0], key))]


def _rows_below(w_rows: np.ndarray, inv: np.ndarray, val: np.ndarray, strict: bool) -> np.ndarray:
    """For each patch p: how many CCD rows of its fiber have wavelength ``< val[p]``
    (``strict``) or ``<= val[p]``; ``w_rows[inv[p]]`` must increase along the rows.

    One ``searchsorted`` over all fibers' rows (offset per fiber) gives a first
    guess, made exact by comparing the rows around it; patches where the guess
    was off by more than that count all their rows.
    """
    nfib, nrow = w_rows.shape
    below = np.less if strict else np.less_equal
    base = float(w_rows.min())
    span = float(w_rows.max()) - base + 1.0
    off = np.arange(nfib) * (2.0 * span)
    keys = (w_rows - base + off[:, None]).ravel()
    guess = np.searchsorted(keys, val - base + off[inv], side="left" if strict else "right") - inv * nrow
    lo = np.clip(guess - 2, 0, nrow)
    win = lo[:, None] + np.arange(5)[None, :]
    inside = win < nrow
    wv = w_rows[inv[:, None], np.minimum(win, nrow - 1)]
    count = lo + np.sum(inside & below(wv, val[:, None]), axis=1)
    ok_lo = (lo == 0) | below(w_rows[inv, np.maximum(lo - 1, 0)], val)
    end = lo + 5
    ok_hi = (end >= nrow) | ~below(w_rows[inv, np.minimum(end, nrow - 1)], val)
    bad = np.nonzero(~(ok_lo & ok_hi))[0]
    if bad.size:
        count[bad] = np.sum(below(w_rows[inv[bad]], val[bad, None]), axis=1)
    return count


def _extreme_x(psf: PSF, fib: np.ndarray, wavemin: np.ndarray, wavemax: np.ndarray, lower: bool) -> np.ndarray:
    """specter's xyrange x bound for many patches: the first column (``lower``) of
    fiber ``fib[p]``'s spot at its leftmost trace point, or the end column of the
    spot at its rightmost, over the CCD rows whose wavelength lies in
    ``[wavemin[p], wavemax[p]]`` plus those two ends, on the CCD only.  (P,) int64."""
    npatch = len(fib)
    ufib, inv = np.unique(fib, return_inverse=True)
    inv = inv.reshape(-1)
    rows = np.arange(psf.npix_y, dtype=float)
    w_rows = np.asarray(psf.wavelength(ufib[:, None], rows[None, :]), dtype=float)  # (U, R)
    x_rows = np.asarray(psf.x(ufib[:, None], w_rows), dtype=float)
    y_rows = np.asarray(psf.y(ufib[:, None], w_rows), dtype=float)
    ny_ccd = psf.npix_y

    def on_ccd(y):
        if lower:
            return (0 <= y - 0.5) & (y < ny_ccd - 0.5)
        return (-0.5 <= y) & (y < ny_ccd - 0.5)

    mono = np.all(np.diff(w_rows, axis=1) > 0, axis=1)[inv]  # (P,)
    if np.all(mono):
        # the candidate rows are one run [r0, r1) per patch: gather that window
        r0 = _rows_below(w_rows, inv, wavemin, strict=True)
        r1 = np.maximum(_rows_below(w_rows, inv, wavemax, strict=False), r0)
        width = max(int((r1 - r0).max()), 1)
        idx = r0[:, None] + np.arange(width)[None, :]
        take = idx < r1[:, None]
        idx = np.minimum(idx, psf.npix_y - 1)
        cand_w = w_rows[inv[:, None], idx]
        cand_x = np.where(take & on_ccd(y_rows[inv[:, None], idx]), x_rows[inv[:, None], idx], np.nan)
    else:  # some trace is not monotonic in its rows: specter's filters, row by row
        wr = w_rows[inv]
        first_lo = wr[:, 0] < wavemin
        keep = ~first_lo[:, None] | (wr >= wavemin[:, None])
        nrow = wr.shape[1]
        last = wr[np.arange(npatch), nrow - 1 - np.argmax(keep[:, ::-1], axis=1)]  # w[-1] after the first filter
        keep &= ~((wavemax < last) & keep.any(axis=1))[:, None] | (wr <= wavemax[:, None])
        cand_w = wr
        cand_x = np.where(keep & on_ccd(y_rows[inv]), x_rows[inv], np.nan)
    ends = np.stack([wavemin, wavemax], axis=1)  # (P, 2)
    x_end = np.asarray(psf.x(fib[:, None], ends), dtype=float)
    y_end = np.asarray(psf.y(fib[:, None], ends), dtype=float)
    cand_x = np.concatenate([cand_x, np.where(on_ccd(y_end), x_end, np.nan)], axis=1)
    cand_w = np.concatenate([cand_w, ends], axis=1)
    # no point on the CCD (specter fails there): the trace's x at the block's ends
    off = np.all(np.isnan(cand_x), axis=1)
    cand_x[off, -2:] = x_end[off]
    pick = np.nanargmin(cand_x, axis=1) if lower else np.nanargmax(cand_x, axis=1)
    best_x = cand_x[np.arange(npatch), pick]
    best_w = cand_w[np.arange(npatch), pick]
    xlo, xhi, *_ = psf.xypix_range(fib, best_w)
    if lower:
        return np.where(best_x < 0, 0, xlo).astype(np.int64)
    return np.where(best_x > psf.npix_x, psf.npix_x, xhi).astype(np.int64)


def xyranges(psf: PSF, specrange: np.ndarray, waverange: np.ndarray) -> np.ndarray:
    """:meth:`PSF.xyrange` for many patches at once: (P, 2) fibers ``[lo, hi)`` and
    (P, 2) wavelengths [A] -> (P, 4) int64 boxes ``(xmin, xmax, ymin, ymax)``."""
    specrange = np.asarray(specrange, dtype=np.int64)
    waverange = np.asarray(waverange, dtype=float)
    speclo, spechi = specrange[:, 0], specrange[:, 1]
    if np.any(speclo < 0) or np.any(spechi > psf.nspec) or np.any(spechi <= speclo):
        raise ValueError(f"fiber ranges must lie in 0..{psf.nspec} with lo < hi")
    wlo, whi = psf.specter_wave_range()
    wavemin = np.maximum(waverange[:, 0], wlo)
    wavemax = np.minimum(waverange[:, -1], whi)
    npatch = len(speclo)

    # y: the lowest (highest) trace among the patch's fibers at the range's ends
    nf = int((spechi - speclo).max())
    fib = speclo[:, None] + np.arange(nf)[None, :]
    ok = fib < spechi[:, None]
    fib = np.where(ok, fib, speclo[:, None])
    ylo = np.where(ok, np.asarray(psf.y(fib, wavemin[:, None])), np.inf)
    yhi = np.where(ok, np.asarray(psf.y(fib, wavemax[:, None])), -np.inf)
    f_lo = fib[np.arange(npatch), np.argmin(ylo, axis=1)]
    f_hi = fib[np.arange(npatch), np.argmax(yhi, axis=1)]
    ymin = psf.xypix_range(f_lo, wavemin)[2]
    ymax = psf.xypix_range(f_hi, wavemax)[3]

    xmin = _extreme_x(psf, speclo, wavemin, wavemax, lower=True)
    xmax = _extreme_x(psf, spechi - 1, wavemin, wavemax, lower=False)
    return np.stack([xmin, xmax, ymin, ymax], axis=1).astype(np.int64)


def patch_geometry(
    psf: PSF,
    wave: np.ndarray,
    specmin: int = 0,
    nspec: int = 25,
    bundlesize: int = 25,
    nsubbundles: int = 5,
    nwavestep: int = 50,
    wavepad_frac: float = 0.2,
    pixpad_frac: float = 0.8,
    *,
    wavesize: int | None = None,
) -> PatchGeometry:
    """Cut fibers ``specmin .. specmin+nspec-1`` x the grid ``wave`` into patches.

    The rules of the established code (specter ``ex2d``): bundles of
    ``bundlesize`` fibers (the last one partial when ``nspec`` is not a multiple),
    each split into ``nsubbundles`` subbundles by :func:`split_bundle` (a partial
    bundle of ``m < nsubbundles`` fibers into ``m``), extracted with one neighbour
    fiber each side inside the bundle; wavelength blocks of ``nwavestep`` core bins;
    the pixel box of the core (:func:`xyranges`) padded in y by
    ``round(pixpad_frac * ny)`` rows each side, where ``ny`` is the height of the
    first fiber's spot at the block's first wavelength as it lands on the CCD;
    extra wavelength bins each side for the rows a further ``int(wavepad_frac * ny)``
    beyond (at least ``ndiag``).

    Args:
        psf: the PSF model (its traces place the pixel boxes).
        wave: (nwave,) linear wavelength grid [A], inside :meth:`PSF.wave_limits`.
        specmin: first fiber.
        nspec: number of fibers (any ``>= 1``).
        bundlesize: fibers per bundle.
        nsubbundles: subbundles per bundle, ``1 <= nsubbundles <= bundlesize``.
        nwavestep: core wavelength bins per patch (``--nwavestep``).
        wavepad_frac: extra wavelength padding, as a fraction of the stamp height.
        pixpad_frac: extra pixel rows, as a fraction of the stamp height.
        wavesize: the previous release's name of ``nwavestep`` (DeprecationWarning).

    Returns:
        A :class:`PatchGeometry` (host NumPy arrays, one row per patch).

    Raises:
        ValueError: a grid that is not linear and increasing, fibers or wavelengths
            outside the PSF, or sizes out of range.
    """
    if wavesize is not None:
        warnings.warn("patch_geometry(wavesize=) is deprecated: use nwavestep=", DeprecationWarning, stacklevel=2)
        nwavestep = wavesize
    wave = np.asarray(wave, dtype=float)
    dw = _check_grid(wave)
    psf.check_fibers(specmin, nspec)
    psf.check_wavelengths(wave)
    if bundlesize < 1:
        raise ValueError(f"bundlesize must be positive, got {bundlesize}")
    if not 1 <= nsubbundles <= bundlesize:
        raise ValueError(f"nsubbundles ({nsubbundles}) must be between 1 and bundlesize ({bundlesize})")
    if nwavestep < 1:
        raise ValueError(f"nwavestep must be positive, got {nwavestep}")
    nwave = len(wave)
    ndiag = psf.ndiag(dw)

    # --- the patches, in the established order: bundle, subbundle, wave block
    sub = _subbundles(specmin, nspec, bundlesize, nsubbundles)
    iwaves = np.arange(0, nwave, nwavestep)
    speclo, spechi, keeplo, keephi = np.repeat(sub, len(iwaves), axis=0).T
    iwave = np.tile(iwaves, len(sub))
    wlo = wave[iwave]
    whi = wave[np.minimum(iwave + nwavestep - 1, nwave - 1)]

    box = xyranges(psf, np.stack([speclo, spechi], 1), np.stack([wlo, whi], 1))

    # pad the box in y so bins just outside the core still see their pixels: the
    # established code's rule, from the height ny of fiber speclo's spot at wlo
    # on the CCD (shorter, or 0, at the CCD's edges)
    ny = psf.xypix_range(speclo, wlo)[4]
    ypad = np.round(pixpad_frac * ny).astype(np.int64)
    box[:, 2] = np.maximum(box[:, 2] - ypad, 0)
    box[:, 3] = np.minimum(box[:, 3] + ypad, psf.npix_y)
    box[:, 3] = np.maximum(box[:, 3], box[:, 2])  # a block wholly off the CCD: empty
    box[:, 1] = np.maximum(box[:, 1], box[:, 0])

    # extra wavelength bins: those whose rows reach int(wavepad_frac * ny) beyond
    # the box along the first fiber's trace, at least ndiag each side
    wpad = (wavepad_frac * ny).astype(np.int64)
    w_at_lo = np.asarray(psf.wavelength(speclo, (box[:, 2] - wpad).astype(float)))
    w_at_hi = np.asarray(psf.wavelength(speclo, (box[:, 3] + wpad).astype(float)))
    nlo = np.maximum(((wlo - w_at_lo) / dw).astype(np.int64) - 1, ndiag)
    nhi = np.maximum(((w_at_hi - whi) / dw).astype(np.int64) - 1, ndiag)
    ncore = np.round((whi - wlo) / dw).astype(np.int64) + 1
    nw = nlo + ncore + nhi

    pad_lo = int(max(0, (nlo - iwave).max()))
    pad_hi = int(max(0, (iwave + ncore - 1 + nhi - (nwave - 1)).max()))
    wave_ext = wave[0] + dw * np.arange(-pad_lo, nwave + pad_hi)
    wave_start = iwave - nlo + pad_lo

    nfiber = int((spechi - speclo).max())
    slot = np.arange(nfiber)[None, :]
    fibers = speclo[:, None] + slot
    fiber_valid = fibers < spechi[:, None]
    fibers = np.where(fiber_valid, fibers, speclo[:, None])
    kept = fiber_valid & (fibers >= keeplo[:, None]) & (fibers < keephi[:, None])
    out_fiber = np.where(kept, fibers - specmin, -1)

    # each output bin comes from exactly one patch: block j // nwavestep
    keep_n = np.minimum(nwavestep, nwave - iwave)

    # spot corners of every fiber of some patch over the extended grid, for the bands
    sets, set_valid = _fiber_sets(fibers, fiber_valid)
    ufib, where = np.unique(sets, return_inverse=True)
    cx, cy = psf.corners(ufib[:, None], wave_ext[None, :])
    where = where.reshape(sets.shape)
    cx = np.asarray(cx, dtype=np.int64)[where]  # (U, F, next)
    cy = np.asarray(cy, dtype=np.int64)[where]
    band = _coupling_band(cy, set_valid, psf.stamp_shape[0])
    fiber_band = _fiber_band(cx, set_valid, psf.stamp_shape[1])

    return PatchGeometry(
        wave=wave,
        dw=dw,
        pad_lo=pad_lo,
        wave_ext=wave_ext,
        fibers=fibers.astype(np.int32),
        fiber_valid=fiber_valid,
        wave_start=wave_start.astype(np.int32),
        nwave_patch=nw.astype(np.int32),
        box=box.astype(np.int32),
        out_fiber=out_fiber.astype(np.int32),
        keep_lo=nlo.astype(np.int32),
        keep_n=keep_n.astype(np.int32),
        out_wave=iwave.astype(np.int32),
        nfiber=nfiber,
        nbin=int(nw.max()),
        box_shape=(int((box[:, 3] - box[:, 2]).max()), int((box[:, 1] - box[:, 0]).max())),
        ndiag=int(ndiag),
        band=band,
        fiber_band=fiber_band,
        specmin=int(specmin),
        nspec=int(nspec),
    )


def _fiber_sets(fibers: np.ndarray, fiber_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (fiber slots, valid slots) rows of the patches: (U, F) each."""
    both = np.unique(np.concatenate([fibers, fiber_valid.astype(fibers.dtype)], axis=1), axis=0)
    nf = fibers.shape[1]
    return both[:, :nf], both[:, nf:].astype(bool)


def _coupling_band(ymin: np.ndarray, valid: np.ndarray, ny: int) -> int:
    """A bound on the bin distance |k - k'| at which spots of two fibers of one patch share a row.

    ``ymin``: (U, F, K) spot corner rows of the distinct sets of patch fibers over the
    extended grid, ``valid`` (U, F) their real slots.  For each set, the lowest and
    highest corners over its fibers bound every pair's overlap (a bound is all the
    projection needs: pairs that do not overlap contribute exact zeros).  All sets
    at once.
    """
    if np.any(np.diff(ymin, axis=2) < 0):  # traces are monotonic in wavelength; be safe otherwise
        return ymin.shape[2]
    big = np.iinfo(np.int64).max // 4
    low = np.where(valid[:, :, None], ymin, big).min(axis=1)  # (U, K), non-decreasing in k
    high = np.where(valid[:, :, None], ymin, -big).max(axis=1)
    nset, nk = low.shape
    # one searchsorted over all sets: offset each set's rows far from the others
    span = int(max(high.max(), low.max()) - min(high.min(), low.min())) + 4 * ny + 8
    off = (np.arange(nset, dtype=np.int64) * span)[:, None]
    k = np.arange(nk)[None, :]
    lo = np.searchsorted((high + off).ravel(), (low - ny + off).ravel(), side="right").reshape(nset, nk)
    hi = np.searchsorted((low + off).ravel(), (high + ny + off).ravel(), side="left").reshape(nset, nk) - 1
    lo -= np.arange(nset)[:, None] * nk
    hi -= np.arange(nset)[:, None] * nk
    band = int(np.max(np.maximum(k - lo, hi - k)))
    return max(band, 1)


def _fiber_band(xmin: np.ndarray, valid: np.ndarray, nx: int) -> int:
    """Largest slot distance d such that two fibers d slots apart in some patch have
    spots less than a stamp width apart in x at some wavelength (so may share pixels).

    ``xmin``: (U, F, K) spot corner columns of the distinct sets of patch fibers,
    ``valid`` (U, F) their real slots."""
    band = 0
    for d in range(1, xmin.shape[1]):  # slot distances (at most a subbundle wide)
        both = valid[:, d:] & valid[:, :-d]
        if np.any(both[:, :, None] & (np.abs(xmin[:, d:] - xmin[:, :-d]) < nx)):
            band = d
    return band
