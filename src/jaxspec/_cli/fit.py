"""``jaxspec fit-psf`` and ``jaxspec simulate-calib``: PSF calibration from arcs and flats.

``simulate-calib`` writes a simulated arc-lamp or continuum-flat exposure as a
preproc file; ``fit-psf`` fits a Gauss-Hermite PSF to such exposures (bundle by
bundle, in wavelength blocks, see :func:`jaxspec.fit_psf_ccd`) and writes
it in the DESI GAUSS-HERMITE format, with an optional PNG of the residuals.

``fit-psf`` checks every option and input before fitting (exit status 2 with a
one-line message); a bundle whose data cannot be fitted (no arc line or lamp light in
it, a fiber without light that is not in ``--broken-fibers``) is flagged and keeps its
input coefficients while the others are fitted.  Exit status: 0 every bundle fitted
(or all of whose fibers are broken), 1 some bundles flagged as failed, 2 a usage or
input error, 3 every bundle failed.

Wired into the command line by :func:`jaxspec._cli.build_parser` through
:func:`add_parser`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from .common import UsageError

log = logging.getLogger("jaxspec")


_usage_error = UsageError


def _parse_range(text: str | None, option: str):
    """'wmin,wmax' -> (wmin, wmax) or None."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise _usage_error(f"{option} {text!r}: expected two numbers wmin,wmax (Angstrom)") from None
    if not hi > lo:
        raise _usage_error(f"{option} {text!r}: need wmin < wmax")
    return lo, hi


def _read_gh_psf(path: str, option: str):
    from ..psf import GaussHermitePSF, read_psf

    if not os.path.exists(path):
        raise _usage_error(f"{option} {path}: no such file")
    psf = read_psf(path)
    if not isinstance(psf, GaussHermitePSF):
        raise _usage_error(f"{option} {path}: a {type(psf).__name__}; PSF fitting needs a GAUSS-HERMITE PSF")
    return psf


def _fibers(args, psf) -> tuple[int, int]:
    specmin = args.specmin
    nspec = psf.nspec - specmin if args.nspec is None else args.nspec
    if not 0 <= specmin < psf.nspec or nspec < 1 or specmin + nspec > psf.nspec:
        raise _usage_error(
            f"--specmin {specmin} --nspec {nspec}: the PSF has fibers 0..{psf.nspec - 1}")
    return specmin, nspec


def _broken_fibers(args, specmin: int, nspec: int, psf_nspec: int):
    """``--broken-fibers 3,17`` -> the checked fiber numbers inside ``-s/-n`` (an integer array).

    As desispec passes a camera's whole list of broken fibers to every bundle's fit, numbers
    of the PSF's other fibers are accepted and ignored (with a log line); a number that is
    no fiber of the PSF is an error.
    """
    from .._fit import check_broken_fibers

    text = args.broken_fibers
    items = [] if text is None or not text.strip() else [v.strip() for v in text.split(",")]
    fibers = []
    for v in items:
        try:
            fibers.append(int(v))
        except ValueError:
            raise _usage_error(f"--broken-fibers {text!r}: {v!r} is not a fiber number (give comma-separated "
                               "integers, e.g. 3,17)") from None
    try:
        alien = sorted({f for f in fibers if not 0 <= f < psf_nspec})
        if alien:
            raise ValueError(f"fiber(s) {', '.join(str(f) for f in alien)} not in the PSF (fibers 0..{psf_nspec - 1})")
        if fibers:  # each once
            check_broken_fibers(fibers, 0, psf_nspec)
        others = sorted(f for f in fibers if not specmin <= f < specmin + nspec)
        if others:
            log.info("--broken-fibers: fiber(s) %s not fitted here (-s %d -n %d): ignored",
                     ",".join(str(f) for f in others), specmin, nspec)
        return check_broken_fibers([f for f in fibers if specmin <= f < specmin + nspec], specmin, nspec)
    except ValueError as err:
        raise _usage_error(f"--broken-fibers {text!r}: {str(err).removeprefix('broken fibers (--broken-fibers): ')}") \
            from None


