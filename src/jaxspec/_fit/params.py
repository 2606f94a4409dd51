"""Fitted PSF parameters: the corrections and their application to a PSF.

The corrections of :func:`apply_psf_params` (per-fiber trace offsets, width
log-scales, Gauss-Hermite offsets) and the flat-vector layout the solvers use.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Int

from ..psf._gausshermite import GaussHermitePSF

__all__ = ["ALL_WHAT", "DEFAULT_GH_TERMS", "DEFAULT_WHAT", "FiberIndices", "LIN_KEYS", "PSF_KEYS", "apply_psf_params", "bundle_series_start", "fiber_legendre", "shape_terms_of"]

#: Fiber indices as a caller gives them: a sequence of ints or a 1-D integer array (NumPy or JAX).
FiberIndices = Sequence[int] | Int[np.ndarray, " nfib"] | Int[jax.Array, " nfib"]

#: GH terms corrected by default (GH-1-0, GH-0-1, GH-2-0, GH-0-2 are degenerate with shifts and widths)
DEFAULT_GH_TERMS = ("GH-1-1", "GH-3-0", "GH-2-1", "GH-1-2", "GH-0-3")
PSF_KEYS = ("dx", "dy", "log_sigx", "log_sigy", "gh", "pc")
LIN_KEYS = ("line_flux", "flat_amp", "cont_amp")  # cont_amp: the arcs' continuum (calib_patch(cont_deg=))
#: What can be fitted: the corrections of issue 7 and ``"shape"``, the full model (every
#: GHSIGX, GHSIGY and GH-i-j coefficient as a bundle Legendre series in fiber and wavelength).
ALL_WHAT = ("xtrace", "ytrace", "sigma", "gh", "shape")
#: What :func:`jaxspec.fit_psf` / :func:`jaxspec.fit_psf_ccd` fit by default (the corrections of issue 7).
DEFAULT_WHAT = ("xtrace", "ytrace", "sigma", "gh")


def shape_terms_of(psf: GaussHermitePSF) -> tuple[str, ...]:
    """The parameters the full model fits: GHSIGX, GHSIGY and every GH-i-j but GH-0-0
    (fixed: each spot is normalised to unit sum, so it would be degenerate with the flux)."""
    gh = [f"GH-{i}-{j}" for j in range(psf.ghdegy + 1) for i in range(psf.ghdegx + 1) if i + j > 0]
    return ("GHSIGX", "GHSIGY", *gh)


def fiber_legendre(nf: int, deg: int) -> np.ndarray:
    """``(nf, deg + 1)`` Legendre basis over the bundle's fibers (first -> -1, last -> +1); host constants."""
    t = np.linspace(-1.0, 1.0, nf) if nf > 1 else np.zeros(1)
    return np.polynomial.legendre.legvander(t, deg)


def bundle_series_start(psf: GaussHermitePSF, bundles: Sequence[Sequence[int] | np.ndarray], terms: Sequence[str],
                        legdeg_fiber: int, legdeg_wave: int | None,
                        broken: Sequence[int] | np.ndarray = ()) -> GaussHermitePSF:
    """``psf`` with every bundle's shape coefficients projected on the full model's series (host, NumPy).

    For each bundle and each of ``terms`` (and GH-0-0, which scales them): the wavelength
    Legendre coefficients above ``legdeg_wave`` are dropped (over the file's wavelength
    domain that is the least-squares projection: the basis is orthogonal there) and each
    remaining coefficient is least-squares fitted over the bundle's live fibers by a
    Legendre series of degree ``legdeg_fiber`` in fiber position (:func:`fiber_legendre`).
    So the start is a point of the fitted family, and the fit (the start plus the series
    ``pc``) is one per-bundle series of these degrees, as specex's PSF is; a start whose
    coefficients bend across a bundle (another night's fit) no longer leaves that bend as
    a floor the fit cannot remove.  Broken fibers keep their rows bit for bit.

    Args:
        psf: the starting PSF, ``params`` ``(nparam, nspec, ncoef)``.
        bundles: each bundle's consecutive fibers (absolute indices).
        terms: parameter names to project (e.g. :func:`shape_terms_of`).
        legdeg_fiber: Legendre degree over a bundle's fibers.
        legdeg_wave: wavelength degree kept (None: all ``ncoef`` coefficients).
        broken: fibers without light, left as they are.

    Returns:
        A GaussHermitePSF with the projected ``params`` (traces unchanged).
    """
    pars = np.array(psf.params, dtype=float)
    ncoef = pars.shape[2]
    nk = ncoef if legdeg_wave is None else int(legdeg_wave) + 1
    names = list(dict.fromkeys((["GH-0-0"] if "GH-0-0" in psf.param_names else []) + list(terms)))
    rows = np.asarray([psf.param_index(n) for n in names], dtype=int)
    dead = set(int(f) for f in np.ravel(np.asarray(broken, dtype=int)))
    for fib in bundles:
        fib = np.asarray(fib, dtype=int)
        live = np.asarray([int(f) not in dead for f in fib])
        if live.sum() < legdeg_fiber + 1:
            continue
        basis = fiber_legendre(len(fib), legdeg_fiber)  # (nf, legdeg_fiber + 1), over the whole bundle
        sub = pars[rows][:, fib[live], :nk]  # (nterm, nlive, nk)
        coef, *_ = np.linalg.lstsq(basis[live], np.moveaxis(sub, 1, 0).reshape(int(live.sum()), -1), rcond=None)
        fitted = np.moveaxis((basis[live] @ coef).reshape((int(live.sum()),) + sub.shape[::2]), 0, 1)
        block = pars[rows][:, fib[live], :]
        block[:, :, :nk] = fitted
        block[:, :, nk:] = 0.0
        pars[rows[:, None], fib[live][None, :], :] = block
    return eqx.tree_at(lambda p: p.params, psf, jnp.asarray(pars, dtype=psf.params.dtype))


