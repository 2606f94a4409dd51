"""Figures people want from an extraction (matplotlib; imported only by the CLI and by users).

* :func:`plot_extraction`: an :class:`~jaxspec.Extraction` in memory: image / model /
  pull panels and spectra with error bands (and the truth, when known, convolved
  with the resolution matrix so that it is comparable with the extracted flux).
* :func:`plot_frame`: a frame file (:class:`~jaxspec.Frame`): spectra with error
  bands and chi2pix per fiber, and optionally image / model / pull panels of a
  pixel region of the preproc image that was extracted.

Both write a PNG through the one atomic writer (:func:`jaxspec._io.atomic.atomic_write`:
a killed run never leaves a partial or empty PNG, and an existing file is replaced only
with ``overwrite=True``) and return its path.  The building blocks :func:`spectra_panel`,
:func:`image_panels` and :func:`chi2pix_panel` draw on matplotlib axes that the
caller owns, for notebooks.

matplotlib is imported lazily; the PNG writers draw on figures outside pyplot
(``matplotlib.figure.Figure``), so they need no backend and leave no figure open.
"""

from __future__ import annotations

import os

import numpy as np

from ._io.atomic import atomic_write, check_output_path

__all__ = ["chi2pix_panel", "image_panels", "plot_extraction", "plot_fit_residuals", "plot_frame", "spectra_panel"]

_PULL_RANGE = 5.0  # colour range of pull panels, in sigma


