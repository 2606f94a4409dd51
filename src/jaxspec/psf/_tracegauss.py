"""Gaussian spots on Legendre traces: the PSF of DESI's trace-only files.

Trace-only files (XTRACE, YTRACE, XSIGMA, WSIGMA HDUs) give the trace centres and
the spot widths: XSIGMA the cross-dispersion sigma in pixels (one value per fiber
or Legendre coefficients in wavelength), WSIGMA Legendre coefficients of the
line-spread sigma in Angstrom.  The spot is a pixel-integrated 2D Gaussian with
``sigma_y = WSIGMA / (dw/dy)`` rows.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._base import PSF, wave_limit_field
from ._gausshermite import pixel_gauss_hermite
from ._legendre import fit_inverse, traceset_eval


class TraceGaussianPSF(PSF):
    """Pixel-integrated 2D Gaussian spots on Legendre traces.

    Array fields: ``xcoef[nspec, nx]``, ``ycoef[nspec, ny]`` (trace centre [pixels]
    vs wavelength), ``wcoef[nspec, nw]``/``ylim[2]`` (fitted inverse trace),
    ``xsigcoef[nspec, kx]`` (sigma_x [pixels], Legendre in wavelength; ``kx = 1``
    for a constant per fiber) and ``wsigcoef[nspec, kw]`` (sigma [A] along the
    dispersion, Legendre in wavelength).  Stamp half sizes cover ~4 sigma.
    """

    xcoef: Float[Array, "nspec nx"]
    ycoef: Float[Array, "nspec ny"]
    wcoef: Float[Array, "nspec nw"]
    ylim: Float[Array, "2"]
    xsigcoef: Float[Array, "nspec kx"]
    wsigcoef: Float[Array, "nspec kw"]

    xdomain: tuple[float, float] = eqx.field(static=True)
    ydomain: tuple[float, float] = eqx.field(static=True)
    wsdomain: tuple[float, float] = eqx.field(static=True)
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
    def from_arrays(
        cls,
        xcoef: ArrayLike,
        ycoef: ArrayLike,
        xsigma: ArrayLike,
        wsigma: ArrayLike,
        *,
        xdomain: tuple[float, float],
        ydomain: tuple[float, float] | None = None,
        wsdomain: tuple[float, float] | None = None,
        npix_x: int = 4114,
        npix_y: int = 4128,
        nsigma: float = 4.0,
        psferr: float = 0.01,
    ) -> "TraceGaussianPSF":
        """Build from trace coefficients and widths (host side, concrete arrays).

        ``xsigma``: ``[nspec]`` pixels or ``[nspec, kx]`` Legendre coefficients;
        ``wsigma``: ``[nspec, kw]`` Legendre coefficients of sigma in A (or
        ``[nspec]`` constants).  Domains default to ``xdomain``.  The stamp half
        sizes are ``ceil(nsigma * max sigma)`` over fibers and the domain.
        """
        dt = jnp.result_type(float)

        def arr(a, nd):
            a = np.asarray(a, dtype=np.float64)
            if a.ndim == 1 and nd == 2:
                a = a[:, None]
            return jnp.asarray(a, dtype=dt)

        xcoef, ycoef = arr(xcoef, 2), arr(ycoef, 2)
        xsig, wsig = arr(xsigma, 2), arr(wsigma, 2)
        nspec = int(xcoef.shape[0])
        for name, a in (("ycoef", ycoef), ("xsigma", xsig), ("wsigma", wsig)):
            if a.shape[0] != nspec:
                raise ValueError(f"{name} has {a.shape[0]} fibers, xcoef has {nspec}")
        xdomain = (float(xdomain[0]), float(xdomain[1]))
        ydomain = xdomain if ydomain is None else (float(ydomain[0]), float(ydomain[1]))
        wsdomain = xdomain if wsdomain is None else (float(wsdomain[0]), float(wsdomain[1]))
        wcoef, ylim = fit_inverse(ycoef, ydomain)
        fib = jnp.arange(nspec)
        wlo = np.asarray(traceset_eval(wcoef, (ylim[0], ylim[1]), fib, -0.5))
        whi = np.asarray(traceset_eval(wcoef, (ylim[0], ylim[1]), fib, npix_y - 0.5))
        proto = cls(
            xcoef=xcoef, ycoef=ycoef, wcoef=wcoef, ylim=ylim, xsigcoef=xsig, wsigcoef=wsig,
            xdomain=xdomain, ydomain=ydomain, wsdomain=wsdomain, nspec=nspec,
            npix_x=int(npix_x), npix_y=int(npix_y), hsizex=1, hsizey=1, psferr=float(psferr),
            wmin=float(wlo.min()), wmax=float(whi.max()),
            wmin_all=float(wlo.max()), wmax_all=float(whi.min()),
        )  # fmt: skip
        grid = jnp.linspace(max(proto.wmin, ydomain[0]), min(proto.wmax, ydomain[1]), 64)
        sx = float(np.max(np.asarray(proto.xsigma(fib[:, None], grid[None, :]))))
        sy = float(np.max(np.asarray(proto.ysigma(fib[:, None], grid[None, :]))))
        hx, hy = int(math.ceil(nsigma * sx)), int(math.ceil(nsigma * sy))
        return dataclasses.replace(proto, hsizex=hx, hsizey=hy)

    # ------------------------------------------------------------ traces
    def x(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Trace centre x [pixels]."""
        return traceset_eval(self.xcoef, self.xdomain, ispec, wave)

    def y(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Trace centre y [pixels]."""
        return traceset_eval(self.ycoef, self.ydomain, ispec, wave)

    def wavelength(self, ispec: ArrayLike, y: ArrayLike) -> Float[Array, "..."]:
        """Wavelength [A] at CCD row ``y`` (fitted inverse trace)."""
        return traceset_eval(self.wcoef, (self.ylim[0], self.ylim[1]), ispec, y)

    def dydw(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Rows per Angstrom of the trace (derivative of the y trace)."""
        ispec, wave = jnp.broadcast_arrays(jnp.asarray(ispec), jnp.asarray(wave, dtype=float))
        _, d = jax.jvp(lambda w: self.y(ispec, w), (wave,), (jnp.ones_like(wave),))
        return d

    def xsigma(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Cross-dispersion sigma [pixels]."""
        return traceset_eval(self.xsigcoef, self.wsdomain, ispec, wave)

    def wsigma(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Line-spread sigma along the dispersion [A]."""
        return traceset_eval(self.wsigcoef, self.wsdomain, ispec, wave)

    def ysigma(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Dispersion-direction sigma [pixels] = wsigma * dy/dw."""
        return self.wsigma(ispec, wave) * jnp.abs(self.dydw(ispec, wave))

    def _stamps(self, ispec, wave, x, y, xmin, ymin) -> Float[Array, "... ny nx"]:
        """Normalised pixel-integrated Gaussian stamps, ``S + (ny, nx)``."""
        ny, nx = self.stamp_shape
        fx = pixel_gauss_hermite(xmin, x, self.xsigma(ispec, wave), nx, 0)[..., 0, :]
        fy = pixel_gauss_hermite(ymin, y, self.ysigma(ispec, wave), ny, 0)[..., 0, :]
        img = fy[..., :, None] * fx[..., None, :]
        return img / jnp.sum(img, axis=(-2, -1), keepdims=True)
