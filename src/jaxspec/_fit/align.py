"""Trace offsets of a starting PSF measured from the images, before any check or fit.

Another night's PSF can be a few pixels off the new images (the CCD moved): its spots
then miss their lines (about 1 px wide) and the Levenberg-Marquardt of the fit, or the
checks before it, fail.  :func:`measure_trace_offsets` measures, per bundle, one shift
``(dx, dy)`` [pixels] of the start's traces by cross-correlating the images with what the
start PSF predicts there (host NumPy, a fraction of a second per bundle);
:func:`apply_trace_offsets` adds the shifts to the constant Legendre coefficient of each
bundle's x and y traces (a constant shift in pixels).

**The templates** are the start PSF's own Gauss-Hermite profiles (pixel-integrated, its
GHSIGX, GHSIGY and GH-i-j at each point; tails left out), at its predicted positions:

* x, from the flats (the arcs when there is none): each fiber's cross-dispersion profile
  on up to ``_MAX_ROWS`` rows of the bundle's box, ``sum_i GH-i-0 g_i(x)`` (the spot
  summed over rows: the ``j > 0`` orders integrate to zero), normalised per row;
* y, from the arcs: each line's spot in each fiber, weighted by the line list's relative
  fluxes (``LineList.flux``), at the x already measured.

**The correlation** ``C(k) = sum_p T_p D_{p + k}`` over integer data offsets ``k`` in
``-K .. K`` (``K = ceil(max_shift) + 1``; 2-d when the arcs alone give x and y) gives the
coarse peak; then, template rebuilt at the current shift ``s``, ``C`` at ``k = -1, 0, 1``
and the vertex of the parabola through ``log C`` moves ``s`` until the step is below
1e-4 px.  ``C(k)`` is then the template's correlation with itself at lag ``k - e``
(``e`` the remaining error), even in ``e`` when the start's spot shapes are the images':
the fixed point ``C(-1) = C(+1)`` is the shift, whatever the sampling or a flat
background.  Template items (a fiber's row, a spot) whose window at any offset leaves an
image are left out for that image, so every offset sees the same pixels; pixels with
``ivar <= 0`` count as no light.

**Refusals** (:class:`jaxspec._fit.patch.BundleInputError`, naming the fibers, the images
and what to change):

* no light: the correlation peak is below ``_MIN_SNR`` times its noise, or fewer than half
  of the bundle's live fibers have light at the best offset (e.g. a bundle off the image
  whose neighbour is within reach);
* at the edge: the best offset is at the end of the window, or the refined shift is
  beyond ``max_shift``;
* ambiguous: another local maximum of ``C``, 2 px or more away, is within
  ``_TOOTH_FRACTION`` of one comb tooth's share of the peak (a tooth: one fiber for x,
  one line for y, counted by ``(sum c)^2 / sum c^2`` over their contributions ``c``) or
  within 5 sigma of it.  The fibers of a bundle are evenly spaced (7.2-7.3 px in DESI's
  r0), so a shift by one pitch loses only the light of an end fiber (4 % in a bundle of
  25): the gaps between bundles fix x, and broken fibers are left out of the template.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from .._simulation.calib import LineList
from ..psf._gausshermite import GaussHermitePSF, pixel_gauss_hermite_of
from .patch import BrokenFibers, BundleInputError, _as_input, _host_wavelength, _host_x, _host_y, check_broken_fibers

__all__ = ["TraceOffset", "apply_trace_offsets", "measure_bundle_offset", "measure_trace_offsets"]

log = logging.getLogger("jaxspec.fit")

#: the x templates use at most this many rows of a bundle's box (evenly spaced)
_MAX_ROWS = 200
#: the correlation peak must exceed its noise this many times
_MIN_SNR = 10.0
#: a secondary peak must fall short of the main one by this fraction of one tooth's share
_TOOTH_FRACTION = 0.25
#: a fiber has light at the best offset when its correlation exceeds this fraction of the brightest's
_LIT_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class TraceOffset:
    """The measured offset of one bundle's traces in the images (:func:`measure_bundle_offset`).

    Attributes:
        fibers: ``(nf,)`` the bundle's fibers (absolute; broken ones included: they get the shift too).
        dx, dy: the shift [pixels] of the images relative to the start PSF's traces (0 when
            not measured): :func:`apply_trace_offsets` adds them to the traces.
        x_from, y_from: the images each was measured on (``"flat"``, ``"arc"``; ``""``: not
            measured, e.g. ``dy`` without arcs).
        snr_x, snr_y: the correlation peak above its baseline over its noise (NaN: not measured).
        contrast_x, contrast_y: ``1 - h2 / h1``, ``h1`` the peak and ``h2`` the highest other
            local maximum 2 px or more away (above the baseline; 1: none in the window).
        max_shift: the search window [pixels].
    """

    fibers: np.ndarray
    dx: float
    dy: float
    x_from: str
    y_from: str
    snr_x: float
    snr_y: float
    contrast_x: float
    contrast_y: float
    max_shift: float

    def describe(self) -> str:
        """One line for the logs: the shifts, where from, S/N and contrast."""
        def part(name, v, src, snr, con):
            if not src:
                return f"{name} not measured"
            return f"{name} {v:+.3f} px ({src}s, S/N {snr:.0f}, contrast {con:.3f})"
        return (f"fibers {self.fibers[0]}-{self.fibers[-1]}: "
                + part("dx", self.dx, self.x_from, self.snr_x, self.contrast_x) + ", "
                + part("dy", self.dy, self.y_from, self.snr_y, self.contrast_y))


# ---------------------------------------------------------------- host Gauss-Hermite profiles
def _pixel_gh(lo: np.ndarray, centre: np.ndarray, sigma: np.ndarray, n: int, deg: int) -> np.ndarray:
    """Pixel-integrated Gauss-Hermite functions of orders ``0 .. deg`` on pixels ``lo .. lo + n - 1``,
    in NumPy (:func:`jaxspec.psf._gausshermite.pixel_gauss_hermite_of`): ``S + (deg + 1, n)``."""
    return pixel_gauss_hermite_of(lo, centre, sigma, n, deg, np)


def _host_params(psf: "_Host", names: Sequence[str], fibers: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """Parameters ``names`` of ``fibers`` ``(nf,)`` at ``wave`` ``(nf, n)`` [A]: ``(len(names), nf, n)``."""
    rows = np.asarray([psf.param_index(n) for n in names], dtype=int)
    coef = psf.params[rows][:, fibers]  # (nr, nf, ncoef)
    lo, hi = psf.pdomain
    t = (wave - lo) * (2.0 / (hi - lo)) - 1.0
    V = np.polynomial.legendre.legvander(t, coef.shape[-1] - 1)  # (nf, n, ncoef)
    return np.einsum("fnk,rfk->rfn", V, coef)


class _Host:
    """The start PSF's arrays as NumPy, read once (the host helpers of :mod:`.patch` take it for the PSF)."""

    def __init__(self, psf: GaussHermitePSF):
        for name in ("xcoef", "ycoef", "wcoef", "ylim", "params"):
            setattr(self, name, np.asarray(getattr(psf, name), dtype=float))
        for name in ("xdomain", "ydomain", "pdomain", "wmin", "wmax", "ghdegx", "ghdegy", "hsizex", "hsizey"):
            setattr(self, name, getattr(psf, name))
        self._index = {n: i for i, n in enumerate(psf.param_names)}

    def param_index(self, name: str) -> int:
        return self._index[name]


