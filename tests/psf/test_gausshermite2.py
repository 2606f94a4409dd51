"""GAUSS-HERMITE2 (two-core Gauss-Hermite) PSF against specter's evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec.psf import GaussHermite2PSF, read_psf

PSF_FILE = "psf-gausshermite2-specter-test.fits"
REF_FILE = "specter-spots-gausshermite2.npz"


@pytest.fixture(scope="module")
def gh2(psf_path):
    return read_psf(psf_path(PSF_FILE))


def test_reader_and_metadata(gh2):
    assert isinstance(gh2, GaussHermite2PSF)
    assert jaxspec.GaussHermite2PSF is GaussHermite2PSF
    assert (gh2.nspec, gh2.npix_x, gh2.npix_y, gh2.hsizex, gh2.hsizey) == (25, 4114, 4128, 10, 10)
    assert (gh2.ghdegx, gh2.ghdegy, gh2.ghdegx2, gh2.ghdegy2) == (6, 6, 3, 3)
    assert gh2.stamp_shape == (20, 20)  # 2 HSIZE, not 2 HSIZE + 1
    assert gh2.psferr == 0.01  # the file has PSFERROR, not PSFERR: specter's default
    assert gh2.domain == (5460.0, 10140.0)


def test_traces_match_specter(gh2, ref_path):
    ref = np.load(ref_path(REF_FILE))
    i, w = ref["ispec"], ref["wave"]
    np.testing.assert_allclose(gh2.x(i, w), ref["x"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(gh2.y(i, w), ref["y"], rtol=0, atol=1e-9)
    # the inverse trace: 1e-9 where it is fitted; up to 500 rows past the fitted rows
    # (extrapolating a degree-10 series) LAPACK's rounding shows, still below 1e-8 A
    wy = np.asarray(gh2.wavelength(i, ref["y_query"]))
    inside = ref["y_query"] <= float(gh2.ylim[1])
    assert inside.sum() > 150
    np.testing.assert_allclose(wy[inside], ref["wave_of_y"][inside], rtol=0, atol=1e-9)
    np.testing.assert_allclose(wy, ref["wave_of_y"], rtol=0, atol=1e-8)


def test_spots_match_specter_on_the_ccd(gh2, ref_path):
    """Every stamp pixel on the CCD to 1e-12, each stamp placed at its (xmin, ymin)."""
    ref = np.load(ref_path(REF_FILE))
    xmin, ymin, st = gh2.spots(ref["ispec"], ref["wave"], edges="specter")
    np.testing.assert_array_equal(np.asarray(xmin), ref["xmin"])
    np.testing.assert_array_equal(np.asarray(ymin), ref["ymin"])
    st = np.asarray(st)
    ny, nx = gh2.stamp_shape
    rows = ref["ymin"][:, None] + np.arange(ny)[None, :]
    cols = ref["xmin"][:, None] + np.arange(nx)[None, :]
    on = ((rows >= 0) & (rows < gh2.npix_y))[:, :, None] & ((cols >= 0) & (cols < gh2.npix_x))[:, None, :]
    refs = ref["spots"][:, :ny, :nx]
    assert np.abs(np.where(on, st - refs, 0.0)).max() < 1e-12
    np.testing.assert_allclose(st.sum(axis=(-2, -1)), 1.0, atol=1e-12)


def test_fiber_index_refused_and_jit_grad(gh2):
    with pytest.raises(IndexError, match="fiber index"):
        gh2.x(25, 6000.0)
    fib = jnp.arange(3)[:, None]
    wave = jnp.array([[6000.0, 6500.0]])
    _, _, st = jax.jit(lambda p: p.spots(fib, wave))(gh2)
    assert st.shape == (3, 2, 20, 20) and bool(jnp.all(jnp.isfinite(st)))

    def loss(params):
        import equinox as eqx

        p = eqx.tree_at(lambda q: q.params, gh2, params)
        return jnp.sum(p.spots(fib, wave)[2] ** 2)

    g = jax.grad(loss)(gh2.params)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


@pytest.mark.slow
def test_gh2_patch_geometry_and_extraction(gh2):
    """The two-core PSF goes through the extraction like any other: a simulated
    patch of 5 fibers comes back unbiased."""
    wave = 6000.0 + 0.8 * np.arange(40)
    flux = np.full((5, 40), 200.0)
    image, ivar, _ = jaxspec.simulate(gh2, wave, flux, readnoise=2.0, seed=3)
    geom = jaxspec.patch_geometry(gh2, wave, 0, 5, bundlesize=5, nsubbundles=1, nwavestep=20)
    assert geom.box_shape[0] > 20
    ex = jaxspec.extract(np.asarray(image), np.asarray(ivar), gh2, wave, nspec=5,
                         options=jaxspec.ExtractOptions(bundlesize=5, nsubbundles=1, nwavestep=20))
    conv = np.asarray(jaxspec.apply_resolution(ex.resolution, flux))
    pull = ((np.asarray(ex.flux) - conv) * np.sqrt(np.asarray(ex.ivar)))[:, 5:-5]
    assert np.all(np.isfinite(pull))
    assert abs(pull.mean()) < 0.3 and 0.6 < pull.std() < 1.4
