"""The whole CCD (or a fiber range of it): a grid of bundle x wavelength-block patches.

Every patch is checked (:func:`jaxspec._fit.patch.check_patch`: its box, its arc
lines, the images' pixels there; :func:`jaxspec._fit.patch.check_fiber_light`: every
fiber not declared broken has light) before the first one is fitted, so a fit that
would fail on its last block fails before its first.  A bundle whose data fail these
checks (:class:`jaxspec._fit.patch.BundleInputError`) is flagged at once and not
fitted; one whose fit fails or does not give finite coefficients keeps its input
coefficients and is flagged (:class:`CCDFit`); the other bundles go on.  When no
bundle is left to fit, the first bundle's problem is raised before any fitting.

Broken fibers (``broken_fibers``, specex's ``--broken-fibers``) have no light: they
are not fitted, their coefficients stay the input PSF's, the PSF's ``STATUS`` row
marks them ``STATUS_BROKEN`` and the header lists them (``NBROKEN``, ``BROKEN``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._simulation.calib import LineList
from ..psf._gausshermite import GaussHermitePSF
from .align import TraceOffset, align_bundles
from .patch import BrokenFibers, BundleInputError, check_broken_fibers, check_fiber_light, check_patch
from .result import FitResult
from .solver import fit_psf

log = logging.getLogger("jaxspec.fit")

__all__ = ["BundleStatus", "CCDFit", "fit_psf_ccd"]

#: Status codes (header key ``BnnSTAT`` per bundle, the PSF's ``STATUS`` row per fiber): 0
#: converged, 1 not converged, 2 failed (input coefficients kept), 3 broken (a fiber listed in
#: ``broken_fibers``, or a bundle all of whose fibers are: not fitted, input coefficients kept).
#: desispec's ``merge_psf`` takes a fiber's coefficients from a fit only where ``STATUS`` is 0.
STATUS_OK, STATUS_NOT_CONVERGED, STATUS_FAILED, STATUS_BROKEN = 0, 1, 2, 3


@dataclasses.dataclass
class BundleStatus:
    """Outcome of one bundle: ``status`` 0 converged, 1 not converged, 2 failed (input kept),
    3 every fiber broken (not fitted, input kept); ``broken``: its broken fibers."""

    bundle: int
    fibers: np.ndarray
    status: int
    chi2: float
    ndata: int
    npar: int
    message: str = ""
    broken: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=int))

    @property
    def reduced_chi2(self) -> float:
        """chi2 / (ndata - npar); NaN for a bundle that was not fitted (failed or broken)."""
        if self.status in (STATUS_FAILED, STATUS_BROKEN):
            return float("nan")
        return float(self.chi2 / max(self.ndata - self.npar, 1))


@dataclasses.dataclass
class CCDFit:
    """Result of :func:`fit_psf_ccd`; unpacks as ``psf, fits = fit_psf_ccd(...)``.

    Attributes:
        psf: the fitted PSF (failed bundles and broken fibers keep their input coefficients).
        fits: the :class:`FitResult` of every fitted patch (bundle-major).
        bundles: one :class:`BundleStatus` per bundle.
        broken: the broken fibers (sorted).
        offsets: per bundle, the :class:`jaxspec._fit.align.TraceOffset` measured and added to the
            start's traces before the checks and the fit (``align``), or None (not measured: ``align``
            off, every fiber broken, or the offset could not be measured and the bundle is flagged).
            A bundle flagged after it (status 2) keeps its input coefficients, unshifted.
    """

    psf: GaussHermitePSF
    fits: list
    bundles: list
    broken: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=int))
    offsets: list[TraceOffset | None] = dataclasses.field(default_factory=list)

    def __iter__(self):
        return iter((self.psf, self.fits))

    def header(self) -> dict:
        """Keys for the PSF HDU: specex's per-bundle ``BnnRCHI2``, ``BnnNDATA``, ``BnnNPAR``, with
        ``BnnSTAT`` (the status code), ``BnnALDX``, ``BnnALDY`` (the alignment's shifts of the start's
        traces [pixels], for the bundles aligned and fitted), ``NBROKEN`` (how many fibers were broken) and, when
        any, ``BROKEN`` (their numbers, comma-separated, as ``--broken-fibers`` takes them)."""
        out = {}
        for i, b in enumerate(self.bundles):
            k = f"B{b.bundle:02d}"
            out[f"{k}RCHI2"] = b.reduced_chi2 if np.isfinite(b.reduced_chi2) else -1.0
            out[f"{k}NDATA"] = int(b.ndata)
            out[f"{k}NPAR"] = int(b.npar)
            out[f"{k}STAT"] = int(b.status)
            off = self.offsets[i] if i < len(self.offsets) else None
            if off is not None and b.status in (STATUS_OK, STATUS_NOT_CONVERGED):  # the others keep the input
                out[f"{k}ALDX"] = float(off.dx)
                out[f"{k}ALDY"] = float(off.dy)
        out["NBROKEN"] = int(len(self.broken))
        if len(self.broken):
            out["BROKEN"] = ",".join(str(int(f)) for f in self.broken)
        return out


def bundle_id(fibers, index: int, specmin: int, bundlesize: int) -> int:
    """The bundle number of the header keys: the CCD's bundle when the range starts on a bundle edge."""
    return int(fibers[0]) // bundlesize if specmin % bundlesize == 0 else index


