"""Figures of :mod:`jaxspec._plots` from an extraction in memory."""

import numpy as np
import pytest

import jaxspec
from jaxspec import _plots

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(scope="module")
def extraction():
    wave = 5650.0 + 0.8 * np.arange(60)
    psf = jaxspec.desi_like_psf(nspec=25, wmin=wave[0] - 8, wmax=wave[-1] + 8, margin=12.0)
    truth = 60.0 + 500.0 * np.exp(-0.5 * ((wave - 5670.0) / 1.0) ** 2) * np.ones((25, 1))
    image, ivar, _ = jaxspec.simulate(psf, wave, truth, readnoise=3.0, seed=2)
    ex = jaxspec.extract(image, ivar, psf, wave, nspec=25, options=jaxspec.ExtractOptions(nwavestep=30), model=True)
    return ex, image, ivar, truth


def test_plot_extraction_writes_png(extraction, tmp_path):
    ex, image, ivar, truth = extraction
    out = tmp_path / "ex.png"
    path = _plots.plot_extraction(out, ex, image=image, ivar=ivar, truth=truth, fibers=(0, 12), title="t")
    assert path == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000
    assert plt.get_fignums() == []  # the figure was closed


def test_spectra_panel_draws_bands_truth_and_gaps(extraction):
    ex, _, _, truth = extraction
    ivar = np.array(ex.ivar)
    ivar[0, 10:15] = 0.0  # a masked stretch must be a gap, not a line to zero
    conv = np.asarray(jaxspec.apply_resolution(ex.resolution, truth))
    fig, ax = plt.subplots()
    _plots.spectra_panel(ax, ex.wave, ex.flux, ivar, [0, 5], ["a", "b"], truth=conv, wave_range=(5655, 5690))
    lines = [ln for ln in ax.get_lines() if ln.get_label() in ("a", "b")]
    assert len(lines) == 2
    y = lines[0].get_ydata()
    x = lines[0].get_xdata()
    assert x.min() >= 5655 and x.max() <= 5690
    wave = np.asarray(ex.wave)
    gap = (x >= wave[10]) & (x <= wave[14])
    assert gap.sum() == 5 and np.all(np.isnan(y[gap]))
    assert np.all(np.isfinite(y[~gap]))
    assert len(ax.collections) == 2  # one error band per spectrum
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["a", "b", "truth convolved with R"]
    # the truth lines follow the extracted flux to within a few sigma
    tl = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--" and len(ln.get_xdata())][0]
    sel = (wave >= 5655) & (wave <= 5690)
    pull = (np.asarray(ex.flux)[0, sel] - tl.get_ydata()) * np.sqrt(np.asarray(ex.ivar)[0, sel])
    assert np.max(np.abs(pull)) < 5
    plt.close(fig)


def test_image_panels_pull_scale(extraction):
    ex, image, ivar, _ = extraction
    fig, axes = plt.subplots(1, 3)
    _plots.image_panels(axes, fig, image, ex.model, ivar, extent=(0, image.shape[1], 0, image.shape[0]))
    pull = axes[2].get_images()[0]
    assert pull.get_clim() == (-5.0, 5.0)
    data = np.ma.filled(pull.get_array(), np.nan)
    good = ivar > 0
    assert abs(np.nanmean(data[good])) < 0.1
    # image and model share one colour scale, so they can be compared by eye
    assert axes[0].get_images()[0].get_clim() == axes[1].get_images()[0].get_clim()
    plt.close(fig)


def test_plot_frame_rejects_fibers_outside(extraction, tmp_path):
    ex, *_ = extraction
    frame = jaxspec.Frame(wave=np.asarray(ex.wave), flux=np.asarray(ex.flux), ivar=np.asarray(ex.ivar),
                          resolution=np.asarray(ex.resolution), chi2pix=None)
    with pytest.raises(ValueError, match="not in the frame"):
        _plots.plot_frame(tmp_path / "f.png", frame, fibers=[25])
    # no CHI2PIX: the panel says so instead of failing
    out = _plots.plot_frame(tmp_path / "f.png", frame, fibers=[0, 24])
    assert (tmp_path / "f.png").stat().st_size > 10_000 and out == tmp_path / "f.png"