def _aligned(offsets) -> str:
    """The summary's words on the alignment: the bundles aligned and the largest shifts."""
    got = [o for o in offsets if o is not None]
    if not got:
        return ""
    return (f", start aligned ({len(got)} bundle(s), largest |dx| {max(abs(o.dx) for o in got):.2f} px, "
            f"|dy| {max(abs(o.dy) for o in got):.2f} px)")


def _exit_status(bundles) -> int:
    """0 every bundle fitted (or broken), 1 some failed, 3 every one failed."""
    nfail = sum(b.status == 2 for b in bundles)
    return 3 if nfail == len(bundles) else (1 if nfail else 0)


def _lines(args, psf):
    from .._simulation.calib import arc_lines, read_lines

    if args.lines is None:
        return arc_lines((psf.wmin, psf.wmax))
    if not os.path.exists(args.lines):
        raise _usage_error(f"--lines {args.lines}: no such file")
    lines = read_lines(args.lines).between(psf.wmin, psf.wmax)
    if len(lines) == 0:
        raise _usage_error(f"--lines {args.lines}: no line between {psf.wmin:.1f} and {psf.wmax:.1f} A")
    return lines


# ---------------------------------------------------------------- simulate-calib
def cmd_simulate_calib(args) -> int:
    """Run ``jaxspec simulate-calib``."""
    from .._io import frames as _frameio
    from .._simulation.calib import simulate_arc, simulate_flat

    _frameio.check_output_path(args.output, args.overwrite)
    psf = _read_gh_psf(args.psf, "--psf")
    specmin, nspec = _fibers(args, psf)
    wr = _parse_range(args.wavelength, "--wavelength")
    # the lower-left sub-image that holds the fibers over the range (the whole CCD by default)
    if wr is None:
        xy = (0, psf.npix_x, 0, psf.npix_y)
    else:
        box = psf.xyrange((specmin, specmin + nspec), wr)
        xy = (0, min(box[1] + psf.hsizex, psf.npix_x), 0, min(box[3] + psf.hsizey, psf.npix_y))
    t0 = time.perf_counter()
    if args.kind == "arc":
        lines = _lines(args, psf)
        cal = simulate_arc(psf, lines, specmin=specmin, nspec=nspec, xyrange=xy, peak_photons=args.level,
                           readnoise=args.readnoise, seed=args.seed)
    else:
        cal = simulate_flat(psf, specmin=specmin, nspec=nspec, xyrange=xy, level=args.level,
                            readnoise=args.readnoise, seed=args.seed)
    header = {"FLAVOR": args.kind.upper(), "EXPTIME": 1.0}
    path = _frameio.write_preproc(args.output, cal.image, cal.ivar, header=header, overwrite=args.overwrite)
    print(f"jaxspec simulate-calib: {args.kind}, fibers {specmin}-{specmin + nspec - 1}, "
          f"{cal.image.shape[0]} x {cal.image.shape[1]} pixels in {time.perf_counter() - t0:.1f} s -> {path}")
    return 0


