"""Figures people want from an extraction (matplotlib, imported only by the CLI and users).

* :func:`plot_extraction`: image / model / residual panels and spectra with error
  bands (and truth, when known, convolved with the resolution matrix).
* :func:`plot_frame`: spectra with error bands and chi2pix from a frame file.
"""

from __future__ import annotations

import numpy as np


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _limits(a: np.ndarray) -> tuple[float, float]:
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _spectra_panel(ax, wave, flux, ivar, fiber_labels, truth=None):
    colors = ["C0", "C1", "C2", "C3", "C4", "C5"]
    for n, (f, label) in enumerate(fiber_labels):
        c = colors[n % len(colors)]
        err = np.where(ivar[f] > 0, 1 / np.sqrt(np.where(ivar[f] > 0, ivar[f], 1)), np.nan)
        ax.fill_between(wave, flux[f] - err, flux[f] + err, color=c, alpha=0.3, lw=0)
        ax.plot(wave, flux[f], color=c, lw=0.8, label=label)
        if truth is not None:
            ax.plot(wave, truth[f], color="k", lw=0.6, ls="--")
    ax.set_xlabel("wavelength [A]")
    ax.set_ylabel("flux [photons / A]")
    ax.legend(fontsize=7, loc="upper right")


def plot_extraction(path, ex, image=None, ivar=None, truth=None, fibers=(0,), title=None):
    """Write a PNG of an :class:`~jaxspec.Extraction`.

    Args:
        path: PNG file to write.
        ex: the extraction (with ``model`` when image panels are wanted).
        image, ivar: the extracted image and its inverse variance (optional).
        truth: (nspec, nwave) true photons / A, plotted after convolution with the
            extraction's resolution matrix (optional).
        fibers: fiber offsets (0 = ``ex.specmin``) to draw.
    """
    from .solve import apply_resolution

    plt = _mpl()
    wave = np.asarray(ex.wave)
    flux = np.asarray(ex.flux)
    fivar = np.asarray(ex.ivar)
    conv = None if truth is None else np.asarray(apply_resolution(ex.resolution, np.asarray(truth)))
    panels = image is not None and ex.model is not None
    fig = plt.figure(figsize=(12, 7 if panels else 4), layout="constrained")
    if panels:
        gs = fig.add_gridspec(2, 3, height_ratios=[1.3, 1])
        model = np.asarray(ex.model)
        lo, hi = _limits(image)
        chi = (image - model) * np.sqrt(np.clip(ivar, 0, None)) if ivar is not None else image - model
        for i, (a, name, lim, cmap) in enumerate(
            [(image, "image", (lo, hi), "viridis"), (model, "model", (lo, hi), "viridis"),
             (chi, "(image - model) x sqrt(ivar)", (-4, 4), "RdBu_r")]
        ):
            ax = fig.add_subplot(gs[0, i])
            im = ax.imshow(a, origin="lower", aspect="auto", vmin=lim[0], vmax=lim[1], cmap=cmap,
                           interpolation="nearest")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("x [pixel]")
            ax.set_ylabel("y [pixel]")
            fig.colorbar(im, ax=ax, shrink=0.8)
        ax = fig.add_subplot(gs[1, :])
    else:
        ax = fig.add_subplot(1, 1, 1)
    labels = [(f, f"fiber {ex.specmin + f}") for f in fibers]
    _spectra_panel(ax, wave, flux, fivar, labels, conv)
    if conv is not None:
        ax.plot([], [], color="k", lw=0.6, ls="--", label="truth (R x input)")
        ax.legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frame(path, frame, fibers=(0,), image=None, model=None, region=None):
    """Write a PNG of a frame file: spectra with error bands, chi2pix, and
    optionally image / model / residual panels of a pixel ``region`` (x0, x1, y0, y1)."""
    plt = _mpl()
    wave = np.asarray(frame.wave)
    flux = np.asarray(frame.flux)
    ivar = np.asarray(frame.ivar)
    specmin = frame.specmin
    nrow = 3 if (image is not None and model is not None) else 2
    fig = plt.figure(figsize=(12, 3.2 * nrow), layout="constrained")
    gs = fig.add_gridspec(nrow, 3)
    row = 0
    if nrow == 3:
        x0, x1, y0, y1 = region if region is not None else (0, image.shape[1], 0, image.shape[0])
        sub_i = image[y0:y1, x0:x1]
        sub_m = model[y0:y1, x0:x1]
        lo, hi = _limits(sub_i)
        for i, (a, name, lim, cmap) in enumerate(
            [(sub_i, "image", (lo, hi), "viridis"), (sub_m, "model", (lo, hi), "viridis"),
             (sub_i - sub_m, "image - model", _limits(sub_i - sub_m), "RdBu_r")]
        ):
            ax = fig.add_subplot(gs[0, i])
            im = ax.imshow(a, origin="lower", aspect="auto", vmin=lim[0], vmax=lim[1], cmap=cmap,
                           extent=(x0 - 0.5, x1 - 0.5, y0 - 0.5, y1 - 0.5), interpolation="nearest")
            ax.set_title(name, fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8)
        row = 1
    ax = fig.add_subplot(gs[row, :])
    idx = [f - specmin if f >= specmin else f for f in fibers]
    _spectra_panel(ax, wave, flux, ivar, [(i, f"fiber {specmin + i}") for i in idx])
    ax = fig.add_subplot(gs[row + 1, :])
    if frame.chi2pix is not None:
        for i in idx:
            ax.plot(wave, np.asarray(frame.chi2pix)[i], lw=0.7, label=f"fiber {specmin + i}")
        ax.axhline(1.0, color="k", lw=0.5, ls=":")
        ax.set_yscale("log")
        ax.set_ylabel("chi2pix")
        ax.set_xlabel("wavelength [A]")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