@dataclasses.dataclass
class _Template:
    """Template items: window ``vals`` ``(m, ny, nx)`` at CCD row ``r0``, column ``c0`` ``(m,)``,
    each of fiber ``fib`` (index in the bundle's live fibers) and line ``line`` (-1: none)."""

    r0: np.ndarray
    c0: np.ndarray
    vals: np.ndarray
    fib: np.ndarray
    line: np.ndarray

    def select(self, keep) -> "_Template":
        return _Template(self.r0[keep], self.c0[keep], self.vals[keep], self.fib[keep], self.line[keep])


def _half(sigma: np.ndarray, hsize: int) -> int:
    """Template half width [pixels]: 4 sigma, at most the PSF's stamp half size."""
    return int(min(hsize, max(2, math.ceil(4.0 * float(np.nanmax(sigma))))))


def _flat_template(psf, fibers, rows, sx, sy) -> _Template:
    """Each fiber's cross-dispersion profile on ``rows``, the traces shifted by ``(sx, sy)``."""
    wave = _host_wavelength(psf, fibers, rows - sy)  # (nf, n): the wavelength that lands on each row
    ok = (wave >= psf.wmin) & (wave <= psf.wmax)
    wave = np.where(ok, wave, psf.wmin)
    xc = _host_x(psf, fibers, wave) + sx
    names = ["GHSIGX"] + [f"GH-{i}-0" for i in range(psf.ghdegx + 1)]
    p = _host_params(psf, names, fibers, wave)
    sig, gh = p[0], np.moveaxis(p[1:], 0, -1)  # (nf, n), (nf, n, ngh)
    h = _half(sig[ok] if ok.any() else sig, psf.hsizex)
    lo = np.rint(xc).astype(np.int64) - h
    prof = np.einsum("fni,fnix->fnx", gh, _pixel_gh(lo.astype(float), xc, sig, 2 * h + 1, psf.ghdegx))
    tot = prof.sum(axis=-1)
    ok &= tot > 0
    prof = prof / np.where(ok, tot, 1.0)[..., None]
    nf, n = xc.shape
    fib = np.broadcast_to(np.arange(nf)[:, None], (nf, n))
    r0 = np.broadcast_to(rows[None, :].astype(np.int64), (nf, n))
    return _Template(r0[ok], lo[ok], prof[ok][:, None, :], fib[ok], np.full(int(ok.sum()), -1))


