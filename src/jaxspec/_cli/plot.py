"""``jaxspec plot``: a PNG of a frame file, optionally with image / model / pull panels.

Wired into the command line by :func:`jaxspec._cli.main.build_parser` through
:func:`add_parser`.  Uses :func:`jaxspec._plots.plot_frame` and the readers of
:mod:`jaxspec._io.frames`; needs no JAX work at all.  The PNG is written atomically
(:func:`jaxspec._io.atomic.atomic_write`): a killed run leaves no partial file.
"""

from __future__ import annotations

import argparse
import logging
import os

from .common import UsageError

log = logging.getLogger("jaxspec")


_usage_error = UsageError


def _parse_ints(text: str | None, option: str, n: int | None = None) -> tuple[int, ...] | None:
    """'0,5,10' -> (0, 5, 10); ``n`` the required count, if any."""
    if text is None:
        return None
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise _usage_error(f"{option} {text!r}: expected comma-separated integers") from None
    if not vals or (n is not None and len(vals) != n):
        want = f"{n} comma-separated integers" if n else "at least one integer"
        raise _usage_error(f"{option} {text!r}: expected {want}")
    return vals


def read_model_image(path: str):
    """The model image written by ``jaxspec extract --model`` (:func:`jaxspec._io.frames.read_model`)."""
    from .._io import frames as _frameio

    if not os.path.exists(path):
        raise _usage_error(f"--model {path}: no such file")
    try:
        return _frameio.read_model(path)
    except (OSError, ValueError) as err:
        raise _usage_error(f"--model {path}: {err}") from None


_MAX_DEFAULT_REGION = 1024  # larger lit areas default to a crop of the panels
_CROP = 256
_LIT = 1e-3  # a pixel is lit where the model exceeds this fraction of its maximum


def _parse_floats(text: str | None, option: str, n: int) -> tuple[float, ...] | None:
    """'5600,5700' -> (5600.0, 5700.0), exactly ``n`` numbers in increasing order."""
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise _usage_error(f"{option} {text!r}: expected {n} comma-separated numbers") from None
    if len(vals) != n or any(b <= a for a, b in zip(vals, vals[1:])):
        raise _usage_error(f"{option} {text!r}: expected {n} increasing comma-separated numbers")
    return vals