def set_status_row(psf_init: GaussHermitePSF, pars: np.ndarray, statuses, broken) -> None:
    """The PSF's ``STATUS`` row (when it has one), in place: each fitted fiber its bundle's code,
    each broken fiber ``STATUS_BROKEN``."""
    if "STATUS" not in psf_init.param_names:
        return
    row = psf_init.param_index("STATUS")
    for st in statuses:
        pars[row, st.fibers, :] = 0.0
        pars[row, st.fibers, 0] = float(st.status)
    pars[row, np.asarray(broken, dtype=int), 0] = float(STATUS_BROKEN)


def precheck_bundles(bundles, broken, check: Callable, specmin: int, bundlesize: int) -> dict:
    """Bundles that will not be fitted, decided before any fitting: ``{index: BundleStatus}``.

    A bundle whose fibers are all broken gets ``STATUS_BROKEN``; one whose data ``check(fibers,
    broken_of_bundle)`` finds a :class:`BundleInputError` in gets ``STATUS_FAILED`` with its
    message (logged now).  Raises ``ValueError`` when no bundle is left to fit.
    """
    out = {}
    for i, fib in enumerate(bundles):
        bb = fib[np.isin(fib, broken)]
        b = bundle_id(fib, i, specmin, bundlesize)
        if len(bb) == len(fib):
            out[i] = BundleStatus(b, fib, STATUS_BROKEN, float("nan"), 0, 0,
                                  "every fiber broken: not fitted, input coefficients kept", broken=bb)
            continue
        try:
            check(fib, bb)
        except BundleInputError as err:
            out[i] = BundleStatus(b, fib, STATUS_FAILED, float("nan"), 0, 0, str(err), broken=bb)
    failed = [st for st in out.values() if st.status == STATUS_FAILED]
    if len(out) == len(bundles):
        if not failed:
            raise ValueError("broken fibers (--broken-fibers): every fitted fiber is broken: nothing to fit")
        more = f" (and {len(failed) - 1} more bundle(s) with input problems)" if len(failed) > 1 else ""
        raise ValueError(f"{failed[0].message}{more}")
    for st in failed:
        log.warning("fit-psf: bundle %d (fibers %d-%d) will not be fitted, its input coefficients are kept "
                    "(flagged): %s", st.bundle, st.fibers[0], st.fibers[-1], st.message)
    return out


def _legfit_weighted(t, y, sig, deg):
    """Weighted Legendre fit of degree ``min(deg, len(t) - 1)``: coefficients."""
    deg = min(deg, len(t) - 1)
    V = np.polynomial.legendre.legvander(t, deg) / sig[:, None]
    return np.linalg.lstsq(V, y / sig, rcond=None)[0]


