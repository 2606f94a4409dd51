import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from astropy.io import fits

from jaxspec._simulation.project import project, simulate
from jaxspec.psf import GaussianPSF, desi_like_psf, read_psf

PAD = 30


@pytest.mark.parametrize(
    "refname", ["specter-r0-67784-f000-024.fits", "specter-r0-67784-f100-124.fits"]
)
def test_reference_images(ref_path, psf_path, refname):
    with fits.open(ref_path(refname)) as h:
        hdr = h[0].header
        image, ivar = h["IMAGE"].data.astype(float), h["IVAR"].data.astype(float)
        wave, truth = h["WAVELENGTH"].data.astype(float), h["TRUTH"].data.astype(float)
    psf = read_psf(psf_path(hdr["PSF"]))
    box = (hdr["XMIN"], hdr["XMAX"], hdr["YMIN"], hdr["YMAX"])
    dw = 0.8
    wpad = np.concatenate(
        [wave[0] - dw * np.arange(PAD, 0, -1), wave, wave[-1] + dw * np.arange(1, PAD + 1)]
    )
    phot = np.pad(truth, ((0, 0), (PAD, PAD)), mode="edge") * dw
    model = np.asarray(project(psf, wpad, phot, specmin=hdr["SPECMIN"], xyrange=box))
    assert model.shape == image.shape
    # The padded bins of the reference held the true spectrum beyond the grid
    # (continuum and emission lines), which no padding of TRUTH reproduces: judge
    # the pixels the padded bins do not reach.
    marker = np.zeros_like(phot)
    marker[:, :PAD] = marker[:, -PAD:] = 1.0
    reach = np.asarray(project(psf, wpad, marker, specmin=hdr["SPECMIN"], xyrange=box))
    good = (ivar > 0) & (reach == 0)
    assert good.sum() > 0.6 * image.size
    chi2 = np.sum((image - model) ** 2 * ivar * good) / good.sum()
    assert abs(chi2 - 1.0) < 0.05, chi2
    # ivar was made from the noiseless model: the model is recovered exactly
    noiseless = 1.0 / ivar[good] - hdr["READNOIS"] ** 2
    np.testing.assert_allclose(model[good], noiseless, rtol=1e-9, atol=1e-6)


def test_flux_conservation_and_box():
    psf = desi_like_psf(nspec=5)
    wave = jnp.linspace(5650.0, 5750.0, 20)
    phot = jnp.ones((5, 20))
    full = project(psf, wave, phot)
    assert full.shape == (psf.npix_y, psf.npix_x)
    np.testing.assert_allclose(full.sum(), 100.0, rtol=1e-12)
    box = (10, 40, 100, 200)
    sub = project(psf, wave, phot, xyrange=box)
    assert sub.shape == (100, 30)
    np.testing.assert_allclose(sub, full[100:200, 10:40], atol=1e-12)
    # specmin shifts fibers
    one = project(psf, wave, phot[:1], specmin=3)
    ref = project(psf, wave, phot.at[jnp.array([0, 1, 2, 4])].set(0.0))
    np.testing.assert_allclose(one, ref, atol=1e-12)


def test_bad_fibers_and_wavelengths():
    psf = desi_like_psf(nspec=5)
    wave = jnp.linspace(5650.0, 5750.0, 4)
    with pytest.raises(ValueError, match="fibers"):
        project(psf, wave, jnp.ones((3, 4)), specmin=4)
    with pytest.raises(ValueError, match="wave"):
        project(psf, wave, jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="outside"):
        psf.check_wavelengths(np.array([5000.0, 5700.0]))


def test_jit_vmap():
    psf = GaussianPSF.create(nspec=4, npix_y=120)
    wave = jnp.linspace(5610.0, 5640.0, 10)
    f = jax.jit(lambda p, ph: project(p, wave, ph, xyrange=(0, 40, 0, 80)))
    ph = jnp.ones((4, 10))
    np.testing.assert_allclose(f(psf, ph), project(psf, wave, ph, xyrange=(0, 40, 0, 80)))
    batch = jax.vmap(lambda s: project(psf, wave, s * ph, xyrange=(0, 40, 0, 80)))(
        jnp.array([1.0, 2.0])
    )
    np.testing.assert_allclose(batch[1], 2 * batch[0], rtol=1e-13)


def test_grad_matches_finite_differences():
    psf = desi_like_psf(nspec=4, wmin=5600.0, wmax=5640.0, ghdeg=2)
    wave = jnp.linspace(5605.0, 5635.0, 25)
    rng = np.random.default_rng(0)
    phot = jnp.asarray(100.0 + 50 * rng.random((4, 25)))
    box = (0, 50, 0, 120)
    data = project(psf, wave, phot, xyrange=box) + jnp.asarray(rng.normal(0, 1.0, (120, 50)))

    def chi2(xcoef, ycoef, params, phot):
        p = eqx.tree_at(lambda q: (q.xcoef, q.ycoef, q.params), psf, (xcoef, ycoef, params))
        return jnp.sum((data - project(p, wave, phot, xyrange=box)) ** 2)

    args = (psf.xcoef, psf.ycoef, psf.params, phot)
    grads = jax.jit(jax.grad(chi2, argnums=(0, 1, 2, 3)))(*args)
    assert all(np.all(np.isfinite(g)) for g in grads)
    gh01 = psf.param_index("GH-0-1")
    sig = psf.param_index("GHSIGX")
    checks = [(0, (1, 0)), (0, (2, 2)), (1, (2, 1)), (2, (gh01, 1, 0)), (2, (sig, 2, 1)), (3, (1, 3))]
    f = jax.jit(chi2)
    for iarg, idx in checks:
        h = 1e-5 * max(1.0, abs(float(args[iarg][idx])))
        plus = [a.at[idx].add(h) if k == iarg else a for k, a in enumerate(args)]
        minus = [a.at[idx].add(-h) if k == iarg else a for k, a in enumerate(args)]
        fd = (float(f(*plus)) - float(f(*minus))) / (2 * h)
        g = float(grads[iarg][idx])
        assert abs(g - fd) <= 1e-6 * abs(g) + 1e-9, (iarg, idx, g, fd)


def test_simulate():
    psf = desi_like_psf(nspec=3)
    wave = np.linspace(5650.0, 5700.0, 51)
    flux = np.full((3, 51), 200.0)
    img, ivar, model = simulate(psf, wave, flux, xyrange=(0, 30, 150, 300), seed=3)
    img2, _, _ = simulate(psf, wave, flux, xyrange=(0, 30, 150, 300), seed=3)
    np.testing.assert_array_equal(img, img2)
    assert img.shape == ivar.shape == model.shape == (150, 30)
    np.testing.assert_allclose(ivar, 1.0 / (np.clip(model, 0, None) + 9.0))
    ref = np.asarray(project(psf, wave, flux * 1.0, xyrange=(0, 30, 150, 300)))
    np.testing.assert_allclose(model, ref, rtol=1e-12, atol=1e-12)
    chi = np.mean((img - model) ** 2 * ivar)
    assert 0.8 < chi < 1.2
