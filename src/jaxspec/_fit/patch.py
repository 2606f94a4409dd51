"""One fitting patch: fibers x pixel box of calibration images, its forward model
and its Gauss-Newton pieces (the coloured band Jacobian, ``J^T J``, ``J^T r``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._simulation.calib import CalibImage, LineList, flat_spectrum
from ..psf._gausshermite import GaussHermitePSF, pixel_gauss_hermite
from ..psf._legendre import legvander, traceset_eval_many
from .params import (
    ALL_WHAT,
    DEFAULT_GH_TERMS,
    DEFAULT_WHAT,
    FiberIndices,
    PSF_KEYS,
    _Layout,
    _psf_shapes,
    apply_psf_params,
    fiber_legendre,
    shape_terms_of,
)

__all__ = ["BundleInputError", "CalibPatch", "calib_patch", "check_broken_fibers", "check_fiber_light", "check_patch",
           "patch_lines"]

log = logging.getLogger("jaxspec.fit")


class BundleInputError(ValueError):
    """A problem of one bundle's data, found before fitting: no arc line or no lamp light in its
    box, no valid pixel, a fiber without light that is not declared broken.

    :func:`jaxspec.fit_psf_ccd` and :func:`jaxspec.fit_psf_full` flag such a bundle (its input
    coefficients kept) and fit the others; a single patch or bundle fit raises it.
    """


#: Broken fibers as a caller gives them: a sequence or 1-D array of fiber numbers (checked by
#: :func:`check_broken_fibers`, which names what is wrong rather than failing a type check).
BrokenFibers = Sequence | np.ndarray | jax.Array | None


def check_broken_fibers(broken: BrokenFibers, specmin: int, nspec: int) -> np.ndarray:
    """The broken fibers, checked against the fitted fibers ``specmin .. specmin + nspec - 1``.

    A broken fiber has no light: it is not fitted, its trace and shape coefficients stay the
    input PSF's, its spots are not modelled.  Fiber numbers are the PSF's fiber indices, as
    ``specmin`` (specex's ``--broken-fibers``: the fiber number within the camera).

    Returns:
        The sorted fiber numbers, an integer array (empty for None or an empty list).

    Raises:
        ValueError: a non-integer, a fiber given twice, one outside the fitted fibers, or every
            fitted fiber broken (the messages name ``--broken-fibers``).
    """
    what = "broken fibers (--broken-fibers)"
    if broken is None:
        return np.zeros(0, dtype=int)
    if isinstance(broken, (str, bytes)) or np.ndim(broken) > 1:
        raise ValueError(f"{what}: expected a list of fiber numbers, got {broken!r}")
    items = list(np.asarray(broken).ravel()) if isinstance(broken, (np.ndarray, jax.Array)) else list(broken)
    out = []
    for v in items:
        if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0:
            v = np.asarray(v)[()]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{what}: {v!r} is not a fiber number (an integer)")
        out.append(int(v))
    arr = np.array(out, dtype=int)
    uniq, counts = np.unique(arr, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"{what}: fiber(s) {', '.join(str(f) for f in uniq[counts > 1])} given more than once")
    last = specmin + nspec - 1
    outside = uniq[(uniq < specmin) | (uniq > last)]
    if len(outside):
        raise ValueError(f"{what}: fiber(s) {', '.join(str(f) for f in outside)} outside the fitted fibers "
                         f"{specmin}..{last} (-s/--specmin, -n/--nspec; fiber numbers are the PSF's, 0-based)")
    if len(uniq) == nspec:
        raise ValueError(f"{what}: every fitted fiber ({specmin}..{last}) is broken: nothing to fit")
    return uniq


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
    colors: tuple  # ((key, a, b), ...): see _colors
    shape_terms: tuple = ()  # parameter names of the rows of "pc" (full model)
    nsig: int = 0  # how many of shape_terms are widths (GHSIGX/GHSIGY): they differentiate the pixel integrals
    nq: int = 0  # stamps that may reach one band row (the gather slots of CalibPatch._placement)
    pair_cols: tuple = ()  # per fiber distance d: the band columns fiber f can share with f + d (_pair_cols)
    ncont: int = 0  # arc continuum: Legendre terms per arc and fiber (0: not modelled), sampled at fwave


def _round_up(n: int, m: int) -> int:
    return int(m * -(-int(n) // m))


def _colors(psf_shapes: dict) -> tuple:
    """Band-Jacobian columns ``(key, a, b)``, each fiber's light in its own band.

    ``("dx"|"dy", k, 0)``: Legendre coefficient ``k`` of the trace offset;
    ``("log_sigx"|"log_sigy", 0, 0)``; ``("gh", k, 0)``: GH term ``k``; ``("pc", r, k)``:
    wavelength coefficient ``k`` of shape term ``r``, per fiber (mapped onto the
    bundle's fiber Legendre series by :meth:`CalibPatch._index_map`).  Only the
    ``k = 0`` columns of traces and ``pc`` need a forward-mode derivative: the others
    are it times ``P_k(t)`` of each spot's wavelength.
    """
    out = []
    for key, shp in psf_shapes.items():
        if key in ("dx", "dy"):
            out += [(key, k, 0) for k in range(shp[1])]
        elif key in ("log_sigx", "log_sigy"):
            out.append((key, 0, 0))
        elif key == "pc":
            out += [(key, r, k) for r in range(shp[0]) for k in range(shp[2])]
        else:  # gh: (ngh,) shared or (ngh, nf) per fiber; one colour per term either way
            out += [(key, k, 0) for k in range(shp[0])]
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
    live: jnp.ndarray  # (nf,) bool: False for a broken fiber (no light: its spots are not modelled)
    static: _Static = eqx.field(static=True)
    cbasis: jnp.ndarray | None = None  # (nsamp, ncont): dw * Legendre basis of the arc continuum; 0 for padding

    # ----------------------------------------------------------- parameter vectors
    @property
    def layout(self) -> _Layout:
        s = self.static
        shapes = dict(s.psf_shapes)
        if s.narc:
            shapes["line_flux"] = (s.narc, s.nf, s.nline)
        if s.nflat:
            shapes["flat_amp"] = (s.nflat, s.nf, s.nbasis)
        if s.ncont:
            shapes["cont_amp"] = (s.narc, s.nf, s.ncont)
        return _Layout(shapes)

    @property
    def sizes(self) -> dict:
        """The paddable sizes (``pad_to`` of :func:`calib_patch`)."""
        s = self.static
        return dict(H=s.H, W=s.W, Wb=s.Wb, nline=s.nline, nsamp=s.nsamp, dmax=s.dmax, nq=s.nq)

    def unflatten(self, theta):
        """dict of named parameters from the flat vector ``theta``."""
        return self.layout.unflatten(theta)

    def corrected_psf(self, params: dict) -> GaussHermitePSF:
        """The initial PSF with the PSF corrections in ``params`` applied (broken fibers untouched)."""
        psfp = {k: params[k] for k in PSF_KEYS if k in params}
        return apply_psf_params(self.psf, psfp, self.fibers, gh_terms=self.static.gh_terms,
                                shape_terms=self.static.shape_terms, live=self.live)

    def dead_mask(self) -> np.ndarray:
        """``(n,)`` bool over theta: the entries of broken fibers (their trace and width
        corrections and fluxes; held at 0, not fitted: their Jacobian columns are zero)."""
        lay = self.layout
        dead = ~np.asarray(self.live, bool)
        m = np.zeros(lay.size, bool)
        for k, shp in lay.shapes.items():
            if k in ("dx", "dy"):
                fm = np.broadcast_to(dead[:, None], shp)
            elif k in ("log_sigx", "log_sigy"):
                fm = dead
            elif k == "gh" and len(shp) == 2:
                fm = np.broadcast_to(dead[None, :], shp)
            elif k in ("line_flux", "flat_amp", "cont_amp"):
                fm = np.broadcast_to(dead[None, :, None], shp)
            else:  # shared: gh (one per bundle), pc (the bundle's series)
                continue
            m[lay.slices[k]] = np.ravel(fm)
        return m

    # ----------------------------------------------------------- forward model
    def stamps(self, psf: GaussHermitePSF):
        """Spots of every fiber at the lines and flat samples.

        Returns ``{"line": (xmin, ymin, st), "flat": (xmin, ymin, st)}`` with
        ``st`` of shape ``(nf, nline or nsamp, ny, nx)`` (padding lines and broken fibers zeroed);
        the ``"flat"`` samples serve the flats and the arcs' continuum.
        """
        s = self.static
        out = {}
        live = self.live[:, None, None, None]  # a broken fiber has no light
        if s.narc:
            xmin, ymin, st = psf.spots(self.fibers[:, None], self.lwave[None, :])
            out["line"] = (xmin, ymin, jnp.where(self.lvalid[None, :, None, None] & live, st, 0.0))
        if s.nflat or s.ncont:
            xmin, ymin, st = psf.spots(self.fibers[:, None], self.fwave[None, :])
            out["flat"] = (xmin, ymin, jnp.where(live, st, 0.0))
        return out

    def _band_index(self, xmin, ymin, ny, nx):
        s = self.static
        i32 = jnp.int32
        x0 = (s.pad - self.x0.astype(i32)) - self.xlo.astype(i32)[:, None, None]  # (nf, 1, 1)
        cols = xmin.astype(i32)[..., None] + x0 + jnp.arange(nx, dtype=i32)[None, None, :]
        rows = ymin.astype(i32)[..., None] - self.y0.astype(i32) + jnp.arange(ny, dtype=i32)[None, None, :]
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

    def _valid(self, kind: str):
        """``(K,)`` bool: the stamps of ``kind`` that carry light (not padding)."""
        if kind == "line":
            return self.lvalid
        return jnp.any((self.fbasis if self.static.nflat else self.cbasis) != 0, axis=1)

    def _placement(self, xmin, ymin, valid, ny: int, nx: int):
        """Where each band pixel's light comes from, for :meth:`_place`.

        For fiber ``f``, band row ``h`` and slot ``q < nq``: the stamp ``k`` (of the
        ``(nf, K)`` stamps at ``xmin``, ``ymin``; ``valid`` ``(K,)``), its row ``j`` on
        that band row, the band column of its first column, and whether the slot is
        used; plus a flag set when more than ``nq`` stamps reach one row.
        """
        s = self.static
        i32 = jnp.int32
        K = xmin.shape[-1]
        r = ymin.astype(i32) - self.y0.astype(i32)  # (nf, K): band row of each stamp's first row
        o = xmin.astype(i32) + (s.pad - self.x0.astype(i32)) - self.xlo.astype(i32)[:, None]  # first column
        jj = jnp.arange(s.H, dtype=i32)[None, :, None] - r[:, None, :]  # (nf, H, K)
        hit = (jj >= 0) & (jj < ny) & valid[None, None, :]
        score = jnp.where(hit, K - jnp.arange(K, dtype=i32), 0)
        top, k = jax.lax.top_k(score, min(s.nq, K))  # (nf, H, Q)
        used = top > 0
        j = jnp.clip(jnp.take_along_axis(jj, k, axis=2), 0, ny - 1)
        col0 = jnp.take_along_axis(jnp.broadcast_to(o[:, None, :], jj.shape), k, axis=2)
        over = jnp.max(jnp.sum(hit, axis=2)) > min(s.nq, K)
        return k, j, col0, used, over, nx

    def _place(self, pl, st, weights):
        """``sum_k weights[e, f, k] st[f, k]`` into each fiber's band, ``(E, nf, H, Wb)``, by
        gathers (:meth:`_placement`): band pixel ``(h, c)`` sums its ``nq`` slots.  NaN
        when a row is reached by more stamps than slots (so the step is refused)."""
        k, j, col0, used, over, nx = pl
        s = self.static
        c = jnp.arange(s.Wb, dtype=col0.dtype)[None, None, None, :] - col0[..., None]  # (nf, H, Q, Wb)
        inside = (c >= 0) & (c < nx) & used[..., None]
        fi = jnp.arange(s.nf)[:, None, None]
        g = st[fi[..., None], k[..., None], j[..., None], jnp.clip(c, 0, nx - 1)]  # (nf, H, Q, Wb)
        g = jnp.where(inside, g, 0.0)
        wq = weights[:, fi, k]  # (E, nf, H, Q)
        out = jnp.einsum("efhq,fhqc->efhc", wq, g)
        return jnp.where(over, jnp.nan, out)

    def _scatter_sum(self, kind, xmin, ymin, st, weights):
        """``sum_k weights[e, f, k] st[f, k]`` of the ``kind`` stamps into each fiber's band: ``(E, nf, H, Wb)``."""
        return self._place(self._placement(xmin, ymin, self._valid(kind), *st.shape[-2:]), st, weights)

    def _weights(self, params: dict) -> dict:
        """Photons per stamp: line ``(narc, nf, nline)``, flat ``(narc + nflat, nf, nsamp)`` with the
        arcs' continuum (``ncont``) or ``(nflat, nf, nsamp)`` without."""
        out = {}
        if self.static.narc:
            out["line"] = params["line_flux"]
        flat = []
        if self.static.ncont:
            flat.append(jnp.sum(params["cont_amp"][:, :, None, :] * self.cbasis[None, None], axis=-1))
        if self.static.nflat:
            # a broadcast sum, not a dot: XLA:CPU (jax 0.10.2) miscompiles the dot
            # fused into the scatter below
            flat.append(jnp.sum(params["flat_amp"][:, :, None, :] * self.fbasis[None, None], axis=-1))
        if flat:
            out["flat"] = flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=0)
        return out

    def _per_image(self, parts: dict):
        """``(nimg, ...)`` from the placed ``{"line": (narc, ...), "flat": (nflat or narc + nflat, ...)}``:
        the lines and (``ncont``) the continuum of each arc summed, then the flats."""
        if self.static.ncont:
            na = self.static.narc
            return jnp.concatenate([parts["line"] + parts["flat"][:na], parts["flat"][na:]], axis=0)
        return jnp.concatenate([parts[k] for k in ("line", "flat") if k in parts], axis=0)

    def _tails_ok(self, psf: GaussHermitePSF):
        """Whether TAILAMP >= 0 at every live stamp (a fitted tail amplitude is kept physical)."""
        s = self.static
        ok = jnp.asarray(True)
        for kind, wave, valid in (("line", self.lwave, self.lvalid), ("flat", self.fwave, None)):
            if (kind == "line" and not s.narc) or (kind == "flat" and not (s.nflat or s.ncont)):
                continue
            amp = psf.param("TAILAMP", self.fibers[:, None], wave[None, :])  # (nf, K)
            use = self.live[:, None] & (self._valid(kind)[None, :] if valid is None else valid[None, :])
            ok = ok & jnp.all(jnp.where(use, amp, 0.0) >= 0.0)
        return ok

    def bands(self, params: dict):
        """Model light of each fiber in its band: ``(nimg, nf, H, Wb)`` (NaN where a fitted TAILAMP
        is negative at a stamp: such a step is refused)."""
        psf = self.corrected_psf(params)
        st = self.stamps(psf)
        w = self._weights(params)
        out = self._per_image({k: self._scatter_sum(k, *st[k], w[k]) for k in ("line", "flat") if k in st})
        if "TAILAMP" in self.static.shape_terms:
            out = jnp.where(self._tails_ok(psf), out, jnp.nan)
        return out

    def _free_psf(self, params: dict) -> dict:
        """The PSF variables derivatives are taken in: ``pc`` as per-fiber offsets, widths apart."""
        s = self.static
        out = {k: params[k] for k in PSF_KEYS if k in params and k != "pc"}
        if "pc" in params:
            pc = params["pc"]
            pf = jnp.asarray(fiber_legendre(s.nf, pc.shape[1] - 1), pc.dtype)
            pcf = jnp.sum(pc[:, None, :, :] * pf[None, :, :, None], axis=2)
            out["pcf_s"] = pcf[: s.nsig]
            out["pcf_g"] = pcf[s.nsig:]
        return out

    def _psf_of_free(self, pp: dict) -> GaussHermitePSF:
        s = self.static
        q = {k: v for k, v in pp.items() if not k.startswith("pcf_")}
        psf = apply_psf_params(self.psf, q, self.fibers, gh_terms=s.gh_terms)
        if "pcf_s" in pp and s.nsig:
            psf = apply_psf_params(psf, {"pcf": pp["pcf_s"]}, self.fibers, shape_terms=s.shape_terms[: s.nsig])
        if "pcf_g" in pp and len(s.shape_terms) > s.nsig:
            psf = apply_psf_params(psf, {"pcf": pp["pcf_g"]}, self.fibers, shape_terms=s.shape_terms[s.nsig:])
        return psf

    def _wave_basis(self, kind: str, key: str, n: int):
        """``(K, n)`` Legendre basis at the stamps' wavelengths in the domain of ``key``."""
        psf = self.psf
        dom = {"dx": psf.xdomain, "dy": psf.ydomain}.get(key, psf.pdomain)
        wave = self.lwave if kind == "line" else self.fwave
        return legvander((wave - dom[0]) * (2.0 / (dom[1] - dom[0])) - 1.0, n - 1)

    def band_jacobian(self, params: dict):
        """``(bands, J)``: the model bands and d bands / d (colours, linear), ``(nimg, nf, H, Wb, na)``.

        Forward-mode derivatives of the spots, one per colour (all fibers'
        parameter of one kind at once: fiber i's light depends on fiber i's
        corrections only), in two groups so that the Gauss-Hermite offsets do
        not differentiate the pixel integrals; the model is linear in the fluxes.
        Legendre coefficient ``k > 0`` of a trace or shape term is not
        differentiated again: its column is that of ``k = 0`` with each stamp's
        photons times ``P_k(t)`` of the stamp's wavelength.
        """
        s = self.static
        free_all = self._free_psf(params)
        w = self._weights(params)
        kinds = [k for k in ("line", "flat") if (k == "line" and s.narc) or (k == "flat" and (s.nflat or s.ncont))]

        def stamps_of(pp):
            st = self.stamps(self._psf_of_free(pp))
            return {k: st[k][2] for k in kinds}

        psf_now = self._psf_of_free(free_all)
        primal = self.stamps(psf_now)
        # Gauss-Hermite coefficients in closed form (a PSF without tail terms): term (i, j)
        # enters the spot linearly, so its derivative needs no forward-mode pass
        closed = {}  # colour -> (i, j)
        if not psf_now.has_tails:
            for col in s.colors:
                key, a, b = col
                name = s.gh_terms[a] if key == "gh" else (s.shape_terms[a] if key == "pc" and b == 0
                                                          and a >= s.nsig else None)
                ij = _gh_term(name, psf_now) if name is not None else None
                if ij is not None:
                    closed[col] = ij
        # the colours that need a jvp, by group, with their tangent in the free variables
        groups = {1: [], 2: []}
        for col in s.colors:
            key, a, b = col
            if col in closed:
                continue
            if key in ("dx", "dy") and a == 0:
                groups[1].append((col, key, lambda t, key=key: t.at[:, 0].set(1.0)))
            elif key in ("log_sigx", "log_sigy"):
                groups[1].append((col, key, lambda t: jnp.ones_like(t)))
            elif key == "gh":
                groups[2].append((col, key, lambda t, a=a: t.at[a].set(1.0)))
            elif key == "pc" and b == 0:
                if a < s.nsig:
                    groups[1].append((col, "pcf_s", lambda t, a=a: t.at[a, :, 0].set(1.0)))
                else:
                    groups[2].append((col, "pcf_g", lambda t, a=a: t.at[a - s.nsig, :, 0].set(1.0)))
        group_keys = {1: ("dx", "dy", "log_sigx", "log_sigy", "pcf_s"), 2: ("gh", "pcf_g")}
        dst = {}  # colour -> {kind: (nf, K, ny, nx)}
        for g, cols in groups.items():
            if not cols:
                continue
            fixed = {k: v for k, v in free_all.items() if k not in group_keys[g]}
            free = {k: v for k, v in free_all.items() if k in group_keys[g]}
            tangents = []
            for _, fkey, setter in cols:
                t = {kk: jnp.zeros_like(v) for kk, v in free.items()}
                t[fkey] = setter(t[fkey])
                tangents.append(t)
            tstack = jax.tree.map(lambda *a: jnp.stack(a), *tangents)
            fn = lambda fr: stamps_of({**fixed, **fr})  # noqa: E731
            d = jax.vmap(lambda t: jax.jvp(fn, (free,), (t,))[1])(tstack)
            for c, (col, _, _) in enumerate(cols):
                dst[col] = {k: d[k][c] for k in kinds}
        if closed:
            terms = list(dict.fromkeys(closed.values()))
            per_kind = {k: self._gh_derivatives(psf_now, k, terms) for k in kinds}
            for col, ij in closed.items():
                dst[col] = {k: per_kind[k][terms.index(ij)] for k in kinds}
        nimg = s.narc + s.nflat
        pls = {k: self._placement(primal[k][0], primal[k][1], self._valid(k), *primal[k][2].shape[-2:]) for k in kinds}
        bands = self._per_image({k: self._place(pls[k], primal[k][2], w[k]) for k in kinds})
        jac = []
        if s.colors:
            basis = {}
            for key, shp in s.psf_shapes:
                if key in ("dx", "dy", "pc"):
                    n = shp[1] if key != "pc" else shp[2]
                    basis[key] = {k: self._wave_basis(k, key, n) for k in kinds}
            # colours sharing one stamp derivative (coefficients k > 0 of a trace or shape
            # term: that of k = 0, photons times P_k(t)) are placed by one gather
            users = {}
            for col in s.colors:
                key, a, b = col
                if key in ("dx", "dy"):
                    users.setdefault((key, 0, 0), []).append((col, key, a))
                elif key == "pc":
                    users.setdefault((key, a, 0), []).append((col, key, b))
                else:
                    users.setdefault(col, []).append((col, key, 0))
            placed = {}
            for src, cols in users.items():
                per_kind = {}
                for k in kinds:
                    wk = jnp.concatenate([w[k] if c == 0 else w[k] * basis[key][k][:, c][None, None, :]
                                          for _, key, c in cols], axis=0)  # (ncol * ne, nf, K)
                    out = self._place(pls[k], dst[src][k], wk)
                    per_kind[k] = out.reshape((len(cols), -1) + out.shape[1:])
                for i, (col, _, _) in enumerate(cols):
                    placed[col] = self._per_image({k: pk[i] for k, pk in per_kind.items()})  # (nimg, nf, H, Wb)
            jac.append(jnp.stack([placed[col] for col in s.colors], axis=-1))  # (nimg, nf, H, Wb, ncolor)
        if s.narc:
            lines = self._scatter_each(*primal["line"])  # (nf, nline, H, Wb)
            onehot = jnp.eye(nimg, s.narc, dtype=bands.dtype)  # image m is arc a
            jac.append(jnp.einsum("ma,ilhw->mihwal", onehot, lines).reshape(nimg, s.nf, s.H, s.Wb, -1))
        if s.nflat:
            xmin, ymin, st = primal["flat"]
            fb = self._place(pls["flat"], st, jnp.broadcast_to(self.fbasis.T[:, None, :], (s.nbasis, s.nf, s.nsamp)))
            onehot = jnp.eye(nimg, s.nflat, k=-s.narc, dtype=bands.dtype)
            jac.append(jnp.einsum("ma,bihw->mihwab", onehot, fb).reshape(nimg, s.nf, s.H, s.Wb, -1))
        if s.ncont:  # each arc's continuum: its Legendre terms along the traces (the flat samples' spots)
            st = primal["flat"][2]
            cb = self._place(pls["flat"], st, jnp.broadcast_to(self.cbasis.T[:, None, :], (s.ncont, s.nf, s.nsamp)))
            onehot = jnp.eye(nimg, s.narc, dtype=bands.dtype)
            jac.append(jnp.einsum("ma,bihw->mihwab", onehot, cb).reshape(nimg, s.nf, s.H, s.Wb, -1))
        return bands, jnp.concatenate(jac, axis=-1)

    def _gh_derivatives(self, psf: GaussHermitePSF, kind: str, terms) -> list:
        """d spot / d GH-i-j for each ``(i, j)`` of ``terms`` (a PSF without tails): the
        ``kind`` stamps' derivatives ``(nf, K, ny, nx)`` with respect to a unit change of the
        term's value at every spot, in closed form.

        The spot is ``c / sum(c)``, ``c = clip(sum_ij gh_ij fy_j fx_i, 0)``
        (:func:`jaxspec.psf._gausshermite.pixel_gauss_hermite`), so the derivative is
        ``(m fy_j fx_i - spot sum(m fy_j fx_i)) / sum(c)`` with ``m = [c > 0]``; zero for the
        stamps :meth:`stamps` zeroes (padding lines, broken fibers).
        """
        ny, nx = psf.stamp_shape
        ispec = self.fibers[:, None]
        wave = (self.lwave if kind == "line" else self.fwave)[None, :]
        shape = (self.static.nf, wave.shape[1])
        x = jnp.broadcast_to(psf.x(ispec, wave), shape)
        y = jnp.broadcast_to(psf.y(ispec, wave), shape)
        xmin = jnp.trunc(x - psf.hsizex + psf._corner_shift).astype(jnp.int32)
        ymin = jnp.trunc(y - psf.hsizey + psf._corner_shift).astype(jnp.int32)
        vals = traceset_eval_many(psf.params[psf._used_rows()], psf.pdomain, ispec, wave)  # (nf, K, nused)
        fx = pixel_gauss_hermite(xmin, x, vals[..., 0], nx, psf.ghdegx)  # (nf, K, dgx + 1, nx)
        fy = pixel_gauss_hermite(ymin, y, vals[..., 1], ny, psf.ghdegy)  # (nf, K, dgy + 1, ny)
        gh = vals[..., 2:2 + (psf.ghdegx + 1) * (psf.ghdegy + 1)].reshape(shape + (psf.ghdegy + 1, psf.ghdegx + 1))
        # the sums of _gh_stamp_values, in its order (the same rounding, so the same clipped pixels)
        fyg = sum(gh[..., j, :, None] * fy[..., j, None, :] for j in range(psf.ghdegy + 1))
        img = sum(fyg[..., i, :, None] * fx[..., i, None, :] for i in range(psf.ghdegx + 1))
        m = img > 0
        c = jnp.where(m, img, 0.0)
        z = jnp.sum(c, axis=(-2, -1), keepdims=True)
        spot = c / z
        keep = self.live[:, None, None, None]
        if kind == "line":
            keep = keep & self.lvalid[None, :, None, None]
        out = []
        for i, j in terms:
            b = jnp.where(m, fy[:, :, j, :, None] * fx[:, :, i, None, :], 0.0)
            d = (b - spot * jnp.sum(b, axis=(-2, -1), keepdims=True)) / z
            out.append(jnp.where(keep, d, 0.0))
        return out

    def _cols(self):
        return self.xlo[:, None] + jnp.arange(self.static.Wb, dtype=self.xlo.dtype)[None, :]  # (nf, Wb)

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
    def _index_map(self):
        """Where each column of a fiber's band Jacobian goes in theta.

        Returns ``(idx, wts)``, both ``(nf, na, nw)``: column ``a`` of fiber ``f``
        contributes ``wts[f, a, l]`` times itself to parameter ``idx[f, a, l]``.
        ``nw = 1`` (weight 1) except for the full model's ``pc`` columns, which
        spread over the bundle's fiber Legendre series (``nw`` = its length,
        weights ``P_l(t_f)``).
        """
        s = self.static
        lay = self.layout
        nf = s.nf
        nw = dict(s.psf_shapes)["pc"][1] if "pc" in dict(s.psf_shapes) else 1
        pf = np.asarray(fiber_legendre(nf, nw - 1))  # (nf, nw)
        idx, wts = [], []
        one = np.zeros((nf, nw))
        one[:, 0] = 1.0

        def add(i, w=one):
            full = np.zeros((nf, nw), int)
            full[:, :] = np.asarray(i)[:, None] if np.ndim(i) == 1 else i
            idx.append(np.where(w != 0, full, 0) if w is one else full)
            wts.append(w)

        for key, a, b in s.colors:
            sl = lay.slices[key]
            shp = lay.shapes[key]
            if key in ("dx", "dy"):
                add(sl.start + np.arange(nf) * shp[1] + a)
            elif key in ("log_sigx", "log_sigy"):
                add(sl.start + np.arange(nf))
            elif key == "pc":  # shape term a, wavelength coefficient b: spread over the fiber series
                add(np.broadcast_to(sl.start + (a * shp[1] + np.arange(nw)) * shp[2] + b, (nf, nw)), pf)
            elif len(shp) == 2:  # per-fiber gh (ngh, nf)
                add(sl.start + a * nf + np.arange(nf))
            else:  # shared gh
                add(np.full(nf, sl.start + a))
        if s.narc:
            st = lay.slices["line_flux"].start
            for a in range(s.narc):
                for li in range(s.nline):
                    add(st + (a * nf + np.arange(nf)) * s.nline + li)
        if s.nflat:
            st = lay.slices["flat_amp"].start
            for a in range(s.nflat):
                for b in range(s.nbasis):
                    add(st + (a * nf + np.arange(nf)) * s.nbasis + b)
        if s.ncont:
            st = lay.slices["cont_amp"].start
            for a in range(s.narc):
                for b in range(s.ncont):
                    add(st + (a * nf + np.arange(nf)) * s.ncont + b)
        return np.stack(idx, axis=1), np.stack(wts, axis=1)

    def pair_products(self, params: dict):
        """The Gauss-Newton pieces per fiber: ``(chi2, jtr_f, blocks)``.

        ``jtr_f`` ``(nf, na)``: each fiber's band Jacobian columns times the residuals;
        ``blocks`` ``(dmax + 1, nf, na, na)``: ``blocks[d, f] = J_f^T J_{f+d}`` over the
        pixels the two bands share (0 where ``f + d >= nf``).  :meth:`_assemble` maps
        them onto theta.
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
        jtr_f = jnp.einsum("frca,frc->fa", jf, rf)
        # neighbour products: fiber i with fiber i + d, its band shifted by o = xlo[i+d] - xlo[i];
        # only fiber i's last w = pair_cols[d] columns can meet fiber i + d's band (o >= Wb - w)
        cols_d = s.pair_cols or (s.Wb,) * (s.dmax + 1)
        jpad = jnp.pad(jf, ((0, s.dmax), (0, 0), (s.Wb, 0), (0, 0)))
        xl = jnp.concatenate([self.xlo, jnp.full((s.dmax,), self.xlo[-1] + 10 * s.Wb, self.xlo.dtype)])
        blocks = [jnp.einsum("frca,frcb->fab", jf, jf)]
        for d in range(1, s.dmax + 1):
            w = cols_d[d]
            if w == 0:
                blocks.append(jnp.zeros_like(blocks[0]))
                continue
            o = jnp.clip(xl[d:d + s.nf] - self.xlo, 0, s.Wb)
            # fiber i's column c (>= Wb - w) is fiber i + d's column c - o: index Wb + c - o of jpad
            other = jax.vmap(lambda jj, oo: jax.lax.dynamic_slice_in_dim(jj, 2 * s.Wb - w - oo, w, axis=1))(
                jpad[d:d + s.nf], o)
            blocks.append(jnp.einsum("frca,frcb->fab", jf[:, :, s.Wb - w:], other))
        valid = jnp.asarray(np.arange(s.nf)[None, :] + np.arange(s.dmax + 1)[:, None] < s.nf)
        return chi2, jtr_f, jnp.where(valid[:, :, None, None], jnp.stack(blocks), 0.0)

    def _assembly_plan(self) -> dict:
        """Static (NumPy) plan of :meth:`_assemble`, from :meth:`_index_map`.

        A band-Jacobian column is *local* when fiber ``f``'s copy is one parameter of
        its own (weight 1: traces, widths, per-fiber GH terms, fluxes), *shared* when
        every fiber's copy feeds the same parameters with weights ``W[f, l]`` (the full
        model's ``pc``, a GH term shared by the fibers).  ``J^T J`` is assembled in the
        canonical order (local ``(f, j)`` then shared ``(j, l)``) and gathered onto
        theta by ``src`` (``nc`` for a parameter no column reaches: a zero row).
        """
        s = self.static
        idx, wts = self._index_map()
        nf, na, nw = idx.shape
        one = np.zeros(nw)
        one[0] = 1.0
        is_local = np.array([np.all(wts[:, a] == one) and len(np.unique(idx[:, a, 0])) == nf for a in range(na)])
        loc, sh = np.flatnonzero(is_local), np.flatnonzero(~is_local)
        used = np.any(wts[:, sh] != 0, axis=0)  # (nS, nw)
        if np.any(np.where(used[None], idx[:, sh] != idx[:1, sh], False)):
            raise AssertionError("a band-Jacobian column is neither local nor shared")
        nL, nS = len(loc), len(sh)
        target = np.concatenate([idx[:, loc, 0].reshape(-1), np.where(used, idx[0, sh], -1).reshape(-1)])
        nc = len(target)
        hit = target[target >= 0]
        if len(np.unique(hit)) != len(hit):
            raise AssertionError("two band-Jacobian columns map onto one parameter")
        src = np.full(self.layout.size, nc)
        src[target[target >= 0]] = np.flatnonzero(target >= 0)
        D = s.dmax + 1
        E = np.zeros((D, nf, nf))  # E[d, f, g] = [g == f + d]
        for d in range(D):
            E[d, np.arange(nf - d), np.arange(d, nf)] = 1.0
        wsh = wts[:, sh]  # (nf, nS, nw)
        wpad = np.zeros((D, nf, nS, nw))  # wpad[d, f] = W[f + d] (0 past the last fiber)
        for d in range(D):
            wpad[d, :nf - d] = wsh[d:]
        return dict(loc=loc, sh=sh, nL=nL, nS=nS, nw=nw, src=src, E=E, wsh=wsh, wpad=wpad)

    def _assemble(self, jtr_f, blocks):
        """``(J^T J, J^T r)`` over theta from :meth:`pair_products`: the fiber Legendre
        weights contracted by einsums, the fiber-pair blocks placed by a one-hot
        product, and one static gather onto theta (no scatter-add)."""
        s = self.static
        pl = self._assembly_plan()
        nf, nL, nS, nw = s.nf, pl["nL"], pl["nS"], pl["nw"]
        dt = blocks.dtype
        loc, sh = jnp.asarray(pl["loc"]), jnp.asarray(pl["sh"])
        E = jnp.asarray(pl["E"], dt)
        wsh = jnp.asarray(pl["wsh"], dt)
        wpad = jnp.asarray(pl["wpad"], dt)
        bl = jnp.take(blocks, loc, axis=2)  # (D, nf, nL, na)
        bs = jnp.take(blocks, sh, axis=2)  # (D, nf, nS, na)
        b_ll, b_ls = jnp.take(bl, loc, axis=3), jnp.take(bl, sh, axis=3)
        b_sl, b_ss = jnp.take(bs, loc, axis=3), jnp.take(bs, sh, axis=3)
        # local x local: block (f, f + d) is blocks[d, f], block (f + d, f) its transpose
        ll = jnp.einsum("dfg,dfab->fagb", E, b_ll)
        if s.dmax:
            ll = ll + jnp.einsum("dfg,dfab->gbfa", E[1:], b_ll[1:])
        ll = ll.reshape(nf * nL, nf * nL)
        # shared x local: rows summed over their fiber with W, columns (g, b)
        sl = jnp.einsum("fjl,dfg,dfjb->jlgb", wsh, E, b_sl)
        if s.dmax:
            sl = sl + jnp.einsum("dfjl,dfbj->jlfb", wpad[1:], b_ls[1:])
        sl = sl.reshape(nS * nw, nf * nL)
        # shared x shared
        ss = jnp.einsum("fjl,dfkm,dfjk->jlkm", wsh, wpad, b_ss)
        if s.dmax:
            t = jnp.einsum("fjl,dfkm,dfjk->jlkm", wsh, wpad[1:], b_ss[1:])
            ss = ss + jnp.transpose(t, (2, 3, 0, 1))
        ss = ss.reshape(nS * nw, nS * nw)
        canon = jnp.concatenate([jnp.concatenate([ll, sl.T], axis=1), jnp.concatenate([sl, ss], axis=1)], axis=0)
        canon = jnp.pad(canon, ((0, 1), (0, 1)))  # the zero row / column of parameters no column reaches
        src = jnp.asarray(pl["src"])
        jtj = jnp.take(jnp.take(canon, src, axis=0), src, axis=1)
        g = jnp.concatenate([jnp.take(jtr_f, loc, axis=1).reshape(-1),
                             jnp.einsum("fj,fjl->jl", jnp.take(jtr_f, sh, axis=1), wsh).reshape(-1),
                             jnp.zeros((1,), dt)])
        return jtj, jnp.take(g, src)

    def normal_equations(self, params: dict):
        """Gauss-Newton pieces at ``params``: ``(chi2, J^T J, J^T r)`` over the flat theta.

        ``r`` are the weighted residuals, ``J = d model / d theta`` weighted, so a
        Gauss-Newton step is ``delta = (J^T J)^-1 J^T r``.
        """
        chi2, jtr_f, blocks = self.pair_products(params)
        jtj, jtr = self._assemble(jtr_f, blocks)
        return chi2, jtj, jtr


def _gh_term(name: str, psf: GaussHermitePSF):
    """``(i, j)`` of a parameter named ``GH-i-j`` within the PSF's Gauss-Hermite degrees, else None."""
    parts = name.split("-")
    if len(parts) != 3 or parts[0] != "GH" or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    i, j = int(parts[1]), int(parts[2])
    return (i, j) if i <= psf.ghdegx and j <= psf.ghdegy else None


def without_idle_tails(psf: GaussHermitePSF, keep: Sequence[str] = ()) -> GaussHermitePSF:
    """``psf`` without its TAIL* rows when they carry no light (TAILAMP 0 everywhere) and none
    is in ``keep`` (the fitted terms): the same spots, and the Gauss-Hermite derivatives of
    :meth:`CalibPatch.band_jacobian` in closed form.  Otherwise ``psf`` itself."""
    if not psf.has_tails or any(n.startswith("TAIL") for n in keep):
        return psf
    if np.any(np.asarray(psf.params[psf.param_index("TAILAMP")]) != 0):
        return psf
    rows = [i for i, n in enumerate(psf.param_names) if not n.startswith("TAIL")]
    return dataclasses.replace(psf, params=psf.params[np.asarray(rows)],
                               param_names=tuple(psf.param_names[i] for i in rows))


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


def patch_lines(psf: GaussHermitePSF, lines: LineList, fibers, box) -> LineList:
    """The lines of ``lines`` whose spots of ``fibers`` reach the pixel ``box`` (or a clear error).

    Raises:
        ValueError: no line reaches the box (names the fibers, rows and
            wavelengths, and says what to change).
    """
    fibers = np.asarray(fibers, dtype=int)
    margin = psf.hsizey + 3
    ylin = _host_y(psf, fibers, lines.wave)
    ok = (lines.wave >= psf.wmin) & (lines.wave <= psf.wmax)
    ok &= np.any((ylin > box[2] - margin) & (ylin < box[3] + margin), axis=0)
    plines = lines.select(ok)
    if len(plines) == 0:
        w = _host_wavelength(psf, fibers[[0, -1]], np.array([box[2], box[3]], float))
        raise BundleInputError(
            f"no arc line falls in the pixel box {tuple(box)} (fibers {fibers[0]}-{fibers[-1]}, rows "
            f"{box[2]}-{box[3]}, about {w.min():.1f}-{w.max():.1f} A): give a line list (--lines) with "
            f"lines there, widen the wavelength range or use fewer wavelength blocks")
    return plines


def check_patch(
    psf_init: GaussHermitePSF,
    arcs: Sequence = (),
    flats: Sequence = (),
    *,
    lines: LineList | None = None,
    fibers: FiberIndices | None = None,
    specmin: int = 0,
    nspec: int | None = None,
    waverange: tuple[float, float] | None = None,
    xyrange: tuple[int, int, int, int] | None = None,
    what: Sequence[str] = DEFAULT_WHAT,
    trace_deg: int = 0,
    gh_terms: Sequence[str] = DEFAULT_GH_TERMS,
    flat_deg: int = 2,
    bucket: int = 16,
    allow_no_lines: bool = False,
    min_hw: tuple[int, int] = (0, 0),
    broken_fibers: BrokenFibers = None,
    data_checks: bool = True,
):
    """Every check of :func:`calib_patch`, without building the patch (cheap: run it for
    all patches of a CCD before fitting any).

    Data problems of the patch (no arc line reaches it, an image has no valid pixel or
    no lamp light there) raise :class:`BundleInputError`; ``broken_fibers`` (fibers of
    ``fibers`` without light, :func:`check_broken_fibers`) are left out of the lamp-light test.
    ``data_checks=False`` skips the images' checks (shapes, valid pixels, lamp light): for a
    patch whose images were checked with the same arguments before.

    Returns:
        ``(fibers, box, real_box, lines_in_box, gh_terms)``: the box rounded up to
        ``bucket`` pixels, the box whose pixels are fitted, the arc lines reaching it
        (None without arcs).

    Raises:
        ValueError / TypeError: bad input, naming what to change.
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
    live = ~np.isin(fibers, check_broken_fibers(broken_fibers, f0, nf))
    gh_terms = tuple(gh_terms) if "gh" in what else ()
    for n in gh_terms:
        psf_init.param_index(n)
    ncoef_trace = min(psf_init.xcoef.shape[1], psf_init.ycoef.shape[1])
    if not 0 <= trace_deg < ncoef_trace:
        raise ValueError(f"trace_deg must be in 0..{ncoef_trace - 1}, got {trace_deg}")
    if flat_deg < 0:
        raise ValueError(f"flat_deg must be >= 0, got {flat_deg}")

    if xyrange is None:
        wr = (psf_init.wmin, psf_init.wmax) if waverange is None else waverange
        if not psf_init.wmin <= wr[0] < wr[1] <= psf_init.wmax:
            raise ValueError(f"waverange {tuple(float(w) for w in wr)}: need wmin < wmax inside the PSF's "
                             f"{psf_init.wmin:.1f}-{psf_init.wmax:.1f} A")
        box = list(psf_init.xyrange((f0, f0 + nf), wr))
    else:
        box = [int(v) for v in xyrange]
    # round the box up for shared compiled shapes; the added pixels get no weight
    # (they may hold light of fibers that are not modelled, e.g. the next bundle)
    real = tuple(box)
    H = max(_round_up(box[3] - box[2], bucket), int(min_hw[0]))
    W = max(_round_up(box[1] - box[0], bucket), int(min_hw[1]))
    box[3] = box[2] + H
    box[1] = box[0] + W
    box = tuple(int(v) for v in box)

    plines = None
    if len(arcs):
        try:
            plines = patch_lines(psf_init, lines, fibers, box)
        except ValueError:
            if not allow_no_lines:
                raise
            plines = lines.select(np.zeros(len(lines), bool))
    for kind, group in (("arc", arcs), ("flat", flats)) if data_checks else ():
        for n, im in enumerate(group):
            image, ivar, ixy = _as_input(im, f"{kind} {n}")
            if np.shape(image) != np.shape(ivar) or np.ndim(image) != 2:
                raise ValueError(f"{kind} {n}: image {np.shape(image)} and ivar {np.shape(ivar)} must be "
                                 "2-d arrays of one shape")
            if (ixy[1] - ixy[0], ixy[3] - ixy[2]) != (np.shape(image)[1], np.shape(image)[0]):
                raise ValueError(f"{kind} {n}: xyrange {ixy} does not match the image shape {np.shape(image)}")
            xa, xb = max(real[0], ixy[0]), min(real[1], ixy[1])
            ya, yb = max(real[2], ixy[2]), min(real[3], ixy[3])
            sub = np.asarray(ivar)[max(ya - ixy[2], 0):max(yb - ixy[2], 0), max(xa - ixy[0], 0):max(xb - ixy[0], 0)]
            if not np.any(np.isfinite(sub) & (sub > 0)):
                raise BundleInputError(
                    f"{kind} {n} has no valid pixel (ivar > 0) in the box {tuple(real)} of fibers "
                    f"{fibers[0]}-{fibers[-1]} (the image covers {tuple(ixy)}): fit fibers and wavelengths "
                    "that the image covers")
            if kind == "arc" and len(plines):
                _check_arc_light(psf_init, np.asarray(image), np.asarray(ivar), ixy, fibers[live], real, plines, n)
    return fibers, box, real, plines, gh_terms


def _check_arc_light(psf, image, ivar, ixy, fibers, box, plines, n, min_snr: float = 10.0):
    """Raise unless arc ``n`` has lamp light where ``plines`` fall in ``box`` (summed S/N >= ``min_snr``)."""
    xy = _host_x(psf, fibers, plines.wave).ravel()
    yy = _host_y(psf, fibers, plines.wave).ravel()
    ok = (yy >= box[2]) & (yy < box[3]) & (xy >= ixy[0]) & (xy < ixy[1]) & (yy >= ixy[2]) & (yy < ixy[3])
    if not np.any(ok):
        return  # only the wings of lines just outside the box: nothing to test on
    sig = var = 0.0
    for x, y in zip(xy[ok], yy[ok]):
        c0, r0 = int(round(x)) - 1 - ixy[0], int(round(y)) - 1 - ixy[2]
        d = image[max(r0, 0):r0 + 3, max(c0, 0):c0 + 3]
        w = ivar[max(r0, 0):r0 + 3, max(c0, 0):c0 + 3]
        good = np.isfinite(d) & np.isfinite(w) & (w > 0)
        sig += float(np.sum(d[good]))
        var += float(np.sum(1.0 / w[good]))
    if var > 0 and sig / np.sqrt(var) < min_snr:
        raise BundleInputError(
            f"arc {n} has no lamp light at the {int(ok.sum())} spots of the arc lines in the box {tuple(box)} "
            f"(fibers {fibers[0]}-{fibers[-1]}; summed S/N {sig / np.sqrt(var):.1f}): check that the arc covers "
            "these fibers and wavelengths, fit a range where its lines are, or list fibers without light in "
            "--broken-fibers")


def _core_sums(image, ivar, ixy, xc, yc):
    """Data and variance summed over the 3 x 3 pixels nearest each centre ``(xc, yc)`` (CCD
    pixels, arrays of one shape; NaN: skip), and the number of valid pixels; over the last axis."""
    ok = np.isfinite(xc) & np.isfinite(yc)
    c0 = np.rint(np.where(ok, xc, -1e6)).astype(np.int64) - int(ixy[0])
    r0 = np.rint(np.where(ok, yc, -1e6)).astype(np.int64) - int(ixy[2])
    d = np.arange(-1, 2)
    rows = r0[..., None, None] + d[:, None]
    cols = c0[..., None, None] + d[None, :]
    H, W = image.shape
    inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    rr, cc = np.clip(rows, 0, H - 1), np.clip(cols, 0, W - 1)
    dat, w = image[rr, cc], ivar[rr, cc]
    good = inside & np.isfinite(dat) & np.isfinite(w) & (w > 0)
    sig = np.where(good, dat, 0.0).sum(axis=(-1, -2)).sum(axis=-1)
    var = np.where(good, 1.0 / np.where(good, w, 1.0), 0.0).sum(axis=(-1, -2)).sum(axis=-1)
    return sig, var, good.sum(axis=(-1, -2)).sum(axis=-1)


def check_fiber_light(
    psf: GaussHermitePSF,
    arcs: Sequence = (),
    flats: Sequence = (),
    *,
    lines: LineList | None = None,
    fibers: FiberIndices,
    box: tuple,
    broken_fibers: BrokenFibers = None,
    min_frac: float = 0.1,
    min_snr: float = 20.0,
) -> None:
    """Raise :class:`BundleInputError` if a fiber not declared broken has no light (a dead fiber).

    Each fiber's light in each image is summed over the 3 x 3 pixels at its arc lines' spots
    (arcs) or along its trace, every third row (flats), inside ``box``; a fiber with less
    than ``min_frac`` of the brightest fiber's signal is unlit.  An image where the
    brightest fiber's summed S/N is below ``min_snr`` is not judged (too little light; the
    lamp-light check of :func:`check_patch` speaks for arcs; a flat there has no light and
    raises).  A fiber declared broken that
    does show light is logged (a warning): its light is not modelled and falls on its
    neighbours' pixels.

    Raises:
        BundleInputError: the unlit fibers and the image, naming ``--broken-fibers``.
    """
    fibers = np.asarray(fibers, dtype=int)
    broken = np.asarray([] if broken_fibers is None else broken_fibers, dtype=int)
    live = ~np.isin(fibers, broken)
    rows = np.arange(box[2] + 1, box[3], 3, dtype=float)
    for kind, group in (("arc", arcs), ("flat", flats)):
        if not len(group):
            continue
        if kind == "arc":
            wl = lines.wave[(lines.wave >= psf.wmin) & (lines.wave <= psf.wmax)] if lines is not None else np.zeros(0)
            if not len(wl):
                continue
            xc = _host_x(psf, fibers, wl)
            yc = _host_y(psf, fibers, wl)
            where = "its arc lines' spots"
        else:
            wr = _host_wavelength(psf, fibers, rows)
            wr = np.where((wr >= psf.wmin) & (wr <= psf.wmax), wr, np.nan)
            xc = _host_x(psf, fibers, np.nan_to_num(wr, nan=psf.wmin))
            xc = np.where(np.isfinite(wr), xc, np.nan)
            yc = np.broadcast_to(rows[None, :], xc.shape)
            where = "its trace"
        inbox = (yc >= box[2]) & (yc < box[3])
        xc, yc = np.where(inbox, xc, np.nan), np.where(inbox, yc, np.nan)
        for n, im in enumerate(group):
            image, ivar, ixy = _as_input(im, f"{kind} {n}")
            sig, var, npix = _core_sums(np.asarray(image, dtype=float), np.asarray(ivar, dtype=float), ixy, xc, yc)
            seen = live & (npix > 0)
            if not np.any(seen):
                continue
            ref = float(np.max(sig[seen]))
            iref = int(np.flatnonzero(seen)[np.argmax(sig[seen])])
            if not ref > min_snr * np.sqrt(var[iref]):
                if kind == "flat":
                    raise BundleInputError(
                        f"flat {n} has no lamp light along the traces of fibers {fibers[0]}-{fibers[-1]} in the box "
                        f"{tuple(box)} (brightest summed S/N {ref / np.sqrt(var[iref]):.1f}): check that the flat "
                        "covers these fibers and wavelengths, or list fibers without light in --broken-fibers")
                continue
            dead = seen & (sig < min_frac * ref)
            if np.any(dead):
                pct = ", ".join(f"{fb} ({int(round(100 * s / ref))}%)" for fb, s in zip(fibers[dead], sig[dead]))
                raise BundleInputError(
                    f"fiber(s) {pct} show no light in {kind} {n} (signal at {where} in the box {tuple(box)}, "
                    f"relative to the brightest fiber of fibers {fibers[0]}-{fibers[-1]}): if they are broken, "
                    "list them in --broken-fibers (broken_fibers=) so that they are not fitted; else check the image")
            lit = ~live & (npix > 0) & (sig > min_frac * ref) & (sig > 5.0 * np.sqrt(var))
            for fb, s in zip(fibers[lit], sig[lit]):
                log.warning("fit-psf: fiber %d is listed as broken but shows %.0f%% of the brightest fiber's light "
                            "in %s %d: its light is not modelled and falls on its neighbours' pixels", fb,
                            100 * s / ref, kind, n)


def _trace_host(coef, domain, fiber, v) -> np.ndarray:
    """Trace-set values on the host (NumPy; the set-up and checks of a CCD's blocks make many
    small calls of ever-changing lengths): the Legendre series of ``fiber`` (an int: ``v``'s
    shape; ``(nf,)``: ``(nf, n)`` for ``v`` ``(n,)``, the same abscissae for every fiber, or
    ``(nf, n)``, each fiber its own)."""
    c = np.asarray(coef)[fiber]
    lo, hi = np.asarray(domain, float)
    t = (np.asarray(v, float) - lo) * (2.0 / (hi - lo)) - 1.0
    V = np.polynomial.legendre.legvander(t, c.shape[-1] - 1)  # t.shape + (ncoef,)
    if c.ndim == 1:
        return V @ c
    if t.ndim == 1:
        return c @ V.T
    return np.einsum("fnk,fk->fn", V, c)


def _host_x(psf, fiber, wave) -> np.ndarray:
    """:meth:`GaussHermitePSF.x` on the host (:func:`_trace_host` broadcasting)."""
    return _trace_host(psf.xcoef, psf.xdomain, fiber, wave)


def _host_y(psf, fiber, wave) -> np.ndarray:
    """:meth:`GaussHermitePSF.y` on the host."""
    return _trace_host(psf.ycoef, psf.ydomain, fiber, wave)


def _host_wavelength(psf, fiber, y) -> np.ndarray:
    """:meth:`GaussHermitePSF.wavelength` on the host."""
    return _trace_host(psf.wcoef, psf.ylim, fiber, y)


def _flat_grid(psf: GaussHermitePSF, fibers, box, dw: float) -> np.ndarray:
    """:func:`jaxspec._simulation.calib.flat_wave_grid` on the host: the wavelengths (step
    ``dw``) whose spots of ``fibers`` cover the rows of ``box`` (with a stamp margin)."""
    margin = psf.hsizey + 2
    w = _host_wavelength(psf, np.asarray(fibers), np.array([box[2] - margin, box[3] + margin], dtype=float))
    lo = max(float(w.min()), psf.wmin)
    hi = min(float(w.max()), psf.wmax)
    return lo + dw * np.arange(int(np.floor((hi - lo) / dw)) + 1)


def neighbour_mask(psf: GaussHermitePSF, f0: int, nf: int, box, margin: float = 1.0) -> np.ndarray:
    """``(H, W)`` of the box ``(xmin, xmax, ymin, ymax)``: 1 on the columns of each row that the
    stamps of fibers ``f0 .. f0 + nf - 1`` reach (``hsizex + margin`` pixels beyond the traces of
    the first and last fiber), 0 outside: there only fibers outside the patch, which are not
    modelled, put light (e.g. the next bundle's first fiber, where the gap between bundles is
    narrow).  Light of a neighbour closer than that is not removed."""
    rows = np.arange(box[2], box[3], dtype=float)
    cols = np.arange(box[0], box[1], dtype=float)[None, :]
    reach = psf.hsizex + margin
    edge = []
    for f in (f0, f0 + nf - 1):
        wave = np.clip(_host_wavelength(psf, f, rows), psf.wmin, psf.wmax)
        edge.append(_host_x(psf, f, wave)[:, None])
    return ((cols >= edge[0] - reach) & (cols <= edge[1] + reach)).astype(float)


def calib_patch(
    psf_init: GaussHermitePSF,
    arcs: Sequence = (),
    flats: Sequence = (),
    *,
    lines: LineList | None = None,
    fibers: FiberIndices | None = None,
    specmin: int = 0,
    nspec: int | None = None,
    waverange: tuple[float, float] | None = None,
    xyrange: tuple[int, int, int, int] | None = None,
    what: Sequence[str] = DEFAULT_WHAT,
    trace_deg: int = 0,
    gh_terms: Sequence[str] = DEFAULT_GH_TERMS,
    per_fiber_gh: bool = False,
    flat_deg: int = 2,
    flat_lamp: Callable | None = None,
    flat_dw: float = 0.5,
    band_margin: int = 3,
    bucket: int = 16,
    shape_terms: Sequence[str] | None = None,
    legdeg_fiber: int = 1,
    legdeg_wave: int | None = None,
    allow_no_lines: bool = False,
    pad_to: dict | None = None,
    broken_fibers: BrokenFibers = None,
    mask_neighbours: bool = False,
    cont_deg: int | None = None,
) -> tuple[CalibPatch, dict]:
    """Set up one fitting patch (see :func:`fit_psf` for the arguments).

    Shapes are rounded up (box to ``bucket`` pixels, line and flat-sample counts
    to fixed steps) so that patches of a CCD share one compiled function;
    ``pad_to`` (``{"H", "W", "Wb", "nline", "nsamp", "dmax", "nq"}`` minimums, e.g. the largest
    over a bundle's blocks, see :attr:`CalibPatch.sizes`) pads further so that
    patches can be stacked and vmapped.  With ``"shape"`` in ``what`` (the full
    model, :func:`apply_psf_params`'s ``pc``): ``shape_terms`` (default
    :func:`shape_terms_of`), their fiber and wavelength Legendre degrees
    ``legdeg_fiber`` and ``legdeg_wave`` (default the file's: all its
    coefficients); ``allow_no_lines`` lets a block of a bigger fit have no arc line.
    ``broken_fibers`` (:func:`check_broken_fibers`): fibers of the patch without light;
    their spots are not modelled, their corrections and fluxes are held at 0 (their
    Jacobian columns are zero), the others are fitted as usual.
    ``mask_neighbours``: give no weight to the pixels beyond the reach of the patch's own
    stamps (:func:`neighbour_mask`), where only unmodelled fibers outside the patch put light.
    ``cont_deg``: model each arc's continuum (specex's ``--fit-continuum``): per arc and fiber a
    Legendre series of this degree in wavelength [photons / A] over the patch's flat-sample grid
    (``flat_dw``), spread along the trace by the PSF's spots, linear parameters ``cont_amp``
    ``(narc, nf, cont_deg + 1)``; None (default) or no arc: not modelled.

    Returns:
        ``(patch, meta)``: the :class:`CalibPatch` and ``{"box": (xmin, xmax,
        ymin, ymax), "real_box": the box whose pixels are fitted, "lines": LineList of the
        modelled lines}``.
    """
    h = _host_patch(psf_init, arcs, flats, lines=lines, fibers=fibers, specmin=specmin, nspec=nspec,
                    waverange=waverange, xyrange=xyrange, what=what, trace_deg=trace_deg, gh_terms=gh_terms,
                    per_fiber_gh=per_fiber_gh, flat_deg=flat_deg, flat_lamp=flat_lamp, flat_dw=flat_dw,
                    band_margin=band_margin, bucket=bucket, shape_terms=shape_terms, legdeg_fiber=legdeg_fiber,
                    legdeg_wave=legdeg_wave, allow_no_lines=allow_no_lines, pad_to=pad_to,
                    broken_fibers=broken_fibers, mask_neighbours=mask_neighbours, cont_deg=cont_deg)
    return _patch_of(psf_init, h), h["meta"]


def _host_patch(psf_init, arcs, flats, *, lines, fibers, specmin, nspec, waverange, xyrange, what, trace_deg, gh_terms,
                per_fiber_gh, flat_deg, flat_lamp, flat_dw, band_margin, bucket, shape_terms, legdeg_fiber,
                legdeg_wave, allow_no_lines, pad_to, broken_fibers, mask_neighbours, data_checks=True,
                cont_deg=None) -> dict:
    """:func:`calib_patch` on the host: the patch's NumPy arrays, its :class:`_Static` and meta
    (``data_checks=False``: the images were checked before, :func:`check_patch`)."""
    fibers, box, real, plines, gh_terms = check_patch(
        psf_init, arcs, flats, lines=lines, fibers=fibers, specmin=specmin, nspec=nspec,
        waverange=waverange, xyrange=xyrange, what=what, trace_deg=trace_deg, gh_terms=gh_terms,
        flat_deg=flat_deg, bucket=bucket, allow_no_lines=allow_no_lines,
        min_hw=(int((pad_to or {}).get("H", 0)), int((pad_to or {}).get("W", 0))), broken_fibers=broken_fibers,
        data_checks=data_checks)
    f0, nf = int(fibers[0]), len(fibers)
    live = ~np.isin(fibers, check_broken_fibers(broken_fibers, f0, nf))
    ny, nx = psf_init.stamp_shape
    pad_to = dict(pad_to or {})
    shape = None
    sterms = ()
    if "shape" in what:
        sterms = shape_terms_of(psf_init) if shape_terms is None else tuple(shape_terms)
        index = psf_init.param_index  # one bound method (each attribute access of an eqx method builds one)
        for n in sterms:
            index(n)
        ncoef = psf_init.params.shape[2]
        nk = ncoef if legdeg_wave is None else int(legdeg_wave) + 1
        if not 1 <= nk <= ncoef:
            raise ValueError(f"legdeg_wave must be in 0..{ncoef - 1} (the file's coefficients), got {legdeg_wave}")
        if not 0 <= legdeg_fiber < max(nf, 1):
            raise ValueError(f"legdeg_fiber must be in 0..{nf - 1} for {nf} fibers, got {legdeg_fiber}")
        shape = (len(sterms), int(legdeg_fiber) + 1, nk)
    nsig = sum(n in ("GHSIGX", "GHSIGY") for n in sterms)
    if sterms[:nsig] != tuple(n for n in sterms if n in ("GHSIGX", "GHSIGY")):
        raise ValueError(f"shape_terms must list GHSIGX / GHSIGY first, got {sterms}")
    H, W = box[3] - box[2], box[1] - box[0]

    inputs = []
    for kind, group in (("arc", arcs), ("flat", flats)):
        for n, im in enumerate(group):
            image, ivar, ixy = _as_input(im, f"{kind} {n}")
            d, w = _cut(image, ivar, ixy, box)
            w[real[3] - box[2]:, :] = 0.0
            w[:, real[1] - box[0]:] = 0.0
            inputs.append((d, w))
    narc, nflat = len(arcs), len(flats)
    if cont_deg is not None and (isinstance(cont_deg, bool) or not isinstance(cont_deg, (int, np.integer))
                                 or cont_deg < 0):
        raise ValueError(f"cont_deg (the arc continuum's Legendre degree) must be an integer >= 0, got {cont_deg!r}")
    ncont = int(cont_deg) + 1 if (cont_deg is not None and narc) else 0

    # the fibers' bands: every spot of fiber i over the box rows, with a margin
    rows = np.arange(box[2] - ny, box[3] + ny, dtype=float)
    wrows = np.clip(_host_wavelength(psf_init, fibers, rows), psf_init.wmin, psf_init.wmax)
    xtr = _host_x(psf_init, fibers, wrows)
    xlo_ccd = np.floor(xtr.min(axis=1) - psf_init.hsizex - band_margin).astype(int)
    xhi_ccd = np.ceil(xtr.max(axis=1) + psf_init.hsizex + band_margin).astype(int) + 1
    Wb = max(_round_up(int((xhi_ccd - xlo_ccd).max()), 4), int(pad_to.get("Wb", 0)))
    pad = Wb
    xlo = xlo_ccd - box[0] + pad
    dmax = max(_dmax(xlo, Wb), min(int(pad_to.get("dmax", 0)), nf - 1))

    lw = lv = None
    nline = 0
    if narc:
        nline = max(_round_up(max(len(plines), 1), 4), int(pad_to.get("nline", 0)))
        lw = np.full(nline, float(plines.wave[0]) if len(plines) else 0.5 * (psf_init.wmin + psf_init.wmax))
        lw[: len(plines)] = plines.wave
        lv = np.arange(nline) < len(plines)
    fw = fb = cb = None
    nsamp = nbasis = 0
    if nflat or ncont:
        fwave = _flat_grid(psf_init, fibers, box, flat_dw)
        tt = (fwave - fwave[0]) * (2.0 / max(fwave[-1] - fwave[0], 1e-9)) - 1.0
        nsamp = max(_round_up(len(fwave), 64), int(pad_to.get("nsamp", 0)))
        fw = np.full(nsamp, fwave[0])
        fw[: len(fwave)] = fwave
    if nflat:
        lamp = flat_spectrum if flat_lamp is None else flat_lamp
        basis = np.polynomial.legendre.legvander(tt, flat_deg) * (np.asarray(lamp(fwave)) * flat_dw)[:, None]
        nbasis = flat_deg + 1
        fb = np.zeros((nsamp, nbasis))
        fb[: len(fwave)] = basis
    if ncont:  # the arcs' continuum: photons / A = sum_k cont_amp_k P_k(t), photons per sample times dw
        cb = np.zeros((nsamp, ncont))
        cb[: len(fwave)] = np.polynomial.legendre.legvander(tt, ncont - 1) * flat_dw

    waves = ([] if lw is None else [lw[lv]]) + ([] if fw is None else [fw[: len(fwave)]])
    nq = max(_slots(psf_init, fibers, waves, box[2], H), int(pad_to.get("nq", 0)))

    data = np.zeros((len(inputs), H, W + 2 * pad))
    sqw = np.zeros_like(data)
    keep = neighbour_mask(psf_init, f0, nf, box) if mask_neighbours else 1.0
    for m, (d, w) in enumerate(inputs):
        data[m, :, pad:pad + W] = d
        sqw[m, :, pad:pad + W] = np.sqrt(w) * keep

    pshapes = _psf_shapes(nf, what, trace_deg, len(gh_terms), per_fiber_gh, shape)
    static = _Static(
        nf=nf, H=H, W=W, Wb=Wb, pad=pad, narc=narc, nflat=nflat, nline=nline, nsamp=nsamp,
        nbasis=nbasis, dmax=dmax, psf_shapes=tuple((k, tuple(v)) for k, v in pshapes.items()),
        gh_terms=gh_terms, colors=_colors(pshapes), shape_terms=sterms, nsig=nsig, nq=nq,
        pair_cols=_pair_cols(xlo, Wb, dmax), ncont=ncont,
    )
    arrays = dict(fibers=np.asarray(fibers, np.int32), data=data, sqw=sqw, xlo=np.asarray(xlo, np.int32),
                  y0=np.asarray(box[2], np.int32), x0=np.asarray(box[0], np.int32),
                  lwave=lw if narc else np.zeros(1), lvalid=lv if narc else np.zeros(1, bool),
                  fwave=fw if (nflat or ncont) else np.zeros(1), fbasis=fb if nflat else np.zeros((1, 1)),
                  live=np.asarray(live))
    if ncont:
        arrays["cbasis"] = cb
    return dict(arrays=arrays, static=static, meta=dict(box=box, real_box=real, lines=plines))


_INT_FIELDS = ("fibers", "xlo", "y0", "x0")


def _patch_of(psf: GaussHermitePSF, h: dict, stacked: bool = False) -> CalibPatch:
    """The :class:`CalibPatch` of :func:`_host_patch`'s arrays (``stacked``: of
    :func:`stack_host_patches`, every field with a leading block axis, the PSF's too)."""
    dt = jnp.result_type(float)
    a = h["arrays"]
    kw = {k: jnp.asarray(v, jnp.int32 if k in _INT_FIELDS else (bool if v.dtype == bool else dt))
          for k, v in a.items()}
    if stacked:
        n = a["data"].shape[0]
        psf = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), psf)
    return CalibPatch(psf=psf, static=h["static"], **kw)