def _merge_bundle(psf_init, fib, res, wc, nblocks, xcoef, ycoef, pars):
    """Turn one bundle's per-block corrections into Legendre coefficients (in place; broken
    fibers are left as they are)."""
    gh_terms = res[0].gh_terms
    live = res[0].live if res[0].live is not None else np.ones(len(fib), bool)
    for j, f in enumerate(fib):
        if not live[j]:
            continue
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
    bundle_progress: Callable[[BundleStatus, int], None] | None = None,
    broken_fibers: BrokenFibers = None,
    align: bool = True,
    max_shift: float = 8.0,
    **fit_kwargs,
) -> CCDFit:
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

    Every patch is checked before any is fitted: a bad range or option raises
    ``ValueError`` at once; a bundle with a data problem (a block without arc
    lines or lamp light, an image without valid pixels there, a fiber without
    light not in ``broken_fibers``) is flagged ``status=2`` and not fitted, the
    others go on (``ValueError`` at once when that leaves nothing to fit).  A
    bundle whose fit then fails (or gives non-finite coefficients) keeps its
    input coefficients and is flagged ``status=2``; one that hits ``maxiter``
    in some block is flagged ``status=1``; one all of whose fibers are broken,
    ``status=3``.  The PSF's ``STATUS`` row, when present, gets the status of
    each fitted fiber and 3 for each broken one.

    With ``align`` (default), before any check, every bundle's trace offset in the images is
    measured (:func:`jaxspec._fit.align.measure_bundle_offset`, search window ``max_shift``
    pixels) and added to the start's traces (all its fibers, broken ones too); a bundle whose
    offset cannot be measured is flagged ``status=2`` and keeps its input coefficients.

    Args:
        progress: ``progress(done, total, fit)`` after every patch.
        bundle_progress: ``bundle_progress(status, nbundles)`` after every bundle.
        broken_fibers: fibers without light (:func:`jaxspec._fit.patch.check_broken_fibers`):
            not fitted, their spots not modelled (fluxes held at 0), their coefficients the input's
            (plus the bundle's alignment shift).
        align: measure and add the start's trace offsets first (see above).
        max_shift: the alignment's search window [pixels] on each axis.

    Returns:
        A :class:`CCDFit` (unpacks as ``(psf, fits)``): the fitted PSF (inverse
        trace refitted), the :class:`FitResult` of every patch (bundle-major)
        and the per-bundle :class:`BundleStatus` and alignment offsets.
    """
    if not isinstance(psf_init, GaussHermitePSF):
        raise TypeError(f"PSF fitting needs a GaussHermitePSF, got {type(psf_init).__name__}")
    nspec = psf_init.nspec - specmin if nspec is None else int(nspec)
    psf_init.check_fibers(specmin, nspec)
    if bundlesize < 1:
        raise ValueError(f"bundlesize must be >= 1, got {bundlesize}")
    if nblocks < 1:
        raise ValueError(f"nblocks must be >= 1, got {nblocks}")
    if waverange is None:
        waverange = (psf_init.wmin_all, psf_init.wmax_all)
    if not (psf_init.wmin <= waverange[0] < waverange[1] <= psf_init.wmax):
        raise ValueError(f"waverange {tuple(waverange)}: need wmin < wmax inside the PSF's "
                         f"{psf_init.wmin:.1f}-{psf_init.wmax:.1f} A")
    broken = check_broken_fibers(broken_fibers, specmin, nspec)
    edges = np.linspace(waverange[0], waverange[1], nblocks + 1)
    bundles = [np.arange(s, min(s + bundlesize, specmin + nspec)) for s in range(specmin, specmin + nspec, bundlesize)]
    offsets, align_errors = [None] * len(bundles), {}
    start = psf_init
    if align:  # before any check: the start's traces shifted onto the images, bundle by bundle
        start, offsets, align_errors = align_bundles(psf_init, arcs, flats, bundles, broken, lines=lines,
                                                     waverange=waverange, max_shift=max_shift)
    index = {int(b[0]): i for i, b in enumerate(bundles)}
    # every patch checked before the first is fitted
    check_keys = ("what", "trace_deg", "gh_terms", "flat_deg")
    ckw = {k: fit_kwargs[k] for k in check_keys if k in fit_kwargs}

    def check(fib, bb):
        err = align_errors.get(index[int(fib[0])])
        if err is not None:
            raise err
        for b in range(nblocks):
            check_patch(start, arcs, flats, lines=lines, fibers=fib, waverange=(edges[b], edges[b + 1]),
                        broken_fibers=bb, **ckw)
        box = start.xyrange((int(fib[0]), int(fib[-1]) + 1), waverange)
        check_fiber_light(start, arcs, flats, lines=lines, fibers=fib, box=box, broken_fibers=bb)

    pre = precheck_bundles(bundles, broken, check, specmin, bundlesize)
    # the bundles fitted start from the aligned traces; those flagged keep the input's
    xcoef = np.array(psf_init.xcoef)
    ycoef = np.array(psf_init.ycoef)
    xcoef_al, ycoef_al = np.asarray(start.xcoef), np.asarray(start.ycoef)
    for ib, fib in enumerate(bundles):
        if ib not in pre:
            xcoef[fib], ycoef[fib] = xcoef_al[fib], ycoef_al[fib]
    pars = np.array(psf_init.params)
    fits_out: list[FitResult] = []
    status_out: list[BundleStatus] = []
    total = (len(bundles) - len(pre)) * nblocks
    wc = 0.5 * (edges[:-1] + edges[1:])
    for ib, fib in enumerate(bundles):
        if ib in pre:
            status_out.append(pre[ib])
            if bundle_progress is not None:
                bundle_progress(pre[ib], len(bundles))
            continue
        bundle = bundle_id(fib, ib, specmin, bundlesize)
        bb = fib[np.isin(fib, broken)]
        res = []
        saved = (np.array(psf_init.xcoef)[fib], np.array(psf_init.ycoef)[fib], pars[:, fib].copy())  # the input's
        try:
            for b in range(nblocks):
                fr = fit_psf(start, arcs, flats, lines=lines, fibers=fib, waverange=(edges[b], edges[b + 1]),
                             broken_fibers=bb, **fit_kwargs)
                res.append(fr)
                fits_out.append(fr)
                if progress is not None:
                    progress(len(fits_out), total, fr)
            _merge_bundle(psf_init, fib, res, wc, nblocks, xcoef, ycoef, pars)
            if not (np.all(np.isfinite(xcoef[fib])) and np.all(np.isfinite(ycoef[fib]))
                    and np.all(np.isfinite(pars[:, fib]))):
                raise FloatingPointError("the fit gave non-finite coefficients")
            code = STATUS_OK if all(r.converged for r in res) else STATUS_NOT_CONVERGED
            st = BundleStatus(bundle, fib, code, float(sum(r.chi2 for r in res)),
                              int(sum(r.ndof + int(np.isfinite(np.diag(r.cov)).sum()) for r in res)),
                              int(sum(int(np.isfinite(np.diag(r.cov)).sum()) for r in res)), broken=bb)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:
            xcoef[fib], ycoef[fib], pars[:, fib] = saved
            log.warning("fit-psf: bundle %d (fibers %d-%d) failed, its input coefficients are kept: %s",
                        bundle, fib[0], fib[-1], err)
            st = BundleStatus(bundle, fib, STATUS_FAILED, float("nan"), 0, 0, str(err), broken=bb)
        status_out.append(st)
        if bundle_progress is not None:
            bundle_progress(st, len(bundles))
    set_status_row(psf_init, pars, status_out, broken)
    psf = eqx.tree_at(lambda p: p.params, psf_init, jnp.asarray(pars)).with_traces(jnp.asarray(xcoef), jnp.asarray(ycoef))
    return CCDFit(psf, fits_out, status_out, broken, offsets)
