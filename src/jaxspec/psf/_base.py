"""The interface every PSF model shares.

A PSF maps (fiber index, wavelength) to a trace centre (x, y) on the CCD and to a
pixel-integrated spot: a small stamp of fixed shape (ny, nx) whose lower-left
pixel sits at integer CCD coordinates (xmin, ymin).  Conventions follow the DESI
pipeline (specter): pixel (x, y) covers [x - 0.5, x + 0.5] x [y - 0.5, y + 0.5];
images are indexed ``image[y, x]``; wavelengths are in Angstrom.

All array methods are pure JAX functions of the module's array fields, so a PSF is
a pytree that ``jax.jit``, ``jax.vmap`` and ``jax.grad`` see through.  Integer
metadata (``nspec``, ``npix_x``, ...) are static fields; the wavelength limits
(``wmin``, ...), which differ from file to file, are leaves (:func:`wave_limit_field`),
so every PSF file of a camera shares each compiled program.  ``xyrange`` and
``ndiag`` are host-side helpers (NumPy) for deciding patch geometry.

At the CCD's edges, :meth:`PSF.spots` with ``edges="specter"`` follows specter's
``xypix`` (see docs/concepts.md, "At the CCD's edges"): a spot whose trace centre
is off the CCD's rows is dropped, and a spot whose corner falls below row (column)
0 is one row (column) short.  A fiber index outside ``0 .. nspec - 1`` raises
:class:`FiberIndexError` in every method, inside ``jit`` too when the index is
concrete.
"""

from __future__ import annotations

import abc
import functools
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from .._config import config


def _cpu_block_spots() -> int:
    """Spots per block for large CPU batches in :meth:`PSF.spots` (0: never block).

    ``JAXSPEC_CPU_BLOCK_SPOTS``, read once per process by :mod:`jaxspec._config`
    (so a compiled program never depends on a value changed later).  By default
    4096 on machines with at most 4 cores, where blocks that stay in cache make a
    full frame of spots 2x faster (1.5 s against 3.0 s on 2 cores), and 0 on larger
    ones, where XLA:CPU spreads one big batch over the cores instead (1.09 s whole
    against 1.72 s in blocks on 16 cores); see docs/performance.md.
    """
    return config().cpu_block_spots


