import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.psf import GaussHermitePSF, desi_like_psf, read_psf

CASES = [
    ("psf-r0-00067784.fits", "specter-spots-r0-67784.npz"),
    ("psf-r0-00051060.fits", "specter-spots-r0-51060.npz"),
    ("psf-gausshermite-v2-specter-test.fits", "specter-spots-gausshermite-v2.npz"),
]


@pytest.mark.parametrize("psfname,refname", CASES)
def test_matches_specter(psf_path, ref_path, psfname, refname):
    psf = read_psf(psf_path(psfname))
    ref = np.load(ref_path(refname))
    assert isinstance(psf, GaussHermitePSF)
    ispec, wave = ref["ispec"], ref["wave"]
    np.testing.assert_allclose(psf.x(ispec, wave), ref["x"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(psf.y(ispec, wave), ref["y"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        psf.wavelength(ispec, ref["y_query"]), ref["wave_of_y"], rtol=0, atol=1e-9
    )
    xmin, ymin, spots = psf.spots(ispec, wave)
    assert spots.shape == ref["spots"].shape
    np.testing.assert_array_equal(xmin, ref["xmin"])
    np.testing.assert_array_equal(ymin, ref["ymin"])
    np.testing.assert_allclose(spots, ref["spots"], rtol=0, atol=1e-12)


def test_v2_has_tails(psf_path):
    psf = read_psf(psf_path("psf-gausshermite-v2-specter-test.fits"))
    assert psf.has_tails and psf.stamp_shape == (17, 29)
    assert float(psf.param("TAILAMP", 3, 6000.0)) != 0.0


def test_metadata_and_ysigma(psf_path):
    psf = read_psf(psf_path("psf-r0-00067784.fits"))
    assert (psf.nspec, psf.npix_x, psf.npix_y, psf.hsizex, psf.hsizey) == (500, 4114, 4128, 8, 5)
    assert psf.psferr == 0.01 and psf.ghdegx == 6 and psf.ghdegy == 6
    assert psf.wmin < psf.wmin_all < 5760 and 7620 < psf.wmax_all < psf.wmax
    np.testing.assert_allclose(psf.ysigma(10, 6000.0), psf.param("GHSIGY", 10, 6000.0))
    w = psf.wavelength(np.arange(500), -0.5)
    assert abs(float(w.min()) - psf.wmin) < 1e-9


def test_batch_shapes_and_normalisation():
    psf = desi_like_psf(nspec=30)
    ispec = jnp.arange(30)[:, None, None]
    wave = jnp.linspace(5610.0, 5790.0, 8).reshape(1, 2, 4)
    xmin, ymin, st = psf.spots(ispec, wave)
    assert xmin.shape == (30, 2, 4) and st.shape == (30, 2, 4, 11, 17)
    np.testing.assert_allclose(st.sum(axis=(-2, -1)), 1.0, atol=1e-13)
    assert float(st.min()) >= 0.0
    # scalar call
    _, _, s1 = psf.spots(3, 5700.0)
    assert s1.shape == (11, 17)
    np.testing.assert_allclose(s1, st[3, 0, 0] * 0 + psf.spots(3, 5700.0)[2], atol=0)


def test_desi_like_geometry():
    psf = desi_like_psf(nspec=50, wmin=5600.0, wmax=5800.0)
    x = np.asarray(psf.x(np.arange(50), 5700.0))
    d = np.diff(x)
    np.testing.assert_allclose(d[:24], 7.4, atol=0.05)
    assert d[24] > 10.0  # bundle gap
    dwdy = psf.angstroms_per_pixel(10, 5700.0)
    assert 0.5 < float(dwdy) < 0.6
    assert psf.wmin < 5600.0 and psf.wmax > 5800.0
    sx = float(psf.param("GHSIGX", 10, 5700.0))
    sy = float(psf.param("GHSIGY", 10, 5700.0))
    assert 1.0 <= sx <= 1.1 and 1.1 <= sy <= 1.3
    psf.check_wavelengths(np.array([5600.0, 5800.0]))
    with pytest.raises(ValueError, match="outside"):
        psf.check_wavelengths(np.array([5000.0]))


def test_jit_vmap_grad():
    psf = desi_like_psf(nspec=10)
    f = jax.jit(lambda p, w: p.spots(jnp.arange(10), w)[2])
    np.testing.assert_allclose(f(psf, 5700.0), psf.spots(jnp.arange(10), 5700.0)[2], atol=1e-15)
    v = jax.vmap(lambda w: psf.spots(2, w)[2])(jnp.linspace(5650, 5750, 3))
    assert v.shape == (3, 11, 17)

    def loss(params, xcoef):
        p = eqx_replace(psf, params, xcoef)
        return jnp.sum(p.spots(jnp.arange(10), 5700.3)[2] ** 2)

    g = jax.grad(loss, argnums=(0, 1))(psf.params, psf.xcoef)
    assert all(np.all(np.isfinite(a)) for a in g)
    assert float(jnp.abs(g[0]).sum()) > 0 and float(jnp.abs(g[1]).sum()) > 0


def eqx_replace(psf, params, xcoef):
    import equinox as eqx

    return eqx.tree_at(lambda p: (p.params, p.xcoef), psf, (params, xcoef))


def test_with_traces_refits_inverse():
    psf = desi_like_psf(nspec=5)
    p2 = psf.with_traces(ycoef=psf.ycoef.at[:, 0].add(3.0))
    w = jnp.array([5650.0, 5750.0])
    y = p2.y(1, w)
    np.testing.assert_allclose(p2.wavelength(1, y), w, atol=1e-6)
    np.testing.assert_allclose(y - psf.y(1, w), 3.0, atol=1e-12)


def test_from_arrays_validation():
    psf = desi_like_psf(nspec=3)
    with pytest.raises(ValueError, match="missing"):
        GaussHermitePSF.from_arrays(
            psf.xcoef, psf.ycoef, psf.params[:1], ["GHSIGX"], xdomain=psf.xdomain,
            hsizex=8, hsizey=5, npix_x=100, npix_y=500,
        )  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        GaussHermitePSF.from_arrays(
            psf.xcoef, psf.ycoef, psf.params, ["GHSIGX"], xdomain=psf.xdomain,
            hsizex=8, hsizey=5, npix_x=100, npix_y=500,
        )  # fmt: skip


def _full_tail_stamps(psf, ispec, wave):
    """Stamps through the with-tails formula, whatever TAILAMP is."""
    from jaxspec.psf._gausshermite import _gh_stamp_values
    from jaxspec.psf._legendre import traceset_eval_many

    x, y = psf.x(ispec, wave), psf.y(ispec, wave)
    xmin = jnp.trunc(x - psf.hsizex + 0.5).astype(jnp.int32)
    ymin = jnp.trunc(y - psf.hsizey + 0.5).astype(jnp.int32)
    vals = traceset_eval_many(psf.params[psf._used_rows()], psf.pdomain, ispec, wave)
    return _gh_stamp_values((psf.stamp_shape, psf.ghdegx, psf.ghdegy), True, vals, x, y, xmin, ymin)


def test_zero_tails_are_skipped_but_differentiable():
    psf = desi_like_psf(nspec=6, tailamp=0.0)
    ispec, wave = jnp.arange(6)[:, None], jnp.linspace(5650.0, 5750.0, 4)[None, :]
    # skipping the tail when every TAILAMP is 0 gives the same stamps
    np.testing.assert_allclose(psf.spots(ispec, wave)[2], _full_tail_stamps(psf, ispec, wave), atol=1e-16)
    # ... and a fit starting from TAILAMP = 0 still sees the tail's derivative
    row = psf.param_index("TAILAMP")
    target = _full_tail_stamps(desi_like_psf(nspec=6, tailamp=0.02), ispec, wave)

    def loss(a):
        p = eqx_replace(psf, psf.params.at[row, :, 0].set(a), psf.xcoef)
        return jnp.sum((p.spots(ispec, wave)[2] - target) ** 2)

    g = jax.grad(loss)(0.0)
    # one-sided (second-order) difference: a negative TAILAMP would switch the clip at 0 on
    h = 1e-6
    fd = (-3 * loss(0.0) + 4 * loss(h) - loss(2 * h)) / (2 * h)
    assert float(g) < 0
    np.testing.assert_allclose(g, fd, rtol=1e-5)
    # non-zero tails take the full formula
    psf2 = desi_like_psf(nspec=6, tailamp=0.02)
    np.testing.assert_allclose(psf2.spots(ispec, wave)[2], target, atol=1e-16)


def test_wavelength_limits_are_leaves_one_program_for_every_psf_file():
    """Two PSFs whose traces (hence wmin..wmax_all) differ share one tree structure and one compiled program."""
    from jaxspec.psf import _base

    a = desi_like_psf(nspec=6)
    b = a.with_traces(a.xcoef + 0.03, a.ycoef + 0.5)
    b = GaussHermitePSF.from_arrays(b.xcoef, b.ycoef, b.params, b.param_names, xdomain=b.xdomain,
                                    hsizex=b.hsizex, hsizey=b.hsizey, npix_x=b.npix_x, npix_y=b.npix_y)
    assert a.wmin != b.wmin and a.wmax_all != b.wmax_all  # limits refitted from the shifted traces
    for p in (a, b):  # host code reads them as floats
        assert all(isinstance(getattr(p, k), float) for k in ("wmin", "wmax", "wmin_all", "wmax_all"))
    assert f"{b.wmin:.1f}" == f"{float(b.wmin):.1f}"
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    ispec, wave = jnp.arange(3)[:, None], jnp.linspace(5650.0, 5750.0, 4)[None, :]
    f = jax.jit(lambda p: p.spots(ispec, wave, edges="specter"))
    for p in (a, b):
        (x0, y0, s0), (x1, y1, s1) = f(p), p.spots(ispec, wave, edges="specter")
        np.testing.assert_array_equal(np.asarray(x0), np.asarray(x1))
        np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))
        np.testing.assert_allclose(np.asarray(s0), np.asarray(s1), rtol=1e-12, atol=1e-17)  # compiled vs op by op
    assert f._cache_size() == 1
    # the geometry's jitted corners (eqx.filter_jit): one program for both PSFs
    _base._corners._cached.clear_cache()
    for p in (a, b):
        p.corners(ispec, wave)
    assert _base._corners._cached._cache_size() == 1