# ---------------------------------------------------------------- parameters
def _psf_shapes(nf: int, what: Sequence[str], trace_deg: int, ngh: int, per_fiber_gh: bool,
                shape: tuple[int, int, int] | None = None) -> dict:
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
    if "shape" in what and shape is not None:
        out["pc"] = tuple(int(v) for v in shape)  # (nterm, legdeg_fiber + 1, legdeg_wave + 1)
    return out


def apply_psf_params(psf: GaussHermitePSF, params: dict, fibers, *, gh_terms: Sequence[str] = DEFAULT_GH_TERMS,
                     shape_terms: Sequence[str] | None = None, live=None) -> GaussHermitePSF:
    """``psf`` with the corrections ``params`` applied to ``fibers`` (JAX-traceable).

    Args:
        psf: the PSF to correct.
        params: any of ``dx``/``dy`` ``(nfib, k)`` offsets [pixels] of the first
            ``k`` Legendre coefficients of the x / y traces, ``log_sigx``/``log_sigy``
            ``(nfib,)`` log-scales of GHSIGX / GHSIGY, ``gh`` ``(nterm,)`` or
            ``(nterm, nfib)`` offsets of the constant coefficient of ``gh_terms``;
            ``pc`` ``(nterm, nl, nk)``: the full model, offsets of the first ``nk``
            wavelength-Legendre coefficients of ``shape_terms`` (default
            :func:`shape_terms_of`) as Legendre series of degree ``nl - 1`` over the
            fibers (:func:`fiber_legendre`: specex's per-bundle LEGDEGX); ``pcf``
            ``(nterm, nfib, nk)``: the same offsets per fiber.
        fibers: ``(nfib,)`` absolute fiber indices the rows of ``params`` refer to.
        shape_terms: the parameter names of the rows of ``pc`` / ``pcf``.
        live: ``(nfib,)`` bool, False for a broken fiber: its traces and parameters are
            left exactly as in ``psf`` (the bundle's ``pc`` series is not applied to it).

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
    if "pc" in params or "pcf" in params:
        names = shape_terms_of(psf) if shape_terms is None else tuple(shape_terms)
        rows = jnp.asarray([psf.param_index(n) for n in names])
        if "pcf" in params:
            off = params["pcf"]
        else:
            pc = params["pc"]
            pf = jnp.asarray(fiber_legendre(fib.shape[0], pc.shape[1] - 1), pc.dtype)
            off = jnp.sum(pc[:, None, :, :] * pf[None, :, :, None], axis=2)
        k = off.shape[-1]
        pars = pars.at[rows[:, None], fib[None, :], :k].add(off)
    if live is not None:  # broken fibers: the input rows, bit for bit
        keep = ~jnp.asarray(live, bool)
        xcoef = xcoef.at[fib].set(jnp.where(keep[:, None], psf.xcoef[fib], xcoef[fib]))
        ycoef = ycoef.at[fib].set(jnp.where(keep[:, None], psf.ycoef[fib], ycoef[fib]))
        pars = pars.at[:, fib].set(jnp.where(keep[None, :, None], psf.params[:, fib], pars[:, fib]))
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