def _figure(**kw):
    """A matplotlib figure outside pyplot: no GUI backend involved and nothing left open."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def _limits(a: np.ndarray) -> tuple[float, float]:
    """Robust colour limits: the 1st and 99.5th percentiles of the finite values."""
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _errors(ivar: np.ndarray) -> np.ndarray:
    """1 / sqrt(ivar), NaN where ivar <= 0 (so that bands and lines break there)."""
    good = ivar > 0
    return np.where(good, 1.0 / np.sqrt(np.where(good, ivar, 1.0)), np.nan)


#: Flux unit of an extraction (and of jaxspec's frames: their BUNIT).
FLUX_UNIT = "electron/Angstrom"


def _unit_label(unit: str) -> str:
    """'electron/Angstrom' -> 'electron / Angstrom' (an axis label)."""
    return " / ".join(part.strip() for part in str(unit).split("/"))


def _save(fig, path, overwrite: bool):
    """Write ``fig`` as a PNG to ``path`` atomically."""
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110), overwrite=overwrite)
    return path


def _labels_and_window(wave, rows, labels, wave_range):
    """Default legend labels for ``rows`` and the mask of ``wave`` inside ``wave_range``."""
    labels = labels or [f"spectrum {r}" for r in rows]
    if wave_range is None:
        return labels, np.ones(wave.shape, bool)
    return labels, (wave >= wave_range[0]) & (wave <= wave_range[1])


def spectra_panel(ax, wave, flux, ivar, rows, labels=None, truth=None, wave_range=None, unit=FLUX_UNIT):
    """Draw spectra with 1-sigma error bands on ``ax``.

    Args:
        ax: matplotlib axes.
        wave: (nwave,) wavelengths [A].
        flux: (nspec, nwave) flux [``unit``].
        ivar: (nspec, nwave) inverse variance of ``flux``; bins with ivar 0 are
            left as gaps.
        rows: indices into the first axis of ``flux`` to draw.
        labels: legend label per row (default ``"spectrum {row}"``).
        truth: optional (nspec, nwave) model already convolved with the resolution
            matrix, drawn as black dashed lines.
        wave_range: optional ``(wmin, wmax)`` [A] to zoom on.
        unit: flux unit for the axis label (a frame's BUNIT; default electron/Angstrom).
    """
    wave = np.asarray(wave)
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    labels, sel = _labels_and_window(wave, rows, labels, wave_range)
    w = wave[sel]
    for n, (r, label) in enumerate(zip(rows, labels)):
        c = f"C{n % 10}"
        err = _errors(ivar[r][sel])
        f = np.where(np.isfinite(err), flux[r][sel], np.nan)
        ax.fill_between(w, f - err, f + err, color=c, alpha=0.35, lw=0, step="mid")
        ax.plot(w, f, color=c, lw=0.8, drawstyle="steps-mid", label=label)
        if truth is not None:
            ax.plot(w, np.asarray(truth)[r][sel], color="k", lw=0.7, ls="--")
    if truth is not None:
        ax.plot([], [], color="k", lw=0.7, ls="--", label="truth convolved with R")
    ax.set_xlabel("wavelength [Angstrom]")
    ax.set_ylabel(f"flux [{_unit_label(unit)}]")
    if len(w):
        ax.set_xlim(w[0], w[-1])
    ax.legend(fontsize=7, loc="upper right", ncol=min(len(rows) + (truth is not None), 4))


def chi2pix_panel(ax, wave, chi2pix, rows, labels=None, wave_range=None):
    """Draw chi2pix (reduced chi2 of the pixels of each bin; ~1 for a good model) on ``ax``."""
    wave = np.asarray(wave)
    chi2pix = np.asarray(chi2pix)
    labels, sel = _labels_and_window(wave, rows, labels, wave_range)
    for n, (r, label) in enumerate(zip(rows, labels)):
        c2 = chi2pix[r][sel]
        ax.plot(wave[sel], np.where(c2 > 0, c2, np.nan), color=f"C{n % 10}", lw=0.7,
                drawstyle="steps-mid", label=label)
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_yscale("log")
    # one tick format, plain decimals: 0.5, 1, 2, 5, 10, ... (1, 2, 5 x 10^k), and on an
    # axis spanning less than a decade the minor ticks between them too (0.6, 0.7, 3, ...)
    plain = FuncFormatter(lambda v, _: np.format_float_positional(float(f"{v:.6g}"), trim="-"))

    def minor(v, pos):
        lo, hi = ax.get_ylim()
        return plain(v, pos) if 0 < lo < hi < 10 * lo else ""

    ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(LogLocator(base=10.0, subs=(3.0, 4.0, 6.0, 7.0, 8.0, 9.0)))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.set_ylabel("chi2pix")
    ax.set_xlabel("wavelength [Angstrom]")
    if sel.any():
        ax.set_xlim(wave[sel][0], wave[sel][-1])


def image_panels(axes, fig, image, model, ivar=None, extent=None):
    """Draw image, model and residual side by side on three axes.

    The residual is the pull ``(image - model) sqrt(ivar)`` on a fixed +-5 sigma
    scale when ``ivar`` is given (masked pixels blank), else ``image - model``.
    ``extent`` is ``(x0, x1, y0, y1)`` in CCD pixels for the axis labels.
    """
    image = np.asarray(image, dtype=float)
    model = np.asarray(model, dtype=float)
    lo, hi = _limits(image)
    if ivar is not None:
        ivar = np.asarray(ivar, dtype=float)
        resid = np.where(ivar > 0, (image - model) * np.sqrt(np.clip(ivar, 0, None)), np.nan)
        rlim, rname = (-_PULL_RANGE, _PULL_RANGE), "(image - model) x sqrt(ivar)"
    else:
        resid = image - model
        r = max(abs(v) for v in _limits(resid))
        rlim, rname = (-r, r), "image - model [electron]"
    ext = None if extent is None else (extent[0] - 0.5, extent[1] - 0.5, extent[2] - 0.5, extent[3] - 0.5)
    for ax, a, name, lim, cmap in zip(
        axes,
        (image, model, resid),
        ("image [electron]", "model [electron]", rname),
        ((lo, hi), (lo, hi), rlim),
        ("viridis", "viridis", "RdBu_r"),
    ):
        im = ax.imshow(a, origin="lower", aspect="auto", vmin=lim[0], vmax=lim[1], cmap=cmap,
                       extent=ext, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("x [pixel]")
        ax.set_ylabel("y [pixel]")
        fig.colorbar(im, ax=ax, shrink=0.85)


def plot_extraction(path, ex, image=None, ivar=None, truth=None, fibers=(0,), title=None, wave_range=None,
                    overwrite=False):
    """Write a PNG of an :class:`~jaxspec.Extraction`: image / model / pull panels and spectra.

    Args:
        path: PNG file to write (atomically: never left partial or empty).
        ex: the extraction (extracted with ``model=True`` for the image panels).
        image: the extracted (sub-)image [electron], same shape as ``ex.model``
            (optional; with it a top row shows image, model and residual).
        ivar: the inverse variance of ``image`` [electron^-2] (optional; makes the
            residual a pull ``(image - model) sqrt(ivar)``).
        truth: (nspec, nwave) true flux [electron / A] on ``ex.wave``; drawn after
            convolution with the extraction's resolution matrix (optional).
        fibers: fiber offsets (0 = ``ex.specmin``) to draw.
        title: figure title.
        wave_range: optional ``(wmin, wmax)`` [A] to zoom the spectra on.
        overwrite: replace an existing ``path`` (otherwise ``FileExistsError``).

    Returns:
        ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (checked before drawing).
    """
    from .solve import apply_resolution

    check_output_path(path, overwrite)
    conv = None if truth is None else np.asarray(apply_resolution(ex.resolution, np.asarray(truth)))
    panels = image is not None and ex.model is not None
    fig = _figure(figsize=(12, 7 if panels else 4), layout="constrained")
    if panels:
        gs = fig.add_gridspec(2, 3, height_ratios=[1.3, 1])
        axes = [fig.add_subplot(gs[0, i]) for i in range(3)]
        image_panels(axes, fig, image, ex.model, ivar)
        ax = fig.add_subplot(gs[1, :])
    else:
        ax = fig.add_subplot(1, 1, 1)
    spectra_panel(ax, ex.wave, ex.flux, ex.ivar, list(fibers), [f"fiber {ex.specmin + f}" for f in fibers],
                  truth=conv, wave_range=wave_range)
    if title:
        fig.suptitle(title)
    return _save(fig, path, overwrite)


def _frame_title(frame) -> str:
    hdr = frame.header
    parts = [os.path.basename(frame.path) if frame.path else "frame"]
    for key in ("CAMERA", "NIGHT", "EXPID"):
        if key in hdr:
            parts.append(f"{key} {hdr[key]}")
    return "  ".join(parts)


def plot_frame(path, frame, fibers=None, image=None, model=None, ivar=None, region=None, wave_range=None,
               title=None, overwrite=False):
    """Write a PNG of a frame: spectra with error bands, chi2pix and, optionally, pixels.

    The flux axis is labelled with the frame's unit (its BUNIT header key).

    Args:
        path: PNG file to write (atomically: never left partial or empty).
        frame: a :class:`~jaxspec.Frame` (e.g. from :func:`~jaxspec.read_frame`).
        fibers: fiber numbers (as on the CCD, ``frame.specmin .. specmin + nspec - 1``)
            to draw; default the first, middle and last.
        image: the (ny, nx) preproc image that was extracted [electron]; with
            ``model``, a top row shows image, model and residual over ``region``.
        model: the (ny, nx) model image (``jaxspec extract --model``) [electron].
        ivar: (ny, nx) pixel inverse variance; makes the residual a pull.
        region: ``(x0, x1, y0, y1)`` pixel box of the image panels (upper bounds
            exclusive); default the whole image.
        wave_range: optional ``(wmin, wmax)`` [A] to zoom the spectra on.
        title: figure title (default: file name, CAMERA, NIGHT, EXPID).
        overwrite: replace an existing ``path`` (otherwise ``FileExistsError``).

    Returns:
        ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (checked before drawing).
        ValueError: a fiber of ``fibers`` is not in the frame.
    """
    check_output_path(path, overwrite)
    fig = _frame_figure(frame, fibers, image, model, ivar, region, wave_range, title)
    return _save(fig, path, overwrite)


def _frame_figure(frame, fibers=None, image=None, model=None, ivar=None, region=None, wave_range=None,
                  title=None):
    """The figure of :func:`plot_frame` (a matplotlib ``Figure`` outside pyplot)."""
    specmin = frame.specmin
    if fibers is None:
        fibers = sorted({specmin, specmin + frame.nspec // 2, specmin + frame.nspec - 1})
    rows = [int(f) - specmin for f in fibers]
    bad = [f for f, r in zip(fibers, rows) if not 0 <= r < frame.nspec]
    if bad:
        raise ValueError(f"fibers {bad} are not in the frame (fibers {specmin}..{specmin + frame.nspec - 1})")
    labels = [f"fiber {f}" for f in fibers]
    pixels = image is not None and model is not None
    nrow = 3 if pixels else 2
    fig = _figure(figsize=(12, 3.3 * nrow), layout="constrained")
    gs = fig.add_gridspec(nrow, 3, height_ratios=[1.4, 1.2, 0.9][3 - nrow:])
    if pixels:
        x0, x1, y0, y1 = region if region is not None else (0, image.shape[1], 0, image.shape[0])
        cut = (slice(y0, y1), slice(x0, x1))
        axes = [fig.add_subplot(gs[0, i]) for i in range(3)]
        image_panels(axes, fig, np.asarray(image)[cut], np.asarray(model)[cut],
                     None if ivar is None else np.asarray(ivar)[cut], extent=(x0, x1, y0, y1))
    ax = fig.add_subplot(gs[nrow - 2, :])
    unit = str(frame.header.get("BUNIT", FLUX_UNIT)).strip() or FLUX_UNIT
    spectra_panel(ax, frame.wave, frame.flux, frame.ivar, rows, labels, wave_range=wave_range, unit=unit)
    ax = fig.add_subplot(gs[nrow - 1, :], sharex=ax)
    if frame.chi2pix is not None:
        chi2pix_panel(ax, frame.wave, frame.chi2pix, rows, labels, wave_range=wave_range)
    else:
        ax.text(0.5, 0.5, "no CHI2PIX HDU in this frame", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    fig.suptitle(title if title is not None else _frame_title(frame), fontsize=10)
    return fig


def plot_fit_residuals(path: str, fits, max_patches: int = 4, overwrite: bool = False) -> str:
    """PNG of data, model and (data - model) sqrt(ivar) for the first patches of a PSF fit.

    Args:
        path: the PNG to write (atomically).
        fits: :class:`jaxspec.FitResult` s (their ``xyrange``, ``kinds``, ``data``,
            ``ivar``, ``model``, ``fibers``, ``reduced_chi2``).
        max_patches: how many fits to draw.
        overwrite: replace an existing file.

    Axes are CCD columns and rows [pixels]; every panel has a labelled colour bar
    (photons for data and model, sigma for the residual).
    """
    fits = list(fits)[:max_patches]
    nimg = sum(len(f.kinds) for f in fits)
    fig = _figure(figsize=(11, 2.8 * nimg))
    axes = fig.subplots(nimg, 3, squeeze=False)
    row = 0
    for f in fits:
        x0, x1, y0, y1 = f.xyrange
        ext = (x0 - 0.5, x1 - 0.5, y0 - 0.5, y1 - 0.5)
        for kind, d, iv, m in zip(f.kinds, f.data, f.ivar, f.model):
            vmax = np.percentile(d[iv > 0], 99.5) if np.any(iv > 0) else 1.0
            r = (d - m) * np.sqrt(iv)
            for ax, img, title, kw, clabel in (
                (axes[row, 0], d, f"{kind} data", dict(vmin=0, vmax=vmax, cmap="gray"), "photons / pixel"),
                (axes[row, 1], m, "model", dict(vmin=0, vmax=vmax, cmap="gray"), "photons / pixel"),
                (axes[row, 2], r, f"residual (chi2/dof {f.reduced_chi2:.3f})",
                 dict(vmin=-4, vmax=4, cmap="RdBu_r"), "(data - model) / sigma"),
            ):
                im = ax.imshow(img, origin="lower", extent=ext, aspect="auto", interpolation="nearest", **kw)
                ax.set_title(f"{title}, fibers {f.fibers[0]}-{f.fibers[-1]}", fontsize=8)
                ax.set_xlabel("CCD column x [pixel]", fontsize=7)
                ax.set_ylabel("CCD row y [pixel]", fontsize=7)
                ax.tick_params(labelsize=7)
                cb = fig.colorbar(im, ax=ax)
                cb.set_label(clabel, fontsize=7)
                cb.ax.tick_params(labelsize=6)
            row += 1
    fig.tight_layout()
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=90), overwrite=overwrite)