def default_region(shape: tuple[int, int], model=None) -> tuple[int, int, int, int]:
    """Default pixel box ``(x0, x1, y0, y1)`` (upper bounds exclusive) of the image panels.

    Without ``model``: the whole image, or a central ``_CROP`` x ``_CROP`` box of a
    large one.  With the (ny, nx) ``model`` image of the extraction (``jaxspec extract
    --model``): the box of the pixels the frame's fibers and wavelengths light (model
    above ``_LIT`` of its maximum); along an axis where that box is longer than
    ``_MAX_DEFAULT_REGION`` pixels, a ``_CROP`` pixel window centred on the light.  So a
    frame of fibers 0-49 on a full CCD shows its own traces, not the CCD's empty centre.
    """
    ny, nx = shape
    if model is not None:
        import numpy as np

        model = np.asarray(model, dtype=np.float64)
        peak = float(np.max(model, initial=0.0, where=np.isfinite(model)))
        lit = np.isfinite(model) & (model > _LIT * peak) if peak > 0 else None
        if lit is not None and lit.any():
            weight = np.where(lit, model, 0.0)
            box = []
            for axis, n in ((0, nx), (1, ny)):  # x: columns (sum over rows), then y
                prof = weight.sum(axis=axis)
                idx = np.flatnonzero(prof > 0)
                lo, hi = int(idx[0]), int(idx[-1]) + 1
                if hi - lo > _MAX_DEFAULT_REGION:
                    centre = float(np.dot(prof, np.arange(n)) / prof.sum())
                    lo = min(max(int(round(centre)) - _CROP // 2, lo), hi - _CROP)
                    hi = lo + _CROP
                box += [lo, hi]
            return tuple(box)
    if max(ny, nx) <= _MAX_DEFAULT_REGION:
        return 0, nx, 0, ny
    x0 = max(nx // 2 - _CROP // 2, 0)
    y0 = max(ny // 2 - _CROP // 2, 0)
    return x0, min(x0 + _CROP, nx), y0, min(y0 + _CROP, ny)


def cmd_plot(args) -> int:
    """Run ``jaxspec plot``."""
    from .._io import frames as _frameio
    from .._plots import plot_frame

    if not os.path.exists(args.frame):
        raise _usage_error(f"FRAME {args.frame}: no such file")
    output = args.output or os.path.splitext(os.path.basename(args.frame))[0] + ".png"
    if not output.lower().endswith(".png"):
        raise _usage_error(f"--output {output}: the plot is a PNG, give a name ending in .png")
    _frameio.check_output_path(output, args.overwrite)
    if (args.image is None) != (args.model is None):
        raise _usage_error("give --image and --model together (the panels show image, model and residual)")
    wave_range = _parse_floats(args.wave, "--wave", 2)

    frame = _frameio.read_frame(args.frame)
    specmin, last = frame.specmin, frame.specmin + frame.nspec - 1
    fibers = _parse_ints(args.fibers, "--fibers")
    if fibers is None:
        fibers = tuple(sorted({specmin, specmin + frame.nspec // 2, last}))
    for f in fibers:
        if not specmin <= f <= last:
            raise _usage_error(f"--fibers: fiber {f} is not in the frame (fibers {specmin}..{last})")
    if wave_range is not None and (wave_range[1] < frame.wave[0] or wave_range[0] > frame.wave[-1]):
        raise _usage_error(
            f"--wave {args.wave}: the frame covers {frame.wave[0]:.1f}-{frame.wave[-1]:.1f} A"
        )
    region = _parse_ints(args.region, "--region", 4)

    image = model = ivar = None
    if args.image is not None:
        if not os.path.exists(args.image):
            raise _usage_error(f"--image {args.image}: no such file")
        pre = _frameio.read_preproc(args.image)
        image, ivar = pre.image, pre.ivar
        model = read_model_image(args.model)
        if model.shape != image.shape:
            raise _usage_error(f"--model image {model.shape} and --image {image.shape} differ in shape")
        ny, nx = image.shape
        if region is None:
            region = default_region(image.shape, model)
            if region != (0, nx, 0, ny):
                log.info("image panels show pixels x %d..%d, y %d..%d, where the model has light; "
                         "choose others with --region", *region)
        x0, x1, y0, y1 = region
        if not (0 <= x0 < x1 <= nx and 0 <= y0 < y1 <= ny):
            raise _usage_error(f"--region {args.region}: need 0 <= x0 < x1 <= {nx} and 0 <= y0 < y1 <= {ny}")
    elif region is not None:
        log.warning("--region is ignored without --image and --model")

    path = plot_frame(output, frame, fibers=fibers, image=image, model=model, ivar=ivar, region=region,
                      wave_range=wave_range, overwrite=args.overwrite)
    print(f"jaxspec plot: {len(fibers)} fibers -> {os.path.abspath(path)}")
    return 0


def add_parser(subparsers, common) -> argparse.ArgumentParser:
    """Add the ``plot`` subcommand to ``subparsers``; ``common(p)`` adds the shared options."""
    p = subparsers.add_parser(
        "plot", help="plot the spectra of a frame file (and image/model panels) to a PNG",
        description="Plot spectra with 1-sigma error bands and chi2pix from a DESI frame file into a "
                    "PNG; with --image and --model (from jaxspec extract --model) also the image, the "
                    "model and the pull (image - model) sqrt(ivar) over a pixel region.",
    )
    p.add_argument("frame", metavar="FRAME", help="frame FITS file (from jaxspec extract)")
    p.add_argument("--image", metavar="PREPROC", default=None, help="preproc FITS file that was extracted")
    p.add_argument("--model", metavar="MODEL", default=None,
                   help="model image FITS file (jaxspec extract --model)")
    p.add_argument("--fibers", default=None,
                   help="comma-separated fiber numbers as on the CCD, e.g. 0,5,10 (default: the frame's first, "
                        "middle and last)")
    p.add_argument("--region", default=None,
                   help="x0,x1,y0,y1 pixel region of the image panels, upper bounds exclusive "
                        "(default: the pixels where the model has light, cut to a "
                        f"{_CROP}-pixel window around the light along a side longer than "
                        f"{_MAX_DEFAULT_REGION})")
    p.add_argument("--wave", default=None, metavar="WMIN,WMAX",
                   help="wavelength range [A] of the spectra panels (default: the whole frame)")
    p.add_argument("-o", "--output", default=None, help="output PNG (default: FRAME's name with .png)")
    common(p)
    p.set_defaults(func=cmd_plot, needs_jax=False)
    return p