# ---------------------------------------------------------------- fit-psf
def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def cmd_fit_psf(args) -> int:
    """Run ``jaxspec fit-psf``."""
    import numpy as np

    from .._io import frames as _frameio
    from .._fit import ALL_WHAT, fit_psf_ccd
    from ..psf import write_psf

    t0 = time.perf_counter()
    if args.psf_init is None:
        raise _usage_error("give the starting PSF (--input-psf / --psf-init)")
    for p in args.input_image:  # specex's --input-image: arc or flat by the file's FLAVOR
        if not os.path.exists(p):
            raise _usage_error(f"--input-image {p}: no such file")
        flavor = str(_frameio.read_preproc(p).header.get("FLAVOR", "")).strip().upper()
        if flavor not in ("ARC", "FLAT"):
            raise _usage_error(f"--input-image {p}: FLAVOR {flavor!r} in its header; need ARC or FLAT "
                               "(or give it with --arc / --flat)")
        (args.arc if flavor == "ARC" else args.flat).append(p)
    if args.model != "full" and (args.fit_continuum or args.fit_psf_tails):
        opt = "--fit-continuum" if args.fit_continuum else "--fit-psf-tails"
        raise _usage_error(f"{opt} is an option of the full model: add --model full")
    if args.continuum_deg < 0:
        raise _usage_error(f"--continuum-deg {args.continuum_deg}: need a degree >= 0")
    if args.fit_continuum and not args.arc:
        raise _usage_error("--fit-continuum models the arcs' continuum: give at least one arc (--arc / --input-image)")
    if _same_file(args.output, args.psf_init):
        raise _usage_error(f"-o {args.output} is the input PSF (--psf-init): write the fit to another file")
    if args.plot is not None and (_same_file(args.plot, args.output) or _same_file(args.plot, args.psf_init)):
        raise _usage_error(f"--plot {args.plot}: the same file as the input or output PSF")
    for opt, paths in (("--arc", args.arc), ("--flat", args.flat)):
        for p in paths:
            if _same_file(args.output, p) or (args.plot is not None and _same_file(args.plot, p)):
                raise _usage_error(f"{opt} {p}: the same file as an output (-o / --plot)")
    _frameio.check_output_path(args.output, args.overwrite)
    if args.plot is not None:
        _frameio.check_output_path(args.plot, args.overwrite)
    if not args.arc and not args.flat:
        raise _usage_error("give at least one --arc or --flat image")
    for opt, paths in (("--arc", args.arc), ("--flat", args.flat)):
        for p in paths:
            if not os.path.exists(p):
                raise _usage_error(f"{opt} {p}: no such file")
    what = tuple(w.strip() for w in args.what.split(",") if w.strip())
    block_what = tuple(w for w in ALL_WHAT if w != "shape")  # the full model is --model full
    bad = [w for w in what if w not in block_what]
    if bad or not what:
        raise _usage_error(f"--what {args.what!r}: choose from {','.join(block_what)} (or use --model full)")
    if args.bundlesize < 1 or args.nblocks < 1 or args.maxiter < 1:
        raise _usage_error("--bundlesize, --nblocks and --maxiter must be positive")
    if not (np.isfinite(args.max_shift) and args.max_shift >= 1.0):
        raise _usage_error(f"--max-shift {args.max_shift:g}: give the alignment's search window in pixels, >= 1 "
                           "(or --no-align to skip the alignment)")
    psf = _read_gh_psf(args.psf_init, "--psf-init")
    specmin, nspec = _fibers(args, psf)
    broken = _broken_fibers(args, specmin, nspec, psf.nspec)
    wr = _parse_range(args.wavelength, "--wavelength")
    if wr is not None and (wr[0] < psf.wmin or wr[1] > psf.wmax):
        raise _usage_error(f"--wavelength {args.wavelength}: outside the PSF's {psf.wmin:.1f}-{psf.wmax:.1f} A")
    lines = _lines(args, psf) if args.arc else None
    arcs = [_frameio.read_preproc(p) for p in args.arc]
    flats = [_frameio.read_preproc(p) for p in args.flat]
    for p, im in zip(list(args.arc) + list(args.flat), arcs + flats):
        if im.image.shape[0] > psf.npix_y or im.image.shape[1] > psf.npix_x:
            raise _usage_error(f"{p}: {im.image.shape} pixels, larger than the PSF's CCD")

    def progress(done, total, fr):
        log.info("patch %d/%d: fibers %d-%d rows %d-%d: %d iterations, chi2/dof %.4f, %.1f s",
                 done, total, fr.fibers[0], fr.fibers[-1], fr.xyrange[2], fr.xyrange[3], fr.niter,
                 fr.reduced_chi2, fr.seconds)

    def bundle_done(st, nbundles):
        state = ("converged", "NOT converged", "FAILED (input kept)", "every fiber broken (input kept)")[st.status]
        brk = f", broken fibers {','.join(str(f) for f in st.broken)}" if len(st.broken) and st.status != 3 else ""
        log.info("bundle %d (fibers %d-%d): %s, chi2/dof %.4f%s%s", st.bundle, st.fibers[0], st.fibers[-1], state,
                 st.reduced_chi2, brk, f": {st.message}" if st.message else "")

    if len(broken):
        log.info("broken fibers (not fitted, input coefficients kept): %s", ",".join(str(f) for f in broken))
    if args.model == "full":
        return _fit_full(args, psf, arcs, flats, lines, specmin, nspec, wr, t0, bundle_done, broken)
    log.info("fitting %s of fibers %d-%d from %d arc(s) and %d flat(s)",
             ",".join(what), specmin, specmin + nspec - 1, len(arcs), len(flats))
    try:
        result = fit_psf_ccd(
            psf, arcs, flats, lines=lines, specmin=specmin, nspec=nspec, bundlesize=args.bundlesize,
            nblocks=args.nblocks, waverange=wr, progress=progress, bundle_progress=bundle_done, what=what,
            maxiter=args.maxiter, broken_fibers=broken, align=args.align, max_shift=args.max_shift,
        )
    except ValueError as err:  # found by the checks that run before any fitting
        raise _usage_error(str(err)) from None
    fits = result.fits
    path = write_psf(args.output, result.psf, overwrite=args.overwrite, header=result.header())
    if args.plot is not None and fits:
        from .._plots import plot_fit_residuals

        plot_fit_residuals(args.plot, fits, overwrite=args.overwrite)
        log.info("wrote %s", args.plot)
    chi2 = sum(f.chi2 for f in fits)
    ndof = sum(f.ndof for f in fits)
    nconv = sum(f.converged for f in fits)
    nfail = sum(b.status == 2 for b in result.bundles)
    dx = [np.abs(f.params["dx"][:, 0][f.live if f.live is not None else slice(None)]).max()
          for f in fits if "dx" in f.params]
    print(f"jaxspec fit-psf: {len(fits)} patches ({nconv} converged), chi2/dof {chi2 / max(ndof, 1):.4f}"
          + _aligned(result.offsets)
          + (f", largest x shift {max(dx):.3f} px" if dx else "")
          + (f", {len(broken)} broken fiber(s) not fitted" if len(broken) else "")
          + (f", {nfail} of {len(result.bundles)} bundles FAILED (input coefficients kept, flagged)" if nfail else "")
          + f", {time.perf_counter() - t0:.1f} s -> {os.path.abspath(path)}")
    return _exit_status(result.bundles)