def _dmax(xlo: np.ndarray, Wb: int) -> int:
    """The largest fiber distance whose bands (``Wb`` wide, at ``xlo``) overlap."""
    dmax = 0
    for d in range(1, len(xlo)):
        if np.any(xlo[d:] - xlo[:-d] < Wb):
            dmax = d
        else:
            break
    return dmax


def _pair_cols(xlo: np.ndarray, Wb: int, dmax: int) -> tuple:
    """Per fiber distance ``d = 0 .. dmax``: how many of fiber ``f``'s last band columns can
    overlap fiber ``f + d``'s band (``Wb`` less the smallest offset ``xlo[f + d] - xlo[f]``),
    the columns :meth:`CalibPatch.pair_products` multiplies."""
    out = []
    for d in range(dmax + 1):
        o = np.clip(xlo[d:] - xlo[:len(xlo) - d], 0, Wb)
        out.append(int(Wb - o.min()) if len(o) else 0)
    return tuple(out)


def _slots(psf: GaussHermitePSF, fibers, waves, y0: int, H: int) -> int:
    """Gather slots (``nq``): the most stamps (of one kind: each of ``waves``) of ``fibers``
    reaching one band row of the ``H`` rows from ``y0``, with room for trace shifts."""
    ny = psf.stamp_shape[0]
    nf = len(fibers)
    nq = 0
    for wv in waves:
        r = np.floor(_host_y(psf, fibers, wv) - psf.hsizey).astype(int) - y0
        L = H + 2 * ny + 2  # stamp k covers band rows r .. r + ny - 1: +1 at r, -1 at r + ny, summed up
        at = np.arange(nf)[:, None] * L + ny + 1
        cnt = (np.bincount((at + np.clip(r, -ny - 1, H + ny)).ravel(), minlength=nf * L)
               - np.bincount((at + np.clip(r + ny, -ny - 1, H + ny)).ravel(), minlength=nf * L))
        nq = max(nq, int(np.cumsum(cnt.reshape(nf, L), axis=1).max()))
    return _round_up(nq + 4, 4)


