"""The interface every PSF model shares.

A PSF maps (fiber index, wavelength) to a trace centre (x, y) on the CCD and to a
pixel-integrated spot: a small stamp of fixed shape (ny, nx) whose lower-left
pixel sits at integer CCD coordinates (xmin, ymin).  Conventions follow the DESI
pipeline (specter): pixel (x, y) covers [x - 0.5, x + 0.5] x [y - 0.5, y + 0.5];
images are indexed ``image[y, x]``; wavelengths are in Angstrom.

All array methods are pure JAX functions of the module's array fields, so a PSF is
a pytree that ``jax.jit``, ``jax.vmap`` and ``jax.grad`` see through.  Integer
metadata (``nspec``, ``npix_x``, ...) are static fields.  ``xyrange`` and
``ndiag`` are host-side helpers (NumPy) for deciding patch geometry.
"""

from __future__ import annotations

import abc
import math
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int


def _cpu_block_spots() -> int:
    """Spots per block for large CPU batches in :meth:`PSF.spots` (0: never block).

    ``JAXSPEC_CPU_BLOCK_SPOTS`` overrides.  By default 4096 on machines with at
    most 4 usable cores, where blocks that stay in cache make a full frame of
    spots 2x faster (1.5 s against 3.0 s on 2 cores), and 0 on larger ones,
    where XLA:CPU spreads one big batch over the cores instead (1.09 s whole
    against 1.72 s in blocks on 16 cores); see docs/performance.md.
    """
    env = os.environ.get("JAXSPEC_CPU_BLOCK_SPOTS")
    if env is not None:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 4096 if cores <= 4 else 0


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