def _block_rows(shape: tuple[int, ...]) -> int | None:
    """Leading rows per block when :meth:`PSF.spots` should evaluate in blocks, else None.

    Only on the CPU, where :func:`_cpu_block_spots` asks for it, and only for
    batches of more than twice that many spots: accelerators take a batch whole.
    The block is the largest divisor of ``shape[0]`` giving at most that many
    spots (at least one row), so no padding or copy is needed.
    """
    block = _cpu_block_spots()
    if block <= 0 or len(shape) == 0 or math.prod(shape) <= 2 * block:
        return None
    if jax.default_backend() != "cpu":
        return None
    target = max(1, block // max(1, math.prod(shape[1:])))
    rows = max(d for d in range(1, min(target, shape[0]) + 1) if shape[0] % d == 0)
    return None if rows == shape[0] else rows


def _host_float(value):
    """A PSF's wavelength limit [A] as a NumPy float64 (a tracer passes through)."""
    if isinstance(value, jax.core.Tracer):
        return value
    return np.float64(value)


def wave_limit_field():
    """Field for a PSF's wavelength limits (``wmin``, ``wmax``, ``wmin_all``, ``wmax_all``).

    They follow from the traces, so every exposure's PSF file has its own values.  As
    static fields they would be part of the PSF's tree structure, hence of the cache
    key of every compiled function that takes the PSF (the extraction kernel, the
    spots, the geometry's corners): each file would trace and compile them anew.
    Here they are leaves holding a NumPy float64: a ``float`` on the host (checks,
    default grids, messages), a traced scalar inside ``jit`` (which never reads them),
    and one tree structure for every file of a camera.
    """
    return eqx.field(converter=_host_float)


@eqx.filter_jit
def _corners(psf: "PSF", ispec, wave):
    shape = jnp.broadcast_shapes(ispec.shape, wave.shape)
    # one rank for both (leading ones), each keeping its own size: the traces then
    # broadcast without evaluating a fiber's coefficients once per wavelength
    ispec = ispec.reshape((1,) * (len(shape) - ispec.ndim) + ispec.shape)
    wave = wave.reshape((1,) * (len(shape) - wave.ndim) + wave.shape)
    x = jnp.broadcast_to(psf.x(ispec, wave), shape)
    y = jnp.broadcast_to(psf.y(ispec, wave), shape)
    xmin = jnp.trunc(x - psf.hsizex + psf._corner_shift).astype(jnp.int32)
    ymin = jnp.trunc(y - psf.hsizey + psf._corner_shift).astype(jnp.int32)
    return xmin, ymin


class FiberIndexError(IndexError, ValueError):
    """A fiber index outside ``0 .. nspec - 1`` of the PSF (specter raises IndexError)."""


def _check_ispec(psf: "PSF", ispec, method: str) -> None:
    """Raise :class:`FiberIndexError` if a concrete ``ispec`` holds a fiber the PSF lacks.

    Traced indices (inside ``jit`` with an index that is itself traced) cannot be
    checked and pass through.
    """
    if isinstance(ispec, jax.core.Tracer):
        return
    # a concrete index (a number, a NumPy array, a JAX array closed over by a jitted
    # function) is read on the host: JAX operations on it would be staged under jit
    a = np.asarray(ispec)
    if a.size == 0 or a.dtype.kind not in "iuf":
        return
    lo, hi = int(np.min(a)), int(np.max(a))
    if lo < 0 or hi >= psf.nspec:
        bad = lo if lo < 0 else hi
        raise FiberIndexError(
            f"{type(psf).__name__}.{method}: fiber index {bad} (argument ispec) is outside "
            f"the PSF's fibers 0..{psf.nspec - 1}; pass indices relative to the PSF's first fiber"
        )


def _checked(fn, name: str):
    @functools.wraps(fn)
    def method(self, ispec, *args, **kwargs):
        _check_ispec(self, ispec, name)
        return fn(self, ispec, *args, **kwargs)

    method._fiber_checked = True
    return method


class PSF(eqx.Module):
    """Abstract base class of all PSF models.

    Subclasses provide the static metadata fields below and implement
    :meth:`x`, :meth:`y`, :meth:`wavelength` and :meth:`_stamps`; their ``x``,
    ``y`` and ``wavelength`` are wrapped to refuse fiber indices the PSF lacks.
    """

    _corner_shift: ClassVar[float] = 0.5
    """A stamp's first pixel is ``trunc(centre - hsize + _corner_shift)`` (specter's
    GAUSS-HERMITE: 0.5, stamps of ``2 hsize + 1`` pixels; GAUSS-HERMITE2: 0, ``2 hsize``)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("x", "y", "wavelength"):
            fn = cls.__dict__.get(name)
            if fn is not None and callable(fn) and not getattr(fn, "_fiber_checked", False):
                setattr(cls, name, _checked(fn, name))

    nspec: eqx.AbstractVar[int]
    """Number of fibers the PSF describes."""
    npix_x: eqx.AbstractVar[int]
    """CCD width in pixels (number of columns)."""
    npix_y: eqx.AbstractVar[int]
    """CCD height in pixels (number of rows)."""
    hsizex: eqx.AbstractVar[int]
    """Stamp half width: stamps have ``2 * hsizex + 1`` columns."""
    hsizey: eqx.AbstractVar[int]
    """Stamp half height: stamps have ``2 * hsizey + 1`` rows."""
    psferr: eqx.AbstractVar[float]
    """Fractional PSF model error used in chi2pix (DESI default 0.01)."""
    wmin: eqx.AbstractVar[float]
    """Smallest wavelength [A] seen on the CCD by any fiber."""
    wmax: eqx.AbstractVar[float]
    """Largest wavelength [A] seen on the CCD by any fiber."""
    wmin_all: eqx.AbstractVar[float]
    """Smallest wavelength [A] seen on the CCD by every fiber."""
    wmax_all: eqx.AbstractVar[float]
    """Largest wavelength [A] seen on the CCD by every fiber."""

    # ------------------------------------------------------------------ traces
    @abc.abstractmethod
    def x(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Trace centre x [CCD pixels] of fiber ``ispec`` at ``wave`` [A] (broadcast)."""

    @abc.abstractmethod
    def y(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Trace centre y [CCD pixels] of fiber ``ispec`` at ``wave`` [A] (broadcast)."""

    @abc.abstractmethod
    def wavelength(self, ispec: ArrayLike, y: ArrayLike) -> Float[Array, "..."]:
        """Wavelength [A] of fiber ``ispec`` at CCD row ``y`` (the inverse trace)."""

    @abc.abstractmethod
    def _stamps(
        self,
        ispec: Int[Array, "..."],
        wave: Float[Array, "..."],
        x: Float[Array, "..."],
        y: Float[Array, "..."],
        xmin: Int[Array, "..."],
        ymin: Int[Array, "..."],
    ) -> Float[Array, "... ny nx"]:
        """Pixel values of the spots whose lower-left pixels are (xmin, ymin)."""

    # ------------------------------------------------------------------ spots
    @property
    def stamp_shape(self) -> tuple[int, int]:
        """(ny, nx) of every stamp."""
        return (2 * self.hsizey + 1, 2 * self.hsizex + 1)

    def corners(
        self, ispec: ArrayLike, wave: ArrayLike
    ) -> tuple[Int[Array, "..."], Int[Array, "..."]]:
        """Integer CCD pixel (xmin, ymin) of each spot's lower-left corner.

        As in specter: ``int(x - hsizex + 0.5)``, truncating toward zero (the shift
        is ``_corner_shift``: 0 for GAUSS-HERMITE2).
        """
        _check_ispec(self, ispec, "corners")
        return _corners(self, jnp.asarray(ispec), jnp.asarray(wave))

    def spots(
        self, ispec: ArrayLike, wave: ArrayLike, *, edges: str = "full"
    ) -> tuple[Int[Array, "..."], Int[Array, "..."], Float[Array, "... ny nx"]]:
        """Pixel-integrated spots of fibers ``ispec`` at wavelengths ``wave``.

        Args:
            ispec: fiber indices (integer array), broadcast against ``wave``.
            wave: wavelengths [A].
            edges: ``"full"`` (default): every stamp whole; ``"specter"``: as
                specter's ``xypix`` at the CCD's edges: a spot whose wavelength lies
                outside ``[wavelength(ispec, -0.5), wavelength(ispec, npix_y - 0.5)]``
                (trace centre off the CCD's rows) is all zeros, and a spot whose
                corner falls below row (column) 0 loses its last row (column) and
                is renormalised to sum 1.

        Returns:
            ``(xmin, ymin, stamps)``: int32 arrays of the broadcast shape ``S``
            giving each stamp's lower-left CCD pixel, and ``stamps`` of shape
            ``S + (ny, nx)`` (rows y, columns x), each normalised to sum 1 (or 0).
        """
        if edges not in ("full", "specter"):
            raise ValueError(f"edges must be 'full' or 'specter', not {edges!r}")
        _check_ispec(self, ispec, "spots")
        ispec = jnp.asarray(ispec).astype(jnp.int32)
        wave = jnp.asarray(wave)
        shape = jnp.broadcast_shapes(ispec.shape, wave.shape)
        rows = _block_rows(shape)
        if rows is None:
            return self._spots_block(ispec, wave, shape, edges)
        # A large batch on a CPU with few cores: blocks of leading rows, one after
        # another (lax.map), so the intermediates stay in cache.
        nd = len(shape)
        ispec = ispec.reshape((1,) * (nd - ispec.ndim) + ispec.shape)
        wave = wave.reshape((1,) * (nd - wave.ndim) + wave.shape)
        split = [a.shape[0] == shape[0] for a in (ispec, wave)]
        xs = tuple(a.reshape((shape[0] // rows, rows) + a.shape[1:]) for a, s in zip((ispec, wave), split) if s)

        def block(xs):
            it = iter(xs)
            i, w = (next(it) if s else a for a, s in zip((ispec, wave), split))
            return self._spots_block(i, w, (rows,) + shape[1:], edges)

        out = jax.lax.map(block, xs)
        return tuple(a.reshape(shape + a.shape[nd + 1 :]) for a in out)

    def _spots_block(self, ispec, wave, shape, edges="full"):
        # ispec and wave stay unbroadcast (e.g. a fiber column and a wavelength row), so
        # models can evaluate per-fiber and per-wavelength factors once each.
        x = jnp.broadcast_to(self.x(ispec, wave), shape)
        y = jnp.broadcast_to(self.y(ispec, wave), shape)
        xmin = jnp.trunc(x - self.hsizex + self._corner_shift).astype(jnp.int32)
        ymin = jnp.trunc(y - self.hsizey + self._corner_shift).astype(jnp.int32)
        stamps = self._stamps(ispec, wave, x, y, xmin, ymin)
        if edges == "specter":
            stamps = self._specter_edges(ispec, wave, shape, x, y, xmin, ymin, stamps)
        return xmin, ymin, stamps

    def _specter_edges(self, ispec, wave, shape, x, y, xmin, ymin, stamps):
        """Stamps as specter's ``xypix`` places them at the CCD's edges (see :meth:`spots`)."""
        ny, nx = self.stamp_shape
        nd = len(shape)
        # specter's pixel ranges are [int(c - h + s), int(c - h + s + n)): both ends
        # truncate toward zero, so a range starting below 0 is one pixel short
        nrow = jnp.trunc(y - self.hsizey + self._corner_shift + ny).astype(jnp.int32) - ymin
        ncol = jnp.trunc(x - self.hsizex + self._corner_shift + nx).astype(jnp.int32) - xmin
        rows = jnp.arange(ny, dtype=jnp.int32).reshape((1,) * nd + (ny, 1))
        cols = jnp.arange(nx, dtype=jnp.int32).reshape((1,) * nd + (1, nx))
        keep = (rows < nrow[..., None, None]) & (cols < ncol[..., None, None])
        short = (nrow < ny) | (ncol < nx)
        cut = jnp.where(keep, stamps, 0.0)
        tot = jnp.sum(cut, axis=(-2, -1), keepdims=True)
        cut = cut / jnp.where(tot > 0, tot, 1.0)
        stamps = jnp.where(short[..., None, None], cut, stamps)
        # light whose trace centre is off the CCD's rows is dropped entirely
        lo = jnp.broadcast_to(self.wavelength(ispec, -0.5), shape)
        hi = jnp.broadcast_to(self.wavelength(ispec, self.npix_y - 0.5), shape)
        w = jnp.broadcast_to(wave, shape)
        on = (w >= lo) & (w <= hi)
        return jnp.where(on[..., None, None], stamps, 0.0)

    # ------------------------------------------------------- host-side helpers
    def ysigma(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Gaussian sigma of the spot along the dispersion direction [pixels].

        The default measures the second moment of the spot's row profile;
        subclasses with an explicit width parameter override it.
        """
        _, ymin, stamps = self.spots(ispec, wave)
        prof = stamps.sum(axis=-1)
        rows = jnp.arange(prof.shape[-1], dtype=prof.dtype).reshape((1,) * (prof.ndim - 1) + (-1,))
        y = self.y(ispec, wave) - ymin.astype(prof.dtype)
        var = jnp.sum(prof * (rows - y[..., None]) ** 2, axis=-1) / jnp.sum(prof, axis=-1)
        return jnp.sqrt(var)

    def angstroms_per_pixel(self, ispec: int, wave: ArrayLike) -> np.ndarray | float:
        """Dispersion dw/dy [A per CCD row] of fiber ``ispec`` at ``wave`` (host; a float for a scalar ``wave``)."""
        rows = np.arange(self.npix_y, dtype=float)
        ww = np.asarray(self.wavelength(ispec, rows))
        return np.interp(np.asarray(wave), ww, np.gradient(ww))

    def wdisp(self, ispec: int, wave: ArrayLike) -> np.ndarray | float:
        """Line-spread sigma [A] of fiber ``ispec`` at ``wave`` (host; a float for a scalar ``wave``)."""
        return self.angstroms_per_pixel(ispec, wave) * np.asarray(self.ysigma(ispec, wave))

    def specter_wave_range(self) -> tuple[float, float]:
        """specter's ``(psf.wmin, psf.wmax)`` [A]: the wavelengths of the CCD's first and
        last rows' centres (rows 0 and ``npix_y - 1``), smallest and largest over fibers.

        (``self.wmin``/``self.wmax`` are taken at the rows' outer edges, -0.5 and
        ``npix_y - 0.5``.)  specter clips a patch's wavelength range to these.
        """
        fib = np.arange(self.nspec)
        lo = np.asarray(self.wavelength(fib, 0.0))
        hi = np.asarray(self.wavelength(fib, float(self.npix_y - 1)))
        return float(lo.min()), float(hi.max())

    def ndiag(self, dw: float) -> int:
        """Half width of the stored resolution band for a grid step ``dw`` [A].

        As the established code picks it: 9 line-spread sigmas in grid steps,
        largest over three fibers and three wavelengths, at most half the stamp.
        """
        wlo, whi = self.specter_wave_range()
        fib = np.array([0, self.nspec // 2, self.nspec - 1])
        waves = np.array([wlo, 0.5 * (wlo + whi), whi])
        rows = np.arange(self.npix_y, dtype=float)
        ww = np.asarray(self.wavelength(fib[:, None], rows[None, :]))  # (3, npix_y)
        disp = np.stack([np.interp(waves, w, np.gradient(w)) for w in ww])  # A per row, (3, 3)
        sig = np.asarray(self.ysigma(fib[:, None], waves[None, :]))  # rows
        nd = int(max(int(round(9.0 * float(v) / dw)) for v in (disp * sig).ravel()))
        ny, nx = self.stamp_shape
        return min(nd, ny // 2, nx // 2)

    def xypix_range(self, ispec: ArrayLike, wave: ArrayLike) -> tuple[np.ndarray, ...]:
        """The CCD pixels specter's ``xypix(ispec, wave)`` gives a spot (host NumPy).

        Returns ``(xlo, xhi, ylo, yhi, ny, nx)``, int64 arrays of the broadcast shape:
        the x and y slices (upper bounds exclusive) and the shape of the pixel array
        on the whole CCD.  The rules, in specter's order: a wavelength below
        ``wavelength(ispec, -0.5)`` gives empty slices at 0, one above
        ``wavelength(ispec, npix_y - 0.5)`` an empty y slice at ``npix_y``; a spot wholly
        above, below, right or left of the CCD gives empty slices at that edge; a
        spot partly off is clipped (in x only at the left when both sides are off,
        likewise in y).  ``(ny, nx)`` is ``(0, 0)`` when either slice is empty.
        """
        ispec, wave = np.broadcast_arrays(np.asarray(ispec), np.asarray(wave, dtype=float))
        _check_ispec(self, ispec, "xypix_range")
        x = np.asarray(self.x(ispec, wave), dtype=float)
        y = np.asarray(self.y(ispec, wave), dtype=float)
        wl_lo = np.asarray(self.wavelength(ispec, -0.5), dtype=float)
        wl_hi = np.asarray(self.wavelength(ispec, self.npix_y - 0.5), dtype=float)
        sny, snx = self.stamp_shape
        s = self._corner_shift
        nx_ccd, ny_ccd = int(self.npix_x), int(self.npix_y)
        xl = np.trunc(x - self.hsizex + s).astype(np.int64)
        xh = np.trunc(x - self.hsizex + s + snx).astype(np.int64)
        yl = np.trunc(y - self.hsizey + s).astype(np.int64)
        yh = np.trunc(y - self.hsizey + s + sny).astype(np.int64)
        # partly off the CCD: clipped (the low side first, as specter's if/elif)
        cx_lo, cx_hi = np.maximum(xl, 0), np.where(xl < 0, xh, np.minimum(xh, nx_ccd))
        cy_lo, cy_hi = np.maximum(yl, 0), np.where(yl < 0, yh, np.minimum(yh, ny_ccd))
        out = [cx_lo, cx_hi, cy_lo, cy_hi]
        # wholly off, in specter's order of tests (the first that applies wins)
        cases = [
            (wave < wl_lo, (0, 0, 0, 0)),
            (wave > wl_hi, (0, 0, ny_ccd, ny_ccd)),
            (yl >= ny_ccd, (0, 0, ny_ccd, ny_ccd)),
            (yh < 0, (0, 0, 0, 0)),
            (xl >= nx_ccd, (nx_ccd, nx_ccd, 0, 0)),
            (xh <= 0, (0, 0, 0, 0)),
        ]
        done = np.zeros(x.shape, dtype=bool)
        for cond, vals in cases:
            hit = cond & ~done
            out = [np.where(hit, v, o) for v, o in zip(vals, out)]
            done |= hit
        xlo, xhi, ylo, yhi = (np.asarray(o, dtype=np.int64) for o in out)
        ok = (xhi > xlo) & (yhi > ylo)
        return xlo, xhi, ylo, yhi, np.where(ok, yhi - ylo, 0), np.where(ok, xhi - xlo, 0)

    def xyrange(
        self, specrange: tuple[int, int] | int, waverange: tuple[float, float] | float
    ) -> tuple[int, int, int, int]:
        """CCD pixel box ``(xmin, xmax, ymin, ymax)`` covering fibers and wavelengths.

        Host-side (NumPy) port of specter's ``PSF.xyrange``, one box at a time:
        the wavelengths are clipped to :meth:`specter_wave_range`; ``ymin`` is the
        first row of the spot (:meth:`xypix_range`) of the fiber in
        ``specmin .. specmax - 1`` whose trace is lowest at the smallest wavelength,
        ``ymax`` the end of the spot of the highest one at the largest; ``xmin``
        (``xmax``) the first (end) column of the spot of fiber ``specmin``
        (``specmax - 1``) at its leftmost (rightmost) trace point, searched over the
        CCD rows' wavelengths inside the range plus the range's two ends, on the CCD
        only (``0.5 <= y < npix_y - 0.5`` for ``xmin``,
        ``-0.5 <= y < npix_y - 0.5`` for ``xmax``), or 0 (``npix_x``) when the trace
        leaves the CCD there.  Upper bounds are exclusive.
        """
        if np.ndim(specrange) == 0:
            specmin, specmax = int(specrange), int(specrange) + 1
        else:
            specmin, specmax = (int(s) for s in specrange)
        if not 0 <= specmin < specmax <= self.nspec:
            raise FiberIndexError(
                f"{type(self).__name__}.xyrange: specrange ({specmin}, {specmax}) must satisfy "
                f"0 <= specmin < specmax <= {self.nspec} (the PSF's fibers 0..{self.nspec - 1})"
            )
        if np.ndim(waverange) == 0:
            wavemin = wavemax = float(waverange)
        else:
            wavemin, wavemax = float(waverange[0]), float(waverange[-1])
        wlo, whi = self.specter_wave_range()
        wavemin = max(wavemin, wlo)
        wavemax = min(wavemax, whi)

        fibers = np.arange(specmin, specmax)
        f_lo = int(fibers[np.argmin(np.asarray(self.y(fibers, wavemin)))])
        f_hi = int(fibers[np.argmax(np.asarray(self.y(fibers, wavemax)))])
        ymin = int(self.xypix_range(f_lo, wavemin)[2])
        ymax = int(self.xypix_range(f_hi, wavemax)[3])

        rows = np.arange(self.npix_y, dtype=float)

        def _extreme_x(ispec: int, lower: bool) -> int:
            w = np.asarray(self.wavelength(ispec, rows))
            if w[0] < wavemin:
                w = w[wavemin <= w]
            if w.size and wavemax < w[-1]:
                w = w[w <= wavemax]
            w = np.concatenate([w, [wavemin, wavemax]])
            x = np.asarray(self.x(ispec, w))
            y = np.asarray(self.y(ispec, w))
            if lower:
                onccd = (0 <= y - 0.5) & (y < self.npix_y - 0.5)
            else:
                onccd = (-0.5 <= y) & (y < self.npix_y - 0.5)
            if np.any(onccd):  # (specter fails when no point is on the CCD)
                x, w = x[onccd], w[onccd]
            else:
                x, w = x[-2:], w[-2:]
            if lower:
                if x.min() < 0:
                    return 0
                return int(self.xypix_range(ispec, w[np.argmin(x)])[0])
            if x.max() > self.npix_x:
                return int(self.npix_x)
            return int(self.xypix_range(ispec, w[np.argmax(x)])[1])

        xmin = _extreme_x(specmin, True)
        xmax = _extreme_x(specmax - 1, False)
        return xmin, xmax, ymin, ymax

    # ------------------------------------------------------------ validation
    def check_fibers(self, specmin: int, nspec: int) -> None:
        """Raise ``ValueError`` unless fibers ``specmin .. specmin+nspec-1`` exist."""
        if specmin < 0 or nspec < 1 or specmin + nspec > self.nspec:
            raise ValueError(
                f"fibers {specmin}..{specmin + nspec - 1} requested but the PSF "
                f"describes fibers 0..{self.nspec - 1} (specmin={specmin}, nspec={nspec})"
            )

    def wave_limits(self) -> tuple[float, float]:
        """Wavelengths [A] an extraction or simulation may ask for: those whose spots can
        still touch the CCD for some fiber, i.e. from one stamp height below the CCD's
        first row to one stamp height above its last (a few A beyond ``wmin``/``wmax``).

        Bins there whose light misses the CCD come out with ivar 0.
        """
        fib = np.arange(self.nspec)
        ny = self.stamp_shape[0]
        lo = np.asarray(self.wavelength(fib, -0.5 - ny), dtype=float)
        hi = np.asarray(self.wavelength(fib, self.npix_y - 0.5 + ny), dtype=float)
        return float(min(lo.min(), self.wmin)), float(max(hi.max(), self.wmax))

    def check_wavelengths(self, wave: ArrayLike) -> None:
        """Raise ``ValueError`` if any wavelength lies outside :meth:`wave_limits`."""
        wave = np.asarray(wave)
        if not wave.size:
            return
        lo, hi = self.wave_limits()
        if not np.all(np.isfinite(wave)) or wave.min() < lo or wave.max() > hi:
            raise ValueError(
                f"wavelengths {np.nanmin(wave):.2f}-{np.nanmax(wave):.2f} A fall outside the "
                f"PSF's range {self.wmin:.2f}-{self.wmax:.2f} A (accepted: {lo:.2f}-{hi:.2f} A, "
                "up to one spot height beyond the CCD); choose a grid inside it"
            )
