"""PSF calibration: fit a Gauss-Hermite PSF to arc and flat exposures.

The forward model of a calibration image is the PSF's spots, scattered into the
pixels exactly as :func:`jaxspec.project` does, of

* arcs: each line of a line list, at its known wavelength, with an unknown
  number of photons per fiber and exposure (linear parameters);
* flats: a continuum ``lamp(w) * poly_f(w)`` per fiber, with ``lamp`` a known
  shape (default :func:`jaxspec._calib.flat_spectrum`) and ``poly_f`` a Legendre
  series of degree ``flat_deg`` with unknown coefficients (linear);

through a PSF whose parameters are those of the initial PSF plus corrections.
**What is fitted** (``what``), on top of the initial PSF's coefficients:

* ``"xtrace"``/``"ytrace"``: per-fiber offsets [pixels] of the first
  ``trace_deg + 1`` Legendre coefficients of the x / y traces (default
  ``trace_deg=0``: a constant shift of each trace);
* ``"sigma"``: per-fiber log-scales of GHSIGX and GHSIGY (all their Legendre
  coefficients multiplied by ``exp(s)``: the widths stay positive by
  construction and keep the file's wavelength dependence);
* ``"gh"``: additive offsets to the constant Legendre coefficient of the
  Gauss-Hermite terms ``gh_terms``, shared by the fitted fibers (a bundle) or
  per fiber (``per_fiber_gh=True``).  The spot stays normalised to unit sum
  (the PSF model divides by the stamp's sum), so GH-0-0 is never fitted.

The default ``gh_terms`` leave out GH-1-0, GH-0-1, GH-2-0, GH-0-2: to first
order they are the derivatives of the Gaussian core with respect to its centre
and width, i.e. degenerate with the trace shifts and sigma scales.  These are
corrections constant over the fitted patch (fibers x pixel box);
:func:`fit_psf_ccd` fits a bundle x wavelength-block grid of patches and turns
the per-block corrections into Legendre coefficients of the file's degrees.

**The minimiser** is Levenberg-Marquardt on the pixel residuals
``(data - model) sqrt(ivar)``.  It is hand-written rather than taken from
optimistix because the Jacobian has a structure a generic solver cannot see:

* the model is linear in the line fluxes and flat amplitudes: their Jacobian
  columns are the unit-flux spot images themselves (no differentiation);
* every fiber's light depends only on that fiber's PSF corrections (plus the
  shared GH offsets), so the PSF columns of *all* fibers come from a handful of
  forward-mode derivatives (one per parameter kind, "graph colouring": ~9 jvps
  instead of one per parameter), each fiber's light kept in its own band of
  columns;
* ``J^T J`` is assembled from the products of neighbouring fibers' bands only.

A generic Levenberg-Marquardt would form the dense (pixels x parameters)
Jacobian with one jvp per parameter (hundreds) and multiply it densely; here one
iteration of a 25-fiber bundle over ~400 CCD rows costs about as much as a few
forward models.  The normal equations are small (a few hundred unknowns) and
are solved on the host, which also reports progress per iteration and applies
the stopping rule.  The covariance of all parameters is ``(J^T W J)^-1`` at the
minimum (the Gauss-Newton Hessian); its PSF block is the PSF uncertainty
marginalised over the line fluxes and flat amplitudes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._simulation.calib import CalibImage, LineList, flat_spectrum, flat_wave_grid
from ..psf._gausshermite import GaussHermitePSF
from ..psf._legendre import legvander

log = logging.getLogger("jaxspec.fit")

__all__ = [
    "ALL_WHAT",
    "CalibPatch",
    "DEFAULT_GH_TERMS",
    "FitResult",
    "apply_psf_params",
    "calib_patch",
    "fit_psf",
    "fit_psf_ccd",
    "flux_jacobian",
    "propagate_psf_uncertainty",
]

DEFAULT_GH_TERMS = ("GH-1-1", "GH-3-0", "GH-2-1", "GH-1-2", "GH-0-3")
PSF_KEYS = ("dx", "dy", "log_sigx", "log_sigy", "gh")
LIN_KEYS = ("line_flux", "flat_amp")
ALL_WHAT = ("xtrace", "ytrace", "sigma", "gh")


# ---------------------------------------------------------------- parameters
def _psf_shapes(nf: int, what: Sequence[str], trace_deg: int, ngh: int, per_fiber_gh: bool) -> dict:
    out = {}
    if "xtrace" in what:
        out["dx"] = (nf, trace_deg + 1)
    if "ytrace" in what:
        out["dy"] = (nf, trace_deg + 1)
    if "sigma" in what:
        out["log_sigx"] = (nf,)
        out["log_sigy"] = (nf,)
    if "gh" in what and ngh:
        out["gh"] = (ngh, nf) if per_fiber_gh else (ngh,)
    return out


def apply_psf_params(psf: GaussHermitePSF, params: dict, fibers, *, gh_terms: Sequence[str] = DEFAULT_GH_TERMS
                     ) -> GaussHermitePSF:
    """``psf`` with the corrections ``params`` applied to ``fibers`` (JAX-traceable).

    Args:
        psf: the PSF to correct.
        params: any of ``dx``/``dy`` ``(nfib, k)`` offsets [pixels] of the first
            ``k`` Legendre coefficients of the x / y traces, ``log_sigx``/``log_sigy``
            ``(nfib,)`` log-scales of GHSIGX / GHSIGY, ``gh`` ``(nterm,)`` or
            ``(nterm, nfib)`` offsets of the constant coefficient of ``gh_terms``.
        fibers: ``(nfib,)`` absolute fiber indices the rows of ``params`` refer to.

    The inverse trace is not refitted (``psf.with_traces()`` does that; the
    forward model and the extraction solve do not use it).
    """
    fib = jnp.asarray(fibers).astype(jnp.int32)
    xcoef, ycoef, pars = psf.xcoef, psf.ycoef, psf.params
    if "dx" in params:
        k = params["dx"].shape[-1]
        xcoef = xcoef.at[fib, :k].add(params["dx"])
    if "dy" in params:
        k = params["dy"].shape[-1]
        ycoef = ycoef.at[fib, :k].add(params["dy"])
    if "log_sigx" in params:
        r = psf.param_index("GHSIGX")
        pars = pars.at[r, fib, :].set(pars[r, fib, :] * jnp.exp(params["log_sigx"])[:, None])
    if "log_sigy" in params:
        r = psf.param_index("GHSIGY")
        pars = pars.at[r, fib, :].set(pars[r, fib, :] * jnp.exp(params["log_sigy"])[:, None])
    if "gh" in params and len(gh_terms):
        rows = jnp.asarray([psf.param_index(n) for n in gh_terms])
        g = jnp.asarray(params["gh"])
        g = jnp.broadcast_to(g[:, None], (len(gh_terms), fib.shape[0])) if g.ndim == 1 else g
        pars = pars.at[rows[:, None], fib[None, :], 0].add(g)
    return eqx.tree_at(lambda p: (p.xcoef, p.ycoef, p.params), psf, (xcoef, ycoef, pars))


class _Layout:
    """Flat parameter vector <-> dict of named arrays."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = dict(shapes)
        self.slices = {}
        start = 0
        for name, shp in self.shapes.items():
            n = int(np.prod(shp)) if len(shp) else 1
            self.slices[name] = slice(start, start + n)
            start += n
        self.size = start

    def unflatten(self, theta):
        return {n: theta[s].reshape(self.shapes[n]) for n, s in self.slices.items()}

    def flatten(self, d) -> np.ndarray:
        out = np.zeros(self.size)
        for n, s in self.slices.items():
            out[s] = np.asarray(d[n]).reshape(-1)
        return out

    def mask(self, names) -> np.ndarray:
        m = np.zeros(self.size, bool)
        for n in names:
            if n in self.slices:
                m[self.slices[n]] = True
        return m


