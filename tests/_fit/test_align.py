"""The start PSF's trace offsets measured from the images (jaxspec._fit.align, issue 18 item 3).

An arc and a flat of bundle 0 (fibers 0-24) simulated from the real r0 PSF over
6370-6430 A; the start is the same PSF with every trace shifted by (-3.4, +2.7) px, so
the images lie at (+3.4, -2.7) px from it (a new night: the CCD moved):

* the offsets are recovered within 0.02 px from the flat and arc, from the arc alone
  (2-d search) and, for x, from the flat alone (measured: within 0.002 px);
* the shifted traces (apply_trace_offsets) are the truth's within 0.02 px; every fiber of
  the bundle is shifted, broken ones too, and the other coefficients are kept bit for bit;
* a shift beyond max_shift, images without light, an end fiber without light that is not
  declared broken (a shift by one fiber pitch then fits as well), a part of a bundle whose
  neighbours are lit: clear errors naming the fibers, the images and what to change;
* end to end (slow): fit_bundle and fit_psf_ccd from the shifted start converge to the
  true traces with the alignment (default) and do not without it.
"""


import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec._fit import BundleInputError, TraceOffset, apply_trace_offsets, measure_bundle_offset, \
    measure_trace_offsets
from jaxspec._simulation.calib import arc_lines, simulate_arc, simulate_flat

PSF_NAME = "psf-r0-00067784.fits"
WR = (6370.0, 6430.0)
SHIFT = (3.4, -2.7)  # the images relative to the start [px]


def _offset(fibers, dx, dy):
    return TraceOffset(np.asarray(fibers), dx, dy, "", "", np.nan, np.nan, np.nan, np.nan, 8.0)


def _box(psf, nf, pad_wave=15.0, pad_x=20):
    box = list(psf.xyrange((0, nf), (WR[0] - pad_wave, WR[1] + pad_wave)))
    return (max(box[0] - pad_x, 0), box[1] + pad_x, box[2], box[3])


@pytest.fixture(scope="module")
def sim(psf_path):
    truth = jaxspec.read_psf(psf_path(PSF_NAME))
    nf = 25
    fibers = np.arange(nf)
    lines = arc_lines("r")
    box = _box(truth, nf)
    arc = simulate_arc(truth, lines, specmin=0, nspec=nf, xyrange=box, seed=1)
    flat = simulate_flat(truth, specmin=0, nspec=nf, xyrange=box, seed=2)
    start = apply_trace_offsets(truth, [_offset(fibers, -SHIFT[0], -SHIFT[1])])
    return dict(truth=truth, start=start, fibers=fibers, lines=lines, box=box, arc=arc, flat=flat)


def test_offsets_recovered_from_flat_and_arcs(sim):
    """(+3.4, -2.7) px recovered within 0.02 px from flat + arc, from the arc alone, and (x) from the
    flat alone; the aligned traces equal the truth's (its cost is a benchmark's business: 0.1-0.3 s
    a bundle here on the 2-core machine, ~0.45 s for a full-CCD bundle on the H200's host)."""
    kw = dict(lines=sim["lines"], fibers=sim["fibers"], waverange=WR)
    both = measure_bundle_offset(sim["start"], [sim["arc"]], [sim["flat"]], **kw)
    arc_only = measure_bundle_offset(sim["start"], [sim["arc"]], [], **kw)
    flat_only = measure_bundle_offset(sim["start"], [], [sim["flat"]], **kw)
    assert (both.x_from, both.y_from, arc_only.x_from, arc_only.y_from) == ("flat", "arc", "arc", "arc")
    for off in (both, arc_only):
        assert abs(off.dx - SHIFT[0]) < 0.02 and abs(off.dy - SHIFT[1]) < 0.02, off
        assert off.snr_x > 100 and off.snr_y > 100
    assert abs(flat_only.dx - SHIFT[0]) < 0.02 and flat_only.y_from == "" and flat_only.dy == 0.0
    assert 0.02 < both.contrast_x < 0.2  # one end fiber of 25 fewer at one fiber pitch (measured 0.04)
    aligned = apply_trace_offsets(sim["start"], [both])
    f, w = sim["fibers"][:, None], np.linspace(WR[0], WR[1], 7)[None, :]
    truth = sim["truth"]
    for fn in ("x", "y"):
        assert np.abs(np.asarray(getattr(aligned, fn)(f, w) - getattr(truth, fn)(f, w))).max() < 0.02, fn
    # the inverse trace follows: the wavelength at the truth's row of each point
    wy = np.asarray(aligned.wavelength(f, truth.y(f, w)))
    assert np.abs(wy - w).max() < 0.02  # A (0.6 A per row)
    # per bundle: measure_trace_offsets gives the same numbers
    (again,) = measure_trace_offsets(sim["start"], [sim["arc"]], [sim["flat"]], lines=sim["lines"], specmin=0,
                                     nspec=25, waverange=WR)
    assert (again.dx, again.dy) == (both.dx, both.dy)