class PSF(eqx.Module):
    """Abstract base class of all PSF models.

    Subclasses provide the static metadata fields below and implement
    :meth:`x`, :meth:`y`, :meth:`wavelength` and :meth:`_stamps`.
    """

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

        As in specter: ``int(x - hsizex + 0.5)``, truncating toward zero.
        """
        ispec, wave = jnp.broadcast_arrays(jnp.asarray(ispec), jnp.asarray(wave))
        x = self.x(ispec, wave)
        y = self.y(ispec, wave)
        xmin = jnp.trunc(x - self.hsizex + 0.5).astype(jnp.int32)
        ymin = jnp.trunc(y - self.hsizey + 0.5).astype(jnp.int32)
        return xmin, ymin

    def spots(
        self, ispec: ArrayLike, wave: ArrayLike
    ) -> tuple[Int[Array, "..."], Int[Array, "..."], Float[Array, "... ny nx"]]:
        """Pixel-integrated spots of fibers ``ispec`` at wavelengths ``wave``.

        Args:
            ispec: fiber indices (integer array), broadcast against ``wave``.
            wave: wavelengths [A].

        Returns:
            ``(xmin, ymin, stamps)``: int32 arrays of the broadcast shape ``S``
            giving each stamp's lower-left CCD pixel, and ``stamps`` of shape
            ``S + (ny, nx)`` (rows y, columns x), each normalised to sum 1.
        """
        ispec = jnp.asarray(ispec).astype(jnp.int32)
        wave = jnp.asarray(wave)
        shape = jnp.broadcast_shapes(ispec.shape, wave.shape)
        rows = _block_rows(shape)
        if rows is None:
            return self._spots_block(ispec, wave, shape)
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
            return self._spots_block(i, w, (rows,) + shape[1:])

        out = jax.lax.map(block, xs)
        return tuple(a.reshape(shape + a.shape[nd + 1 :]) for a in out)

    def _spots_block(self, ispec, wave, shape):
        # ispec and wave stay unbroadcast (e.g. a fiber column and a wavelength row), so
        # models can evaluate per-fiber and per-wavelength factors once each.
        x = jnp.broadcast_to(self.x(ispec, wave), shape)
        y = jnp.broadcast_to(self.y(ispec, wave), shape)
        xmin = jnp.trunc(x - self.hsizex + 0.5).astype(jnp.int32)
        ymin = jnp.trunc(y - self.hsizey + 0.5).astype(jnp.int32)
        stamps = self._stamps(ispec, wave, x, y, xmin, ymin)
        return xmin, ymin, stamps

    # ------------------------------------------------------- host-side helpers
    def ysigma(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Gaussian sigma of the spot along the dispersion direction [pixels].

        The default measures the second moment of the spot's row profile;
        subclasses with an explicit width parameter override it.
        """
        _, ymin, stamps = self.spots(ispec, wave)
        prof = stamps.sum(axis=-1)
        rows = jnp.arange(prof.shape[-1])
        y = self.y(ispec, wave) - ymin
        var = jnp.sum(prof * (rows - y[..., None]) ** 2, axis=-1) / jnp.sum(prof, axis=-1)
        return jnp.sqrt(var)

    def angstroms_per_pixel(self, ispec: int, wave: ArrayLike) -> np.ndarray:
        """Dispersion dw/dy [A per CCD row] of fiber ``ispec`` at ``wave`` (host)."""
        rows = np.arange(self.npix_y, dtype=float)
        ww = np.asarray(self.wavelength(ispec, rows))
        return np.interp(np.asarray(wave), ww, np.gradient(ww))

    def wdisp(self, ispec: int, wave: ArrayLike) -> np.ndarray:
        """Line-spread sigma [A] of fiber ``ispec`` at ``wave`` (host)."""
        return self.angstroms_per_pixel(ispec, wave) * np.asarray(self.ysigma(ispec, wave))

    def ndiag(self, dw: float) -> int:
        """Half width of the stored resolution band for a grid step ``dw`` [A].

        As the established code picks it: 9 line-spread sigmas in grid steps,
        largest over three fibers and three wavelengths, at most half the stamp.
        """
        nd = 0
        for ispec in (0, self.nspec // 2, self.nspec - 1):
            for w in (self.wmin, 0.5 * (self.wmin + self.wmax), self.wmax):
                nd = max(nd, int(round(9.0 * float(self.wdisp(ispec, w)) / dw)))
        ny, nx = self.stamp_shape
        return min(nd, ny // 2, nx // 2)

    def xyrange(
        self, specrange: tuple[int, int] | int, waverange: tuple[float, float] | float
    ) -> tuple[int, int, int, int]:
        """CCD pixel box ``(xmin, xmax, ymin, ymax)`` covering fibers and wavelengths.

        Host-side (NumPy) port of the established code's rule: y from the spots
        of the lowest/highest traces at the range ends (the fiber just past
        ``specrange`` is included in that search, as specter does), x from the
        extreme columns of the first and last fibers' spots over the wavelength
        range, limited to rows on the CCD.  Upper bounds are exclusive.
        """
        if np.ndim(specrange) == 0:
            specmin, specmax = int(specrange), int(specrange) + 1
        else:
            specmin, specmax = (int(s) for s in specrange)
        if np.ndim(waverange) == 0:
            wavemin = wavemax = float(waverange)
        else:
            wavemin, wavemax = float(waverange[0]), float(waverange[-1])
        wavemin = max(wavemin, self.wmin)
        wavemax = min(wavemax, self.wmax)

        fibers = np.arange(specmin, min(specmax + 1, self.nspec))
        ylo = np.asarray(self.y(fibers, wavemin))
        yhi = np.asarray(self.y(fibers, wavemax))
        _, ymin = self.corners(int(fibers[np.argmin(ylo)]), wavemin)
        _, ymax = self.corners(int(fibers[np.argmax(yhi)]), wavemax)
        ymin = max(int(ymin), 0)
        ymax = min(int(ymax) + self.stamp_shape[0], self.npix_y)

        rows = np.arange(self.npix_y, dtype=float)

        def _extreme_x(ispec: int, lower: bool) -> int:
            w = np.asarray(self.wavelength(ispec, rows))
            w = w[(w >= wavemin) & (w <= wavemax)]
            w = np.concatenate([w, [wavemin, wavemax]])
            x = np.asarray(self.x(ispec, w))
            y = np.asarray(self.y(ispec, w))
            if lower:
                onccd = (0 <= y - 0.5) & (y < self.npix_y - 0.5)
            else:
                onccd = (-0.5 <= y) & (y < self.npix_y - 0.5)
            x, w = x[onccd], w[onccd]
            if lower:
                if x.min() < 0:
                    return 0
                xc, _ = self.corners(ispec, w[np.argmin(x)])
                return max(int(xc), 0)
            if x.max() > self.npix_x:
                return int(self.npix_x)
            xc, _ = self.corners(ispec, w[np.argmax(x)])
            return min(int(xc) + self.stamp_shape[1], int(self.npix_x))

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

    def check_wavelengths(self, wave: ArrayLike) -> None:
        """Raise ``ValueError`` if any wavelength lies outside [wmin, wmax] of the PSF."""
        wave = np.asarray(wave)
        if wave.size and (wave.min() < self.wmin or wave.max() > self.wmax):
            raise ValueError(
                f"wavelengths {wave.min():.2f}-{wave.max():.2f} A fall outside the "
                f"PSF's range {self.wmin:.2f}-{self.wmax:.2f} A"
            )