def _arc_template(psf, fibers, lines: LineList, sx, sy, core: bool = False) -> _Template:
    """Every line's spot in every fiber (unit sum times the line's relative flux), shifted by ``(sx, sy)``;
    ``core``: 5 x 5 pixels only (the coarse 2-d search)."""
    nf, nl = len(fibers), len(lines)
    wave = np.broadcast_to(lines.wave[None, :], (nf, nl))
    xc = _host_x(psf, fibers, wave) + sx
    yc = _host_y(psf, fibers, wave) + sy
    names = ["GHSIGX", "GHSIGY"] + [f"GH-{i}-{j}" for j in range(psf.ghdegy + 1) for i in range(psf.ghdegx + 1)]
    p = _host_params(psf, names, fibers, wave)
    sx_, sy_ = p[0], p[1]
    gh = np.moveaxis(p[2:], 0, -1).reshape(nf, nl, psf.ghdegy + 1, psf.ghdegx + 1)  # [j, i]: GH-i-j
    hx = 2 if core else _half(sx_, psf.hsizex)
    hy = 2 if core else _half(sy_, psf.hsizey)
    lox = np.rint(xc).astype(np.int64) - hx
    loy = np.rint(yc).astype(np.int64) - hy
    fx = _pixel_gh(lox.astype(float), xc, sx_, 2 * hx + 1, psf.ghdegx)  # (nf, nl, dgx+1, nx)
    fy = _pixel_gh(loy.astype(float), yc, sy_, 2 * hy + 1, psf.ghdegy)  # (nf, nl, dgy+1, ny)
    spot = np.einsum("flji,fljy,flix->flyx", gh, fy, fx)
    tot = spot.sum(axis=(-1, -2))
    wgt = np.broadcast_to(lines.flux[None, :] / np.max(lines.flux), (nf, nl))
    ok = (tot > 0) & (wgt > 0)
    spot = spot * (wgt / np.where(ok, tot, 1.0))[..., None, None]
    fib = np.broadcast_to(np.arange(nf)[:, None], (nf, nl))
    lin = np.broadcast_to(np.arange(nl)[None, :], (nf, nl))
    return _Template(loy[ok], lox[ok], spot[ok], fib[ok], lin[ok])


# ---------------------------------------------------------------- correlation
def _inside(t: _Template, ixy, K: int, axes: str) -> np.ndarray:
    """Items whose window stays inside the image at every offset up to ``K`` along ``axes``."""
    ny, nx = t.vals.shape[1:]
    kx = K if "x" in axes else 0
    ky = K if "y" in axes else 0
    return ((t.c0 - kx >= ixy[0]) & (t.c0 + nx - 1 + kx < ixy[1])
            & (t.r0 - ky >= ixy[2]) & (t.r0 + ny - 1 + ky < ixy[3]))