# ---------------------------------------------------------------- one patch: static set-up
@dataclasses.dataclass(frozen=True)
class _Static:
    """Shapes and switches the compiled patch functions specialise on."""

    nf: int
    H: int
    W: int  # width of the box
    Wb: int  # width of one fiber's band of columns
    pad: int  # zero columns each side of the box in the working frame
    narc: int
    nflat: int
    nline: int  # padded line count
    nsamp: int  # padded flat samples
    nbasis: int
    dmax: int  # largest fiber distance whose bands overlap
    psf_shapes: tuple  # ((key, shape), ...)
    gh_terms: tuple
    colors: tuple  # ((key, k), ...) one jvp each


def _round_up(n: int, m: int) -> int:
    return int(m * -(-int(n) // m))


def _colors(psf_shapes: dict) -> tuple:
    """Tangent directions: per-fiber keys set for all fibers at once; shared gh one term each."""
    out = []
    for key, shp in psf_shapes.items():
        if key in ("dx", "dy"):
            out += [(key, k) for k in range(shp[1])]
        elif key in ("log_sigx", "log_sigy"):
            out.append((key, 0))
        else:  # gh: (ngh,) shared or (ngh, nf) per fiber; one colour per term either way
            out += [(key, k) for k in range(shp[0])]
    return tuple(out)


class CalibPatch(eqx.Module):
    """One fitting patch: fibers x pixel box, its calibration pixels and model set-up.

    Build with :func:`calib_patch`.  Parameters are dicts (see :meth:`unflatten`):
    PSF corrections (``dx``, ``dy``, ``log_sigx``, ``log_sigy``, ``gh``; see
    :func:`apply_psf_params`) and linear ones, ``line_flux`` ``(narc, nfib, nline)``
    [photons per line] and ``flat_amp`` ``(nflat, nfib, nbasis)``.  :meth:`chi2`,
    :meth:`residuals` and :meth:`model` are pure JAX (jit / grad / vmap safe).
    """

    psf: GaussHermitePSF
    fibers: jnp.ndarray  # (nf,) absolute
    data: jnp.ndarray  # (nimg, H, W + 2 pad)
    sqw: jnp.ndarray  # (nimg, H, W + 2 pad): sqrt(ivar), 0 outside the box
    xlo: jnp.ndarray  # (nf,) first band column in the working frame
    y0: jnp.ndarray  # () CCD row of the box's first row
    x0: jnp.ndarray  # () CCD column of the box's first column
    lwave: jnp.ndarray  # (nline,)
    lvalid: jnp.ndarray  # (nline,) bool
    fwave: jnp.ndarray  # (nsamp,)
    fbasis: jnp.ndarray  # (nsamp, nbasis): lamp * dw * Legendre basis; 0 for padding
    static: _Static = eqx.field(static=True)

    # ----------------------------------------------------------- parameter vectors
    @property
    def layout(self) -> _Layout:
        s = self.static
        shapes = dict(s.psf_shapes)
        if s.narc:
            shapes["line_flux"] = (s.narc, s.nf, s.nline)
        if s.nflat:
            shapes["flat_amp"] = (s.nflat, s.nf, s.nbasis)
        return _Layout(shapes)

    def unflatten(self, theta):
        """dict of named parameters from the flat vector ``theta``."""
        return self.layout.unflatten(theta)

    def corrected_psf(self, params: dict) -> GaussHermitePSF:
        """The initial PSF with the PSF corrections in ``params`` applied."""
        psfp = {k: params[k] for k in PSF_KEYS if k in params}
        return apply_psf_params(self.psf, psfp, self.fibers, gh_terms=self.static.gh_terms)

    # ----------------------------------------------------------- forward model
    def stamps(self, psf: GaussHermitePSF):
        """Spots of every fiber at the lines and flat samples.

        Returns ``{"line": (xmin, ymin, st), "flat": (xmin, ymin, st)}`` with
        ``st`` of shape ``(nf, nline or nsamp, ny, nx)`` (padding lines zeroed).
        """
        s = self.static
        out = {}
        if s.narc:
            xmin, ymin, st = psf.spots(self.fibers[:, None], self.lwave[None, :])
            out["line"] = (xmin, ymin, jnp.where(self.lvalid[None, :, None, None], st, 0.0))
        if s.nflat:
            out["flat"] = psf.spots(self.fibers[:, None], self.fwave[None, :])
        return out

    def _band_index(self, xmin, ymin, ny, nx):
        s = self.static
        cols = xmin[..., None] + s.pad - self.x0 - self.xlo[:, None, None] + jnp.arange(nx)
        rows = ymin[..., None] - self.y0 + jnp.arange(ny)
        rows = jnp.where((rows >= 0) & (rows < s.H), rows, s.H)
        cols = jnp.where((cols >= 0) & (cols < s.Wb), cols, s.Wb)
        return rows, cols

    def _scatter_each(self, xmin, ymin, vals):
        """Stamps ``vals (nf, K, ny, nx)`` -> one band each, ``(nf, K, H, Wb)``."""
        s = self.static
        ny, nx = vals.shape[-2:]
        rows, cols = self._band_index(xmin, ymin, ny, nx)  # (nf, K, ny), (nf, K, nx)

        def one(v, r, c):  # v (ny, nx) -> (H, Wb)
            return jnp.zeros((s.H, s.Wb), v.dtype).at[r[:, None], c[None, :]].add(v, mode="drop")

        return jax.vmap(jax.vmap(one))(vals, rows, cols)

    def _scatter_sum(self, xmin, ymin, st, weights):
        """``sum_k weights[e, f, k] st[f, k]`` into each fiber's band: ``(E, nf, H, Wb)``."""
        s = self.static
        ny, nx = st.shape[-2:]
        rows, cols = self._band_index(xmin, ymin, ny, nx)  # (nf, K, ny), (nf, K, nx)
        ok = (rows[..., :, None] < s.H) & (cols[..., None, :] < s.Wb)  # (nf, K, ny, nx)
        size = s.H * s.Wb
        flat = rows[..., :, None] * s.Wb + cols[..., None, :]
        flat = jnp.where(ok, flat + size * jnp.arange(s.nf)[:, None, None, None], s.nf * size)
        vals = weights[..., None, None] * st[None]  # (E, nf, K, ny, nx)
        out = jax.vmap(lambda v: jax.ops.segment_sum(v.reshape(-1), flat.reshape(-1), s.nf * size + 1))(vals)
        return out[:, :-1].reshape(-1, s.nf, s.H, s.Wb)

    def _weights(self, params: dict) -> dict:
        """Photons per stamp: line ``(narc, nf, nline)``, flat ``(nflat, nf, nsamp)``."""
        out = {}
        if self.static.narc:
            out["line"] = params["line_flux"]
        if self.static.nflat:
            # a broadcast sum, not a dot: XLA:CPU (jax 0.10.2) miscompiles the dot
            # fused into the scatter below
            out["flat"] = jnp.sum(params["flat_amp"][:, :, None, :] * self.fbasis[None, None], axis=-1)
        return out

    def bands(self, params: dict):
        """Model light of each fiber in its band: ``(nimg, nf, H, Wb)``."""
        st = self.stamps(self.corrected_psf(params))
        w = self._weights(params)
        return jnp.concatenate([self._scatter_sum(*st[k], w[k]) for k in ("line", "flat") if k in st], axis=0)

    def band_jacobian(self, params: dict):
        """``(bands, J)``: the model bands and d bands / d (colours, linear), ``(nimg, nf, H, Wb, na)``.

        Forward-mode derivatives of the spots, one per colour (all fibers'
        parameter of one kind at once: fiber i's light depends on fiber i's
        corrections only), in two groups so that the Gauss-Hermite offsets do
        not differentiate the pixel integrals; the model is linear in the fluxes.
        """
        s = self.static
        psfp = {k: params[k] for k in PSF_KEYS if k in params}
        w = self._weights(params)
        kinds = [k for k in ("line", "flat") if (k == "line" and s.narc) or (k == "flat" and s.nflat)]

        def stamps_of(pp):
            st = self.stamps(self.corrected_psf(pp))
            return {k: st[k][2] for k in kinds}

        primal = self.stamps(self.corrected_psf(psfp))
        dst = []  # per colour: {kind: (nf, K, ny, nx)}
        for group in (("dx", "dy", "log_sigx", "log_sigy"), ("gh",)):
            cols = [(key, k) for key, k in s.colors if key in group]
            if not cols:
                continue
            fixed = {k: v for k, v in psfp.items() if k not in group}
            free = {k: v for k, v in psfp.items() if k in group}
            tangents = []
            for key, k in cols:
                t = {kk: jnp.zeros_like(v) for kk, v in free.items()}
                if key in ("dx", "dy"):
                    t[key] = t[key].at[:, k].set(1.0)
                elif key in ("log_sigx", "log_sigy"):
                    t[key] = jnp.ones_like(t[key])
                else:
                    t[key] = t[key].at[k].set(1.0)
                tangents.append(t)
            tstack = jax.tree.map(lambda *a: jnp.stack(a), *tangents)
            fn = lambda fr: stamps_of({**fixed, **fr})  # noqa: E731
            dst.append(jax.vmap(lambda t: jax.jvp(fn, (free,), (t,))[1])(tstack))
        nimg = s.narc + s.nflat
        bands = jnp.concatenate([self._scatter_sum(*primal[k], w[k]) for k in kinds], axis=0)
        jac = []
        if dst:
            per_kind = []
            for k in kinds:
                d = jnp.concatenate([g[k] for g in dst], axis=0)  # (ncolor, nf, K, ny, nx)
                xmin, ymin, _ = primal[k]
                out = [self._scatter_sum(xmin, ymin, d[c], w[k]) for c in range(d.shape[0])]  # (ne, nf, H, Wb)
                per_kind.append(jnp.stack(out, axis=-1))  # (ne, nf, H, Wb, ncolor)
            jac.append(jnp.concatenate(per_kind, axis=0))
        if s.narc:
            lines = self._scatter_each(*primal["line"])  # (nf, nline, H, Wb)
            onehot = jnp.eye(nimg, s.narc, dtype=bands.dtype)  # image m is arc a
            jac.append(jnp.einsum("ma,ilhw->mihwal", onehot, lines).reshape(nimg, s.nf, s.H, s.Wb, -1))
        if s.nflat:
            xmin, ymin, st = primal["flat"]
            basis = self._scatter_sum(xmin, ymin, st, jnp.broadcast_to(self.fbasis.T[:, None, :], (s.nbasis, s.nf, s.nsamp)))
            onehot = jnp.eye(nimg, s.nflat, k=-s.narc, dtype=bands.dtype)
            jac.append(jnp.einsum("ma,bihw->mihwab", onehot, basis).reshape(nimg, s.nf, s.H, s.Wb, -1))
        return bands, jnp.concatenate(jac, axis=-1)

    def _cols(self):
        return self.xlo[:, None] + jnp.arange(self.static.Wb)  # (nf, Wb)

    def _to_image(self, bands):
        """Sum the fibers' bands into the working frame: ``(nimg, H, W + 2 pad)``."""
        s = self.static
        nimg = bands.shape[0]
        img = jnp.zeros((nimg, s.H, s.W + 2 * s.pad), bands.dtype)
        cols = self._cols()
        return img.at[:, :, cols].add(jnp.moveaxis(bands, 1, 2), mode="drop")

    def model(self, params: dict):
        """Model images of the box, ``(nimg, H, W)`` (arcs first, then flats)."""
        s = self.static
        return self._to_image(self.bands(params))[:, :, s.pad:s.pad + s.W]

    def residuals(self, params: dict):
        """``(data - model) sqrt(ivar)``, ``(nimg, H, W)``."""
        s = self.static
        r = (self.data - self._to_image(self.bands(params))) * self.sqw
        return r[:, :, s.pad:s.pad + s.W]

    def chi2(self, params: dict):
        """Pixel chi2 of the model (a scalar; differentiable in ``params``)."""
        return jnp.sum(self.residuals(params) ** 2)

    # ----------------------------------------------------------- Gauss-Newton pieces
    def _index_map(self) -> np.ndarray:
        """(nf, na) index into theta of every column of a fiber's band Jacobian."""
        s = self.static
        lay = self.layout
        nf = s.nf
        idx = []
        for key, k in s.colors:
            sl = lay.slices[key]
            shp = lay.shapes[key]
            if key in ("dx", "dy"):
                idx.append(sl.start + np.arange(nf) * shp[1] + k)
            elif key in ("log_sigx", "log_sigy"):
                idx.append(sl.start + np.arange(nf))
            elif len(shp) == 2:  # per-fiber gh (ngh, nf)
                idx.append(sl.start + k * nf + np.arange(nf))
            else:  # shared gh
                idx.append(np.full(nf, sl.start + k))
        if s.narc:
            st = lay.slices["line_flux"].start
            for a in range(s.narc):
                for li in range(s.nline):
                    idx.append(st + (a * nf + np.arange(nf)) * s.nline + li)
        if s.nflat:
            st = lay.slices["flat_amp"].start
            for a in range(s.nflat):
                for b in range(s.nbasis):
                    idx.append(st + (a * nf + np.arange(nf)) * s.nbasis + b)
        return np.stack(idx, axis=1)

    def normal_equations(self, params: dict):
        """Gauss-Newton pieces at ``params``: ``(chi2, J^T J, J^T r)`` over the flat theta.

        ``r`` are the weighted residuals, ``J = d model / d theta`` weighted, so a
        Gauss-Newton step is ``delta = (J^T J)^-1 J^T r``.
        """
        s = self.static
        bands, jac = self.band_jacobian(params)
        cols = self._cols()
        resid = (self.data - self._to_image(bands)) * self.sqw  # (nimg, H, Wfull)
        chi2 = jnp.sum(resid**2)
        # each fiber's band of weights / residuals: (nimg, nf, H, Wb), 0 past the frame
        wfull = s.W + 2 * s.pad
        inside = (cols < wfull)[None, :, None, :]
        cl = jnp.clip(cols, 0, wfull - 1)
        sqw_b = jnp.where(inside, jnp.moveaxis(self.sqw[:, :, cl], 2, 1), 0.0)
        r_b = jnp.where(inside, jnp.moveaxis(resid[:, :, cl], 2, 1), 0.0)
        jw = jac * sqw_b[..., None]  # weighted
        na = jw.shape[-1]
        # (nf, R, Wb, na) with R = nimg * H
        jf = jnp.moveaxis(jw, 1, 0).reshape(s.nf, -1, s.Wb, na)
        rf = jnp.moveaxis(r_b, 1, 0).reshape(s.nf, -1, s.Wb)
        jtr_local = jnp.einsum("frca,frc->fa", jf, rf)
        # neighbour products: fiber i with fiber i + d, its band shifted by o = xlo[i+d] - xlo[i]
        jpad = jnp.pad(jf, ((0, s.dmax), (0, 0), (s.Wb, s.Wb), (0, 0)))
        xl = jnp.concatenate([self.xlo, jnp.full((s.dmax,), self.xlo[-1] + 10 * s.Wb, self.xlo.dtype)])
        blocks = []
        for d in range(s.dmax + 1):
            o = jnp.clip(xl[d:d + s.nf] - self.xlo, 0, s.Wb)
            other = jax.vmap(lambda jj, oo: jax.lax.dynamic_slice_in_dim(jj, s.Wb - oo, s.Wb, axis=1))(
                jpad[d:d + s.nf], o)
            blocks.append(jnp.einsum("frca,frcb->fab", jf, other))
        idx = jnp.asarray(self._index_map())
        idx_pad = jnp.concatenate([idx, jnp.zeros((s.dmax, na), idx.dtype)])
        n = self.layout.size
        jtj = jnp.zeros((n, n), jw.dtype)
        jtr = jnp.zeros((n,), jw.dtype).at[idx].add(jtr_local)
        for d, g in enumerate(blocks):
            ii = idx[:, :, None]
            jj = idx_pad[d:d + s.nf][:, None, :]
            if d == 0:
                jtj = jtj.at[ii, jj].add(g)
            else:
                valid = (jnp.arange(s.nf) + d < s.nf)[:, None, None]
                g = jnp.where(valid, g, 0.0)
                jtj = jtj.at[ii, jj].add(g)
                jtj = jtj.at[jj, ii].add(g)  # the transposed block: entry [f, p, q] -> (j q, i p)
        return chi2, jtj, jtr


def _cut(image, ivar, img_xyrange, box):
    """Cut ``box`` out of an image placed at ``img_xyrange`` on the CCD (ivar 0 outside it)."""
    image = np.asarray(image, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    x0, x1, y0, y1 = box
    ix0, ix1, iy0, iy1 = img_xyrange
    out = np.zeros((y1 - y0, x1 - x0))
    oiv = np.zeros_like(out)
    xa, xb = max(x0, ix0), min(x1, ix1)
    ya, yb = max(y0, iy0), min(y1, iy1)
    if xa < xb and ya < yb:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = image[ya - iy0:yb - iy0, xa - ix0:xb - ix0]
        oiv[ya - y0:yb - y0, xa - x0:xb - x0] = ivar[ya - iy0:yb - iy0, xa - ix0:xb - ix0]
    good = np.isfinite(out) & np.isfinite(oiv) & (oiv > 0)
    return np.where(good, out, 0.0), np.where(good, oiv, 0.0)


def _as_input(img, where: str):
    """(image, ivar, xyrange) from a CalibImage, a Preproc-like object or a tuple."""
    if isinstance(img, CalibImage):
        return img.image, img.ivar, img.xyrange
    if hasattr(img, "image") and hasattr(img, "ivar"):
        xy = getattr(img, "xyrange", None) or (0, img.image.shape[1], 0, img.image.shape[0])
        return img.image, img.ivar, xy
    if isinstance(img, (tuple, list)) and len(img) == 3:
        return img[0], img[1], tuple(int(v) for v in img[2])
    if isinstance(img, (tuple, list)) and len(img) == 2:
        image, ivar = img
        return image, ivar, (0, np.shape(image)[1], 0, np.shape(image)[0])
    raise TypeError(f"{where}: expected a CalibImage, a Preproc, (image, ivar) or (image, ivar, xyrange)")


def calib_patch(
    psf_init: GaussHermitePSF,
    arcs: Sequence = (),
    flats: Sequence = (),
    *,
    lines: LineList | None = None,
    fibers: Sequence[int] | None = None,
    specmin: int = 0,
    nspec: int | None = None,
    waverange: tuple[float, float] | None = None,
    xyrange: tuple[int, int, int, int] | None = None,
    what: Sequence[str] = ALL_WHAT,
    trace_deg: int = 0,
    gh_terms: Sequence[str] = DEFAULT_GH_TERMS,
    per_fiber_gh: bool = False,
    flat_deg: int = 2,
    flat_lamp: Callable | None = None,
    flat_dw: float = 0.5,
    band_margin: int = 3,
    bucket: int = 16,
) -> CalibPatch:
    """Set up one fitting patch (see :func:`fit_psf` for the arguments).

    Shapes are rounded up (box to ``bucket`` pixels, line and flat-sample counts
    to fixed steps) so that patches of a CCD share one compiled function.

    Returns:
        ``(patch, meta)``: the :class:`CalibPatch` and ``{"box": (xmin, xmax,
        ymin, ymax), "lines": LineList of the modelled lines}``.
    """
    if not isinstance(psf_init, GaussHermitePSF):
        raise TypeError(f"PSF fitting needs a GaussHermitePSF, got {type(psf_init).__name__}")
    bad = [w for w in what if w not in ALL_WHAT]
    if bad:
        raise ValueError(f"unknown 'what' entries {bad}; choose from {ALL_WHAT}")
    if not len(arcs) and not len(flats):
        raise ValueError("PSF fitting needs at least one arc or flat image")
    if len(arcs) and lines is None:
        raise ValueError("arc images need a line list (lines=...)")
    if fibers is None:
        nspec = psf_init.nspec - specmin if nspec is None else nspec
        fibers = np.arange(specmin, specmin + nspec)
    fibers = np.asarray(fibers, dtype=int)
    if fibers.ndim != 1 or len(fibers) == 0 or np.any(np.diff(fibers) != 1):
        raise ValueError(f"fibers must be consecutive fiber indices, got {fibers}")
    psf_init.check_fibers(int(fibers[0]), len(fibers))
    f0, nf = int(fibers[0]), len(fibers)
    gh_terms = tuple(gh_terms) if "gh" in what else ()
    for n in gh_terms:
        psf_init.param_index(n)
    ncoef_trace = min(psf_init.xcoef.shape[1], psf_init.ycoef.shape[1])
    if not 0 <= trace_deg < ncoef_trace:
        raise ValueError(f"trace_deg must be in 0..{ncoef_trace - 1}, got {trace_deg}")
    if flat_deg < 0:
        raise ValueError(f"flat_deg must be >= 0, got {flat_deg}")

    ny, nx = psf_init.stamp_shape
    if xyrange is None:
        wr = (psf_init.wmin, psf_init.wmax) if waverange is None else waverange
        box = list(psf_init.xyrange((f0, f0 + nf), wr))
    else:
        box = [int(v) for v in xyrange]
    # round the box up for shared compiled shapes; the added pixels get no weight
    # (they may hold light of fibers that are not modelled, e.g. the next bundle)
    real = tuple(box)
    H = _round_up(box[3] - box[2], bucket)
    W = _round_up(box[1] - box[0], bucket)
    box[3] = box[2] + H
    box[1] = box[0] + W
    box = tuple(int(v) for v in box)

    inputs = []
    for kind, group in (("arc", arcs), ("flat", flats)):
        for n, im in enumerate(group):
            image, ivar, ixy = _as_input(im, f"{kind} {n}")
            d, w = _cut(image, ivar, ixy, box)
            w[real[3] - box[2]:, :] = 0.0
            w[:, real[1] - box[0]:] = 0.0
            inputs.append((d, w))
    narc, nflat = len(arcs), len(flats)

    # the fibers' bands: every spot of fiber i over the box rows, with a margin
    rows = np.arange(box[2] - ny, box[3] + ny, dtype=float)
    wrows = np.asarray(psf_init.wavelength(fibers[:, None], rows[None, :]))
    wrows = np.clip(wrows, psf_init.wmin, psf_init.wmax)
    xtr = np.asarray(psf_init.x(fibers[:, None], wrows))
    xlo_ccd = np.floor(xtr.min(axis=1) - psf_init.hsizex - band_margin).astype(int)
    xhi_ccd = np.ceil(xtr.max(axis=1) + psf_init.hsizex + band_margin).astype(int) + 1
    Wb = _round_up(int((xhi_ccd - xlo_ccd).max()), 4)
    pad = Wb
    xlo = xlo_ccd - box[0] + pad
    dmax = 0
    for d in range(1, nf):
        if np.any(xlo[d:] - xlo[:-d] < Wb):
            dmax = d
        else:
            break

    lw = lv = None
    nline = 0
    if narc:
        margin = psf_init.hsizey + 3
        ylin = np.asarray(psf_init.y(fibers[:, None], lines.wave[None, :]))
        ok = (lines.wave >= psf_init.wmin) & (lines.wave <= psf_init.wmax)
        ok &= np.any((ylin > box[2] - margin) & (ylin < box[3] + margin), axis=0)
        plines = lines.select(ok)
        if len(plines) == 0:
            raise ValueError(f"no arc line falls in the pixel box {box} (fibers {f0}-{f0 + nf - 1})")
        nline = _round_up(len(plines), 4)
        lw = np.full(nline, float(plines.wave[0]))
        lw[: len(plines)] = plines.wave
        lv = np.arange(nline) < len(plines)
    else:
        plines = None
    fw = fb = None
    nsamp = nbasis = 0
    if nflat:
        lamp = flat_spectrum if flat_lamp is None else flat_lamp
        fwave = flat_wave_grid(psf_init, f0, nf, box, flat_dw)
        tt = (fwave - fwave[0]) * (2.0 / max(fwave[-1] - fwave[0], 1e-9)) - 1.0
        basis = np.polynomial.legendre.legvander(tt, flat_deg) * (np.asarray(lamp(fwave)) * flat_dw)[:, None]
        nsamp = _round_up(len(fwave), 64)
        nbasis = flat_deg + 1
        fw = np.full(nsamp, fwave[0])
        fw[: len(fwave)] = fwave
        fb = np.zeros((nsamp, nbasis))
        fb[: len(fwave)] = basis

    data = np.zeros((len(inputs), H, W + 2 * pad))
    sqw = np.zeros_like(data)
    for m, (d, w) in enumerate(inputs):
        data[m, :, pad:pad + W] = d
        sqw[m, :, pad:pad + W] = np.sqrt(w)

    pshapes = _psf_shapes(nf, what, trace_deg, len(gh_terms), per_fiber_gh)
    static = _Static(
        nf=nf, H=H, W=W, Wb=Wb, pad=pad, narc=narc, nflat=nflat, nline=nline, nsamp=nsamp,
        nbasis=nbasis, dmax=dmax, psf_shapes=tuple((k, tuple(v)) for k, v in pshapes.items()),
        gh_terms=gh_terms, colors=_colors(pshapes),
    )
    dt = jnp.result_type(float)
    patch = CalibPatch(
        psf=psf_init,
        fibers=jnp.asarray(fibers, jnp.int32),
        data=jnp.asarray(data, dt),
        sqw=jnp.asarray(sqw, dt),
        xlo=jnp.asarray(xlo, jnp.int32),
        y0=jnp.asarray(box[2], jnp.int32),
        x0=jnp.asarray(box[0], jnp.int32),
        lwave=jnp.asarray(lw if narc else np.zeros(1), dt),
        lvalid=jnp.asarray(lv if narc else np.zeros(1, bool)),
        fwave=jnp.asarray(fw if nflat else np.zeros(1), dt),
        fbasis=jnp.asarray(fb if nflat else np.zeros((1, 1)), dt),
        static=static,
    )
    return patch, dict(box=box, lines=plines)


# ---------------------------------------------------------------- compiled pieces
@eqx.filter_jit
def _normal_equations(patch: CalibPatch, theta):
    return patch.normal_equations(patch.unflatten(theta))


@eqx.filter_jit
def _chi2(patch: CalibPatch, theta):
    return patch.chi2(patch.unflatten(theta))


@eqx.filter_jit
def _model(patch: CalibPatch, theta):
    return patch.model(patch.unflatten(theta))


# ---------------------------------------------------------------- result
@dataclasses.dataclass
class FitResult:
    """Outcome of :func:`fit_psf` on one patch (fibers x pixel box).

    Attributes:
        psf: the fitted PSF (all fibers; the fitted ones corrected, inverse trace refitted).
        params: fitted parameters by name: ``dx``, ``dy`` (nfib, trace_deg+1) [pixels],
            ``log_sigx``, ``log_sigy`` (nfib,), ``gh`` (nterm,) or (nterm, nfib),
            ``line_flux`` (narc, nfib, nline) [photons], ``flat_amp`` (nflat, nfib, flat_deg+1).
        errors: 1-sigma uncertainties, same layout (sqrt of the covariance diagonal).
        cov: (n, n) covariance of the flat parameter vector ``theta`` (Gauss-Newton).
        theta: (n,) the flat parameter vector; ``slices`` names its parts.
        chi2, ndof: final pixel chi2 and degrees of freedom.
        chi2_history, step_history, lambda_history: per accepted iteration
            (step = max |delta theta_i| / sigma_i).
        niter, converged: iterations done and whether the stopping rule was met.
        fibers, xyrange: fitted fibers (absolute) and the pixel box of the fit.
        lines: the arc lines modelled (padding dropped); line_flux columns past
            ``len(lines)`` are padding (0, error inf).
        data, ivar, model, kinds: per image: the cut-out data, ivar, final model
            and ``"arc"``/``"flat"`` (for residual plots).
        psf_init: the initial PSF; gh_terms: which GH terms were corrected.
        seconds: wall time.
    """

    psf: GaussHermitePSF
    params: dict
    errors: dict
    cov: np.ndarray
    theta: np.ndarray
    slices: dict
    chi2: float
    ndof: int
    chi2_history: list
    step_history: list
    lambda_history: list
    niter: int
    converged: bool
    fibers: np.ndarray
    xyrange: tuple[int, int, int, int]
    lines: LineList | None
    data: list
    ivar: list
    model: list
    kinds: list
    psf_init: GaussHermitePSF
    gh_terms: tuple[str, ...]
    seconds: float = 0.0

    @property
    def psf_mask(self) -> np.ndarray:
        """Boolean mask of the PSF parameters in ``theta``."""
        m = np.zeros(len(self.theta), bool)
        for n in PSF_KEYS:
            if n in self.slices:
                m[self.slices[n]] = True
        return m

    @property
    def psf_params(self) -> dict:
        """The fitted PSF corrections only (``dx``, ``dy``, ``log_sigx``, ``log_sigy``, ``gh``)."""
        return {k: v for k, v in self.params.items() if k in PSF_KEYS}

    @property
    def psf_cov(self) -> np.ndarray:
        """Covariance of the PSF parameters, marginalised over fluxes (block of ``cov``)."""
        m = self.psf_mask
        return self.cov[np.ix_(m, m)]

    @property
    def reduced_chi2(self) -> float:
        """chi2 / ndof."""
        return float(self.chi2 / max(self.ndof, 1))

    def pulls(self, truth: dict) -> dict:
        """``(fitted - truth) / error`` for the parameters named in ``truth``."""
        return {k: (np.asarray(self.params[k]) - np.asarray(v)) / np.asarray(self.errors[k]) for k, v in truth.items()}


# ---------------------------------------------------------------- the fit
def _lm(patch: CalibPatch, theta: np.ndarray, *, maxiter, step_tol, chi2_rtol, lam0, report):
    """Levenberg-Marquardt on the host with compiled Gauss-Newton pieces.

    Parameters whose ``J^T J`` diagonal is 0 (padding lines, a line whose spots
    have left the box) are held fixed in that iteration and get an infinite error.
    """
    lay = patch.layout
    linear = lay.mask(LIN_KEYS)

    def ne(th):
        c, a, g = _normal_equations(patch, jnp.asarray(th))
        a = np.asarray(a)
        return float(c), a, np.asarray(g), np.diag(a) > 0

    # the model is linear in the fluxes: solve for them first at the initial PSF
    chi2, JtJ, Jtr, active = ne(theta)
    theta = theta + _solve_scaled(JtJ, Jtr, active & linear)
    chi2, JtJ, Jtr, active = ne(theta)
    if not np.all(active[~linear]):
        dead = [k for k, sl in lay.slices.items() for i in range(sl.start, sl.stop) if not active[i] and k in PSF_KEYS]
        raise ValueError(f"PSF parameters {sorted(set(dead))} have no pixels constraining them")
    hist_c, hist_s, hist_l = [chi2], [np.inf], [0.0]
    report(0, chi2, np.inf, 0.0)
    lam = lam0
    converged = False
    it = 0
    while it < maxiter:
        it += 1
        dg = np.where(active, np.diag(JtJ), 1.0)
        accepted = False
        for _ in range(20):
            try:
                delta = _solve_scaled(JtJ + lam * np.diag(dg), Jtr, active)
            except np.linalg.LinAlgError:
                lam *= 10.0
                continue
            chi2_new = float(_chi2(patch, jnp.asarray(theta + delta)))
            if np.isfinite(chi2_new) and chi2_new <= chi2:
                accepted = True
                break
            lam *= 4.0
        if not accepted:
            log.info("fit-psf: no step lowers chi2 further (lambda %.1e); stopping", lam)
            converged = True
            break
        sig = np.sqrt(np.diag(_inv_active(JtJ, active)))
        step = float(np.max(np.abs(delta)[active] / sig[active]))
        dchi2 = chi2 - chi2_new
        theta = theta + delta
        chi2, JtJ, Jtr, active = ne(theta)
        hist_c.append(chi2)
        hist_s.append(step)
        hist_l.append(lam)
        report(it, chi2, step, lam)
        lam = max(lam / 5.0, 1e-12)
        if step < step_tol or dchi2 < chi2_rtol * chi2:
            converged = True
            break
    cov = _inv_active(JtJ, active)
    return theta, chi2, cov, active, it, converged, hist_c, hist_s, hist_l


def _solve_scaled(A, b, active):
    """Solve ``A x = b`` on the active parameters (Jacobi-scaled); 0 elsewhere."""
    out = np.zeros(len(b))
    a = A[np.ix_(active, active)]
    sc = 1.0 / np.sqrt(np.diag(a))
    out[active] = sc * np.linalg.solve(a * sc[:, None] * sc[None, :], b[active] * sc)
    return out


def _inv_active(JtJ, active):
    """Inverse of ``JtJ`` on the active parameters (inf on the diagonal elsewhere)."""
    n = len(JtJ)
    cov = np.zeros((n, n))
    a = JtJ[np.ix_(active, active)]
    sc = 1.0 / np.sqrt(np.diag(a))  # unit diagonal: a well-conditioned inverse
    inv = np.linalg.inv(a * sc[:, None] * sc[None, :]) * sc[:, None] * sc[None, :]
    cov[np.ix_(active, active)] = 0.5 * (inv + inv.T)
    cov[~active, ~active] = np.inf
    return cov


def fit_psf(
    psf_init: GaussHermitePSF,
    arcs: Sequence = (),
    flats: Sequence = (),
    *,
    lines: LineList | None = None,
    fibers: Sequence[int] | None = None,
    specmin: int = 0,
    nspec: int | None = None,
    waverange: tuple[float, float] | None = None,
    xyrange: tuple[int, int, int, int] | None = None,
    what: Sequence[str] = ALL_WHAT,
    trace_deg: int = 0,
    gh_terms: Sequence[str] = DEFAULT_GH_TERMS,
    per_fiber_gh: bool = False,
    flat_deg: int = 2,
    flat_lamp: Callable | None = None,
    flat_dw: float = 0.5,
    maxiter: int = 30,
    step_tol: float = 0.01,
    chi2_rtol: float = 1e-10,
    lam0: float = 1e-3,
    callback: Callable[[int, float, float, float], None] | None = None,
) -> FitResult:
    """Fit PSF corrections and line / flat fluxes to calibration images of one patch.

    Args:
        psf_init: starting PSF (a :class:`GaussHermitePSF`, e.g. from :func:`read_psf`).
        arcs: arc images: :class:`CalibImage`, ``(image, ivar)`` (full CCD) or
            ``(image, ivar, xyrange)`` (a sub-image at ``xyrange``). Every arc gets
            its own line fluxes.
        flats: flat images, in the same forms; every flat gets its own amplitudes.
        lines: arc line list (required with arcs); lines whose spots reach the
            box are modelled.
        fibers: fibers to fit (consecutive absolute indices; their PSF
            corrections and fluxes are free; other fibers are not modelled, so keep
            the box clear of their light: fit whole bundles).
        specmin: first fiber to fit, when ``fibers`` is not given.
        nspec: number of fibers to fit, when ``fibers`` is not given.
        waverange: wavelength range [A] whose pixels are fitted (default: the PSF's).
        xyrange: explicit pixel box (overrides ``waverange``).
        what: subset of ``("xtrace", "ytrace", "sigma", "gh")``.
        trace_deg: Legendre degree of the trace offsets (0: constant shifts).
        gh_terms: Gauss-Hermite terms to correct.
        per_fiber_gh: correct them per fiber instead of one offset shared by the
            fitted fibers.
        flat_deg: Legendre degree (over the box's wavelengths) of each fiber's
            flat amplitude.
        flat_lamp: ``f(wave) -> shape`` of the lamp (default :func:`flat_spectrum`).
        flat_dw: flat sampling step [A].
        maxiter: most Levenberg-Marquardt iterations.
        step_tol: converged when an accepted step moves no parameter by more
            than ``step_tol`` of its uncertainty.
        chi2_rtol: converged when an accepted step lowers chi2 by less than
            ``chi2_rtol`` of it.
        lam0: initial Marquardt damping (relative to the diagonal of J^T J).
        callback: ``callback(iteration, chi2, step, lambda)`` after each
            iteration (default: log at INFO).

    Returns:
        A :class:`FitResult`.
    """
    t0 = time.perf_counter()
    patch, meta = calib_patch(
        psf_init, arcs, flats, lines=lines, fibers=fibers, specmin=specmin, nspec=nspec,
        waverange=waverange, xyrange=xyrange, what=what, trace_deg=trace_deg, gh_terms=gh_terms,
        per_fiber_gh=per_fiber_gh, flat_deg=flat_deg, flat_lamp=flat_lamp, flat_dw=flat_dw,
    )
    return _fit_patch(patch, meta, maxiter=maxiter, step_tol=step_tol, chi2_rtol=chi2_rtol, lam0=lam0,
                      callback=callback, t0=t0)


def _fit_patch(patch: CalibPatch, meta: dict, *, maxiter=30, step_tol=0.01, chi2_rtol=1e-10, lam0=1e-3, callback=None, t0=None):
    t0 = time.perf_counter() if t0 is None else t0
    s = patch.static
    lay = patch.layout
    fibers = np.asarray(patch.fibers)
    f0, nf = int(fibers[0]), len(fibers)
    npix = int(np.count_nonzero(np.asarray(patch.sqw)))
    report = callback or (lambda it, c, st, lam: log.info(
        "fit-psf fibers %d-%d: iter %2d chi2 %.6g (chi2/dof %.4f) step %.3g sigma lambda %.1e",
        f0, f0 + nf - 1, it, c, c / max(npix - lay.size, 1), st, lam))
    theta0 = np.zeros(lay.size)
    theta, chi2, cov, active, it, converged, hc, hs, hl = _lm(
        patch, theta0, maxiter=maxiter, step_tol=step_tol, chi2_rtol=chi2_rtol, lam0=lam0, report=report)
    err = np.sqrt(np.diag(cov))
    params = {k: np.asarray(v) for k, v in lay.unflatten(theta).items()}
    errors = {k: np.asarray(v) for k, v in lay.unflatten(err).items()}
    psf_fit = patch.corrected_psf({k: jnp.asarray(v) for k, v in params.items()}).with_traces()
    model = np.asarray(_model(patch, jnp.asarray(theta)))
    data = np.asarray(patch.data)[:, :, s.pad:s.pad + s.W]
    ivar = np.asarray(patch.sqw)[:, :, s.pad:s.pad + s.W] ** 2
    kinds = ["arc"] * s.narc + ["flat"] * s.nflat
    return FitResult(
        psf=psf_fit, params=params, errors=errors, cov=cov, theta=theta, slices=dict(lay.slices),
        chi2=chi2, ndof=int(npix - int(active.sum())), chi2_history=hc, step_history=hs,
        lambda_history=hl, niter=it, converged=converged, fibers=fibers, xyrange=meta["box"],
        lines=meta["lines"], data=list(data), ivar=list(ivar), model=list(model), kinds=kinds,
        psf_init=patch.psf, gh_terms=s.gh_terms, seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------- full CCD
def _legfit_weighted(t, y, sig, deg):
    """Weighted Legendre fit of degree ``min(deg, len(t) - 1)``: coefficients."""
    deg = min(deg, len(t) - 1)
    V = np.polynomial.legendre.legvander(t, deg) / sig[:, None]
    return np.linalg.lstsq(V, y / sig, rcond=None)[0]


def fit_psf_ccd(
    psf_init: GaussHermitePSF,
    arcs: Sequence = (),
    flats: Sequence = (),
    *,
    lines: LineList | None = None,
    specmin: int = 0,
    nspec: int | None = None,
    bundlesize: int = 25,
    nblocks: int = 8,
    waverange: tuple[float, float] | None = None,
    progress: Callable[[int, int, FitResult], None] | None = None,
    **fit_kwargs,
) -> tuple[GaussHermitePSF, list[FitResult]]:
    """Fit a whole CCD (or fibers ``specmin .. specmin+nspec-1`` of it) patch by patch.

    Each bundle of ``bundlesize`` fibers x each of ``nblocks`` equal wavelength
    blocks of ``waverange`` (default the PSF's common range) is fitted with
    :func:`fit_psf` (constant corrections inside the patch; ``what`` etc.
    passed through ``fit_kwargs``).  The per-block corrections of each fiber
    then become Legendre coefficients over the file's wavelength domains, by
    weighted least squares: trace offsets up to the trace's degree (at most
    ``nblocks - 1``), GHSIGX/GHSIGY refitted with their file degree to
    ``sigma_file(w_b) exp(s_b)``, GH offsets up to the parameters' degree.
    The fibers outside the range keep their initial parameters.

    Returns:
        ``(psf, fits)``: the fitted PSF (inverse trace refitted) and the
        :class:`FitResult` of every patch (bundle-major).
    """
    nspec = psf_init.nspec - specmin if nspec is None else int(nspec)
    psf_init.check_fibers(specmin, nspec)
    if nblocks < 1:
        raise ValueError(f"nblocks must be >= 1, got {nblocks}")
    if waverange is None:
        waverange = (psf_init.wmin_all, psf_init.wmax_all)
    edges = np.linspace(waverange[0], waverange[1], nblocks + 1)
    bundles = [np.arange(s, min(s + bundlesize, specmin + nspec)) for s in range(specmin, specmin + nspec, bundlesize)]
    xcoef = np.array(psf_init.xcoef)
    ycoef = np.array(psf_init.ycoef)
    pars = np.array(psf_init.params)
    fits_out: list[FitResult] = []
    total = len(bundles) * nblocks
    wc = 0.5 * (edges[:-1] + edges[1:])
    for fib in bundles:
        res = []
        for b in range(nblocks):
            fr = fit_psf(psf_init, arcs, flats, lines=lines, fibers=fib, waverange=(edges[b], edges[b + 1]),
                         **fit_kwargs)
            res.append(fr)
            fits_out.append(fr)
            if progress is not None:
                progress(len(fits_out), total, fr)
        gh_terms = res[0].gh_terms
        for j, f in enumerate(fib):
            for key, coef, dom in (("dx", xcoef, psf_init.xdomain), ("dy", ycoef, psf_init.ydomain)):
                if key not in res[0].params:
                    continue
                t = (wc - dom[0]) * (2.0 / (dom[1] - dom[0])) - 1.0
                # the block's offset of coefficient 0 is the mean shift over the block
                val = np.array([r.params[key][j, 0] for r in res])
                sig = np.array([r.errors[key][j, 0] for r in res])
                c = _legfit_weighted(t, val, sig, coef.shape[1] - 1)
                coef[f, :len(c)] += c
            t = (wc - psf_init.pdomain[0]) * (2.0 / (psf_init.pdomain[1] - psf_init.pdomain[0])) - 1.0
            for key, name in (("log_sigx", "GHSIGX"), ("log_sigy", "GHSIGY")):
                if key not in res[0].params:
                    continue
                row = psf_init.param_index(name)
                s = np.array([r.params[key][j] for r in res])
                es = np.array([r.errors[key][j] for r in res])
                if nblocks > pars.shape[2] - 1:
                    # enough blocks: refit the width itself with the file's degree
                    target = np.polynomial.legendre.legval(t, pars[row, f]) * np.exp(s)
                    c = _legfit_weighted(t, target, np.maximum(target * es, 1e-12), pars.shape[2] - 1)
                    pars[row, f, :] = 0.0
                    pars[row, f, :len(c)] = c
                else:  # too few blocks for the file's degree: scale it by the mean factor
                    wgt = 1.0 / es**2
                    pars[row, f, :] *= np.exp(np.sum(wgt * s) / np.sum(wgt))
            if "gh" in res[0].params:
                for k, name in enumerate(gh_terms):
                    row = psf_init.param_index(name)
                    g = np.array([r.params["gh"][k] if r.params["gh"].ndim == 1 else r.params["gh"][k, j] for r in res])
                    eg = np.array([r.errors["gh"][k] if r.errors["gh"].ndim == 1 else r.errors["gh"][k, j] for r in res])
                    c = _legfit_weighted(t, g, eg, pars.shape[2] - 1)
                    pars[row, f, :len(c)] += c
    psf = eqx.tree_at(lambda p: p.params, psf_init, jnp.asarray(pars)).with_traces(jnp.asarray(xcoef), jnp.asarray(ycoef))
    return psf, fits_out


# ---------------------------------------------------------------- uncertainty propagation
def flux_jacobian(
    fit: FitResult,
    image,
    ivar,
    wave,
    *,
    xyrange: tuple[int, int, int, int] | None = None,
    nsubbundles: int = 1,
    wavesize: int = 50,
    batch: int = 8,
    **extract_kwargs,
):
    """Extract the fitted fibers with the fitted PSF, and d flux / d PSF parameters.

    The extraction geometry is fixed (from ``fit.psf``; all fitted fibers form
    one bundle); the decorrelated flux is differentiated through the patch
    solves by forward mode, ``batch`` parameters at a time (``jax.linearize``).

    Returns:
        ``(extraction, jac)``: the :class:`Extraction` and ``jac`` of shape
        ``(nspec, nwave, npsf)`` [photons / A per unit parameter], columns in the
        order of ``fit.theta[fit.psf_mask]`` (i.e. of ``fit.psf_cov``).
    """
    from .._extraction.extract import _as_array, extract_patches
    from .._extraction.geometry import patch_geometry

    fibers = fit.fibers
    nf = len(fibers)
    geom = patch_geometry(fit.psf, np.asarray(wave), int(fibers[0]), nf, nf, nsubbundles, wavesize,
                          **{k: extract_kwargs.pop(k) for k in ("wavepad_frac", "pixpad_frac") if k in extract_kwargs})
    image = _as_array(image)
    ivar = _as_array(ivar)
    keys = [k for k in PSF_KEYS if k in fit.slices]
    shapes = {k: np.shape(fit.params[k]) for k in keys}
    lay = _Layout(shapes)
    p0 = jnp.asarray(lay.flatten(fit.params))
    psf_fit = fit.psf

    def flux(p):
        d = lay.unflatten(p)
        psf = apply_psf_params(fit.psf_init, d, fibers, gh_terms=fit.gh_terms)
        # extraction never uses the inverse trace: keep the fitted one
        psf = eqx.tree_at(lambda q: (q.wcoef, q.ylim), psf, (psf_fit.wcoef, psf_fit.ylim))
        return extract_patches(image, ivar, psf, geom, xyrange=xyrange, **extract_kwargs).flux

    ex = extract_patches(image, ivar, psf_fit, geom, xyrange=xyrange, **extract_kwargs)
    _, jvp = jax.linearize(flux, p0)
    eye = jnp.eye(lay.size, dtype=p0.dtype)
    cols = [jax.vmap(jvp)(eye[i:i + batch]) for i in range(0, lay.size, batch)]
    jac = jnp.moveaxis(jnp.concatenate(cols, axis=0), 0, -1)
    return ex, np.asarray(jac)


def propagate_psf_uncertainty(jac, cov) -> np.ndarray:
    """Flux variance from PSF uncertainty: ``diag(J C J^T)`` per (fiber, wavelength).

    Args:
        jac: ``(..., npsf)`` Jacobian of the flux w.r.t. the PSF parameters
            (:func:`flux_jacobian`).
        cov: ``(npsf, npsf)`` covariance of those parameters (``FitResult.psf_cov``).

    Returns:
        The variance, shape ``jac.shape[:-1]`` [(photons / A)^2]; add ``1 / ivar``
        for the total.
    """
    jac = np.asarray(jac)
    cov = np.asarray(cov)
    if cov.shape != (jac.shape[-1], jac.shape[-1]):
        raise ValueError(f"cov {cov.shape} does not match the Jacobian's {jac.shape[-1]} parameters")
    return np.einsum("...i,ij,...j->...", jac, cov, jac)
