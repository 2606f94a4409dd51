"""Patch geometry against specter's rules (split_bundle, xyrange, ex2d's padding).

specter (desihub/specter, ``extract/ex2d.py`` and ``psf/psf.py``) decides every
patch's fibers, wavelengths and pixel box; jaxspec must cut the very same patches.
Each rule is checked here on its own, against an independent statement of it.
"""

import jax
import numpy as np
import pytest

import jaxspec
from jaxspec._extraction.geometry import patch_geometry, split_bundle


# --------------------------------------------------------------------------- split_bundle
def _specter_split(n: int, nsub: int):
    """specter's split_bundle, stated independently: np.array_split sizes, then one
    left-to-right pass swapping any size larger than its right neighbour."""
    sizes = [len(a) for a in np.array_split(np.arange(n), nsub)]
    for i in range(nsub - 1):
        if sizes[i] > sizes[i + 1]:
            sizes[i + 1], sizes[i] = sizes[i], sizes[i + 1]
    edges = np.cumsum([0] + sizes)
    core = [list(range(edges[i], edges[i + 1])) for i in range(nsub)]
    ext = [list(range(max(c[0] - 1, 0), min(c[-1] + 2, n))) for c in core]
    return core, ext


def test_split_bundle_docstring_example():
    # the example in specter's split_bundle docstring
    core, ext = split_bundle(10, 3)
    assert [c.tolist() for c in core] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [e.tolist() for e in ext] == [[0, 1, 2, 3], [2, 3, 4, 5, 6], [5, 6, 7, 8, 9]]


@pytest.mark.parametrize("n", [1, 2, 5, 7, 24, 25, 26])
def test_split_bundle_all_sizes(n):
    for nsub in range(1, n + 1):
        core, ext = split_bundle(n, nsub)
        want_core, want_ext = _specter_split(n, nsub)
        assert [c.tolist() for c in core] == want_core, (n, nsub)
        assert [e.tolist() for e in ext] == want_ext, (n, nsub)
        # every fiber owned once; extract lengths differ by at most 1 (specter's note)... or 2 at the bundle's ends
        assert sorted(sum(want_core, [])) == list(range(n))


def test_split_bundle_25_by_4():
    core, _ = split_bundle(25, 4)
    assert [len(c) for c in core] == [6, 6, 6, 7]  # the 7 bubbles to the end in one pass


def test_split_bundle_refuses_bad_counts():
    for nsub in (0, 26):
        with pytest.raises(ValueError, match="nsubbundles"):
            split_bundle(25, nsub)


# --------------------------------------------------------------------------- xyrange
@pytest.fixture(scope="module")
def synth_psf():
    # fibers 0..49; in the first half of the slit the traces dip: y falls with fiber number
    return jaxspec.desi_like_psf(nspec=50, wmin=5600.0, wmax=5800.0)


def test_xyrange_ymin_uses_only_the_range_fibers(synth_psf):
    """Convention 3: specter's ymin search covers fibers specmin..specmax-1, not specmax."""
    # traces that fall by half a row per fiber: the fiber past a range sits lower
    tilt = -0.5 * np.arange(synth_psf.nspec)
    psf = synth_psf.with_traces(ycoef=synth_psf.ycoef.at[:, 0].add(tilt + 30.0))
    ny = psf.stamp_shape[0]
    nlower = 0
    for lo in range(0, 20, 2):
        for w in (5650.0, 5700.4, 5733.3):
            fib = np.arange(lo, lo + 6)
            y = np.asarray(psf.y(fib, w))
            ymin_want = max(int(np.trunc(y.min() - psf.hsizey + 0.5)), 0)
            xr = psf.xyrange((lo, lo + 6), (w, w + 40.0))
            assert xr[2] == ymin_want, (lo, w)
            y_next = float(psf.y(lo + 6, w))
            nlower += int(np.trunc(y_next - psf.hsizey + 0.5)) < ymin_want
    # the case that tells the two rules apart does occur here
    assert nlower >= 10
    assert ny == 11


def test_xyrange_refuses_fibers_outside(synth_psf):
    with pytest.raises(IndexError):
        synth_psf.xyrange((45, 51), (5650.0, 5700.0))
    with pytest.raises(IndexError):
        synth_psf.xyrange(50, 5650.0)


def _specter_box(psf, speclo, spechi, wlo, whi, pixpad_frac=0.8):
    """ex2d's padded box from PSF.xyrange: round(pixpad_frac * ny) rows each side,
    ny the height of fiber speclo's spot at wlo as it lands on the CCD."""
    xlo, xhi, ylo, yhi = psf.xyrange((speclo, spechi), (wlo, whi))
    ny = int(psf.xypix_range(speclo, wlo)[4])
    pad = int(round(pixpad_frac * ny))
    return xlo, xhi, max(ylo - pad, 0), min(yhi + pad, psf.npix_y)


