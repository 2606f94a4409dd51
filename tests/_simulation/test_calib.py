"""Arc line lists and simulated calibration exposures (jaxspec._simulation.calib)."""

import numpy as np
import pytest

import jaxspec
from jaxspec._simulation.calib import (
    ARC_LINES,
    CAMERA_RANGES,
    arc_lines,
    flat_spectrum,
    read_lines,
    simulate_arc,
    simulate_flat,
    write_lines,
)


def test_arc_lines_cover_each_arm_sorted():
    for arm, (lo, hi) in CAMERA_RANGES.items():
        lines = arc_lines(arm)
        assert len(lines) >= 10, arm
        assert np.all(np.diff(lines.wave) > 0)
        assert lines.wave.min() >= lo and lines.wave.max() <= hi
    # well-known lines are where they belong (air wavelengths, A)
    r = arc_lines("r")
    for w in (6402.246, 6506.528, 7032.413):
        assert np.min(np.abs(r.wave - w)) < 1e-6
    assert set(arc_lines(lamps=("Hg",)).element) == {"Hg"}
    with pytest.raises(ValueError, match="unknown lamps"):
        arc_lines(lamps=("Hg", "Zz"))
    with pytest.raises(ValueError, match="unknown arm"):
        arc_lines("q")


def test_min_separation_keeps_the_brighter_line():
    lines = arc_lines("r", min_separation=5.0)
    assert np.all(np.diff(lines.wave) >= 5.0)
    full = arc_lines("r")
    # of Ar 7503.869 (700) and 7514.652 (500): 10.8 A apart, both kept at 5 A, the fainter dropped at 12 A
    assert 7514.652 in lines.wave
    assert 7514.652 not in arc_lines("r", min_separation=12.0).wave
    assert 7503.869 in arc_lines("r", min_separation=12.0).wave
    assert len(arc_lines("r", min_flux=500.0)) < len(full)
    assert sum(len(v) for v in ARC_LINES.values()) > 100


def test_line_file_round_trip(tmp_path):
    lines = arc_lines("b")
    path = tmp_path / "lines.txt"
    write_lines(path, lines)
    back = read_lines(path)
    np.testing.assert_allclose(back.wave, lines.wave, atol=5e-4)
    np.testing.assert_allclose(back.flux, lines.flux, rtol=1e-5)
    assert list(back.element) == list(lines.element)
    # a bare list of wavelengths (the --lines format) gets unit fluxes
    (tmp_path / "bare.txt").write_text("# two lines\n6402.246\n\n5852.488  # Ne\n")
    bare = read_lines(tmp_path / "bare.txt")
    np.testing.assert_array_equal(bare.wave, [5852.488, 6402.246])
    np.testing.assert_array_equal(bare.flux, [1.0, 1.0])
    (tmp_path / "bad.txt").write_text("6402.2\nnot-a-number\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        read_lines(tmp_path / "bad.txt")


@pytest.fixture(scope="module")
def psf(psf_path):
    return jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))


def test_simulate_arc_puts_each_lines_photons_on_the_ccd(psf):
    """Lines well inside the box: the noiseless model sums to the line photons; noise is right."""
    box = psf.xyrange((0, 5), (6280.0, 6460.0))
    lines = arc_lines("r")
    arc = simulate_arc(psf, lines, specmin=0, nspec=5, xyrange=box, seed=3, peak_photons=2e4)
    assert arc.kind == "arc" and arc.image.shape == (box[3] - box[2], box[1] - box[0])
    inside = (lines.between(psf.wmin, psf.wmax).wave > 6300) & (lines.between(psf.wmin, psf.wmax).wave < 6440)
    expect = arc.line_photons[:, inside].sum()
    assert expect > 1e4
    rows = np.asarray(psf.y(np.arange(5)[:, None], arc.lines.wave[None, inside]))
    assert rows.min() > box[2] + 10 and rows.max() < box[3] - 10
    # the light of the lines inside (others are outside the box by more than a stamp)
    others = arc.lines.wave[~inside]
    y_others = np.asarray(psf.y(0, others))
    assert np.all((y_others < box[2] - psf.hsizey - 1) | (y_others > box[3] + psf.hsizey + 1))
    np.testing.assert_allclose(arc.model.sum(), expect, rtol=1e-9)
    pull = (arc.image - arc.model) * np.sqrt(arc.ivar)
    assert abs(pull.mean()) < 0.02 and abs(pull.std() - 1) < 0.02
    # throughputs are per fiber, 0.9-1.1, the brightest line at peak_photons
    assert arc.line_photons.max() <= 2e4 * 1.1 and arc.line_photons.max() >= 2e4 * 0.9


def test_simulate_flat_follows_the_lamp(psf):
    """One lit fiber: each CCD row collects level * throughput * lamp(w) * dw/dy photons."""
    box = psf.xyrange((1, 2), (6000.0, 6200.0))
    flat = simulate_flat(psf, specmin=1, nspec=1, xyrange=box, seed=4, level=1e4)
    assert flat.kind == "flat" and flat.flux.shape == (1, len(flat.wave))
    np.testing.assert_allclose(flat.flux[0] / flat.flux[0, 0], flat_spectrum(flat.wave) / flat_spectrum(flat.wave[0]))
    thr = flat.flux[0, 0] / (1e4 * flat_spectrum(flat.wave[0]))
    assert 0.9 <= thr <= 1.1
    for y in (box[2] + 40, (box[2] + box[3]) // 2, box[3] - 40):
        w = float(psf.wavelength(1, y))
        expect = 1e4 * thr * flat_spectrum(w) * float(psf.angstroms_per_pixel(1, w))
        np.testing.assert_allclose(flat.model[y - box[2]].sum(), expect, rtol=2e-3)
    pull = (flat.image - flat.model) * np.sqrt(flat.ivar)
    assert abs(pull.std() - 1) < 0.03
    with pytest.raises(ValueError, match="fibers"):
        simulate_flat(psf, specmin=498, nspec=5, xyrange=box)


def test_simulate_arc_continuum_follows_the_trace(psf):
    """An arc with a continuum: its noiseless model is the lines' plus level * throughput * dw/dy
    photons per CCD row along each fiber's trace (one fiber lit); without it, the same image as before."""
    box = psf.xyrange((1, 2), (6000.0, 6200.0))
    lines = arc_lines("r")
    bare = simulate_arc(psf, lines, specmin=1, nspec=1, xyrange=box, seed=4)
    arc = simulate_arc(psf, lines, specmin=1, nspec=1, xyrange=box, seed=4, continuum=lambda w: 50.0 + 0.01 * (w - 6000))
    assert bare.wave is None and arc.flux.shape == (1, len(arc.wave))
    np.testing.assert_array_equal(arc.line_photons, bare.line_photons)
    thr = arc.flux[0, 0] / 50.0
    assert 0.9 <= thr <= 1.1
    cont = arc.model - bare.model
    for y in (box[2] + 40, (box[2] + box[3]) // 2, box[3] - 40):
        w = float(psf.wavelength(1, y))
        expect = thr * (50.0 + 0.01 * (w - 6000)) * float(psf.angstroms_per_pixel(1, w))
        np.testing.assert_allclose(cont[y - box[2]].sum(), expect, rtol=2e-3)
    with pytest.raises(ValueError, match="dw"):
        simulate_arc(psf, lines, specmin=1, nspec=1, xyrange=box, continuum=10.0, dw=0.0)