def test_host_gauss_hermite_equals_the_psf_model():
    """The templates' NumPy pixel-integrated Gauss-Hermite functions equal the PSF model's (JAX) to 1e-14."""
    from jaxspec._fit.align import _pixel_gh
    from jaxspec.psf._gausshermite import pixel_gauss_hermite

    rng = np.random.default_rng(5)
    centre = rng.uniform(100.0, 101.0, 40)
    sigma = rng.uniform(0.8, 1.4, 40)
    lo = np.floor(centre).astype(np.int64) - 5
    want = np.asarray(pixel_gauss_hermite(jnp.asarray(lo), jnp.asarray(centre), jnp.asarray(sigma), 11, 6))
    got = _pixel_gh(lo.astype(float), centre, sigma, 11, 6)
    assert got.shape == want.shape == (40, 7, 11)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)


def test_apply_trace_offsets_shifts_every_fiber_of_the_bundle(sim):
    """Coefficient 0 of the x and y traces of the bundle's fibers (broken ones too) moves by (dx, dy);
    every other coefficient, and every other fiber, bit for bit."""
    psf = sim["truth"]
    out = apply_trace_offsets(psf, [_offset(np.arange(5, 10), 0.25, -1.5), None])
    for name, d in (("xcoef", 0.25), ("ycoef", -1.5)):
        a, b = np.asarray(getattr(out, name)), np.asarray(getattr(psf, name))
        np.testing.assert_array_equal(a[5:10, 0], b[5:10, 0] + d)
        assert a[5:10, 1:].tobytes() == b[5:10, 1:].tobytes()
        assert a[:5].tobytes() == b[:5].tobytes() and a[10:].tobytes() == b[10:].tobytes()
    assert np.asarray(out.params).tobytes() == np.asarray(psf.params).tobytes()
    np.testing.assert_allclose(np.asarray(out.y(7, 6400.0) - psf.y(7, 6400.0)), -1.5, atol=1e-12)


def test_shift_beyond_max_shift_is_refused(sim):
    """The images 3.4 px off in x, searched over +-2 px: the peak is at the window's edge; and bad
    max_shift values: clear messages."""
    kw = dict(lines=sim["lines"], fibers=sim["fibers"], waverange=WR)
    for arcs, flats, image in (([sim["arc"]], [sim["flat"]], "flat 0"), ([sim["arc"]], [], "arc 0")):
        with pytest.raises(BundleInputError, match=rf"{image}: .* fibers 0-24 match best at the edge of the "
                                                   r"search window \(\+-2 px.*--max-shift"):
            measure_bundle_offset(sim["start"], arcs, flats, max_shift=2.0, **kw)
    # y alone beyond the window: x searched wide enough, y not
    start = apply_trace_offsets(sim["truth"], [_offset(sim["fibers"], 0.0, -SHIFT[1] + 2.0)])  # images at -4.7 in y
    with pytest.raises(BundleInputError, match=r"arc 0: .*edge of the search window \(\+-3 px"):
        measure_bundle_offset(start, [sim["arc"]], [sim["flat"]], max_shift=3.0, **kw)
    for bad in (0.5, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"max_shift \(--max-shift\) must be a number of pixels >= 1"):
            measure_bundle_offset(sim["start"], [sim["arc"]], [sim["flat"]], max_shift=bad, **kw)