def _frame(ex, bunit="electron/Angstrom"):
    from astropy.io import fits

    hdr = fits.Header()
    if bunit is not None:
        hdr["BUNIT"] = bunit
    return jaxspec.Frame(wave=np.asarray(ex.wave), flux=np.asarray(ex.flux), ivar=np.asarray(ex.ivar),
                         resolution=np.asarray(ex.resolution), chi2pix=np.asarray(ex.chi2pix), header=hdr)


def test_flux_axis_says_the_frames_unit(extraction):
    ex, *_ = extraction
    for bunit, label in [("electron/Angstrom", "flux [electron / Angstrom]"),
                         ("10**-17 erg/(s cm2 Angstrom)", "flux [10**-17 erg / (s cm2 Angstrom)]"),
                         (None, "flux [electron / Angstrom]")]:  # no BUNIT: what jaxspec writes
        fig = _plots._frame_figure(_frame(ex, bunit), fibers=[0, 24])
        spectra_ax = fig.axes[0]
        assert spectra_ax.get_ylabel() == label
        assert "photons" not in spectra_ax.get_ylabel()
        plt.close(fig)
    fig, ax = plt.subplots()
    _plots.spectra_panel(ax, ex.wave, ex.flux, ex.ivar, [0])
    assert ax.get_ylabel() == "flux [electron / Angstrom]" and ax.get_xlabel() == "wavelength [Angstrom]"
    plt.close(fig)


@pytest.mark.parametrize("scale", [0.4, 1.0, 3.0, 30.0, 400.0])
def test_chi2pix_ticks_one_format(scale):
    """Every labelled chi2pix tick is a plain decimal (no '3e-01' beside '1', no mathtext)."""
    import re

    rng = np.random.default_rng(5)
    wave = np.linspace(5600.0, 5700.0, 120)
    c2 = scale * rng.uniform(0.6, 1.8, (3, 120))
    fig, ax = plt.subplots(figsize=(8, 3))
    _plots.chi2pix_panel(ax, wave, c2, [0, 1, 2])
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    shown = [t.get_text() for minor in (False, True) for t in ax.get_yticklabels(minor=minor)
             if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert len(shown) >= 2, shown
    assert all(re.fullmatch(r"\d+(\.\d+)?", s) for s in shown), shown
    # the labels are the tick values
    for t in ax.get_yticklabels():
        if t.get_text() and lo <= t.get_position()[1] <= hi:
            assert float(t.get_text()) == pytest.approx(t.get_position()[1], rel=1e-12)
    plt.close(fig)


def test_png_written_atomically(extraction, tmp_path):
    """PNGs go through the atomic writer: never replaced without overwrite, no temp file left."""
    ex, *_ = extraction
    frame = _frame(ex)
    out = tmp_path / "f.png"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _plots.plot_frame(out, frame, fibers=[0])
    with pytest.raises(FileExistsError):
        _plots.plot_extraction(out, ex)
    assert out.read_bytes() == b"keep me" and plt.get_fignums() == []
    _plots.plot_frame(out, frame, fibers=[0], overwrite=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_png_never_partial_after_sigkill(tmp_path):
    """SIGKILL while PNGs are written: the file is always a whole PNG (or absent), never empty."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "k.png"
    script = f"""
import sys
import matplotlib
matplotlib.use("Agg")
import numpy as np
from jaxspec import _plots
from jaxspec._io.frames import Frame
wave = np.linspace(5600, 5700, 2000)
rng = np.random.default_rng(0)
f = Frame(wave=wave, flux=rng.normal(100, 10, (3, 2000)), ivar=np.ones((3, 2000)),
          resolution=np.ones((3, 1, 2000)), chi2pix=rng.uniform(0.5, 2, (3, 2000)))
for i in range(10_000):
    _plots.plot_frame({str(out)!r}, f, fibers=[0, 1, 2], overwrite=True)
    print("done", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "done"
        for delay in (0.013, 0.05, 0.11, 0.17):
            time.sleep(delay)
            head = out.read_bytes()
            assert head[:8] == b"\x89PNG\r\n\x1a\n" and head.endswith(b"IEND\xaeB`\x82")
        time.sleep(0.07)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data.endswith(b"IEND\xaeB`\x82")  # complete
    # at most a hidden temporary file of the writer's pattern may remain (cleaned by the next run)
    rest = [p.name for p in tmp_path.iterdir() if p.name != "k.png"]
    assert all(n.startswith(".k.png.") and n.endswith(".tmp") for n in rest), rest
