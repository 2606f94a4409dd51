"""Two-core Gauss-Hermite PSF (PSFTYPE GAUSS-HERMITE2, as specter evaluates it).

The spot of fiber ``i`` at wavelength ``w`` is the sum of

* a first core ``sum_ij GH-i-j f_j(y) g_i(x)`` of pixel-integrated Gauss-Hermite
  functions of widths GHSIGX, GHSIGY, set to zero at pixels whose centre lies
  GHNSIG core sigmas or more from the trace centre,
* a second, wider core ``sum_ij GH2-i-j`` of widths GHSIGX2, GHSIGY2,
* a power-law tail ``TAILAMP r^2 / (TAILCORE^2 + r^2)^(1 + TAILINDE / 2)`` evaluated
  at pixel centres (``r^2 = (dx TAILXSCA)^2 + (dy TAILYSCA)^2``),

clipped at zero and normalised to unit sum.  Every parameter, the trace centres X
and Y included, is a Legendre series in wavelength per fiber.  Stamps are
``2 HSIZEY x 2 HSIZEX`` pixels whose first pixel is ``int(x - HSIZEX)`` (specter's
rule for this type; GAUSS-HERMITE uses ``int(x - HSIZEX + 0.5)`` and one pixel
more).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from numpy.polynomial import legendre
from jaxtyping import Array, ArrayLike, Float

from ._base import PSF, wave_limit_field
from ._gausshermite import pixel_gauss_hermite
from ._legendre import traceset_eval, traceset_eval_many

_TAILS = ("TAILAMP", "TAILCORE", "TAILXSCA", "TAILYSCA", "TAILINDE")


class GaussHermite2PSF(PSF):
    """Two-core Gauss-Hermite PSF with Legendre-in-wavelength parameters.

    Array fields (all differentiable): ``xcoef[nspec, ncoef]``, ``ycoef[nspec, ncoef]``
    (trace centre in CCD pixels vs wavelength), ``wcoef[nspec, nw]`` and ``ylim[2]``
    (the fitted inverse trace), ``params[nparam, nspec, ncoef]`` (one Legendre
    series per parameter named in ``param_names``).  Every series shares the
    wavelength ``domain`` [A].

    Build with :meth:`from_arrays` or :func:`read_psf`.
    """

    _corner_shift: ClassVar[float] = 0.0

    xcoef: Float[Array, "nspec ncoef"]
    ycoef: Float[Array, "nspec ncoef"]
    wcoef: Float[Array, "nspec nw"]
    ylim: Float[Array, "2"]
    params: Float[Array, "nparam nspec ncoef"]

    param_names: tuple[str, ...] = eqx.field(static=True)
    domain: tuple[float, float] = eqx.field(static=True)
    ghdegx: int = eqx.field(static=True)
    ghdegy: int = eqx.field(static=True)
    ghdegx2: int = eqx.field(static=True)
    ghdegy2: int = eqx.field(static=True)
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
    fibermin: int = eqx.field(static=True, default=0)

    @classmethod
    def from_arrays(
        cls,
        xcoef: ArrayLike,
        ycoef: ArrayLike,
        params: ArrayLike,
        param_names: Sequence[str],
        *,
        domain: tuple[float, float],
        hsizex: int,
        hsizey: int,
        npix_x: int,
        npix_y: int,
        ghdeg: tuple[int, int, int, int],
        psferr: float = 0.01,
        fibermin: int = 0,
    ) -> "GaussHermite2PSF":
        """Build a PSF from Legendre coefficient arrays (host-side, concrete arrays).

        Args:
            xcoef: ``[nspec, ncoef]`` coefficients of the trace centre's x [CCD pixels].
            ycoef: ``[nspec, ncoef]`` coefficients of the trace centre's y [CCD pixels].
            params: ``[nparam, nspec, ncoef]`` coefficients of ``param_names``
                (GHSIGX, GHSIGY, GHNSIG, GHSIGX2, GHSIGY2, GH-i-j, GH2-i-j, TAIL*;
                others are carried along unused).
            param_names: the ``nparam`` names, in the order of ``params``.
            domain: wavelength domain ``(wmin, wmax)`` [A] of every series.
            hsizex: stamps have ``2 hsizex`` columns.
            hsizey: stamps have ``2 hsizey`` rows.
            npix_x: CCD width [pixels].
            npix_y: CCD height [pixels].
            ghdeg: ``(GHDEGX, GHDEGY, GHDEGX2, GHDEGY2)``.
            psferr: fractional PSF error used in chi2pix.
            fibermin: number of the first fiber in the file (FIBERMIN).

        The inverse trace is fitted as specter does; wmin/wmax follow from it.
        """
        dt = jnp.result_type(float)
        xcoef = jnp.asarray(np.asarray(xcoef, dtype=np.float64), dtype=dt)
        ycoef = jnp.asarray(np.asarray(ycoef, dtype=np.float64), dtype=dt)
        params = jnp.asarray(np.asarray(params, dtype=np.float64), dtype=dt)
        names = tuple(str(n).strip() for n in param_names)
        if params.ndim != 3 or params.shape[0] != len(names):
            raise ValueError(f"params must have shape (nparam={len(names)}, nspec, ncoef), got {params.shape}")
        nspec = int(xcoef.shape[0])
        if ycoef.shape[0] != nspec or params.shape[1] != nspec:
            raise ValueError(
                f"inconsistent fiber counts: xcoef {xcoef.shape}, ycoef {ycoef.shape}, params {params.shape}"
            )
        dgx, dgy, dgx2, dgy2 = (int(d) for d in ghdeg)
        missing = [n for n in _needed(dgx, dgy, dgx2, dgy2) if n not in names]
        if missing:
            raise ValueError(f"GAUSS-HERMITE2 PSF parameters missing: {missing}")
        domain = (float(domain[0]), float(domain[1]))
        wcoef, ylim = _host_inverse(np.asarray(ycoef), domain)
        wcoef, ylim = jnp.asarray(wcoef, dtype=dt), jnp.asarray(ylim, dtype=dt)
        ylim_t = (ylim[0], ylim[1])
        wlo = np.asarray(traceset_eval(wcoef, ylim_t, jnp.arange(nspec), -0.5))
        whi = np.asarray(traceset_eval(wcoef, ylim_t, jnp.arange(nspec), npix_y - 0.5))
        return cls(
            xcoef=xcoef, ycoef=ycoef, wcoef=wcoef, ylim=ylim, params=params, param_names=names,
            domain=domain, ghdegx=dgx, ghdegy=dgy, ghdegx2=dgx2, ghdegy2=dgy2, nspec=nspec,
            npix_x=int(npix_x), npix_y=int(npix_y), hsizex=int(hsizex), hsizey=int(hsizey),
            psferr=float(psferr), wmin=float(wlo.min()), wmax=float(whi.max()),
            wmin_all=float(wlo.max()), wmax_all=float(whi.min()), fibermin=int(fibermin),
        )

    # ------------------------------------------------------------ geometry
    @property
    def stamp_shape(self) -> tuple[int, int]:
        """(ny, nx) = (2 hsizey, 2 hsizex) of every stamp."""
        return (2 * self.hsizey, 2 * self.hsizex)

    def param_index(self, name: str) -> int:
        """Row of ``params`` holding parameter ``name``."""
        try:
            return self.param_names.index(name)
        except ValueError:
            raise KeyError(f"PSF has no parameter {name!r}") from None

    def param(self, name: str, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Value of parameter ``name`` for fibers ``ispec`` at ``wave`` [A] (broadcast)."""
        return traceset_eval(self.params[self.param_index(name)], self.domain, ispec, wave)

    def x(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Trace centre x [pixels] of fibers ``ispec`` at ``wave`` [A]."""
        return traceset_eval(self.xcoef, self.domain, ispec, wave)

    def y(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Trace centre y [pixels] of fibers ``ispec`` at ``wave`` [A]."""
        return traceset_eval(self.ycoef, self.domain, ispec, wave)

    def wavelength(self, ispec: ArrayLike, y: ArrayLike) -> Float[Array, "..."]:
        """Wavelength [A] of fibers ``ispec`` at CCD row ``y`` (fitted inverse trace)."""
        return traceset_eval(self.wcoef, (self.ylim[0], self.ylim[1]), ispec, y)

    def ysigma(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """GHSIGY [pixels], the first core's width along the dispersion."""
        return self.param("GHSIGY", ispec, wave)

    # ------------------------------------------------------------ spots
    def _used_rows(self) -> np.ndarray:
        names = _needed(self.ghdegx, self.ghdegy, self.ghdegx2, self.ghdegy2)
        return np.asarray([self.param_index(n) for n in names])

    def _stamps(self, ispec, wave, x, y, xmin, ymin) -> Float[Array, "... ny nx"]:
        return _gh2_stamps(self, ispec, wave, x, y, xmin, ymin)

    def _stamps_impl(self, ispec, wave, x, y, xmin, ymin):
        nd = max(jnp.ndim(ispec), jnp.ndim(wave))
        ispec = jnp.reshape(ispec, (1,) * (nd - jnp.ndim(ispec)) + jnp.shape(ispec))
        wave = jnp.reshape(wave, (1,) * (nd - jnp.ndim(wave)) + jnp.shape(wave))
        vals = traceset_eval_many(self.params[self._used_rows()], self.domain, ispec, wave)
        vals = jnp.broadcast_to(vals, x.shape + vals.shape[-1:])
        static = (self.stamp_shape, self.ghdegx, self.ghdegy, self.ghdegx2, self.ghdegy2)
        return _gh2_stamp_values(static, vals, x, y, xmin, ymin)


def _host_inverse(ycoef: np.ndarray, domain: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """specter's ``TraceSet.invert`` in NumPy: wavelength as a Legendre series (degree
    ``ncoef + 2``) of the normalised row, least-squares fitted to 1000 points per
    fiber evenly spanning ``domain``; the rows' domain is the trace's range at the
    domain's ends over all fibers.  Returns ``(wcoef[nspec, ncoef + 3], ylim[2])``.
    (The high degree needs ``legfit``'s SVD: normal equations lose ~1e-8 A here.)"""
    a, b = domain
    ends = legendre.legval((np.array([a, b]) - a) * (2.0 / (b - a)) - 1.0, ycoef.T)  # (nspec, 2)
    ymin, ymax = float(ends.min()), float(ends.max())
    w = np.linspace(a, b, 1000)
    t = (w - a) * (2.0 / (b - a)) - 1.0
    y = legendre.legval(t, ycoef.T)  # (nspec, 1000)
    yy = (y - ymin) * (2.0 / (ymax - ymin)) - 1.0
    deg = ycoef.shape[1] + 2
    wcoef = np.stack([legendre.legfit(yy[i], w, deg) for i in range(ycoef.shape[0])])
    return wcoef, np.array([ymin, ymax])


def _needed(dgx: int, dgy: int, dgx2: int, dgy2: int) -> list[str]:
    """Parameter names in the order :func:`_gh2_stamp_values` reads them."""
    names = ["GHSIGX", "GHSIGY", "GHNSIG", "GHSIGX2", "GHSIGY2"]
    names += [f"GH-{i}-{j}" for j in range(dgy + 1) for i in range(dgx + 1)]
    names += [f"GH2-{i}-{j}" for j in range(dgy2 + 1) for i in range(dgx2 + 1)]
    return names + list(_TAILS)


def _core(gh, fx, fy, dgx: int, dgy: int):
    """``sum_ij gh[j, i] fy[j] (outer) fx[i]``: S + (ny, nx)."""
    fyg = sum(gh[..., j, :, None] * fy[..., j, None, :] for j in range(dgy + 1))  # S + (dgx+1, ny)
    return sum(fyg[..., i, :, None] * fx[..., i, None, :] for i in range(dgx + 1))


def _gh2_stamp_values(static, vals, x, y, xmin, ymin) -> Float[Array, "... ny nx"]:
    """Stamps ``S + (ny, nx)`` from the parameter values ``vals[*S, nused]`` (order of :func:`_needed`)."""
    (ny, nx), dgx, dgy, dgx2, dgy2 = static
    sigx, sigy, nsig, sigx2, sigy2 = (vals[..., k] for k in range(5))
    n1 = (dgx + 1) * (dgy + 1)
    n2 = (dgx2 + 1) * (dgy2 + 1)
    gh1 = vals[..., 5 : 5 + n1].reshape(vals.shape[:-1] + (dgy + 1, dgx + 1))
    gh2 = vals[..., 5 + n1 : 5 + n1 + n2].reshape(vals.shape[:-1] + (dgy2 + 1, dgx2 + 1))
    amp, tcore, xsca, ysca, inde = (vals[..., 5 + n1 + n2 + k, None, None] for k in range(5))

    core1 = _core(gh1, pixel_gauss_hermite(xmin, x, sigx, nx, dgx), pixel_gauss_hermite(ymin, y, sigy, ny, dgy), dgx, dgy)
    core2 = _core(gh2, pixel_gauss_hermite(xmin, x, sigx2, nx, dgx2), pixel_gauss_hermite(ymin, y, sigy2, ny, dgy2), dgx2, dgy2)
    nd = xmin.ndim
    dx = (xmin[..., None] + jnp.arange(nx, dtype=xmin.dtype).reshape((1,) * nd + (nx,))).astype(x.dtype) - x[..., None]
    dy = (ymin[..., None] + jnp.arange(ny, dtype=ymin.dtype).reshape((1,) * nd + (ny,))).astype(y.dtype) - y[..., None]
    # the first core is cut at GHNSIG sigmas (pixel centres)
    r2 = (dx / sigx[..., None])[..., None, :] ** 2 + (dy / sigy[..., None])[..., :, None] ** 2
    core1 = jnp.where(r2 < (nsig**2)[..., None, None], core1, 0.0)
    t2 = (dx[..., None, :] * xsca) ** 2 + (dy[..., :, None] * ysca) ** 2
    tails = amp * t2 / (tcore**2 + t2) ** (1.0 + 0.5 * inde)
    img = jnp.clip(core1 + core2 + tails, 0.0)
    return img / jnp.sum(img, axis=(-2, -1), keepdims=True)


@eqx.filter_jit
def _gh2_stamps(psf: GaussHermite2PSF, ispec, wave, x, y, xmin, ymin):
    return psf._stamps_impl(ispec, wave, x, y, xmin, ymin)
