"""Patch geometry: how a frame is cut into overlapping patches (host-side NumPy).

A *patch* is a block of fibers (a subbundle plus one neighbour on each side inside
its bundle) times a block of wavelengths (``wavesize`` core bins plus padding on
each side), with the CCD pixel box that covers them.  The rules reproduce the
established code (specter ``ex2d``) so that jaxspec solves exactly the same
sub-problems; only the centre of each patch is kept when stitching.

Everything here is decided once on the host from the PSF's traces and becomes
static shapes (the largest patch) plus index arrays, so that all patches of a frame
go through one compiled, vmapped solve.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..psf import PSF


def split_bundle(bundlesize: int, nsub: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split a bundle into ``nsub`` subbundles.

    Returns ``(core, extract)``: the fiber offsets each subbundle owns, and the
    offsets it extracts (its own plus one neighbour each side inside the bundle).
    Smaller subbundles go to the middle when ``bundlesize % nsub != 0``.
    """
    sizes = [len(a) for a in np.array_split(np.arange(bundlesize), nsub)]
    for i in range(nsub - 1):  # bubble the larger sizes outward (one pass)
        if sizes[i] > sizes[i + 1]:
            sizes[i], sizes[i + 1] = sizes[i + 1], sizes[i]
    core, extract, start = [], [], 0
    for n in sizes:
        own = np.arange(start, start + n)
        lo = [own[0] - 1] if own[0] > 0 else []
        hi = [own[-1] + 1] if own[-1] < bundlesize - 1 else []
        core.append(own)
        extract.append(np.concatenate([lo, own, hi]).astype(int))
        start += n
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


class _TraceTables:
    """Per-fiber tables of the traces sampled at every CCD row (host NumPy)."""

    def __init__(self, psf: PSF, fibers: np.ndarray):
        self.psf = psf
        rows = np.arange(psf.npix_y, dtype=float)
        self.fibers = np.asarray(fibers)
        self.index = {int(f): i for i, f in enumerate(self.fibers)}
        self.wave_rows = np.asarray(psf.wavelength(self.fibers[:, None], rows[None, :]))
        self.x_rows = np.asarray(psf.x(self.fibers[:, None], self.wave_rows))
        self.y_rows = np.asarray(psf.y(self.fibers[:, None], self.wave_rows))


def _xyranges(psf: PSF, tables: _TraceTables, specrange: np.ndarray, waverange: np.ndarray) -> np.ndarray:
    """Vectorised ``psf.xyrange`` for many patches: (P, 2) fibers, (P, 2) waves -> (P, 4)."""
    ny, nx = psf.stamp_shape
    specmin, specmax = specrange[:, 0], specrange[:, 1]
    wmin = np.maximum(waverange[:, 0], psf.wmin)
    wmax = np.minimum(waverange[:, 1], psf.wmax)
    npatch = len(specmin)

    # y: spots of the lowest / highest trace at the ends (specter also looks at
    # the fiber just past the range).
    nf = int((specmax - specmin).max()) + 1
    fib = specmin[:, None] + np.arange(nf)[None, :]
    ok = fib <= np.minimum(specmax, psf.nspec - 1)[:, None]
    fibc = np.where(ok, fib, specmin[:, None])
    ylo = np.where(ok, np.asarray(psf.y(fibc, wmin[:, None])), np.inf)
    yhi = np.where(ok, np.asarray(psf.y(fibc, wmax[:, None])), -np.inf)
    f_lo = fibc[np.arange(npatch), np.argmin(ylo, axis=1)]
    f_hi = fibc[np.arange(npatch), np.argmax(yhi, axis=1)]
    _, ymin = psf.corners(f_lo, wmin)
    _, ymax = psf.corners(f_hi, wmax)
    ymin = np.maximum(np.asarray(ymin), 0)
    ymax = np.minimum(np.asarray(ymax) + ny, psf.npix_y)

    def extreme(fibers: np.ndarray, lower: bool) -> np.ndarray:
        # the trace's x at the block ends, all patches in one evaluation
        ends = np.stack([wmin, wmax], axis=1)  # (P, 2)
        x_end = np.asarray(psf.x(fibers[:, None], ends))
        y_end = np.asarray(psf.y(fibers[:, None], ends))
        if lower:
            on_end = (0 <= y_end - 0.5) & (y_end < psf.npix_y - 0.5)
        else:
            on_end = (-0.5 <= y_end) & (y_end < psf.npix_y - 0.5)
        end_x = np.where(on_end, x_end, np.nan)
        best_x = np.full(npatch, np.nan)
        best_w = np.zeros(npatch)
        # the trace sampled at CCD rows inside each block (host tables, per fiber)
        for f in np.unique(fibers):
            sel = np.nonzero(fibers == f)[0]
            t = tables.index[int(f)]
            w_rows, x_rows, y_rows = tables.wave_rows[t], tables.x_rows[t], tables.y_rows[t]
            if lower:
                on_rows = (0 <= y_rows - 0.5) & (y_rows < psf.npix_y - 0.5)
            else:
                on_rows = (-0.5 <= y_rows) & (y_rows < psf.npix_y - 0.5)
            inside = (w_rows[None, :] >= wmin[sel, None]) & (w_rows[None, :] <= wmax[sel, None]) & on_rows[None, :]
            cand_x = np.concatenate([np.where(inside, x_rows[None, :], np.nan), end_x[sel]], axis=1)
            cand_w = np.concatenate([np.broadcast_to(w_rows, inside.shape), ends[sel]], axis=1)
            # a block whose trace never crosses the CCD (a grid reaching past the PSF's
            # rows): fall back to the trace's x at the block's ends
            off = np.all(np.isnan(cand_x), axis=1)
            if np.any(off):
                cand_x[off, -2:] = x_end[sel][off]
            i = np.nanargmin(cand_x, axis=1) if lower else np.nanargmax(cand_x, axis=1)
            best_x[sel] = cand_x[np.arange(len(sel)), i]
            best_w[sel] = cand_w[np.arange(len(sel)), i]
        xc = np.asarray(psf.corners(fibers, best_w)[0])
        if lower:
            return np.where(best_x < 0, 0, np.maximum(xc, 0))
        return np.where(best_x > psf.npix_x, psf.npix_x, np.minimum(xc + nx, psf.npix_x))

    xmin = extreme(specmin, True)
    xmax = extreme(specmax - 1, False)
    return np.stack([xmin, xmax, ymin, ymax], axis=1).astype(np.int64)