def test_images_without_light_are_refused(sim):
    """Read noise only (no lamp): 'no lamp light', naming the image and the fibers; an image that does
    not cover the bundle: 'no valid pixel'."""
    rng = np.random.default_rng(3)
    box = sim["box"]
    shape = (box[3] - box[2], box[1] - box[0])
    dark = (rng.normal(0.0, 3.0, shape), np.full(shape, 1 / 9.0), box)
    kw = dict(lines=sim["lines"], fibers=sim["fibers"], waverange=WR)
    with pytest.raises(BundleInputError, match=r"flat 0: no lamp light to align fibers 0-24: .*S/N"):
        measure_bundle_offset(sim["start"], [sim["arc"]], [dark], **kw)
    with pytest.raises(BundleInputError, match=r"arc 0: no lamp light to align fibers 0-24"):
        measure_bundle_offset(sim["start"], [dark], [sim["flat"]], **kw)
    with pytest.raises(BundleInputError, match=r"arcs 0-1: no lamp light to align fibers 0-24"):
        measure_bundle_offset(sim["start"], [dark, dark], [], **kw)
    # the next bundle (fibers 25-49) is off these images: nothing to correlate with
    with pytest.raises(BundleInputError, match=r"flat 0: no lamp light to align fibers 25-49: no valid pixel"):
        measure_bundle_offset(sim["start"], [sim["arc"]], [sim["flat"]], lines=sim["lines"],
                              fibers=np.arange(25, 50), waverange=WR)
    with pytest.raises(ValueError, match="line list"):
        measure_bundle_offset(sim["start"], [sim["arc"]], [], fibers=sim["fibers"], waverange=WR)


def test_unlit_end_fiber_and_part_of_a_bundle_are_ambiguous(sim):
    """A shift by one fiber pitch (7.3 px) loses only an end fiber's light: with fiber 24 dark and not
    declared broken (the images at +3.4 px: the template one pitch lower, at -3.9 px, meets the 24
    lit fibers as well), or fitting fibers 5-9 of the 25 lit ones, offsets one pitch apart fit as
    well and the alignment refuses (naming --max-shift and --broken-fibers); declared broken, or
    with a window below half the pitch, the shift is recovered."""
    truth, lines = sim["truth"], sim["lines"]
    tp = np.where(np.arange(25) == 24, 0.0, 1.0)
    flat = simulate_flat(truth, specmin=0, nspec=25, xyrange=sim["box"], seed=4, throughput=tp)
    kw = dict(lines=lines, fibers=sim["fibers"], waverange=WR)
    with pytest.raises(BundleInputError, match=r"flat 0: the offset of fibers 0-24 is ambiguous: .*offsets 3 and "
                                               r"-4 px.*--max-shift.*--broken-fibers"):
        measure_bundle_offset(sim["start"], [], [flat], **kw)
    off = measure_bundle_offset(sim["start"], [], [flat], broken_fibers=[24], **kw)
    assert abs(off.dx - SHIFT[0]) < 0.02
    part = dict(lines=lines, fibers=np.arange(5, 10), waverange=WR)
    with pytest.raises(BundleInputError, match="fibers 5-9 is ambiguous"):
        measure_bundle_offset(sim["start"], [sim["arc"]], [sim["flat"]], **part)
    start = apply_trace_offsets(truth, [_offset(np.arange(25), -1.2, 0.0)])
    off = measure_bundle_offset(start, [sim["arc"]], [sim["flat"]], max_shift=3.0, **part)
    assert abs(off.dx - 1.2) < 0.02 and abs(off.dy) < 0.02


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def small(psf_path):
    """Fibers 0-4 (a bundle of 5, the others dark) over 6360-6440 A; the start 3.4 px, -2.7 px off."""
    truth = jaxspec.read_psf(psf_path(PSF_NAME))
    nf, wr = 5, (6360.0, 6440.0)
    lines = arc_lines("r")
    box = list(truth.xyrange((0, nf), (wr[0] - 25, wr[1] + 25)))
    box = (max(box[0] - 20, 0), box[1] + 20, box[2], box[3])
    arc = simulate_arc(truth, lines, specmin=0, nspec=nf, xyrange=box, seed=1)
    flat = simulate_flat(truth, specmin=0, nspec=nf, xyrange=box, seed=2)
    start = apply_trace_offsets(truth, [_offset(np.arange(nf), -SHIFT[0], -SHIFT[1])])
    rng = np.random.default_rng(0)
    f, w = rng.integers(0, nf, 200), rng.uniform(wr[0] + 5, wr[1] - 5, 200)

    def rms(psf):
        return tuple(float(np.sqrt(np.mean(np.asarray(getattr(psf, fn)(f, w) - getattr(truth, fn)(f, w)) ** 2)))
                     for fn in ("x", "y"))

    return dict(truth=truth, start=start, lines=lines, arc=arc, flat=flat, wr=wr, nf=nf, rms=rms)