def _correlate(images, t: _Template, offsets, K: int, axes: str, per_item: bool = False):
    """``C``, ``V`` ``(q,)``: ``sum_p T_p D_{p + k}`` and its variance, summed over ``images``, for
    the data offsets ``offsets`` ``(q, 2)`` = ``(kx, ky)`` [pixels] (at most ``K`` along ``axes``, 0
    along the other); with ``per_item`` also the items' terms ``(q, m)``.  Returns ``(C, V, Ci, Vi,
    nused)`` (``nused``: items used, summed over the images).  Each item's window, widened by ``K``,
    is gathered once per image; every offset is a slice of it."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    q, m = len(offsets), len(t.r0)
    ny, nx = t.vals.shape[1:]
    Kx = K if "x" in axes else 0
    Ky = K if "y" in axes else 0
    C, V = np.zeros(q), np.zeros(q)
    Ci = np.zeros((q, m)) if per_item else None
    Vi = np.zeros((q, m)) if per_item else None
    nused = 0
    for image, ivar, ixy in images:
        use = _inside(t, ixy, K, axes)
        if not use.any():
            continue
        nused += int(use.sum())
        idx = np.flatnonzero(use)
        rr = (t.r0[idx] - ixy[2] - Ky)[:, None, None] + np.arange(ny + 2 * Ky)[None, :, None]
        cc = (t.c0[idx] - ixy[0] - Kx)[:, None, None] + np.arange(nx + 2 * Kx)[None, None, :]
        d, w = image[rr, cc], ivar[rr, cc]
        good = np.isfinite(d) & np.isfinite(w) & (w > 0)
        d = np.where(good, d, 0.0)
        var = np.where(good, 1.0 / np.where(good, w, 1.0), 0.0)
        tv = t.vals[idx]
        tv2 = tv * tv
        for j, (kx, ky) in enumerate(offsets):
            sl = (slice(None), slice(Ky + ky, Ky + ky + ny), slice(Kx + kx, Kx + kx + nx))
            c = np.einsum("iyx,iyx->i", tv, d[sl])
            v = np.einsum("iyx,iyx->i", tv2, var[sl])
            C[j] += c.sum()
            V[j] += v.sum()
            if per_item:
                Ci[j, idx] += c
                Vi[j, idx] += v
    return C, V, Ci, Vi, nused


def _vertex(c: np.ndarray) -> float:
    """Offset of the maximum of the parabola through ``log c`` (``c`` at -1, 0, 1; plain ``c`` when
    not all positive), clipped to [-1, 1] (toward the higher side when not a maximum)."""
    y = np.log(c) if np.all(c > 0) else np.asarray(c, float)
    den = y[0] - 2.0 * y[1] + y[2]
    if not den < 0:
        return 1.0 if y[2] > y[0] else -1.0
    return float(np.clip(0.5 * (y[0] - y[2]) / den, -1.0, 1.0))


def _n_teeth(c: np.ndarray) -> float:
    """Effective number of comb teeth with contributions ``c``: ``(sum c)^2 / sum c^2`` (positive ones)."""
    c = np.clip(c, 0.0, None)
    s2 = float(np.sum(c * c))
    return float(np.sum(c)) ** 2 / s2 if s2 > 0 else 1.0


def _names(kind: str, n: int) -> str:
    return f"{kind} 0" if n == 1 else f"{kind}s 0-{n - 1}"


def _peaks(Cg: np.ndarray, base: float) -> list[tuple[float, tuple[int, int], tuple[float, float], bool]]:
    """Local maxima of the correlation grid ``Cg`` ``(nky, nkx)`` (an axis of length 1: not searched),
    highest first: ``(height above base, grid index, sub-pixel offset from it (x, y), at an edge)``,
    the height and offset from the parabola through ``log(C - base)`` along each searched axis
    (plain ``C - base`` where a neighbour is not above the base; the axes' rises added)."""
    pad = np.pad(Cg, 1, constant_values=-np.inf)
    ny, nx = Cg.shape
    nbrs = [pad[1 + a:1 + a + ny, 1 + b:1 + b + nx] for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
    is_max = np.all([Cg >= v for v in nbrs], axis=0) & (Cg > base)
    out = []
    for a, b in zip(*np.nonzero(is_max)):
        c0 = float(Cg[a, b]) - base
        rises, offs, edge = [], [0.0, 0.0], False
        for axis, (n, i) in enumerate(((nx, b), (ny, a))):  # x, then y
            if n == 1:
                continue
            if i == 0 or i == n - 1:
                edge = True
                continue
            trio = (Cg[a, b - 1:b + 2] if axis == 0 else Cg[a - 1:a + 2, b]) - base
            use_log = bool(np.all(trio > 0))
            y = np.log(trio) if use_log else trio
            den = y[0] - 2.0 * y[1] + y[2]
            p = _vertex(trio)
            rises.append((use_log, 0.5 * (y[2] - y[0]) * p + 0.5 * den * p * p))
            offs[axis] = p
        h = c0
        for use_log, r in rises:
            h = h * math.exp(r) if use_log else h + r
        out.append((float(h), (int(a), int(b)), (offs[0], offs[1]), edge))
    out.sort(key=lambda v: -v[0])
    return out


def _measure(images, kind, t: _Template, axes, fibers, nlive, max_shift, tooth_keys, what):
    """The coarse correlation along ``axes`` (``"x"``, ``"y"`` or ``"xy"``) of ``images`` with the
    template ``t``, its checks (module docstring) and the peak: ``(snr, contrast, (sx, sy))``, the
    shift from the parabola through the grid (0 on an axis not searched)."""
    K = int(math.ceil(max_shift)) + 1
    ks = np.arange(-K, K + 1)
    kxs = ks if "x" in axes else np.zeros(1, dtype=int)
    kys = ks if "y" in axes else np.zeros(1, dtype=int)
    grid = np.stack(np.meshgrid(kxs, kys, indexing="xy"), axis=-1).reshape(-1, 2)  # (kx, ky), ky major
    C, V, _, _, nused = _correlate(images, t, grid, K, axes)
    src = _names(kind, len(images))
    span = f"fibers {fibers[0]}-{fibers[-1]}"
    advice = ("check that the images cover these fibers and wavelengths, list fibers without light in "
              "--broken-fibers, or skip the alignment (--no-align, align=False)")
    if nused == 0:
        raise BundleInputError(
            f"{src}: no lamp light to align {span}: no valid pixel (ivar > 0) of the image(s) holds their "
            f"predicted {what} within +-{max_shift:g} px (--max-shift): {advice}")
    Cg, Vg = C.reshape(len(kys), len(kxs)), V.reshape(len(kys), len(kxs))
    base = float(np.min(Cg))
    peaks = _peaks(Cg, base)
    if not peaks:
        raise BundleInputError(f"{src}: no lamp light to align {span}: the correlation with their predicted {what} "
                               f"is flat within +-{max_shift:g} px: {advice}")
    h1, i0, frac, edge = peaks[0]
    snr = h1 / math.sqrt(max(float(Vg[i0]), 1e-300))
    if not snr >= _MIN_SNR:
        raise BundleInputError(
            f"{src}: no lamp light to align {span}: the correlation with their predicted {what} peaks at "
            f"S/N {snr:.1f} within +-{max_shift:g} px (need {_MIN_SNR:g}): {advice}")
    kx, ky = int(kxs[i0[1]]), int(kys[i0[0]])
    # the fibers (and lines) that make the peak
    _, _, Ci, Vi, _ = _correlate(images, t, [(kx, ky)], K, axes, per_item=True)
    per_fib = np.bincount(t.fib, weights=Ci[0], minlength=nlive)
    var_fib = np.bincount(t.fib, weights=Vi[0], minlength=nlive)
    lit = (per_fib > _LIT_FRACTION * per_fib.max()) & (per_fib > 3.0 * np.sqrt(var_fib))
    if lit.sum() < 0.5 * nlive:
        raise BundleInputError(
            f"{src}: no lamp light to align {span}: at the best offset ({kx}, {ky}) px only {int(lit.sum())} of "
            f"their {nlive} fibers (not broken) show light at their predicted {what}, which then meet another "
            f"bundle's fibers or stray light: {advice}")
    at = (kx, ky) if axes == "xy" else (kx if axes == "x" else ky)
    if edge:
        raise BundleInputError(
            f"{src}: the {what} of {span} match best at the edge of the search window (+-{max_shift:g} px, "
            f"offset {at} px): the start PSF is further off than that; raise --max-shift (max_shift=) or "
            "start from a closer PSF (--psf-init)")
    nteeth = _n_teeth(per_fib)
    if "line" in tooth_keys:
        on = t.line >= 0
        nteeth = max(nteeth, _n_teeth(np.bincount(t.line[on], weights=Ci[0][on])))
    contrast = 1.0
    others = [p for p in peaks[1:] if max(abs(p[1][0] - i0[0]), abs(p[1][1] - i0[1])) >= 2]
    if others:
        h2, j2, _, _ = others[0]
        contrast = 1.0 - h2 / h1
        noise = math.sqrt(max(float(Vg[i0]) + float(Vg[j2]), 1e-300))
        if h1 - h2 < _TOOTH_FRACTION * h1 / nteeth or h1 - h2 < 5.0 * noise:
            k2 = (int(kxs[j2[1]]), int(kys[j2[0]]))
            other = k2 if axes == "xy" else (k2[0] if axes == "x" else k2[1])
            raise BundleInputError(
                f"{src}: the offset of {span} is ambiguous: their {what} match offsets {at} and {other} px about "
                f"as well (peak heights 1 : {h2 / h1:.3f}, one of {nteeth:.1f} comb teeth {1 / nteeth:.3f}; e.g. "
                "one fiber pitch apart, or a bundle with an unlit end fiber): lower --max-shift (max_shift=, now "
                f"{max_shift:g} px) below that distance, fit whole bundles (their gaps fix x; list fibers without "
                "light in --broken-fibers), start from a closer PSF, or skip the alignment (--no-align, align=False)")
    return snr, contrast, (kx + frac[0], ky + frac[1])


def _refine(images, build, ax: str, s: float, K: int, nit: int = 8) -> float:
    """Move the shift ``s`` along ``ax`` until ``C(-1) = C(+1)`` (template rebuilt at ``s``)."""
    offs = [(-1, 0), (0, 0), (1, 0)] if ax == "x" else [(0, -1), (0, 0), (0, 1)]
    for _ in range(nit):
        t = build(s)
        C = _correlate(images, t, offs, K, ax)[0]
        step = _vertex(C)
        s += step
        if abs(step) < 1e-4:
            break
    return s


# ---------------------------------------------------------------- public
def measure_bundle_offset(
    psf: GaussHermitePSF,
    arcs: Sequence = (),
    flats: Sequence = (),
    *,
    lines: LineList | None = None,
    fibers,
    waverange: tuple[float, float] | None = None,
    max_shift: float = 8.0,
    broken_fibers: BrokenFibers = None,
) -> TraceOffset:
    """The offset ``(dx, dy)`` [pixels] of one bundle's traces in the images (see the module docstring).

    Args:
        psf: the start PSF.
        arcs, flats: calibration images (CalibImage, Preproc, ``(image, ivar)`` or ``(image, ivar, xyrange)``).
        lines: the arc line list (required with arcs); ``flux`` weights the lines.
        fibers: ``(nf,)`` the bundle's consecutive fibers.
        waverange: wavelengths [A] whose rows are used (default: the PSF's common range).
        max_shift: the search window [pixels], on each axis.
        broken_fibers: fibers without light: left out of the templates (they get the shift).

    Returns:
        A :class:`TraceOffset`: x from the flats (the arcs when there is none), y from the arcs
        (not measured without arcs or without a line in ``waverange``).

    Raises:
        BundleInputError: no light, a peak at the edge of the window, or an ambiguous one.
        ValueError: bad options.
    """
    if not isinstance(psf, GaussHermitePSF):
        raise TypeError(f"trace alignment needs a GaussHermitePSF, got {type(psf).__name__}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, float, np.integer, np.floating)) \
            or not (np.isfinite(max_shift) and max_shift >= 1.0):
        raise ValueError(f"max_shift (--max-shift) must be a number of pixels >= 1, got {max_shift!r}")
    max_shift = float(max_shift)
    if not len(arcs) and not len(flats):
        raise ValueError("trace alignment needs at least one arc or flat image")
    if len(arcs) and lines is None:
        raise ValueError("arc images need a line list (lines=...)")
    fibers = np.asarray(fibers, dtype=int)
    if fibers.ndim != 1 or len(fibers) == 0 or np.any(np.diff(fibers) != 1):
        raise ValueError(f"fibers must be consecutive fiber indices, got {fibers}")
    psf.check_fibers(int(fibers[0]), len(fibers))
    if waverange is None:
        waverange = (psf.wmin_all, psf.wmax_all)
    if not psf.wmin <= waverange[0] < waverange[1] <= psf.wmax:
        raise ValueError(f"waverange {tuple(float(w) for w in waverange)}: need wmin < wmax inside the PSF's "
                         f"{psf.wmin:.1f}-{psf.wmax:.1f} A")
    broken = check_broken_fibers(broken_fibers, int(fibers[0]), len(fibers))
    live = fibers[~np.isin(fibers, broken)]
    K = int(math.ceil(max_shift)) + 1

    def prepared(group, kind):
        out = []
        for n, im in enumerate(group):
            image, ivar, ixy = _as_input(im, f"{kind} {n}")
            image, ivar = np.asarray(image, dtype=float), np.asarray(ivar, dtype=float)
            if image.shape != ivar.shape or image.ndim != 2:
                raise ValueError(f"{kind} {n}: image {image.shape} and ivar {ivar.shape} must be 2-d arrays of "
                                 "one shape")
            out.append((image, ivar, tuple(int(v) for v in ixy)))
        return out

    arcs_, flats_ = prepared(arcs, "arc"), prepared(flats, "flat")
    box = psf.xyrange((int(fibers[0]), int(fibers[-1]) + 1), waverange)
    rows = np.arange(box[2], box[3], dtype=float)
    if len(rows) > _MAX_ROWS:
        rows = np.unique(np.rint(np.linspace(box[2], box[3] - 1, _MAX_ROWS)))
    plines = None
    if len(arcs_):
        plines = lines.between(max(waverange[0], psf.wmin), min(waverange[1], psf.wmax))
        plines = plines.select(plines.flux > 0)
    shift = {"x": 0.0, "y": 0.0}
    res = dict(x_from="", y_from="", snr_x=float("nan"), snr_y=float("nan"), contrast_x=float("nan"),
               contrast_y=float("nan"))

    host = _Host(psf)

    def flat_build(sx, sy):
        return _flat_template(host, live, rows, sx, sy)

    def arc_build(sx, sy, core=False):
        return _arc_template(host, live, plines, sx, sy, core=core)

    have_lines = plines is not None and len(plines) > 0
    if len(flats_):
        snr, con, est = _measure(flats_, "flat", flat_build(0.0, 0.0), "x", fibers, len(live), max_shift,
                                 ("fiber",), "traces")
        shift["x"] = _refine(flats_, lambda s: flat_build(s, 0.0), "x", est[0], K)
        res.update(x_from="flat", snr_x=snr, contrast_x=con)
    if have_lines:
        if len(flats_):
            snr, con, est = _measure(arcs_, "arc", arc_build(shift["x"], 0.0), "y", fibers, len(live), max_shift,
                                     ("line",), "arc-line spots")
            shift["y"] = est[1]
        else:
            snr, con, est = _measure(arcs_, "arc", arc_build(0.0, 0.0, core=True), "xy", fibers, len(live),
                                     max_shift, ("fiber", "line"), "arc-line spots")
            shift["x"], shift["y"] = est
            res.update(x_from="arc", snr_x=snr, contrast_x=con)
            shift["x"] = _refine(arcs_, lambda s: arc_build(s, shift["y"]), "x", shift["x"], K)
        res.update(y_from="arc", snr_y=snr, contrast_y=con)
        shift["y"] = _refine(arcs_, lambda s: arc_build(shift["x"], s), "y", shift["y"], K)
        # each template depends a little on the other shift (the traces' tilt): once more
        x_images = flats_ if len(flats_) else arcs_
        x_build = ((lambda s: flat_build(s, shift["y"])) if len(flats_) else (lambda s: arc_build(s, shift["y"])))
        shift["x"] = _refine(x_images, x_build, "x", shift["x"], K)
        shift["y"] = _refine(arcs_, lambda s: arc_build(shift["x"], s), "y", shift["y"], K)
    if len(arcs_) and not len(flats_) and not have_lines:
        log.info("trace alignment of fibers %d-%d: no arc line in %s A and no flat: nothing to align on",
                 fibers[0], fibers[-1], tuple(waverange))
    for ax in ("x", "y"):
        if res[f"{ax}_from"] and not abs(shift[ax]) <= max_shift:
            raise BundleInputError(
                f"{_names(res[f'{ax}_from'], len(flats_ if res[f'{ax}_from'] == 'flat' else arcs_))}: the d{ax} "
                f"offset of fibers {fibers[0]}-{fibers[-1]} is {shift[ax]:+.2f} px, beyond the search window "
                f"+-{max_shift:g} px: raise --max-shift (max_shift=) or start from a closer PSF (--psf-init)")
    return TraceOffset(fibers=fibers.copy(), dx=float(shift["x"]) if res["x_from"] else 0.0,
                       dy=float(shift["y"]) if res["y_from"] else 0.0, max_shift=max_shift, **res)


def measure_trace_offsets(
    psf: GaussHermitePSF,
    arcs: Sequence = (),
    flats: Sequence = (),
    *,
    lines: LineList | None = None,
    specmin: int = 0,
    nspec: int | None = None,
    bundlesize: int = 25,
    waverange: tuple[float, float] | None = None,
    max_shift: float = 8.0,
    broken_fibers: BrokenFibers = None,
) -> list[TraceOffset]:
    """The offsets of the start PSF's traces in the images, bundle by bundle (:func:`measure_bundle_offset`).

    Args:
        psf: the start PSF (e.g. another night's).
        arcs, flats, lines, waverange, max_shift: as for :func:`measure_bundle_offset`.
        specmin, nspec: the fibers ``specmin .. specmin + nspec - 1`` (default: to the last).
        bundlesize: fibers per bundle (consecutive, from ``specmin``).
        broken_fibers: fibers without light (left out of the templates; they get their bundle's
            shift); a bundle all of whose fibers are broken is not measured (``dx = dy = 0``).

    Returns:
        One :class:`TraceOffset` per bundle; give it to :func:`apply_trace_offsets`.

    Raises:
        BundleInputError: the first bundle whose offset cannot be measured (see the module docstring).
    """
    nspec = psf.nspec - specmin if nspec is None else int(nspec)
    psf.check_fibers(specmin, nspec)
    if bundlesize < 1:
        raise ValueError(f"bundlesize must be >= 1, got {bundlesize}")
    broken = check_broken_fibers(broken_fibers, specmin, nspec)
    out = []
    for s in range(specmin, specmin + nspec, bundlesize):
        fib = np.arange(s, min(s + bundlesize, specmin + nspec))
        bb = fib[np.isin(fib, broken)]
        if len(bb) == len(fib):
            out.append(TraceOffset(fib, 0.0, 0.0, "", "", float("nan"), float("nan"), float("nan"), float("nan"),
                                   float(max_shift)))
            continue
        out.append(measure_bundle_offset(psf, arcs, flats, lines=lines, fibers=fib, waverange=waverange,
                                         max_shift=max_shift, broken_fibers=bb))
    return out


def apply_trace_offsets(psf: GaussHermitePSF, offsets: Sequence[TraceOffset | None]) -> GaussHermitePSF:
    """``psf`` with each offset's ``dx``, ``dy`` [pixels] added to the constant Legendre coefficient of
    its fibers' x and y traces (every fiber of the bundle, broken ones too), the inverse trace refitted.

    Args:
        psf: the start PSF, ``xcoef``/``ycoef`` ``(nspec, ncoef)``.
        offsets: :class:`TraceOffset` s (e.g. of :func:`measure_trace_offsets`; None entries skipped).

    Returns:
        The shifted PSF; every other coefficient, and every other fiber, kept bit for bit.
    """
    xcoef = np.array(psf.xcoef, dtype=float)
    ycoef = np.array(psf.ycoef, dtype=float)
    for off in offsets:
        if off is None:
            continue
        fib = np.asarray(off.fibers, dtype=int)
        xcoef[fib, 0] += off.dx
        ycoef[fib, 0] += off.dy
    return psf.with_traces(jnp.asarray(xcoef, dtype=psf.xcoef.dtype), jnp.asarray(ycoef, dtype=psf.ycoef.dtype))


def align_bundles(psf: GaussHermitePSF, arcs, flats, bundles, broken, *, lines, waverange, max_shift):
    """Measure every bundle (all-broken ones skipped) before any check: ``(aligned_psf, offsets, errors)``,
    ``offsets[i]`` a :class:`TraceOffset` or None, ``errors`` ``{i: BundleInputError}`` for the bundles
    that could not be measured (their traces are left as they are); each measured one logged."""
    offsets, errors = [], {}
    for i, fib in enumerate(bundles):
        bb = np.asarray(fib)[np.isin(fib, broken)]
        if len(bb) == len(fib):
            offsets.append(None)
            continue
        try:
            off = measure_bundle_offset(psf, arcs, flats, lines=lines, fibers=fib, waverange=waverange,
                                        max_shift=max_shift, broken_fibers=bb)
        except BundleInputError as err:
            errors[i] = err
            offsets.append(None)
            continue
        log.info("fit-psf: start PSF aligned, %s", off.describe())
        offsets.append(off)
    return apply_trace_offsets(psf, [o for o in offsets if o is not None]), offsets, errors