def patch_geometry(
    psf: PSF,
    wave: np.ndarray,
    specmin: int = 0,
    nspec: int = 25,
    bundlesize: int = 25,
    nsubbundles: int = 5,
    wavesize: int = 50,
    wavepad_frac: float = 0.2,
    pixpad_frac: float = 0.8,
) -> PatchGeometry:
    """Cut fibers ``specmin .. specmin+nspec-1`` x the grid ``wave`` into patches.

    The rules of the established code: bundles of ``bundlesize`` fibers, each split
    into ``nsubbundles`` subbundles extracted with one neighbour fiber each side;
    wavelength blocks of ``wavesize`` core bins; the pixel box of the core
    (``psf.xyrange``) padded in y by ``int(pixpad_frac * ny)`` rows (one more
    above); extra wavelength bins each side for
    the rows a further ``int(wavepad_frac * ny)`` beyond (at least ``ndiag``).

    Args:
        psf: the PSF model (its traces place the pixel boxes).
        wave: (nwave,) linear wavelength grid [A].
        specmin: first fiber.
        nspec: number of fibers, a multiple of ``bundlesize``.
        bundlesize: fibers per bundle.
        nsubbundles: subbundles per bundle (``bundlesize`` a multiple of it).
        wavesize: core wavelength bins per patch.
        wavepad_frac: extra wavelength padding, as a fraction of the stamp height.
        pixpad_frac: extra pixel rows, as a fraction of the stamp height.

    Returns:
        A :class:`PatchGeometry` (host NumPy arrays, one row per patch).

    Raises:
        ValueError: a grid that is not linear and increasing, fibers or wavelengths
            outside the PSF, or sizes that do not divide as required.
    """
    wave = np.asarray(wave, dtype=float)
    dw = _check_grid(wave)
    psf.check_fibers(specmin, nspec)
    psf.check_wavelengths(wave)
    if bundlesize < 1 or nspec % bundlesize:
        raise ValueError(f"nspec ({nspec}) must be a multiple of bundlesize ({bundlesize})")
    if nsubbundles < 1 or bundlesize % nsubbundles:
        raise ValueError(f"bundlesize ({bundlesize}) must be a multiple of nsubbundles ({nsubbundles})")
    if wavesize < 1:
        raise ValueError(f"wavesize must be positive, got {wavesize}")
    nwave = len(wave)
    ny, nx = psf.stamp_shape
    ndiag = psf.ndiag(dw)

    # --- the patches, in the established order: bundle, subbundle, wave block
    core, extract = split_bundle(bundlesize, nsubbundles)
    iwaves = np.arange(0, nwave, wavesize)
    rows = []
    for blo in range(specmin, specmin + nspec, bundlesize):
        for own, ext in zip(core, extract):
            for iw in iwaves:
                rows.append((blo + ext[0], blo + ext[-1] + 1, blo + own[0], blo + own[-1] + 1, iw))
    rows = np.array(rows, dtype=np.int64)
    speclo, spechi, keeplo, keephi, iwave = rows.T
    npatch = len(rows)
    wlo = wave[iwave]
    whi = wave[np.minimum(iwave + wavesize - 1, nwave - 1)]

    tables = _TraceTables(psf, np.unique(np.concatenate([speclo, spechi - 1])))
    box = _xyranges(psf, tables, np.stack([speclo, spechi], 1), np.stack([wlo, whi], 1))

    # pad the box in y so bins just outside the core still see their pixels
    # (the established code's rule: int(pixpad_frac * ny) rows below, one more above)
    ypad = int(pixpad_frac * ny)
    box[:, 2] = np.maximum(box[:, 2] - ypad, 0)
    box[:, 3] = np.minimum(box[:, 3] + ypad + 1, psf.npix_y)

    # extra wavelength bins: those whose rows reach int(wavepad_frac * ny) beyond
    # the box along the first fiber's trace, at least ndiag each side
    wpad = int(wavepad_frac * ny)
    w_at_lo = np.asarray(psf.wavelength(speclo, box[:, 2] - wpad))
    w_at_hi = np.asarray(psf.wavelength(speclo, box[:, 3] + wpad))
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

    # each output bin comes from exactly one patch: block j // wavesize
    keep_n = np.minimum(wavesize, nwave - iwave)

    band = _coupling_band(psf, fibers, wave_ext, ny)
    fiber_band = _fiber_band(psf, fibers, fiber_valid, wave_ext, nx)

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