@pytest.mark.slow
def test_fit_bundle_from_a_shifted_start(small):
    """fit_bundle (traces of degree 1, GHSIGX/GHSIGY) from the start 3.4 px, -2.7 px off.

    Measured (2 cores): aligned, x trace RMS 0.0006 px and y 0.005 px of the truth, chi2/dof 0.995
    in 2 iterations (28 s with compilation); not aligned, the fit runs off (x RMS 160 px, chi2/dof
    470 after 10 iterations).  Asserted: aligned < 0.01 px RMS on both axes and chi2/dof within 0.02
    of 1; not aligned, refused or > 0.5 px RMS off.
    """
    kw = dict(lines=small["lines"], fibers=np.arange(small["nf"]), waverange=small["wr"], trace_deg=1,
              shape_terms=("GHSIGX", "GHSIGY"), legdeg_wave=0, maxiter=10, rows_per_block=32, patches_per_call=4)
    res = jaxspec.fit_bundle(small["start"], [small["arc"]], [small["flat"]], **kw)
    assert abs(res.offset.dx - SHIFT[0]) < 0.02 and abs(res.offset.dy - SHIFT[1]) < 0.02
    assert max(small["rms"](res.psf)) < 0.01, small["rms"](res.psf)
    assert abs(res.reduced_chi2 - 1) < 0.02
    assert min(small["rms"](res.psf_init)) < 0.02  # the fit started from the aligned traces
    try:
        bad = jaxspec.fit_bundle(small["start"], [small["arc"]], [small["flat"]], align=False, **kw)
    except ValueError:  # refused by the checks: also shows that the alignment matters
        return
    assert bad.offset is None
    assert max(small["rms"](bad.psf)) > 0.5, small["rms"](bad.psf)


@pytest.mark.slow
def test_fit_psf_ccd_from_a_shifted_start(small):
    """fit_psf_ccd (trace shifts per block) from the start 3.4 px, -2.7 px off: the offsets in the
    result and the header (BnnALDX, BnnALDY), the traces within 0.01 px RMS; not aligned: refused,
    failed or > 0.5 px off."""
    kw = dict(lines=small["lines"], specmin=0, nspec=small["nf"], bundlesize=small["nf"], nblocks=1,
              waverange=small["wr"], what=("xtrace", "ytrace"), maxiter=10)
    res = jaxspec.fit_psf_ccd(small["start"], [small["arc"]], [small["flat"]], **kw)
    (off,) = res.offsets
    assert abs(off.dx - SHIFT[0]) < 0.02 and abs(off.dy - SHIFT[1]) < 0.02
    hdr = res.header()
    assert hdr["B00ALDX"] == off.dx and hdr["B00ALDY"] == off.dy and hdr["B00STAT"] == 0
    assert max(small["rms"](res.psf)) < 0.01, small["rms"](res.psf)
    try:
        bad = jaxspec.fit_psf_ccd(small["start"], [small["arc"]], [small["flat"]], align=False, **kw)
    except ValueError:
        return
    assert bad.offsets == [None] and "B00ALDX" not in bad.header()
    assert bad.bundles[0].status == 2 or max(small["rms"](bad.psf)) > 0.5, small["rms"](bad.psf)


def test_broken_fiber_gets_its_bundles_shift(small):
    """measure_trace_offsets with a broken fiber: it is left out of the template and, applied, gets
    the bundle's shift; a bundle all of whose fibers are broken is not measured."""
    offs = measure_trace_offsets(small["start"], [small["arc"]], [small["flat"]], lines=small["lines"], specmin=0,
                                 nspec=10, bundlesize=5, waverange=small["wr"], broken_fibers=[2, 5, 6, 7, 8, 9])
    assert abs(offs[0].dx - SHIFT[0]) < 0.02 and abs(offs[0].dy - SHIFT[1]) < 0.02
    assert (offs[1].x_from, offs[1].y_from, offs[1].dx, offs[1].dy) == ("", "", 0.0, 0.0)
    out = apply_trace_offsets(small["start"], offs)
    assert abs(float(out.x(2, 6400.0) - small["truth"].x(2, 6400.0))) < 0.02
    np.testing.assert_array_equal(np.asarray(out.xcoef[5:10]), np.asarray(small["start"].xcoef[5:10]))
    assert jnp.asarray(out.xcoef).dtype == jnp.float64