def _fit_full(args, psf, arcs, flats, lines, specmin, nspec, wr, t0, bundle_done, broken) -> int:
    """``fit-psf --model full``: every coefficient of every bundle (:func:`jaxspec.fit_psf_full`)."""
    from .._fit import fit_psf_full
    from ..psf import write_psf

    ncoef = psf.params.shape[2]
    if args.legendre_deg_wave is not None and not 0 <= args.legendre_deg_wave < ncoef:
        raise _usage_error(f"--legendre-deg-wave {args.legendre_deg_wave}: the PSF stores {ncoef} wavelength "
                           f"coefficients, so 0..{ncoef - 1}")
    if not 0 <= args.legendre_deg_x < args.bundlesize:
        raise _usage_error(f"--legendre-deg-x {args.legendre_deg_x}: need 0..{args.bundlesize - 1}")
    log.info("fitting the full model of fibers %d-%d from %d arc(s) and %d flat(s)",
             specmin, specmin + nspec - 1, len(arcs), len(flats))
    try:
        result = fit_psf_full(psf, arcs, flats, lines=lines, specmin=specmin, nspec=nspec,
                              bundlesize=args.bundlesize, waverange=wr, legdeg_wave=args.legendre_deg_wave,
                              legdeg_fiber=args.legendre_deg_x, maxiter=args.maxiter, bundle_progress=bundle_done,
                              broken_fibers=broken, align=args.align, max_shift=args.max_shift,
                              fit_tails=args.fit_psf_tails, fit_continuum=args.fit_continuum,
                              cont_deg=args.continuum_deg)
    except ValueError as err:  # found by the checks that run before any fitting
        raise _usage_error(str(err)) from None
    path = write_psf(args.output, result.psf, overwrite=args.overwrite, header=result.header())
    if args.plot is not None:
        from .._fit import bundle_residuals
        from .._plots import plot_fit_residuals

        # the middle block of the first fitted bundles: data, the fitted PSF's model, residuals
        shown = [bundle_residuals(f, arcs, flats, lines=lines, psf=result.psf)
                 for f in [f for f in result.fits if f is not None][:2]]
        if shown:
            plot_fit_residuals(args.plot, shown, overwrite=args.overwrite)
            log.info("wrote %s", args.plot)
        else:
            log.warning("--plot %s: no bundle was fitted, nothing to draw", args.plot)
    nfail = sum(b.status == 2 for b in result.bundles)
    nconv = sum(b.status == 0 for b in result.bundles)
    print(f"jaxspec fit-psf --model full: {len(result.bundles)} bundles ({nconv} converged"
          + (f", {nfail} FAILED: input coefficients kept, flagged" if nfail else "")
          + (f", {len(broken)} broken fiber(s) not fitted" if len(broken) else "")
          + f"){_aligned(result.offsets)}, {time.perf_counter() - t0:.1f} s -> {os.path.abspath(path)}")
    return _exit_status(result.bundles)


