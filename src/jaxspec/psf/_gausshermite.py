"""Gauss-Hermite PSF (DESI's specex model, as specter evaluates it).

The spot of fiber ``i`` at wavelength ``w`` is a sum of pixel-integrated
Gauss-Hermite functions ``sum_ij GH-i-j * f_j(y) g_i(x)`` plus a power-law tail,
clipped at zero and normalised to unit sum.  Every parameter is a Legendre series
in wavelength per fiber; the trace centres x(w), y(w) are Legendre series too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ._base import PSF, wave_limit_field
from ._legendre import fit_inverse, traceset_eval, traceset_eval_many
from ._normal_dist import normal_cdf_pdf, normal_cdf_pdf_of

_TAIL_NAMES = ("TAILAMP", "TAILCORE", "TAILXSCA", "TAILYSCA", "TAILINDE")


@functools.partial(jax.jit, static_argnums=(3, 4))
def pixel_gauss_hermite(
    lo: Int[Array, "..."], centre: Float[Array, "..."], sigma: Float[Array, "..."], n: int, deg: int
) -> Float[Array, "... norder n"]:
    """Pixel-integrated Gauss-Hermite functions of orders ``0 .. deg`` (``norder = deg + 1``).

    Pixels ``lo .. lo + n - 1`` (edges at ``lo - 0.5 .. lo + n - 0.5``); order 0 is
    the integral of a unit Gaussian of width ``sigma`` centred on ``centre``; order
    ``m > 0`` integrates ``He_m(u) phi(u)`` exactly, ``-He_{m-1}(u) phi(u)`` at the
    edges (``He`` probabilists' Hermite polynomials, ``u = (edge - centre) / sigma``).
    The density and distribution at each edge share one ``exp`` (:mod:`._normal_dist`).
    """
    return pixel_gauss_hermite_of(lo, centre, sigma, n, deg, jnp)


def pixel_gauss_hermite_of(lo, centre, sigma, n: int, deg: int, xp=jnp):
    """:func:`pixel_gauss_hermite` computed with the array module ``xp`` (``numpy`` for host
    code: the same arithmetic, no tracing): ``lo``, ``centre``, ``sigma`` of one shape ``S``,
    returns ``S + (deg + 1, n)``."""
    steps = xp.arange(n + 1, dtype=centre.dtype).reshape((1,) * lo.ndim + (n + 1,))
    edges = lo[..., None].astype(centre.dtype) - 0.5 + steps
    u = (edges - centre[..., None]) / sigma[..., None]
    cdf, phi = normal_cdf_pdf(u) if xp is jnp else normal_cdf_pdf_of(u, xp)
    # antiderivative of each order at the edges; the pixel values are their differences
    prims = [cdf]
    hm1, h = xp.zeros_like(u), xp.ones_like(u)  # He_{-1}, He_0
    for m in range(1, deg + 1):
        prims.append(-h * phi)  # uses He_{m-1}
        hm1, h = h, u * h - (m - 1) * hm1
    return xp.diff(xp.stack(prims, axis=-2), axis=-1)


class GaussHermitePSF(PSF):
    """Gauss-Hermite PSF with Legendre-in-wavelength parameters.

    Array fields (all differentiable): ``xcoef[nspec, nx]`` and ``ycoef[nspec, ny]``
    (trace centre in CCD pixels vs wavelength, domains ``xdomain``/``ydomain`` in
    A), ``wcoef[nspec, nw]`` and ``ylim[2]`` (the fitted inverse trace: wavelength
    vs normalised CCD row), ``params[nparam, nspec, ncoef]`` (one Legendre series
    per parameter named in ``param_names``, domain ``pdomain``).

    Build with :meth:`from_arrays`, :func:`read_psf` or :func:`desi_like_psf`.
    """

    xcoef: Float[Array, "nspec nx"]
    ycoef: Float[Array, "nspec ny"]
    wcoef: Float[Array, "nspec nw"]
    ylim: Float[Array, "2"]
    params: Float[Array, "nparam nspec ncoef"]

    param_names: tuple[str, ...] = eqx.field(static=True)
    xdomain: tuple[float, float] = eqx.field(static=True)
    ydomain: tuple[float, float] = eqx.field(static=True)
    pdomain: tuple[float, float] = eqx.field(static=True)
    ghdegx: int = eqx.field(static=True)
    ghdegy: int = eqx.field(static=True)
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
    legdeg: tuple[tuple[int, int], ...] | None = eqx.field(static=True, default=None)
    """Per-parameter (LEGDEGX, LEGDEGW) read from file, kept for writing only."""

    # ------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        xcoef: ArrayLike,
        ycoef: ArrayLike,
        params: ArrayLike,
        param_names: Sequence[str],
        *,
        xdomain: tuple[float, float],
        ydomain: tuple[float, float] | None = None,
        pdomain: tuple[float, float] | None = None,
        hsizex: int,
        hsizey: int,
        npix_x: int,
        npix_y: int,
        ghdegx: int | None = None,
        ghdegy: int | None = None,
        psferr: float = 0.01,
        fibermin: int = 0,
        legdeg: Sequence[tuple[int, int]] | None = None,
    ) -> "GaussHermitePSF":
        """Build a PSF from Legendre coefficient arrays (host-side, concrete arrays).

        The inverse trace is fitted as specter does; wmin/wmax follow from it.

        Args:
            xcoef: ``[nspec, ncoef]`` Legendre coefficients of the x trace [CCD pixels].
            ycoef: ``[nspec, ncoef]`` Legendre coefficients of the y trace [CCD pixels].
            params: ``[nparam, nspec, ncoef]`` coefficients of the parameters
                ``param_names`` (GHSIGX, GHSIGY, GH-i-j for all i <= ghdegx,
                j <= ghdegy, optionally TAIL*; others are carried along unused).
            param_names: the ``nparam`` parameter names, in the order of ``params``.
            xdomain: wavelength domain ``(wmin, wmax)`` [A] of the x trace.
            ydomain: wavelength domain [A] of the y trace (default ``xdomain``).
            pdomain: wavelength domain [A] of the parameters (default ``xdomain``).
            hsizex: stamp half width: stamps have ``2 hsizex + 1`` columns.
            hsizey: stamp half height: stamps have ``2 hsizey + 1`` rows.
            npix_x: CCD width [pixels].
            npix_y: CCD height [pixels].
            ghdegx: Hermite degree in x (default: inferred from the names).
            ghdegy: Hermite degree in y (default: inferred from the names).
            psferr: fractional PSF error used in chi2pix.
            fibermin: number of the first fiber in the file (FIBERMIN), kept for writing.
            legdeg: per-parameter (LEGDEGX, LEGDEGW), kept for writing only.

        Returns:
            The PSF, with float64 arrays when x64 is enabled.
        """
        dt = jnp.result_type(float)
        xcoef = jnp.asarray(np.asarray(xcoef, dtype=np.float64), dtype=dt)
        ycoef = jnp.asarray(np.asarray(ycoef, dtype=np.float64), dtype=dt)
        params = jnp.asarray(np.asarray(params, dtype=np.float64), dtype=dt)
        names = tuple(str(n).strip() for n in param_names)
        if params.ndim != 3 or params.shape[0] != len(names):
            raise ValueError(
                f"params must have shape (nparam={len(names)}, nspec, ncoef), got {params.shape}"
            )
        nspec = int(xcoef.shape[0])
        if ycoef.shape[0] != nspec or params.shape[1] != nspec:
            raise ValueError(
                f"inconsistent fiber counts: xcoef {xcoef.shape}, ycoef {ycoef.shape}, "
                f"params {params.shape}"
            )
        gh = [n for n in names if n.startswith("GH-")]
        if ghdegx is None:
            ghdegx = max(int(n.split("-")[1]) for n in gh) if gh else 0
        if ghdegy is None:
            ghdegy = max(int(n.split("-")[2]) for n in gh) if gh else 0
        need = ["GHSIGX", "GHSIGY"] + [
            f"GH-{i}-{j}" for j in range(ghdegy + 1) for i in range(ghdegx + 1)
        ]
        missing = [n for n in need if n not in names]
        if missing:
            raise ValueError(f"Gauss-Hermite PSF parameters missing: {missing}")
        xdomain = (float(xdomain[0]), float(xdomain[1]))
        ydomain = xdomain if ydomain is None else (float(ydomain[0]), float(ydomain[1]))
        pdomain = xdomain if pdomain is None else (float(pdomain[0]), float(pdomain[1]))
        wcoef, ylim = fit_inverse(ycoef, ydomain)
        wlo = np.asarray(traceset_eval(wcoef, (ylim[0], ylim[1]), jnp.arange(nspec), -0.5))
        whi = np.asarray(
            traceset_eval(wcoef, (ylim[0], ylim[1]), jnp.arange(nspec), npix_y - 0.5)
        )
        return cls(
            xcoef=xcoef,
            ycoef=ycoef,
            wcoef=wcoef,
            ylim=ylim,
            params=params,
            param_names=names,
            xdomain=xdomain,
            ydomain=ydomain,
            pdomain=pdomain,
            ghdegx=int(ghdegx),
            ghdegy=int(ghdegy),
            nspec=nspec,
            npix_x=int(npix_x),
            npix_y=int(npix_y),
            hsizex=int(hsizex),
            hsizey=int(hsizey),
            psferr=float(psferr),
            wmin=float(wlo.min()),
            wmax=float(whi.max()),
            wmin_all=float(wlo.max()),
            wmax_all=float(whi.min()),
            fibermin=int(fibermin),
            legdeg=None if legdeg is None else tuple((int(a), int(b)) for a, b in legdeg),
        )

    def with_traces(
        self, xcoef: ArrayLike | None = None, ycoef: ArrayLike | None = None
    ) -> "GaussHermitePSF":
        """Copy with new trace coefficients and a refitted inverse (JAX-traceable).

        The metadata (wmin, wmax, ...) are kept as they are.
        """
        xcoef = self.xcoef if xcoef is None else jnp.asarray(xcoef)
        ycoef = self.ycoef if ycoef is None else jnp.asarray(ycoef)
        wcoef, ylim = fit_inverse(ycoef, self.ydomain, deg=self.wcoef.shape[-1] - 1)
        return eqx.tree_at(
            lambda p: (p.xcoef, p.ycoef, p.wcoef, p.ylim), self, (xcoef, ycoef, wcoef, ylim)
        )

    # ------------------------------------------------------------ parameters
    def param_index(self, name: str) -> int:
        """Row of ``params`` holding parameter ``name``."""
        try:
            return self.param_names.index(name)
        except ValueError:
            raise KeyError(f"PSF has no parameter {name!r}") from None

    @property
    def has_tails(self) -> bool:
        """Whether all five TAIL* parameters are present."""
        return all(n in self.param_names for n in _TAIL_NAMES)

    def _used_rows(self) -> np.ndarray:
        rows = [self.param_index("GHSIGX"), self.param_index("GHSIGY")]
        rows += [
            self.param_index(f"GH-{i}-{j}")
            for j in range(self.ghdegy + 1)
            for i in range(self.ghdegx + 1)
        ]
        if self.has_tails:
            rows += [self.param_index(n) for n in _TAIL_NAMES]
        return np.asarray(rows)

    def param(self, name: str, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Value of parameter ``name`` for fibers ``ispec`` at ``wave`` [A] (broadcast)."""
        return traceset_eval(self.params[self.param_index(name)], self.pdomain, ispec, wave)

    # ------------------------------------------------------------ traces
    def x(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Trace centre x [pixels] of fibers ``ispec`` at ``wave`` [A]."""
        return traceset_eval(self.xcoef, self.xdomain, ispec, wave)

    def y(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """Trace centre y [pixels] of fibers ``ispec`` at ``wave`` [A]."""
        return traceset_eval(self.ycoef, self.ydomain, ispec, wave)

    def wavelength(self, ispec: ArrayLike, y: ArrayLike) -> Float[Array, "..."]:
        """Wavelength [A] of fibers ``ispec`` at CCD row ``y`` (fitted inverse trace)."""
        return traceset_eval(self.wcoef, (self.ylim[0], self.ylim[1]), ispec, y)

    def xsigma(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """GHSIGX [pixels], the cross-dispersion Gaussian core width."""
        return self.param("GHSIGX", ispec, wave)

    def ysigma(self, ispec: ArrayLike, wave: ArrayLike) -> Float[Array, "..."]:
        """GHSIGY [pixels], the dispersion-direction core width (as specter reports it)."""
        return self.param("GHSIGY", ispec, wave)

    # ------------------------------------------------------------ spots
    def _stamps(self, ispec, wave, x, y, xmin, ymin) -> Float[Array, "... ny nx"]:
        """Spots ``S + (2 hsizey + 1, 2 hsizex + 1)`` for batch shape ``S``."""
        return _gh_stamps(self, ispec, wave, x, y, xmin, ymin)

    def _stamps_impl(self, ispec, wave, x, y, xmin, ymin) -> Float[Array, "... ny nx"]:
        # one rank for both (leading ones), keeping each its own small shape
        nd = max(jnp.ndim(ispec), jnp.ndim(wave))
        ispec = jnp.reshape(ispec, (1,) * (nd - jnp.ndim(ispec)) + jnp.shape(ispec))
        wave = jnp.reshape(wave, (1,) * (nd - jnp.ndim(wave)) + jnp.shape(wave))
        vals = traceset_eval_many(self.params[self._used_rows()], self.pdomain, ispec, wave)
        static = (self.stamp_shape, self.ghdegx, self.ghdegy)
        if not self.has_tails:
            return _gh_stamp_values(static, False, vals, x, y, xmin, ymin)
        # DESI's files carry TAILAMP = 0: the per-pixel power is then skipped
        any_tail = jnp.any(self.params[self.param_index("TAILAMP")] != 0)
        return _gh_stamps_tails_if_any(static, any_tail, vals, x, y, xmin, ymin)


def _gh_stamp_values(static, tails: bool, vals, x, y, xmin, ymin) -> Float[Array, "... ny nx"]:
    """Stamps ``S + (ny, nx)`` from the parameter values ``vals[*S, nparam_used]``.

    ``vals[..., k]``: GHSIGX, GHSIGY, GH-i-j (j major), then TAIL* when ``tails``
    (the rows :meth:`GaussHermitePSF._used_rows` picks, evaluated at each spot).
    """
    (ny, nx), dgx, dgy = static
    sigx, sigy = vals[..., 0], vals[..., 1]
    ngh = (dgx + 1) * (dgy + 1)
    gh = vals[..., 2 : 2 + ngh].reshape(vals.shape[:-1] + (dgy + 1, dgx + 1))
    fx = pixel_gauss_hermite(xmin, x, sigx, nx, dgx)  # S + (dgx+1, nx)
    fy = pixel_gauss_hermite(ymin, y, sigy, ny, dgy)  # S + (dgy+1, ny)
    # sum_j gh[j, i] fy[j, y] first, then the outer products with fx; both written
    # as unrolled broadcast sums, which XLA:CPU fuses and vectorises several times
    # better than batched 7 x 7 dots (the last one fuses with clip and normalise)
    fyg = sum(gh[..., j, :, None] * fy[..., j, None, :] for j in range(dgy + 1))  # S + (dgx+1, ny)
    img = sum(fyg[..., i, :, None] * fx[..., i, None, :] for i in range(dgx + 1))  # S + (ny, nx)
    if tails:
        amp, core, xsca, ysca, inde = (vals[..., k, None, None] for k in range(2 + ngh, 7 + ngh))
        nd = xmin.ndim
        dx = (xmin[..., None] + jnp.arange(nx, dtype=xmin.dtype).reshape((1,) * nd + (nx,))).astype(x.dtype) - x[..., None]
        dy = (ymin[..., None] + jnp.arange(ny, dtype=ymin.dtype).reshape((1,) * nd + (ny,))).astype(y.dtype) - y[..., None]
        r2 = (dx[..., None, :] * xsca) ** 2 + (dy[..., :, None] * ysca) ** 2
        img = img + amp * r2 / (core**2 + r2) ** (1.0 + 0.5 * inde)
    img = jnp.clip(img, 0.0)
    return img / jnp.sum(img, axis=(-2, -1), keepdims=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _gh_stamps_tails_if_any(static, any_tail, vals, x, y, xmin, ymin):
    """Stamps with tails, or without evaluating them when ``any_tail`` is False.

    ``any_tail`` is one boolean for the whole PSF (some TAILAMP coefficient is
    non-zero), so this is a real conditional even under ``vmap``; both branches
    give the same stamps when every TAILAMP is zero.  Derivatives always include
    the tail terms, so a fit starting from TAILAMP = 0 can grow a tail.
    """
    return jax.lax.cond(
        any_tail,
        functools.partial(_gh_stamp_values, static, True),
        functools.partial(_gh_stamp_values, static, False),
        vals, x, y, xmin, ymin,
    )


@_gh_stamps_tails_if_any.defjvp
def _gh_stamps_tails_if_any_jvp(static, primals, tangents):
    return jax.jvp(functools.partial(_gh_stamp_values, static, True), primals[1:], tangents[1:])


@eqx.filter_jit
def _gh_stamps(psf: GaussHermitePSF, ispec, wave, x, y, xmin, ymin):
    return psf._stamps_impl(ispec, wave, x, y, xmin, ymin)


# ---------------------------------------------------------------- synthetic PSF
def desi_like_psf(
    nspec: int = 50,
    wmin: float = 5600.0,
    wmax: float = 5800.0,
    *,
    npix_x: int | None = None,
    npix_y: int | None = None,
    pitch: float = 7.4,
    bundlesize: int = 25,
    bundle_gap: float = 12.0,
    dispersion: float = 0.55,
    sigx: tuple[float, float] = (1.0, 1.1),
    sigy: tuple[float, float] = (1.1, 1.3),
    ghdeg: int = 2,
    gh_scale: float = 0.02,
    tailamp: float = 0.0,
    hsizex: int = 8,
    hsizey: int = 5,
    margin: float = 20.0,
    seed: int = 0,
) -> GaussHermitePSF:
    """A synthetic DESI-like Gauss-Hermite PSF, for demos and tests.

    Fibers sit ``pitch`` pixels apart in bundles of ``bundlesize`` with an extra
    ``bundle_gap`` pixels between bundles; rows advance ``1 / dispersion`` per A
    (``dispersion`` in A per row) with a slight fiber-dependent curvature, the
    traces bend by ~1 pixel across the range; GHSIGX/GHSIGY vary linearly over
    the ranges ``sigx``/``sigy`` with wavelength and fiber; GH-i-j of order
    ``i + j > 0`` up to ``ghdeg`` are small (``gh_scale``, seeded random); tails
    have amplitude ``tailamp``.  The traces cover ``[wmin - margin, wmax + margin]``
    A, and the CCD (default just large enough) is ``npix_y`` rows x ``npix_x`` columns.

    Args:
        nspec: number of fibers.
        wmin: smallest wavelength [A] every fiber must cover.
        wmax: largest wavelength [A] every fiber must cover.
        npix_x: CCD width [pixels] (default: just wide enough for the fibers).
        npix_y: CCD height [pixels] (default: just tall enough for the wavelengths).
        pitch: distance between neighbouring fibers [pixels].
        bundlesize: fibers per bundle.
        bundle_gap: extra gap between bundles [pixels].
        dispersion: A per CCD row.
        sigx: (low, high) range of GHSIGX, the spot's x width [pixels].
        sigy: (low, high) range of GHSIGY, the spot's y width [pixels].
        ghdeg: largest Gauss-Hermite order ``i + j``.
        gh_scale: size of the random Gauss-Hermite coefficients of order > 0.
        tailamp: amplitude of the power-law tails (0: none).
        hsizex: stamp half width (stamps have ``2 hsizex + 1`` columns).
        hsizey: stamp half height (stamps have ``2 hsizey + 1`` rows).
        margin: extra wavelength coverage [A] beyond ``[wmin, wmax]``.
        seed: seed of the random Gauss-Hermite coefficients.

    Returns:
        A :class:`GaussHermitePSF`.

    Example:
        ```python
        psf = jaxspec.desi_like_psf(nspec=25, wmin=5600, wmax=5800)
        xmin, ymin, stamps = psf.spots(np.arange(25)[:, None], np.array([5700.0]))
        stamps.shape    # (25, 1, 11, 17)
        ```
    """
    rng = np.random.default_rng(seed)
    wlo, whi = wmin - margin, wmax + margin
    half = 0.5 * (whi - wlo) / dispersion  # rows from centre to domain end
    fib = np.arange(nspec)
    ffrac = fib / max(nspec - 1, 1)
    x0 = 2.0 * hsizex + 4.0 + fib * pitch + (fib // bundlesize) * bundle_gap
    xcoef = np.zeros((nspec, 3))
    xcoef[:, 0] = x0
    xcoef[:, 1] = 0.3 * (ffrac - 0.5)  # slight tilt, fanning out
    xcoef[:, 2] = 0.6 + 0.2 * ffrac  # ~1 pixel bow
    ycoef = np.zeros((nspec, 3))
    ycoef[:, 0] = half + 2.0 * hsizey + 0.5 + 1.5 * (ffrac - 0.5) ** 2
    ycoef[:, 1] = half
    ycoef[:, 2] = 0.8 * (ffrac - 0.5)  # mild, keeps the trace monotonic
    if npix_x is None:
        npix_x = int(np.ceil(x0.max() + 2.0 * hsizex + 4.0))
    if npix_y is None:
        npix_y = int(np.ceil(2.0 * half + 4.0 * hsizey + 4.0))

    names = ["GHSIGX", "GHSIGY"]
    rows = []

    def lin(lo, hi):  # value at domain centre + slope in wavelength and fiber
        c = np.zeros((nspec, 3))
        c[:, 0] = lo + (hi - lo) * (0.5 + 0.25 * (ffrac - 0.5))
        c[:, 1] = 0.25 * (hi - lo)
        return c

    rows += [lin(*sigx), lin(*sigy)]
    for j in range(ghdeg + 1):
        for i in range(ghdeg + 1):
            names.append(f"GH-{i}-{j}")
            c = np.zeros((nspec, 3))
            if i == 0 and j == 0:
                c[:, 0] = 1.0
            elif i + j <= ghdeg:
                a = gh_scale * rng.normal(size=3) / (i + j)
                c[:, 0] = a[0] + 0.2 * a[1] * (ffrac - 0.5)
                c[:, 1] = 0.3 * a[2]
            rows.append(c)
    tails = {"TAILAMP": tailamp, "TAILCORE": 1.0, "TAILXSCA": 1.0, "TAILYSCA": 1.0, "TAILINDE": 2.0}
    for n, v in tails.items():
        names.append(n)
        c = np.zeros((nspec, 3))
        c[:, 0] = v
        rows.append(c)
    return GaussHermitePSF.from_arrays(
        xcoef,
        ycoef,
        np.stack(rows),
        names,
        xdomain=(wlo, whi),
        hsizex=hsizex,
        hsizey=hsizey,
        npix_x=npix_x,
        npix_y=npix_y,
        ghdegx=ghdeg,
        ghdegy=ghdeg,
    )
