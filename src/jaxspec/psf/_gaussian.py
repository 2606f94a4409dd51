"""Analytic pixel-integrated Gaussian PSF on straight traces (tests, notebooks)."""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._base import PSF, wave_limit_field
from ._gausshermite import pixel_gauss_hermite


class GaussianPSF(PSF):
    """Straight vertical traces with pixel-integrated 2D Gaussian spots.

    ``x(i, w) = x0[i]``, ``y(i, w) = (w - wave0) / dispersion`` (``dispersion`` in A
    per row), constant widths ``sigma_x``, ``sigma_y`` [pixels].  All five are array
    fields (differentiable); build with :meth:`create`.
    """

    x0: Float[Array, "nspec"]
    wave0: Float[Array, ""]
    dispersion: Float[Array, ""]
    sigma_x: Float[Array, ""]
    sigma_y: Float[Array, ""]

    nspec: int = eqx.field(static=True)
    npix_x: int = eqx.field(static=True)
    npix_y: int = eqx.field(static=True)
    hsizex: int = eqx.field(static=True)
    hsizey: int = eqx.field(static=True)
    psferr: float = eqx.field(static=True)
    wmin: float = wave_limit_field()
    wmax: float = wave_limit_field()
    wmin_all: float = wave_limit_field()
    wmax_all: float = wave_limit_field()

    @classmethod
    def create(
        cls,
        nspec: int = 10,
        *,
        wave0: float = 5600.0,
        dispersion: float = 0.55,
        npix_y: int = 400,
        npix_x: int | None = None,
        pitch: float = 7.4,
        x0: ArrayLike | None = None,
        xstart: float = 12.3,
        sigma_x: float = 1.05,
        sigma_y: float = 1.2,
        hsizex: int | None = None,
        hsizey: int | None = None,
        psferr: float = 0.01,
    ) -> "GaussianPSF":
        """Build from physical parameters.

        ``x0`` [pixels] per fiber defaults to ``xstart + pitch * arange(nspec)``;
        ``wave0`` [A] is the wavelength at row 0; the CCD is ``npix_y`` rows by
        ``npix_x`` columns (default: just wide enough); half sizes default to
        ``ceil(4 sigma)``.
        """
        dt = jnp.result_type(float)
        x0 = xstart + pitch * np.arange(nspec) if x0 is None else np.asarray(x0, float)
        if x0.shape != (nspec,):
            raise ValueError(f"x0 must have shape ({nspec},), got {x0.shape}")
        hsizex = int(math.ceil(4 * sigma_x)) if hsizex is None else int(hsizex)
        hsizey = int(math.ceil(4 * sigma_y)) if hsizey is None else int(hsizey)
        if npix_x is None:
            npix_x = int(math.ceil(x0.max() + hsizex + 2 + xstart))
        wlo = wave0 - 0.5 * dispersion
        whi = wave0 + (npix_y - 0.5) * dispersion
        return cls(
            x0=jnp.asarray(x0, dt), wave0=jnp.asarray(wave0, dt),
            dispersion=jnp.asarray(dispersion, dt), sigma_x=jnp.asarray(sigma_x, dt),
            sigma_y=jnp.asarray(sigma_y, dt), nspec=int(nspec), npix_x=int(npix_x),
            npix_y=int(npix_y), hsizex=hsizex, hsizey=hsizey, psferr=float(psferr),
            wmin=float(wlo), wmax=float(whi), wmin_all=float(wlo), wmax_all=float(whi),
        )  # fmt: skip

    def _args(self, ispec: ArrayLike, w: ArrayLike) -> tuple[Array, Array]:
        """``ispec`` (int32) and ``w`` (the fields' float dtype), broadcast together."""
        ispec = jnp.asarray(ispec).astype(jnp.int32)
        w = jnp.asarray(w, dtype=self.wave0.dtype)
        return tuple(jnp.broadcast_arrays(ispec, w))

    def x(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Trace centre x [pixels]."""
        ispec, wave = self._args(ispec, wave)
        return self.x0[ispec] + 0.0 * wave

    def y(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Trace centre y [pixels]."""
        ispec, wave = self._args(ispec, wave)
        return (wave - self.wave0) / self.dispersion

    def wavelength(self, ispec: ArrayLike, y: ArrayLike) -> Float[Array, "..."]:
        """Wavelength [A] at row ``y``."""
        ispec, y = self._args(ispec, y)
        return self.wave0 + y * self.dispersion

    def ysigma(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """sigma_y [pixels]."""
        ispec, wave = self._args(ispec, wave)
        return jnp.broadcast_to(self.sigma_y, ispec.shape)

    def _stamps(self, ispec, wave, x, y, xmin, ymin) -> Float[Array, "... ny nx"]:
        """Normalised pixel-integrated Gaussian stamps, ``S + (ny, nx)``."""
        ny, nx = self.stamp_shape
        sx = jnp.broadcast_to(self.sigma_x, x.shape)
        sy = jnp.broadcast_to(self.sigma_y, y.shape)
        fx = pixel_gauss_hermite(xmin, x, sx, nx, 0)[..., 0, :]
        fy = pixel_gauss_hermite(ymin, y, sy, ny, 0)[..., 0, :]
        img = fy[..., :, None] * fx[..., None, :]
        return img / jnp.sum(img, axis=(-2, -1), keepdims=True)