def add_parser(subparsers, common) -> argparse.ArgumentParser:
    """Add ``fit-psf`` and ``simulate-calib`` to ``subparsers``; ``common(p)`` adds the shared options."""
    s = subparsers.add_parser(
        "simulate-calib", help="simulate an arc-lamp or continuum-flat exposure (preproc file)",
        description="Project arc lines (the built-in Hg/Ar/Cd/Ne/Kr/Xe list or --lines) or a smooth "
                    "continuum through a PSF, add Poisson and read noise, and write a preproc file.",
    )
    s.add_argument("--psf", required=True, help="GAUSS-HERMITE PSF file to simulate with")
    s.add_argument("--kind", choices=("arc", "flat"), required=True, help="arc lamp or continuum flat")
    s.add_argument("-o", "--output", required=True, help="output preproc FITS file")
    s.add_argument("--specmin", type=int, default=0, help="first lit fiber (default 0)")
    s.add_argument("--nspec", type=int, default=None, help="number of lit fibers (default: to the last)")
    s.add_argument("--wavelength", default=None,
                   help="wmin,wmax [A]: write only the lower-left sub-image that holds this range "
                        "(default: the whole CCD)")
    s.add_argument("--lines", default=None,
                   help="arc lines: one wavelength [A] per row, optionally a relative flux (default: built-in)")
    s.add_argument("--level", type=float, default=None,
                   help="arc: photons of the brightest line (default 3e4); flat: photons/A (default 2e4)")
    s.add_argument("--readnoise", type=float, default=3.0, help="read noise [electrons] (default 3)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    common(s)
    s.set_defaults(func=_simulate_calib_defaults)

    p = subparsers.add_parser(
        "fit-psf", help="fit a Gauss-Hermite PSF to arc and flat exposures",
        description="Fit trace shifts, GHSIGX/GHSIGY scales and Gauss-Hermite terms of a PSF, with the "
                    "line fluxes and flat amplitudes, to calibration images by Levenberg-Marquardt on the "
                    "pixel chi2; bundle by bundle in wavelength blocks.  Writes a GAUSS-HERMITE PSF file.  "
                    "Each bundle's start traces are first shifted onto the images (offsets measured by "
                    "cross-correlation, up to --max-shift pixels; --no-align skips it).  "
                    "Every option and input is checked before fitting; a bundle that cannot be fitted keeps its "
                    "input coefficients and is flagged.  Exit status: 0 every bundle fitted, 1 some flagged as "
                    "failed, 2 a usage or input error, 3 every bundle failed.",
    )
    p.add_argument("--arc", action="append", default=[], metavar="IMAGE", help="arc preproc file (repeatable)")
    p.add_argument("--flat", action="append", default=[], metavar="IMAGE", help="flat preproc file (repeatable)")
    p.add_argument("--input-image", action="append", default=[], metavar="IMAGE",
                   help="arc or flat preproc file, by its FLAVOR header key (repeatable; specex's name)")
    p.add_argument("--psf-init", "--input-psf", dest="psf_init", default=None, metavar="PSF",
                   help="starting GAUSS-HERMITE PSF file (e.g. another night's)")
    p.add_argument("--model", choices=("blocks", "full"), default="blocks",
                   help="blocks: corrections per bundle x wavelength block (default); full: every trace and "
                        "shape coefficient of each bundle at once (issue 18)")
    p.add_argument("--legendre-deg-wave", type=int, default=None,
                   help="--model full: wavelength Legendre degree of the shape parameters (default: the file's)")
    p.add_argument("--legendre-deg-x", type=int, default=1,
                   help="--model full: fiber Legendre degree inside a bundle (specex's LEGDEGX, default 1)")
    p.add_argument("-o", "--output", required=True, metavar="PSF", help="output PSF file")
    p.add_argument("--lines", default=None,
                   help="arc lines: one wavelength [A] per row (default: the built-in lamp list)")
    p.add_argument("-s", "--specmin", type=int, default=0, help="first fiber to fit (default 0)")
    p.add_argument("-n", "--nspec", type=int, default=None,
                   help="number of fibers to fit (default: to the last); the others are copied")
    p.add_argument("--bundlesize", type=int, default=25, help="fibers fitted together (default 25)")
    p.add_argument("--nblocks", type=int, default=8, help="wavelength blocks per bundle (default 8)")
    p.add_argument("--wavelength", default=None,
                   help="wmin,wmax [A] to fit (default: the wavelengths every fiber sees)")
    p.add_argument("--what", default="xtrace,ytrace,sigma,gh",
                   help="what to fit, comma-separated from xtrace,ytrace,sigma,gh (default: all)")
    p.add_argument("--broken-fibers", default=None, metavar="LIST",
                   help="fibers without light, comma-separated (specex's option; the PSF's fiber numbers, as "
                        "--specmin): not fitted, their coefficients kept; the written PSF marks them (STATUS 3, "
                        "header NBROKEN, BROKEN)")
    p.add_argument("--no-align", dest="align", action="store_false",
                   help="do not align the start PSF first (by default each bundle's x and y trace offsets in the "
                        "images are measured, x on the flats, y on the arcs' lines, and added to the start's "
                        "traces before any check or fit; a bundle whose offset cannot be measured is flagged)")
    p.add_argument("--max-shift", type=float, default=8.0, metavar="PIXELS",
                   help="the alignment's search window: the largest trace offset looked for on each axis "
                        "(default 8 px; below the fiber pitch, about 7.3 px, when fitting part of a bundle)")
    p.add_argument("--fit-continuum", action="store_true",
                   help="--model full: model each arc's continuum under its lines (specex's option): a Legendre "
                        "series in wavelength per arc, fiber and block, spread along the trace; written to the "
                        "PSF's CONT row [electrons per CCD row]")
    p.add_argument("--continuum-deg", type=int, default=2,
                   help="--fit-continuum: the continuum's Legendre degree in wavelength per block (default 2)")
    p.add_argument("--fit-psf-tails", action="store_true",
                   help="--model full: also fit TAILAMP, the PSF tail's amplitude, as the shape terms "
                        "(specex's option; TAILCORE, TAILXSCA, TAILYSCA, TAILINDE kept)")
    p.add_argument("--maxiter", type=int, default=30, help="most iterations per patch (default 30)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a PNG of the residuals of the first patches")
    common(p)
    p.set_defaults(func=cmd_fit_psf)
    return p


def _simulate_calib_defaults(args) -> int:
    if args.level is None:
        args.level = 3.0e4 if args.kind == "arc" else 2.0e4
    if args.level <= 0:
        raise _usage_error(f"--level must be positive, got {args.level}")
    return cmd_simulate_calib(args)