def _patch_rows(geom):
    fib = np.where(geom.fiber_valid, geom.fibers, -1)
    speclo = geom.fibers[:, 0]
    spechi = fib.max(axis=1) + 1
    wlo = geom.wave[geom.out_wave]
    whi = geom.wave[np.minimum(geom.out_wave + geom.keep_n - 1, len(geom.wave) - 1)]
    return speclo, spechi, wlo, whi


def test_boxes_match_xyrange_patch_by_patch(psf_path):
    """The vectorised boxes equal PSF.xyrange plus ex2d's padding, patch by patch,
    in the first and last bundles and at both ends of the CCD."""
    psf = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    wlo_s, whi_s = psf.specter_wave_range()
    cases = [
        (0, 25, 5548.0 + 0.8 * np.arange(160)),  # first bundle, from the CCD's bottom rows
        (475, 25, 7672.0 + 0.8 * np.arange(160)),  # last bundle, up to its top rows
    ]
    nbox = 0
    for specmin, nspec, wave in cases:
        geom = patch_geometry(psf, wave, specmin, nspec)
        speclo, spechi, wlo, whi = _patch_rows(geom)
        for p in range(geom.npatch):
            want = _specter_box(psf, int(speclo[p]), int(spechi[p]), float(wlo[p]), float(whi[p]))
            assert tuple(int(v) for v in geom.box[p]) == want, (specmin, p)
            nbox += 1
    assert nbox == 2 * 5 * 4
    assert wlo_s < 5548.0 and whi_s > 7672.0 + 0.8 * 159


def test_y_padding_is_round_not_int(synth_psf):
    """Convention 4: ex2d pads round(0.8 * 11) = 9 rows each side (not int(): 8)."""
    psf = synth_psf
    wave = 5650.0 + 0.8 * np.arange(100)
    geom = patch_geometry(psf, wave, 0, 25, nwavestep=50)
    speclo, spechi, wlo, whi = _patch_rows(geom)
    for p in range(geom.npatch):
        xr = psf.xyrange((int(speclo[p]), int(spechi[p])), (float(wlo[p]), float(whi[p])))
        assert geom.box[p, 2] == xr[2] - 9 and geom.box[p, 3] == xr[3] + 9


# --------------------------------------------------------------------------- partial bundles
@pytest.mark.parametrize("nspec,bundlesize,nsub", [(30, 25, 4), (27, 25, 5), (25, 25, 4), (12, 5, 3), (25, 25, 25)])
def test_partial_bundles_and_any_nsubbundles(synth_psf, nspec, bundlesize, nsub):
    """Every fiber is kept from exactly one patch per block, with specter's subbundles."""
    wave = 5650.0 + 0.8 * np.arange(60)
    geom = patch_geometry(synth_psf, wave, 3, nspec, bundlesize=bundlesize, nsubbundles=nsub, nwavestep=30)
    nblock = 2
    kept = geom.out_fiber[geom.out_fiber >= 0]
    assert np.array_equal(np.bincount(kept, minlength=nspec), np.full(nspec, nblock))
    # the subbundles of each bundle, as specter's split_bundle cuts them
    want = []
    for b0 in range(0, nspec, bundlesize):
        m = min(bundlesize, nspec - b0)
        core, ext = _specter_split(m, min(nsub, m))
        want += [(3 + b0 + e[0], 3 + b0 + e[-1] + 1, 3 + b0 + c[0], 3 + b0 + c[-1] + 1) for c, e in zip(core, ext)]
    got = []
    for p in range(0, geom.npatch, nblock):
        f = geom.fibers[p][geom.fiber_valid[p]]
        k = f[geom.out_fiber[p][geom.fiber_valid[p]] >= 0]
        got.append((f[0], f[-1] + 1, k[0], k[-1] + 1))
    assert got == want


def test_nsubbundles_out_of_range_refused(synth_psf):
    wave = 5650.0 + 0.8 * np.arange(60)
    for nsub in (0, 26):
        with pytest.raises(ValueError, match="nsubbundles"):
            patch_geometry(synth_psf, wave, 0, 25, bundlesize=25, nsubbundles=nsub)


# --------------------------------------------------------------------------- PSF range
def test_wavelengths_a_little_past_the_psf_are_accepted(synth_psf):
    psf = synth_psf
    lo, hi = psf.wave_limits()
    assert lo < psf.wmin - 3.0 and hi > psf.wmax + 3.0  # one spot height: ~6 A here
    wave = np.arange(psf.wmax - 40.0, psf.wmax + 3.0, 0.8)
    geom = patch_geometry(psf, wave, 0, 25, nwavestep=25)
    assert np.all(geom.box[:, 3] <= psf.npix_y) and np.all(geom.box[:, 3] >= geom.box[:, 2])
    with pytest.raises(ValueError, match="outside"):
        patch_geometry(psf, wave + 50.0, 0, 25)