def _coupling_band(psf: PSF, fibers: np.ndarray, wave_ext: np.ndarray, ny: int) -> int:
    """A bound on the bin distance |k - k'| at which spots of two fibers of one patch share a row.

    For each distinct set of patch fibers, the lowest and highest spot corners over
    its fibers bound every pair's overlap (a bound is all the projection needs:
    pairs that do not overlap contribute exact zeros).
    """
    fib = np.unique(fibers)
    _, ymin = psf.corners(fib[:, None], wave_ext[None, :])
    ymin = np.asarray(ymin)
    row_of = np.full(int(fib.max()) + 1, -1)
    row_of[fib] = np.arange(len(fib))
    if np.any(np.diff(ymin, axis=1) < 0):  # traces are monotonic in wavelength; be safe otherwise
        return len(wave_ext)
    k = np.arange(len(wave_ext))
    band = 0
    for patch in np.unique(fibers, axis=0):
        rows = ymin[row_of[patch]]
        low, high = rows.min(axis=0), rows.max(axis=0)  # monotonic too
        lo = np.searchsorted(high, low - ny, side="right")  # first k' any spot of which reaches k's rows
        hi = np.searchsorted(low, high + ny, side="left") - 1  # last such k'
        band = max(band, int(np.max(np.maximum(k - lo, hi - k))))
    return max(band, 1)


def _fiber_band(psf: PSF, fibers: np.ndarray, fiber_valid: np.ndarray, wave_ext: np.ndarray, nx: int) -> int:
    """Largest slot distance d such that two fibers d slots apart in some patch have
    spots less than a stamp width apart in x at some wavelength (so may share pixels)."""
    fib = np.unique(fibers)
    xmin, _ = psf.corners(fib[:, None], wave_ext[None, :])
    xmin = np.asarray(xmin)
    row_of = np.full(int(fib.max()) + 1, -1)
    row_of[fib] = np.arange(len(fib))
    nf = fibers.shape[1]
    band = 0
    for patch, ok in {(tuple(f), tuple(v)) for f, v in zip(fibers, fiber_valid)}:
        xs = xmin[row_of[np.asarray(patch)]]
        ok = np.asarray(ok)
        for d in range(band + 1, nf):
            both = ok[d:] & ok[:-d]
            if np.any(both[:, None] & (np.abs(xs[d:] - xs[:-d]) < nx)):
                band = d
    return band