def pad_host_patch(psf: GaussHermitePSF, h: dict, sizes: dict) -> dict:
    """:func:`_host_patch`'s patch padded on the host to ``sizes`` (``H``, ``W``, ``Wb``,
    ``nline``, ``nsamp`` at least the patch's): zero-weight rows and columns, padding lines
    and flat samples; ``dmax`` and ``nq`` recomputed for the new frame (raise them further with
    :func:`stack_host_patches`).  Same fit as the patch itself: only pixels of no weight and
    stamps of no light are added."""
    s, a = h["static"], dict(h["arrays"])
    H, W, Wb = (max(int(sizes.get(k, 0)), getattr(s, k)) for k in ("H", "W", "Wb"))
    nline, nsamp = max(int(sizes.get("nline", 0)), s.nline), max(int(sizes.get("nsamp", 0)), s.nsamp)
    nimg = a["data"].shape[0]
    for k in ("data", "sqw"):
        out = np.zeros((nimg, H, W + 2 * Wb))
        out[:, :s.H, Wb:Wb + s.W] = a[k][:, :, s.pad:s.pad + s.W]
        a[k] = out
    a["xlo"] = (a["xlo"] + (Wb - s.pad)).astype(np.int32)
    if s.narc and nline > s.nline:
        a["lwave"] = np.concatenate([a["lwave"], np.full(nline - s.nline, a["lwave"][0])])
        a["lvalid"] = np.concatenate([a["lvalid"], np.zeros(nline - s.nline, bool)])
    if (s.nflat or s.ncont) and nsamp > s.nsamp:
        a["fwave"] = np.concatenate([a["fwave"], np.full(nsamp - s.nsamp, a["fwave"][0])])
        if s.nflat:
            a["fbasis"] = np.concatenate([a["fbasis"], np.zeros((nsamp - s.nsamp, s.nbasis))])
        if s.ncont:
            a["cbasis"] = np.concatenate([a["cbasis"], np.zeros((nsamp - s.nsamp, s.ncont))])
    nq = s.nq
    if H > s.H:
        fvalid = np.any((a["fbasis"] if s.nflat else a.get("cbasis", a["fbasis"])) != 0, axis=1)
        waves = ([a["lwave"][a["lvalid"]]] if s.narc else []) + ([a["fwave"][fvalid]] if (s.nflat or s.ncont)
                                                                  else [])
        nq = max(nq, _slots(psf, a["fibers"], waves, int(a["y0"]), H))
    dmax = max(s.dmax, _dmax(a["xlo"], Wb))
    static = dataclasses.replace(s, H=H, W=W, Wb=Wb, pad=Wb, nline=nline if s.narc else 0,
                                 nsamp=nsamp if (s.nflat or s.ncont) else 0, dmax=dmax, nq=nq,
                                 pair_cols=_pair_cols(a["xlo"], Wb, dmax))
    box = h["meta"]["box"]
    meta = dict(h["meta"], box=(box[0], box[0] + W, box[2], box[2] + H))
    return dict(arrays=a, static=static, meta=meta)


def stack_host_patches(psf: GaussHermitePSF, hs: Sequence[dict]) -> CalibPatch:
    """Patches of :func:`pad_host_patch` (one shape) as one :class:`CalibPatch` with a leading
    block axis on every field (for ``jax.vmap``); ``dmax`` and ``nq`` are their largest."""
    st = hs[0]["static"]
    dmax = max(h["static"].dmax for h in hs)
    cols = np.max([_pair_cols(h["arrays"]["xlo"], st.Wb, dmax) for h in hs], axis=0)
    st = dataclasses.replace(st, dmax=dmax, nq=max(h["static"].nq for h in hs), pair_cols=tuple(int(c) for c in cols))
    for h in hs:
        if dataclasses.replace(h["static"], dmax=st.dmax, nq=st.nq, pair_cols=st.pair_cols) != st:
            raise ValueError("patches of different shapes cannot be stacked: pad them to one (pad_host_patch)")
    arrays = {k: np.stack([h["arrays"][k] for h in hs]) for k in hs[0]["arrays"]}
    return _patch_of(psf, dict(arrays=arrays, static=st), stacked=True)


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
