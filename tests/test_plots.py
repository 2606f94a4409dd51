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
    ex = jaxspec.extract(image, ivar, psf, wave, nspec=25, wavesize=30, model=True)
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