# --------------------------------------------------------------------------- fiber indices
@pytest.mark.parametrize("bad", [50, -1])
def test_fiber_index_out_of_range_raises(synth_psf, bad):
    """specter raises IndexError; x, y, wavelength and spots used to clamp silently."""
    psf = synth_psf
    for call in (
        lambda: psf.x(bad, 5700.0),
        lambda: psf.y(np.array([0, bad]), 5700.0),
        lambda: psf.wavelength(bad, 100.0),
        lambda: psf.spots(np.array([[bad]]), np.array([5700.0])),
        lambda: psf.corners(bad, 5700.0),
    ):
        with pytest.raises(IndexError, match="fiber index"):
            call()
    # inside jit too, where the index is concrete
    with pytest.raises(IndexError, match="fiber index"):
        jax.jit(lambda p, w: p.x(bad, w))(psf, 5700.0)
    with pytest.raises(IndexError, match="fiber index"):
        jax.jit(lambda p, w: p.spots(np.arange(45, 51), w)[2])(psf, np.array([5700.0]))
    # the last fiber is fine
    assert np.isfinite(float(psf.x(49, 5700.0)))


def test_xypix_range_follows_specters_xypix(psf_path):
    """The pixels specter's xypix gives a spot on the whole CCD, case by case."""
    psf = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    ny_ccd = psf.npix_y
    f = 200
    rows = np.array([-0.6, -0.4, 3.7, 10.0, ny_ccd - 3.0, ny_ccd - 0.4, ny_ccd - 0.6])
    wave = np.asarray(psf.wavelength(np.full(rows.shape, f), rows))
    xlo, xhi, ylo, yhi, ny, nx = (np.asarray(a) for a in psf.xypix_range(f, wave))
    y = np.asarray(psf.y(f, wave))
    # below row -0.5: nothing, slices at 0; just above: rows from 0, one short of the
    # clipped range (int truncates toward zero), i.e. int(y + 6.5) rows
    assert (ylo[0], yhi[0], ny[0], nx[0]) == (0, 0, 0, 0)
    assert (ylo[1], yhi[1], ny[1]) == (0, int(y[1] + 6.5), int(y[1] + 6.5))
    assert (ylo[2], yhi[2], ny[2]) == (0, int(y[2] + 6.5), int(y[2] + 6.5))
    assert (ylo[3], yhi[3], ny[3], nx[3]) == (int(y[3] - 4.5), int(y[3] - 4.5) + 11, 11, 17)
    # at the top: clipped to npix_y, then nothing past row npix_y - 0.5 (slices at npix_y)
    assert yhi[4] == ny_ccd and ny[4] == ny_ccd - ylo[4] < 11
    assert (ylo[5], yhi[5], ny[5]) == (ny_ccd, ny_ccd, 0)
    assert ny[6] > 0
    assert np.all(xhi[ny > 0] - xlo[ny > 0] == 17)


def test_padding_uses_the_spot_height_on_the_ccd(psf_path):
    """ex2d pads by round(0.8 ny) with ny the first fiber's spot height at the block's
    first wavelength as it lands on the CCD: fewer rows there at the CCD's bottom."""
    psf = jaxspec.read_psf(psf_path("psf-r0-00067784.fits"))
    w0 = float(psf.wavelength(0, 2.0))  # fiber 0's spot at w0 starts below row 0
    wave = w0 + 0.8 * np.arange(100)
    geom = patch_geometry(psf, wave, 0, 25)
    ny = int(psf.xypix_range(0, w0)[4])
    assert ny < 11
    xr = psf.xyrange((0, 6), (wave[0], wave[49]))
    assert geom.box[0, 3] == min(xr[3] + int(round(0.8 * ny)), psf.npix_y)
    assert geom.box[0, 3] != xr[3] + 9


def test_wavesize_is_the_deprecated_name_of_nwavestep(synth_psf):
    wave = 5650.0 + 0.8 * np.arange(100)
    new = patch_geometry(synth_psf, wave, 0, 25, nwavestep=25)
    with pytest.warns(DeprecationWarning, match="nwavestep"):
        old = patch_geometry(synth_psf, wave, 0, 25, wavesize=25)
    assert new.npatch == old.npatch == 5 * 4
    for name in ("fibers", "wave_start", "nwave_patch", "box", "keep_n", "out_wave"):
        np.testing.assert_array_equal(getattr(old, name), getattr(new, name))
