"""The full model of one bundle: every trace and shape coefficient, fitted over all its rows at once.

The bundle's CCD rows are cut into blocks of ``rows_per_block`` rows (all of one
shape, so one compiled function serves every block, vmapped over them).  The
PSF parameters are shared by the blocks: per-fiber offsets of the first
``trace_deg + 1`` Legendre coefficients of the x and y traces, and the full
model ``pc`` (every GHSIGX, GHSIGY and GH-i-j but GH-0-0 as a Legendre series of
degree ``legdeg_fiber`` over the bundle's fibers and ``legdeg_wave`` in
wavelength, added to the starting PSF's coefficients: the file's own form).
The line fluxes and flat amplitudes are linear and local to a block.  Pixels beyond
the reach of the bundle's own stamps get no weight (``calib_patch(mask_neighbours=True)``):
only the next bundle's fibers, which are not modelled, light them.

A broken fiber (``broken_fibers``) stays in its bundle's patches with no light: its
spots are zeroed, so its trace offsets and fluxes have zero Jacobian columns and are
held at 0, and its coefficients in the result are the input's, bit for bit.  The
bundle's fiber-direction series keeps its abscissa over the whole bundle (fiber
``f0 + i`` at ``t_i``, as without the broken fiber) and is fitted to the good fibers
only: their model is the same function of fiber position as without the broken fiber,
just with one fiber's data fewer.  (Re-spacing the series over the good fibers would
bend its fiber dependence; dropping the fiber from the patch would give its bundle
another shape, and another compilation.)  So every bundle keeps one shape and all
still share one compiled function.

Many bundles (the whole CCD, :func:`fit_psf_full`) are fitted together: all
their blocks are padded to one shape (a bundle with fewer blocks gets blocks of
zero weight), stacked, and evaluated ``patches_per_call`` at a time by one
compiled, vmapped function; each bundle keeps its own Levenberg-Marquardt
damping, the bundles stepping in lockstep.

Each Gauss-Newton iteration builds every block's ``J^T J``, ``J^T r``
(:meth:`CalibPatch.normal_equations`), eliminates the block's linear
parameters on the device (Schur complement), sums the reduced PSF systems and
takes a Levenberg-Marquardt step on the PSF parameters (all on the device, every
bundle at once), the linear ones following at their conditional optimum.  A bundle
stops when the next Gauss-Newton step is shorter than ``step_tol`` in sigma units
(:func:`_distances`) or an accepted step lowered chi2 by less than ``chi2_atol``; its
calls are then skipped.  The PSF covariance is the inverse of the summed reduced
system (marginalised over fluxes).  The spots
stay normalised (the model divides by the stamp sum, GH-0-0 is fixed); a step
that makes a width non-positive gives a non-finite chi2 and is refused.

Options (off by default; off, the fitted terms and the compiled program are those above):
``fit_tails`` adds TAILAMP, the amplitude of the power-law tail, to the shape terms (the same
bundle series; as specex's ``--fit-psf-tails``, TAILCORE, TAILXSCA, TAILYSCA and TAILINDE stay
the file's); a step that makes TAILAMP negative at a modelled spot is refused.
``fit_continuum`` models each arc's continuum (specex's ``--fit-continuum``): per arc, fiber and
block a Legendre series of degree ``cont_deg`` in wavelength [photons / A], spread along the
trace by the PSF's spots, linear parameters like the flat amplitudes; the fit is written to the
PSF's CONT row in specex's units (electrons per CCD row, :func:`_continuum_rows`).
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

from .._simulation.calib import LineList
from ..psf._gausshermite import GaussHermitePSF
from .align import TraceOffset, align_bundles, apply_trace_offsets, measure_bundle_offset
from .ccd import (STATUS_FAILED, STATUS_NOT_CONVERGED, STATUS_OK, BundleStatus, CCDFit, bundle_id, precheck_bundles,
                  set_status_row)
from .params import FiberIndices, apply_psf_params, bundle_series_start, shape_terms_of
from .patch import (BrokenFibers, BundleInputError, CalibPatch, _host_patch, _host_y, check_broken_fibers,
                    check_fiber_light, check_patch, pad_host_patch, stack_host_patches, without_idle_tails)
from .result import FitResult
from .solver import fit_psf

log = logging.getLogger("jaxspec.fit")

__all__ = ["BundleFit", "bundle_residuals", "fit_bundle", "fit_psf_full"]


@dataclasses.dataclass
class BundleFit:
    """Outcome of :func:`fit_bundle`.

    Attributes:
        psf: the starting PSF with this bundle's fitted coefficients (inverse trace refitted).
        params: ``dx``, ``dy`` ``(nf, trace_deg + 1)`` [pixels] trace-coefficient
            offsets, ``pc`` ``(nterm, legdeg_fiber + 1, legdeg_wave + 1)`` shape offsets.
        errors: their 1-sigma uncertainties (Gauss-Newton, marginalised over fluxes).
        cov: ``(npsf, npsf)`` covariance of the flat PSF parameters (``dx``, ``dy``, ``pc`` order).
        chi2, ndata, npar: pixel chi2, fitted pixels, free parameters (PSF + linear).
        niter, converged, chi2_history: iterations, stopping rule met, chi2 per iteration.
        fibers, boxes: the fibers and the pixel box of every block.
        shape_terms: the parameter names of ``pc``'s rows.
        psf_init: the starting PSF.
        seconds: wall time of the fit (set-up, compilation and all bundles fitted with it);
        compile_seconds: its compilation (first call of each compiled function less a later call).
        live: ``(nf,)`` bool, False for a broken fiber (not fitted; its ``dx``, ``dy`` are 0
            with an infinite error and ``psf`` keeps its input coefficients).
        cont_coef: ``(nf, ncoef)`` the CONT coefficients written (``fit_continuum``: the arcs'
            mean continuum [electrons per CCD row], a Legendre series over the PSF's wavelength
            domain; broken fibers the input's), else None.
        offset: the trace offset measured and added to the start before the checks and the fit
            (``align``, :func:`jaxspec._fit.align.measure_bundle_offset`; ``psf_init`` has it), else None.
    """

    psf: GaussHermitePSF
    params: dict
    errors: dict
    cov: np.ndarray
    chi2: float
    ndata: int
    npar: int
    niter: int
    converged: bool
    chi2_history: list
    fibers: np.ndarray
    boxes: list
    shape_terms: tuple
    psf_init: GaussHermitePSF | None = None
    seconds: float = 0.0
    compile_seconds: float = 0.0
    live: np.ndarray | None = None
    cont_coef: np.ndarray | None = None
    offset: TraceOffset | None = None

    @property
    def psf_cov(self) -> np.ndarray:
        """The PSF covariance (``cov``; for :func:`propagate_psf_uncertainty` with :func:`flux_jacobian`)."""
        return self.cov

    @property
    def reduced_chi2(self) -> float:
        """chi2 / (ndata - npar)."""
        return float(self.chi2 / max(self.ndata - self.npar, 1))


def _schur_one(patch: CalibPatch, theta, npsf: int):
    """One block: chi2 and its normal equations with the block's linear parameters eliminated."""
    chi2, a, b = patch.normal_equations(patch.unflatten(theta))
    agg, agl, all_ = a[:npsf, :npsf], a[:npsf, npsf:], a[npsf:, npsf:]
    bg, bl = b[:npsf], b[npsf:]
    d = jnp.diagonal(all_)
    active = d > 0
    sc = jnp.where(active, 1.0 / jnp.sqrt(jnp.where(active, d, 1.0)), 0.0)
    als = all_ * sc[:, None] * sc[None, :] + jnp.diag(jnp.where(active, 0.0, 1.0))
    rhs = jnp.concatenate([agl.T * sc[:, None], (bl * sc)[:, None]], axis=1)
    x = jnp.linalg.solve(als, rhs) * sc[:, None]  # (nloc, npsf + 1): A_ll^-1 [A_lg, b_l]
    s = agg - agl @ x[:, :npsf]
    r = bg - agl @ x[:, npsf]
    return chi2, s, r, x[:, :npsf], x[:, npsf], active


@eqx.filter_jit
def _schur_chunk(patches: CalibPatch, tgp, tl, seg, nseg: int):
    """One call's blocks: chi2, R, X_g, x_b, active per block; S summed per bundle (``seg``)."""
    npsf = tgp.shape[-1]
    th = jnp.concatenate([tgp, tl], axis=1)
    c, s, r, xg, xb, act = jax.vmap(lambda p, t: _schur_one(p, t, npsf))(patches, th)
    return c, jax.ops.segment_sum(s, seg, num_segments=nseg), r, xg, xb, act


@eqx.filter_jit
def _trial_chunk(patches: CalibPatch, tgp, dgp, tl, xg, xb):
    """chi2 per block after the step ``dgp`` (linear parameters at their conditional optimum)."""
    tln = tl + xb - jnp.einsum("plg,pg->pl", xg, dgp)
    th = jnp.concatenate([tgp + dgp, tln], axis=1)
    return jax.vmap(lambda p, t: p.chi2(p.unflatten(t)))(patches, th), tln


@functools.partial(jax.jit, static_argnums=4)
def _bundle_systems(ss, rs, seg_owner, owner, nb: int):
    """Every bundle's reduced system from the calls' outputs, on the device: ``S`` ``(nb, npsf,
    npsf)`` from the calls' per-segment sums ``ss`` (segment ``i`` of all calls, in order, is
    bundle ``seg_owner[i]``), ``R`` ``(nb, npsf)`` from the blocks' ``rs`` (block ``j`` is bundle
    ``owner[j]``)."""
    S = jax.ops.segment_sum(jnp.concatenate(ss), seg_owner, num_segments=nb)
    return S, jax.ops.segment_sum(jnp.concatenate(rs), owner, num_segments=nb)


def _scaled(S, on, shift=None):
    """Jacobi-scaled ``S`` (``(..., n, n)``; ``+ shift * diag(S)``) over the parameters ``on``, the
    others' rows and columns replaced by those of the identity; and the scale."""
    d = jnp.diagonal(S, axis1=-2, axis2=-1)
    da = d if shift is None else d * (1.0 + shift[..., None])
    sc = jnp.where(on, 1.0 / jnp.sqrt(jnp.where(on, da, 1.0)), 0.0)
    eye = jnp.broadcast_to(jnp.eye(S.shape[-1], dtype=S.dtype), S.shape)
    a = S if shift is None else S + shift[..., None, None] * d[..., None, :] * eye
    return a * sc[..., :, None] * sc[..., None, :] + jnp.where(on, 0.0, 1.0)[..., None] * eye, sc


@jax.jit
def _lm_steps(S, R, lam):
    """Levenberg-Marquardt steps of every bundle, ``(S + lam diag(S))^-1 R`` over the parameters
    with a non-empty row (the others 0): ``(nb, npsf)``, and whether each is finite."""
    on = jnp.diagonal(S, axis1=-2, axis2=-1) > 1e-300
    a, sc = _scaled(S, on, lam)
    x = jnp.linalg.solve(a, (R * sc)[..., None])[..., 0] * sc
    fin = jnp.all(jnp.isfinite(x), axis=-1)
    return jnp.where(fin[:, None], x, 0.0), fin


@jax.jit
def _distances(S, R):
    """Length of every bundle's undamped Gauss-Newton step ``S^-1 R`` in sigma units,
    ``sqrt(R^T S^-1 R)``: ``(nb,)``.

    It bounds the step of every linear combination of the parameters in units of its
    uncertainty (and is the chi2 fall the step predicts, square-rooted); parameters with an
    empty row of ``S`` are left out (none: 0), a singular system gives infinity.
    """
    on = jnp.diagonal(S, axis1=-2, axis2=-1) > 1e-300
    a, sc = _scaled(S, on)
    rs = R * sc
    v = jnp.sum(jnp.linalg.solve(a, rs[..., None])[..., 0] * rs, axis=-1)
    dist = jnp.sqrt(jnp.maximum(v, 0.0))
    return jnp.where(jnp.any(on, axis=-1), jnp.where(jnp.isfinite(dist), dist, jnp.inf), 0.0)


@jax.jit
def _covariances(S):
    """The inverse of every bundle's ``S`` over its parameters with a non-empty row (Jacobi-scaled,
    symmetrised; the other rows and columns 0): ``(nb, npsf, npsf)``."""
    on = jnp.diagonal(S, axis1=-2, axis2=-1) > 1e-300
    a, sc = _scaled(S, on)
    inv = jnp.linalg.inv(a) * sc[..., :, None] * sc[..., None, :]
    return 0.5 * (inv + jnp.swapaxes(inv, -1, -2))


def bundle_blocks(psf: GaussHermitePSF, fibers, waverange, rows_per_block: int) -> list[tuple[int, int, int, int]]:
    """Pixel boxes of a bundle's row blocks: one x range, rows ``rows_per_block`` at a time.

    The rows span the bundle's spots over ``waverange``; the blocks do not
    overlap, so every pixel is fitted once.
    """
    f0, nf = int(fibers[0]), len(fibers)
    x0, x1, y0, y1 = psf.xyrange((f0, f0 + nf), waverange)
    nb = -(-(y1 - y0) // rows_per_block)
    return [(x0, x1, y0 + b * rows_per_block, y0 + (b + 1) * rows_per_block) for b in range(nb)]


def _resolve(psf_init, *, waverange, rows_per_block, trace_deg, shape_terms, legdeg_fiber, legdeg_wave,
             fit_tails=False, fit_continuum=False, cont_deg=2, narc=0) -> dict:
    """The options all bundles share, checked once before any bundle is set up."""
    if not isinstance(psf_init, GaussHermitePSF):
        raise TypeError(f"PSF fitting needs a GaussHermitePSF, got {type(psf_init).__name__}")
    if fit_tails and not psf_init.has_tails:
        raise ValueError("fit_tails (--fit-psf-tails): the starting PSF has no TAIL* parameters "
                         "(TAILAMP, TAILCORE, TAILXSCA, TAILYSCA, TAILINDE) to fit")
    if fit_continuum:
        if not narc:
            raise ValueError("fit_continuum (--fit-continuum) models the arcs' continuum: give at least one arc")
        if isinstance(cont_deg, bool) or not isinstance(cont_deg, (int, np.integer)) or cont_deg < 0:
            raise ValueError(f"cont_deg (--continuum-deg) must be an integer >= 0, got {cont_deg!r}")
    if rows_per_block < 16 or rows_per_block % 16:
        raise ValueError(f"rows_per_block must be a positive multiple of 16, got {rows_per_block}")
    if waverange is None:
        waverange = (psf_init.wmin_all, psf_init.wmax_all)
    if not (psf_init.wmin <= waverange[0] < waverange[1] <= psf_init.wmax):
        raise ValueError(f"waverange {tuple(waverange)}: need wmin < wmax inside the PSF's "
                         f"{psf_init.wmin:.1f}-{psf_init.wmax:.1f} A")
    if trace_deg is None:
        trace_deg = min(psf_init.xcoef.shape[1], psf_init.ycoef.shape[1]) - 1
    sterms = shape_terms_of(psf_init) if shape_terms is None else tuple(shape_terms)
    if fit_tails and "TAILAMP" not in sterms:
        sterms = sterms + ("TAILAMP",)
    for n in sterms:
        psf_init.param_index(n)
    sig = tuple(n for n in sterms if n in ("GHSIGX", "GHSIGY"))
    if sterms[:len(sig)] != sig:
        raise ValueError(f"shape_terms must list GHSIGX / GHSIGY first, got {sterms}")
    ncoef = psf_init.params.shape[2]
    if legdeg_wave is not None and not 0 <= int(legdeg_wave) < ncoef:
        raise ValueError(f"legdeg_wave must be in 0..{ncoef - 1} (the file's coefficients), got {legdeg_wave}")
    if legdeg_fiber < 0:
        raise ValueError(f"legdeg_fiber must be >= 0, got {legdeg_fiber}")
    return dict(waverange=tuple(float(w) for w in waverange), trace_deg=int(trace_deg), sterms=sterms,
                cont_deg=int(cont_deg) if fit_continuum else None)


def _check_bundle(psf_init, arcs, flats, fib, broken, *, lines, waverange, rows_per_block, trace_deg, flat_deg,
                  legdeg_fiber) -> None:
    """Every check of one bundle's blocks, before any set-up: options (``ValueError``) and data
    (:class:`BundleInputError`: no arc line or lamp light, no valid pixel, too few good fibers for
    ``legdeg_fiber``, a fiber without light not in ``broken``)."""
    nlive = len(fib) - len(broken)
    if legdeg_fiber >= nlive:
        raise BundleInputError(
            f"fibers {fib[0]}-{fib[-1]}: {nlive} fiber(s) not broken, too few for a fiber-direction Legendre "
            f"degree {legdeg_fiber} (legdeg_fiber, --legendre-deg-x; --broken-fibers): it needs {legdeg_fiber + 1}")
    nlines = 0
    for b in bundle_blocks(psf_init, fib, waverange, rows_per_block):
        plines = check_patch(psf_init, arcs, flats, lines=lines, fibers=fib, xyrange=b,
                             what=("xtrace", "ytrace", "shape"), trace_deg=trace_deg, flat_deg=flat_deg,
                             allow_no_lines=True, bucket=16, broken_fibers=broken)[3]
        nlines += 0 if plines is None else len(plines)
    if len(arcs) and nlines == 0:
        raise BundleInputError(f"no arc line falls on fibers {fib[0]}-{fib[-1]} over {tuple(waverange)} A: "
                               "give a line list (--lines) with lines there or widen the range")
    box = psf_init.xyrange((int(fib[0]), int(fib[-1]) + 1), waverange)
    check_fiber_light(psf_init, arcs, flats, lines=lines, fibers=fib, box=box, broken_fibers=broken)


def _setup_blocks(psf_init, arcs, flats, bundles, broken, *, lines, waverange, rows_per_block, trace_deg, sterms,
                  legdeg_fiber, legdeg_wave, flat_deg, patches_per_call, cont_deg=None):
    """Every block of every bundle (equal sizes), set up on the host and padded to one shape.

    Returns ``(chunks, owner, nper, boxes, npix)``: the stacked :class:`CalibPatch` of each
    call (``patches_per_call`` blocks), the bundle of every block (in order; the zero-weight
    blocks that fill a bundle to ``nper`` blocks are its own, those that fill the last call
    belong to a dummy bundle ``len(bundles)``), the
    blocks' pixel boxes per bundle and every block's count of weighted pixels.
    """
    kw = dict(lines=lines, what=("xtrace", "ytrace", "shape"), trace_deg=trace_deg, shape_terms=sterms,
              legdeg_fiber=legdeg_fiber, legdeg_wave=legdeg_wave, flat_deg=flat_deg, allow_no_lines=True,
              bucket=16, mask_neighbours=True, specmin=0, nspec=None, waverange=None, gh_terms=(),
              per_fiber_gh=False, flat_lamp=None, flat_dw=0.5, band_margin=3, pad_to=None,
              data_checks=False, cont_deg=cont_deg)  # checked before (_check_bundle)
    boxes = [bundle_blocks(psf_init, fib, waverange, rows_per_block) for fib in bundles]
    host = [[_host_patch(psf_init, arcs, flats, fibers=fib, xyrange=b, broken_fibers=bb, **kw) for b in bx]
            for fib, bx, bb in zip(bundles, boxes, broken)]
    sizes = {k: max(getattr(h["static"], k) for hs in host for h in hs) for k in ("H", "W", "Wb", "nline", "nsamp")}
    nper = max(len(bx) for bx in boxes)
    B = len(bundles)
    C = int(patches_per_call)
    blocks, owner = [], []
    for b, hs in enumerate(host):
        row = [pad_host_patch(psf_init, h, sizes) for h in hs]
        blocks += row
        owner += [b] * len(row)
        for _ in range(nper - len(row)):  # zero weight: no pixels (a bundle with fewer blocks)
            blocks.append(_no_weight(row[0]))
            owner.append(b)
    while len(blocks) % C:  # whole calls: zero-weight copies, owned by a dummy bundle
        blocks.append(_no_weight(blocks[0]))
        owner.append(B)
    npix = np.array([np.count_nonzero(h["arrays"]["sqw"]) for h in blocks], float)
    model_psf = without_idle_tails(psf_init, sterms)  # the same spots; closed-form GH derivatives
    chunks = [stack_host_patches(model_psf, blocks[c:c + C]) for c in range(0, len(blocks), C)]
    return chunks, np.asarray(owner), nper, boxes, npix


def _no_weight(h: dict) -> dict:
    """A host block with no weight anywhere (fills a bundle or a call)."""
    return dict(h, arrays=dict(h["arrays"], sqw=np.zeros_like(h["arrays"]["sqw"])))


def _fit_bundles(psf_init, arcs, flats, bundles, broken, ids, *, lines, waverange, rows_per_block, trace_deg, sterms,
                 legdeg_fiber, legdeg_wave, flat_deg, maxiter, step_tol, chi2_rtol, chi2_atol, lam0,
                 patches_per_call, callback, bundle_progress, nbundles, cont_deg=None):
    """Fit the full model of every bundle in ``bundles`` (equal sizes; checked by
    :func:`_check_bundle`; ``broken[i]`` its broken fibers, ``ids[i]`` its number) together;
    returns ``(fits, statuses)`` (a failed bundle's fit is None)."""
    t0 = time.perf_counter()
    if len({len(b) for b in bundles}) != 1:
        raise ValueError("bundles fitted together must have the same number of fibers")
    B = len(bundles)
    C = max(1, int(patches_per_call))  # blocks per compiled call
    chunks, owner, nper, boxes, npix_p = _setup_blocks(
        psf_init, arcs, flats, bundles, broken, lines=lines, waverange=waverange, rows_per_block=rows_per_block,
        trace_deg=trace_deg, sterms=sterms, legdeg_fiber=legdeg_fiber, legdeg_wave=legdeg_wave, flat_deg=flat_deg,
        patches_per_call=C, cont_deg=cont_deg)
    nchunk = len(chunks)
    lay = chunks[0].layout
    psf_keys = [k for k in ("dx", "dy", "pc") if k in lay.slices]
    npsf = lay.slices[psf_keys[-1]].stop
    nloc = lay.size - npsf
    npix = np.bincount(owner, weights=npix_p, minlength=B + 1)[:B]
    log.info("fit-psf: %d bundles set up as %d blocks (%d calls of %d) in %.1f s", B, nchunk * C, nchunk, C,
             time.perf_counter() - t0)
    nseg = -(-C // nper) + 1
    first_owner = [int(owner[c * C]) for c in range(nchunk)]
    segs = [jnp.asarray(owner[c * C:(c + 1) * C] - first_owner[c], jnp.int32) for c in range(nchunk)]
    Bp = B + 1

    tg = np.zeros((Bp, npsf))
    tl = [jnp.zeros((C, nloc)) for _ in range(nchunk)]

    def per_bundle(vals):  # per-block values of all calls -> per-bundle sums
        return np.bincount(owner, weights=np.concatenate(vals), minlength=Bp)

    cache = [None] * nchunk  # the last _schur_chunk output of every call

    # the bundle of each call's segment of S (Bp: none, dropped by the segment sum)
    seg_owner = np.array([first_owner[c] + k for c in range(nchunk) for k in range(nseg)])
    seg_owner = jnp.asarray(np.where(seg_owner < Bp, seg_owner, Bp), jnp.int32)
    owner_d = jnp.asarray(owner, jnp.int32)

    def schur(need):
        """The reduced systems ``S``, ``R`` of every bundle (on the device) and the distance of each
        to its minimum; only the calls holding a block of a bundle with ``need`` are recomputed."""
        for c in range(nchunk):
            if cache[c] is None or need[owner[c * C:(c + 1) * C]].any():
                cache[c] = _schur_chunk(chunks[c], jnp.asarray(tg[owner[c * C:(c + 1) * C]]), tl[c], segs[c], nseg)
        out = cache
        chi2 = per_bundle([np.asarray(o[0]) for o in out])
        S, R = _bundle_systems(tuple(o[1] for o in out), tuple(o[2] for o in out), seg_owner, owner_d, Bp)
        dist = np.asarray(_distances(S, R))
        return chi2, S, R, dist, [o[3] for o in out], [o[4] for o in out], [o[5] for o in out]

    def trial(dg, active):
        """chi2 per bundle after the steps ``dg``; calls without a block of an ``active`` bundle are skipped."""
        vals, tln = [], []
        for c in range(nchunk):
            own = owner[c * C:(c + 1) * C]
            if active[own].any():
                o = _trial_chunk(chunks[c], jnp.asarray(tg[own]), jnp.asarray(dg[own]), tl[c], XG[c], XB[c])
                vals.append(np.asarray(o[0]))
                tln.append(o[1])
            else:
                vals.append(np.full(C, np.inf))
                tln.append(tl[c])
        return per_bundle(vals), tln

    everyone = np.ones(Bp, bool)
    tc = time.perf_counter()
    chi2, S, R, dist, XG, XB, ACT = schur(everyone)
    t_first = time.perf_counter() - tc
    tl = [tl[c] + XB[c] for c in range(nchunk)]  # the linear parameters at their optimum for the start
    tc = time.perf_counter()
    chi2, S, R, dist, XG, XB, ACT = schur(everyone)
    t_second = time.perf_counter() - tc
    lam = np.full(Bp, lam0)
    t_lm = []
    for _ in range(2):  # compile the damped solves (the first call less the second: compilation)
        tc = time.perf_counter()
        jax.block_until_ready(_lm_steps(S, R, jnp.asarray(lam)))
        t_lm.append(time.perf_counter() - tc)
    schur_times = []
    trial_times, trial_calls = [], []
    done = np.zeros(Bp, bool)
    done[B:] = True
    failed = np.zeros(Bp, bool)
    converged = np.zeros(Bp, bool)
    niter = np.zeros(Bp, int)
    hist = [[float(chi2[b])] for b in range(B)]
    steps = [[] for _ in range(B)]  # the next step's length [sigma] after each iteration
    why = [""] * B  # the stopping rule that stopped each bundle
    msg = [""] * B
    for b in range(B):
        if not np.isfinite(chi2[b]):
            failed[b] = done[b] = True
            msg[b] = "non-finite chi2 at the start"
    report = callback or (lambda b, it, c, st, lm: log.info(
        "fit-psf bundle fibers %d-%d: iter %2d chi2 %.6g (chi2/dof %.4f) next step %.3g sigma lambda %.1e",
        bundles[b][0], bundles[b][-1], it, c, c / max(npix[b] - npsf - nper * nloc, 1), st, lm))
    for b in range(B):
        report(b, 0, chi2[b], np.inf, 0.0)
    for _ in range(4 * maxiter):
        if np.all(done):
            break
        dg, fin = (np.asarray(v) for v in _lm_steps(S, R, jnp.asarray(lam)))
        dg = np.where(done[:, None], 0.0, dg)
        lam = np.where(~done & ~fin, lam * 10.0, lam)  # a singular system: more damping
        tc = time.perf_counter()
        chi2_new, tl_new = trial(dg, ~done)
        trial_times.append(time.perf_counter() - tc)
        trial_calls.append(int(sum((~done)[owner[c * C:(c + 1) * C]].any() for c in range(nchunk))))
        ok = ~done & np.isfinite(chi2_new) & (chi2_new <= chi2) & np.any(dg != 0, axis=1)
        for b in np.where(~done & ~ok)[0]:
            lam[b] *= 4.0
            if lam[b] > 1e8:  # no step lowers chi2 any more: the minimum
                done[b] = converged[b] = True
                why[b] = "no step lowers chi2"
        if not np.any(ok):
            continue
        oke = ok[owner]
        tg = np.where(ok[:, None], tg + dg, tg)
        tl = [jnp.where(jnp.asarray(oke[c * C:(c + 1) * C])[:, None], tl_new[c], tl[c]) for c in range(nchunk)]
        old = chi2.copy()
        tc = time.perf_counter()
        chi2, S, R, dist, XG, XB, ACT = schur(ok)
        schur_times.append(time.perf_counter() - tc)
        for b in np.where(ok)[0]:
            niter[b] += 1
            hist[b].append(float(chi2[b]))
            steps[b].append(float(dist[b]))
            report(b, int(niter[b]), chi2[b], dist[b], lam[b])
            lam[b] = max(lam[b] / 5.0, 1e-12)
            fall = old[b] - chi2[b]
            if dist[b] < step_tol or fall < chi2_atol or fall < chi2_rtol * chi2[b]:
                done[b] = converged[b] = True
                why[b] = (f"next step {dist[b]:.2g} sigma" if dist[b] < step_tol else
                          f"chi2 fell by {fall:.2g}")
            elif niter[b] >= maxiter:
                done[b] = True
                why[b] = "maxiter"
    seconds = time.perf_counter() - t0
    log.info("fit-psf: %d passes, trial %.2f s (median), reduced systems %.2f s (median; %.2f s the first, "
             "compilation included), %.1f s in all", len(trial_times), np.median(trial_times or [0.0]),
             np.median(schur_times or [0.0]), t_first, seconds)
    # compilation: the first call of each compiled function less a later one
    # (a trial's time scales with the calls it evaluates: bundles that stopped are skipped)
    per_call = [t / max(n, 1) for t, n in zip(trial_times[1:], trial_calls[1:])]
    compile_s = max(t_first - t_second, 0.0) + (max(trial_times[0] - trial_calls[0] * float(np.median(per_call)), 0.0)
                                                if per_call else 0.0) + max(t_lm[0] - t_lm[1], 0.0)
    for b in range(B):
        if not failed[b]:
            falls = -np.diff(hist[b][-4:])
            log.info("fit-psf bundle fibers %d-%d: %d iterations, stopped by %s; chi2 %.6g, its last falls %s, "
                     "next step %.3g sigma", bundles[b][0], bundles[b][-1], niter[b], why[b] or "?", chi2[b],
                     " ".join(f"{v:.3g}" for v in falls), steps[b][-1] if steps[b] else np.inf)
    covs = np.asarray(_covariances(S))
    S = np.asarray(S)
    fits, statuses = [], []
    act = np.concatenate([np.asarray(a).sum(axis=1) for a in ACT])
    tl_opt = [tl[c] + XB[c] for c in range(nchunk)]  # the linear parameters at their optimum for the result
    for b, fib in enumerate(bundles):
        params = {k: tg[b, lay.slices[k]].reshape(lay.shapes[k]) for k in psf_keys}
        finite = np.isfinite(chi2[b]) and all(np.all(np.isfinite(v)) for v in params.values())
        live = ~np.isin(fib, broken[b])
        if failed[b] or not finite:
            st = BundleStatus(ids[b], np.asarray(fib), STATUS_FAILED, float("nan"), 0, 0, msg[b] or "non-finite fit",
                              broken=np.asarray(broken[b]))
            log.warning("fit-psf: bundle %d (fibers %d-%d) failed, its input coefficients are kept: %s",
                        st.bundle, fib[0], fib[-1], st.message)
            statuses.append(st)
            fits.append(None)
            if bundle_progress is not None:
                bundle_progress(st, nbundles)
            continue
        on = np.diag(S[b]) > 1e-300
        cov = np.where(on[:, None] & on[None, :], covs[b], np.nan)
        err = np.sqrt(np.where(np.isfinite(np.diag(cov)), np.abs(np.diag(cov)), np.inf))
        errors = {k: err[lay.slices[k]].reshape(lay.shapes[k]) for k in psf_keys}
        psf = apply_psf_params(psf_init, {k: jnp.asarray(v) for k, v in params.items()}, fib,
                               shape_terms=sterms, live=live).with_traces()
        cont = None
        if "cont_amp" in lay.slices:
            psf, cont = _continuum_rows(psf, fib, live, b, boxes[b], chunks, tl_opt, owner,
                                         lay.slices["cont_amp"], npsf)
        npar = int(on.sum()) + int(act[owner == b].sum())
        fr = BundleFit(psf=psf, params=params, errors=errors, cov=cov, chi2=float(chi2[b]), ndata=int(npix[b]),
                       npar=npar, niter=int(niter[b]), converged=bool(converged[b]), chi2_history=hist[b],
                       fibers=np.asarray(fib), boxes=boxes[b], shape_terms=sterms, psf_init=psf_init, seconds=seconds,
                       compile_seconds=compile_s, live=live, cont_coef=cont)
        fits.append(fr)
        st = BundleStatus(ids[b], np.asarray(fib), STATUS_OK if fr.converged else STATUS_NOT_CONVERGED, fr.chi2,
                          fr.ndata, fr.npar, broken=np.asarray(broken[b]))
        statuses.append(st)
        if bundle_progress is not None:
            bundle_progress(st, nbundles)
    return fits, statuses


def _continuum_rows(psf, fib, live, b, boxes, chunks, tl, owner, sl, npsf):
    """``psf`` with bundle ``b``'s fitted arc continuum in its CONT row (if it has one), and the coefficients.

    specex's convention (``specex_psf_fitter.cc``, ``specex_psf_io_gauss_hermite_psf_fits_3.cc``):
    CONT is the continuum in electrons per CCD row (spread across the columns by a profile of unit
    sum), a Legendre series in wavelength over the PSF's domain (its LEGDEGW, 2 in DESI's files).
    Here each block's series [photons / A] is sampled on its flat grid at the rows the block fits,
    the arcs averaged, times |dlambda / dy| of the fitted trace, and least-squares fitted per live
    fiber by a series of degree min(LEGDEGW, ncoef - 1).  Outside the fitted wavelengths the series
    is an extrapolation.

    Returns:
        ``(psf, coef)``: ``coef`` ``(nf, ncoef)`` (broken fibers the input's); ``psf`` unchanged
        when it has no CONT row.
    """
    if "CONT" not in psf.param_names:
        return psf, None
    r = psf.param_index("CONT")
    ncoef = psf.params.shape[2]
    deg = 2 if psf.legdeg is None else int(psf.legdeg[r][1])
    deg = max(0, min(deg, ncoef - 1))
    C = int(np.asarray(tl[0]).shape[0])
    waves, vals = [[] for _ in fib], [[] for _ in fib]
    k = 0
    for j in np.flatnonzero(owner == b):
        if k >= len(boxes):  # a zero-weight block filling the bundle
            break
        box = boxes[k]
        k += 1
        c, i = divmod(int(j), C)
        cb = np.asarray(chunks[c].cbasis[i])
        fw = np.asarray(chunks[c].fwave[i])
        ok = np.any(cb != 0, axis=1)
        if not np.any(ok):
            continue
        dw = float(cb[ok, 0][0])  # column 0 is dw * P_0
        amp = np.asarray(tl[c][i])[sl.start - npsf:sl.stop - npsf].reshape(-1, len(fib), cb.shape[1])
        per_a = np.einsum("afk,sk->fs", amp, cb[ok]) / (dw * amp.shape[0])  # (nf, ns) photons / A, mean of arcs
        w = fw[ok]
        y = _host_y(psf, fib, w)
        dydw = _host_y(psf, fib, w + 0.5) - _host_y(psf, fib, w - 0.5)
        inside = (y >= box[2]) & (y < box[3])
        for f in range(len(fib)):
            waves[f].append(w[inside[f]])
            vals[f].append(per_a[f, inside[f]] / np.abs(dydw[f, inside[f]]))
    pars = np.array(psf.params)
    lo, hi = psf.pdomain
    for f, fiber in enumerate(fib):
        w = np.concatenate(waves[f]) if waves[f] else np.zeros(0)
        if not live[f] or len(w) <= deg:
            continue
        t = (w - lo) * (2.0 / (hi - lo)) - 1.0
        coef, *_ = np.linalg.lstsq(np.polynomial.legendre.legvander(t, deg), np.concatenate(vals[f]), rcond=None)
        pars[r, fiber] = 0.0
        pars[r, fiber, :deg + 1] = coef
    out = eqx.tree_at(lambda p: p.params, psf, jnp.asarray(pars, dtype=psf.params.dtype))
    return out, pars[r, np.asarray(fib)].copy()


def fit_bundle(
    psf_init: GaussHermitePSF,
    arcs: Sequence = (),
    flats: Sequence = (),
    *,
    lines: LineList | None = None,
    fibers: FiberIndices,
    waverange: tuple[float, float] | None = None,
    rows_per_block: int = 128,
    trace_deg: int | None = None,
    shape_terms: Sequence[str] | None = None,
    legdeg_fiber: int = 1,
    legdeg_wave: int | None = None,
    flat_deg: int = 2,
    maxiter: int = 20,
    step_tol: float = 0.1,
    chi2_rtol: float = 1e-9,
    chi2_atol: float = 0.1,
    lam0: float = 1e-3,
    patches_per_call: int = 16,
    callback: Callable | None = None,
    broken_fibers: BrokenFibers = None,
    project_start: bool = True,
    align: bool = True,
    max_shift: float = 8.0,
    fit_tails: bool = False,
    fit_continuum: bool = False,
    cont_deg: int = 2,
) -> BundleFit:
    """Fit the full PSF model of one bundle to arcs and flats (see the module docstring).

    Args:
        psf_init: the starting PSF (e.g. another night's).
        arcs: arc calibration images, as for :func:`fit_psf`.
        flats: flat calibration images, as for :func:`fit_psf`.
        lines: the arc line list (required with arcs).
        fibers: the bundle's consecutive fibers.
        waverange: wavelengths [A] whose rows are fitted (default: the PSF's common range).
        rows_per_block: CCD rows per block (a multiple of 16).
        trace_deg: Legendre degree of the fitted trace offsets (default: the file's).
        shape_terms: the shape parameters fitted (default
            :func:`jaxspec._fit.params.shape_terms_of`: GHSIGX, GHSIGY, every GH-i-j but GH-0-0).
        legdeg_fiber: their Legendre degree over the bundle's fibers (specex's LEGDEGX).
        legdeg_wave: their degree in wavelength (default the file's: all its coefficients).
        flat_deg: Legendre degree of each fiber's flat amplitude inside a block.
        maxiter: Levenberg-Marquardt iterations at most, as in :func:`fit_psf`.
        step_tol: stop when the next Gauss-Newton step is shorter than this in sigma units
            (``sqrt(R^T S^-1 R)`` of the reduced system: no combination of the parameters is
            then further than ``step_tol`` of its uncertainty from the minimum).
        chi2_rtol: stop when chi2 changes by less than this fraction, as in :func:`fit_psf`.
        chi2_atol: stop when an accepted step lowers chi2 by less than this: its predicted fall
            is at least its length squared in sigma units, so such a step moved no combination
            of the parameters by more than ``sqrt(chi2_atol)`` of its uncertainty.
        lam0: the first damping, as in :func:`fit_psf`.
        patches_per_call: blocks evaluated by one compiled call (memory).
        callback: ``callback(bundle, iteration, chi2, distance, lambda)``, ``distance`` the next step's
            length in sigma units (the stopping rule; default: log at INFO).
        broken_fibers: fibers of the bundle without light (specex's ``--broken-fibers``): not
            fitted, their spots not modelled, their coefficients the input's; the bundle's
            fiber-direction series is fitted to the other fibers (see the module docstring).
        project_start: start from the projection of ``psf_init``'s shape coefficients on the
            bundle's series (:func:`jaxspec._fit.params.bundle_series_start`), so that the result
            is one series of degrees (``legdeg_fiber``, ``legdeg_wave``) per bundle, as specex's;
            False adds the series to ``psf_init``'s coefficients as they are.
        align: first measure the offset of the bundle's traces in the images
            (:func:`jaxspec._fit.align.measure_bundle_offset`) and add it to the start's traces
            (every fiber of the bundle, broken ones too), before the checks and the fit: a start
            a few pixels off (another night's) then still meets its lines.
        max_shift: the alignment's search window [pixels] on each axis.
        fit_tails: also fit TAILAMP, the power-law tail's amplitude, as a shape term (specex's
            ``--fit-psf-tails``; the other TAIL* fixed; kept >= 0 at the modelled spots).
        fit_continuum: model each arc's continuum (specex's ``--fit-continuum``), linear parameters
            solved with the fluxes; the result's CONT row holds it (:attr:`BundleFit.cont_coef`).
        cont_deg: the continuum's Legendre degree in wavelength within a block (``fit_continuum``).

    Returns:
        A :class:`BundleFit` (``offset``: the alignment's measured shift, ``psf_init``: the start
        with it).

    Raises:
        ValueError: bad input (:class:`jaxspec._fit.patch.BundleInputError` for the bundle's
            data: no arc line or lamp light, a fiber without light not in ``broken_fibers``),
            before any fitting; or the fit failed (non-finite chi2).
    """
    fibers = np.asarray(fibers, dtype=int)
    r = _resolve(psf_init, waverange=waverange, rows_per_block=rows_per_block, trace_deg=trace_deg,
                 shape_terms=shape_terms, legdeg_fiber=legdeg_fiber, legdeg_wave=legdeg_wave, fit_tails=fit_tails,
                 fit_continuum=fit_continuum, cont_deg=cont_deg, narc=len(arcs))
    broken = check_broken_fibers(broken_fibers, int(fibers[0]), len(fibers)) if fibers.size else np.zeros(0, int)
    offset = None
    if align and fibers.size:
        offset = measure_bundle_offset(psf_init, arcs, flats, lines=lines, fibers=fibers, waverange=r["waverange"],
                                       max_shift=max_shift, broken_fibers=broken)
        log.info("fit-psf: start PSF aligned, %s", offset.describe())
        psf_init = apply_trace_offsets(psf_init, [offset])
    _check_bundle(psf_init, arcs, flats, fibers, broken, lines=lines, waverange=r["waverange"],
                  rows_per_block=rows_per_block, trace_deg=r["trace_deg"], flat_deg=flat_deg, legdeg_fiber=legdeg_fiber)
    start = bundle_series_start(psf_init, [fibers], r["sterms"], legdeg_fiber, legdeg_wave,
                                broken) if project_start else psf_init
    fits, st = _fit_bundles(start, arcs, flats, [fibers], [broken], [0], lines=lines, waverange=r["waverange"],
                            rows_per_block=rows_per_block, trace_deg=r["trace_deg"], sterms=r["sterms"],
                            legdeg_fiber=legdeg_fiber, legdeg_wave=legdeg_wave, flat_deg=flat_deg, maxiter=maxiter,
                            step_tol=step_tol, chi2_rtol=chi2_rtol, chi2_atol=chi2_atol, lam0=lam0,
                            patches_per_call=patches_per_call,
                            callback=callback, bundle_progress=None, nbundles=1, cont_deg=r["cont_deg"])
    if fits[0] is None:
        raise ValueError(f"the fit of fibers {fibers[0]}-{fibers[-1]} failed: {st[0].message}")
    fits[0].offset = offset
    return fits[0]


def fit_psf_full(
    psf_init: GaussHermitePSF,
    arcs: Sequence = (),
    flats: Sequence = (),
    *,
    lines: LineList | None = None,
    specmin: int = 0,
    nspec: int | None = None,
    bundlesize: int = 25,
    waverange: tuple[float, float] | None = None,
    rows_per_block: int = 128,
    trace_deg: int | None = None,
    shape_terms: Sequence[str] | None = None,
    legdeg_fiber: int = 1,
    legdeg_wave: int | None = None,
    flat_deg: int = 2,
    maxiter: int = 20,
    step_tol: float = 0.1,
    chi2_rtol: float = 1e-9,
    chi2_atol: float = 0.1,
    lam0: float = 1e-3,
    patches_per_call: int = 16,
    callback: Callable | None = None,
    bundle_progress: Callable | None = None,
    broken_fibers: BrokenFibers = None,
    project_start: bool = True,
    align: bool = True,
    max_shift: float = 8.0,
    fit_tails: bool = False,
    fit_continuum: bool = False,
    cont_deg: int = 2,
) -> CCDFit:
    """The full model of every bundle of fibers ``specmin .. specmin + nspec - 1``, fitted together.

    All bundles' blocks share one compiled function (see the module docstring);
    arguments as :func:`fit_bundle`.  Every bundle is checked before any is fitted: a
    bad option raises ``ValueError``; a bundle whose data fail the checks (no arc line
    or lamp light, a fiber without light not in ``broken_fibers``, fewer good fibers than
    ``legdeg_fiber + 1``) is flagged (status 2) and not fitted, the others go on
    (``ValueError`` when that leaves none).  A bundle whose fit fails keeps its input
    coefficients and is flagged (status 2); one all of whose fibers are broken, status 3.
    With ``align`` (default) every bundle's trace offset is measured first
    (:func:`jaxspec._fit.align.measure_bundle_offset`) and added to the start's traces before
    the checks and the fit; a bundle whose offset cannot be measured (no light, the peak at the
    edge of ``max_shift`` or ambiguous) is flagged (status 2) like one failing the checks.

    Returns:
        A :class:`CCDFit`: the PSF with every fitted bundle's coefficients, the
        :class:`BundleFit` of every bundle (None where it was not fitted or failed), the
        statuses, the broken fibers (``STATUS`` row 3, header ``NBROKEN``/``BROKEN``), the
        measured offsets (``offsets``; header ``BnnALDX``/``BnnALDY``).
    """
    nspec = psf_init.nspec - specmin if nspec is None else int(nspec)
    psf_init.check_fibers(specmin, nspec)
    if bundlesize < 1:
        raise ValueError(f"bundlesize must be >= 1, got {bundlesize}")
    broken = check_broken_fibers(broken_fibers, specmin, nspec)
    r = _resolve(psf_init, waverange=waverange, rows_per_block=rows_per_block, trace_deg=trace_deg,
                 shape_terms=shape_terms, legdeg_fiber=legdeg_fiber, legdeg_wave=legdeg_wave, fit_tails=fit_tails,
                 fit_continuum=fit_continuum, cont_deg=cont_deg, narc=len(arcs))
    bundles = [np.arange(s, min(s + bundlesize, specmin + nspec)) for s in range(specmin, specmin + nspec, bundlesize)]
    t_check = time.perf_counter()
    aligned, offsets, align_errors = psf_init, [None] * len(bundles), {}
    if align:  # before any check: a bundle that cannot be aligned is flagged with the checks' failures
        aligned, offsets, align_errors = align_bundles(psf_init, arcs, flats, bundles, broken, lines=lines,
                                                       waverange=r["waverange"], max_shift=max_shift)
        log.info("fit-psf: %d of %d bundles aligned in %.1f s", sum(o is not None for o in offsets), len(bundles),
                 time.perf_counter() - t_check)
    index = {int(b[0]): i for i, b in enumerate(bundles)}

    def check(fib, bb):
        err = align_errors.get(index[int(fib[0])])
        if err is not None:
            raise err
        _check_bundle(aligned, arcs, flats, fib, bb, lines=lines, waverange=r["waverange"],
                      rows_per_block=rows_per_block, trace_deg=r["trace_deg"], flat_deg=flat_deg,
                      legdeg_fiber=legdeg_fiber)

    pre = precheck_bundles(bundles, broken, check, specmin, bundlesize)
    log.info("fit-psf: %d bundles checked in %.1f s", len(bundles), time.perf_counter() - t_check)
    fits, statuses = [None] * len(bundles), [None] * len(bundles)
    for i, st in pre.items():
        statuses[i] = st
        if bundle_progress is not None:
            bundle_progress(st, len(bundles))
    groups = {}
    for i, b in enumerate(bundles):
        if i not in pre:
            groups.setdefault(len(b), []).append(i)
    start = bundle_series_start(aligned, [bundles[i] for i in range(len(bundles)) if i not in pre], r["sterms"],
                                legdeg_fiber, legdeg_wave, broken) if project_start else aligned
    for _, idx in groups.items():
        f, st = _fit_bundles(start, arcs, flats, [bundles[i] for i in idx],
                             [bundles[i][np.isin(bundles[i], broken)] for i in idx],
                             [bundle_id(bundles[i], i, specmin, bundlesize) for i in idx], lines=lines,
                             waverange=r["waverange"], rows_per_block=rows_per_block, trace_deg=r["trace_deg"],
                             sterms=r["sterms"], legdeg_fiber=legdeg_fiber, legdeg_wave=legdeg_wave, flat_deg=flat_deg,
                             maxiter=maxiter, step_tol=step_tol, chi2_rtol=chi2_rtol, chi2_atol=chi2_atol, lam0=lam0,
                             patches_per_call=patches_per_call, callback=callback, bundle_progress=bundle_progress,
                             nbundles=len(bundles), cont_deg=r["cont_deg"])
        for j, i in enumerate(idx):
            fits[i] = f[j]
            statuses[i] = st[j]
            if f[j] is not None:
                f[j].offset = offsets[i]
    xcoef = np.array(psf_init.xcoef)  # bundles not fitted keep the input's (not aligned) coefficients
    ycoef = np.array(psf_init.ycoef)
    pars = np.array(psf_init.params)
    for fr in fits:
        if fr is None:
            continue
        fib = fr.fibers
        xcoef[fib] = np.asarray(fr.psf.xcoef)[fib]  # broken fibers: the aligned input's (apply_psf_params(live=))
        ycoef[fib] = np.asarray(fr.psf.ycoef)[fib]
        pars[:, fib] = np.asarray(fr.psf.params)[:, fib]
    set_status_row(psf_init, pars, statuses, broken)
    psf = eqx.tree_at(lambda p: p.params, psf_init, jnp.asarray(pars)).with_traces(jnp.asarray(xcoef),
                                                                                jnp.asarray(ycoef))
    return CCDFit(psf, fits, statuses, broken, offsets)


def bundle_residuals(fit: BundleFit, arcs: Sequence = (), flats: Sequence = (), *, lines: LineList | None = None,
                     block: int | None = None, psf: GaussHermitePSF | None = None,
                     broken_fibers: BrokenFibers = None) -> FitResult:
    """Data, model and residuals of one block of a full-model bundle fit, for plots and checks.

    The model is that of the fitted PSF (``psf``, default ``fit.psf``; pass the CCD fit's merged
    PSF for a bundle of :func:`fit_psf_full`) over the block's pixel box ``fit.boxes[block]``
    (default the middle block), with the line fluxes and flat amplitudes solved for it (linear,
    exact) and no PSF parameter changed: :func:`jaxspec._fit.solver.fit_psf` with
    ``maxiter=0``.  Its ``data``, ``ivar``, ``model`` ``[(ny, nx)]`` per image [photons / pixel]
    and ``reduced_chi2`` are what :func:`jaxspec._plots.plot_fit_residuals` draws.
    """
    boxes = list(fit.boxes)
    b = len(boxes) // 2 if block is None else int(block)
    if not 0 <= b < len(boxes):
        raise ValueError(f"block {block}: the bundle has blocks 0..{len(boxes) - 1}")
    broken = fit.fibers[~np.asarray(fit.live)] if broken_fibers is None and fit.live is not None else broken_fibers
    return fit_psf(fit.psf if psf is None else psf, arcs, flats, lines=lines if len(arcs) else None,
                   fibers=fit.fibers, xyrange=tuple(int(v) for v in boxes[b]), what=("xtrace",), maxiter=0,
                   broken_fibers=None if broken is None or not len(broken) else broken, callback=lambda *a: None)
