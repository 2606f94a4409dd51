"""Extraction of sub-images: agreement with specter's reference cases, masking, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from astropy.io import fits
from jax.test_util import check_grads

import jaxspec
from jaxspec._extraction.extract import extract_patches
from jaxspec._extraction.patch import _solve_chunk

REF_CASES = ["specter-r0-67784-f000-024.fits", "specter-r0-67784-f100-124.fits"]


def _load_case(ref_path, psf_path, name):
    with fits.open(ref_path(name)) as h:
        hdr = h[0].header
        case = {k: np.asarray(h[k].data, dtype=float) for k in
                ("IMAGE", "IVAR", "WAVELENGTH", "TRUTH", "REF_FLUX", "REF_IVAR", "REF_RESOLUTION")}
        case["hdr"] = dict(hdr)
    case["psf"] = jaxspec.read_psf(psf_path(hdr["PSF"]))
    case["xyrange"] = (hdr["XMIN"], hdr["XMAX"], hdr["YMIN"], hdr["YMAX"])
    return case


def _pulls(ex, truth):
    conv = np.asarray(jaxspec.apply_resolution(ex.resolution, truth))
    return ((np.asarray(ex.flux) - conv) * np.sqrt(np.asarray(ex.ivar)))[:, 10:-10]


@pytest.fixture(scope="module", params=REF_CASES)
def reference(request, ref_path, psf_path):
    case = _load_case(ref_path, psf_path, request.param)
    h = case["hdr"]
    case["ex"] = jaxspec.extract(
        case["IMAGE"], case["IVAR"], case["psf"], case["WAVELENGTH"], specmin=h["SPECMIN"],
        nspec=h["NSPEC"], xyrange=case["xyrange"],
        options=jaxspec.ExtractOptions(nwavestep=h["WAVESIZE"], nsubbundles=h["NSUB"]),
    )
    return case


def test_reference_flux_agrees_with_specter(reference):
    """|flux - REF_FLUX| sqrt(REF_IVAR) < 0.01 in >= 99.9% of bins and < 0.05 in all."""
    ex = reference["ex"]
    dsig = np.abs(np.asarray(ex.flux) - reference["REF_FLUX"]) * np.sqrt(reference["REF_IVAR"])
    assert np.mean(dsig < 0.01) >= 0.999, np.quantile(dsig, 0.999)
    assert dsig.max() < 0.05
    # most bins agree to rounding: the patches are the established code's own
    assert np.median(dsig) < 1e-8


def test_reference_ivar_and_resolution_agree(reference):
    """ivar within 1% and resolution diagonals within 1e-3 in >= 99.9% of bins."""
    ex = reference["ex"]
    rel = np.abs(np.asarray(ex.ivar) / reference["REF_IVAR"] - 1)
    assert np.mean(rel < 0.01) >= 0.999
    dres = np.abs(np.asarray(ex.resolution) - reference["REF_RESOLUTION"]).max(axis=1)
    assert np.mean(dres < 1e-3) >= 0.999
    assert ex.resolution.shape == reference["REF_RESOLUTION"].shape


def test_reference_pulls_against_truth(reference):
    """Pulls (flux - R truth) sqrt(ivar): |mean| < 0.02, std in 0.97-1.03."""
    pulls = _pulls(reference["ex"], reference["TRUTH"])
    assert abs(pulls.mean()) < 0.02
    assert 0.97 < pulls.std() < 1.03


def test_reference_outputs_are_finite(reference):
    ex = reference["ex"]
    for name in ("flux", "ivar", "resolution", "chi2pix", "pixmask_fraction", "xflux"):
        assert np.all(np.isfinite(np.asarray(getattr(ex, name)))), name
    # the model fits the pixels to their noise (fewer dof than pixels: a bit under 1)
    chi2 = np.asarray(ex.chi2pix)[:, 10:-10]
    assert 0.7 < chi2.mean() < 1.2


# --------------------------------------------------------------------------- synthetic
@pytest.fixture(scope="module")
def small_frame():
    """25 fibers x 120 wavelengths of a DESI-like PSF, with noise."""
    wave = 5650.0 + 0.8 * np.arange(120)
    psf = jaxspec.desi_like_psf(nspec=25, wmin=wave[0] - 10, wmax=wave[-1] + 10)
    rng = np.random.default_rng(3)
    flux = 50 + 30 * rng.random((25, 1)) + 400 * np.exp(-0.5 * ((wave - 5690) / 1.0) ** 2)
    image, ivar, model = jaxspec.simulate(psf, wave, flux, readnoise=3.0, seed=5)
    return dict(psf=psf, wave=wave, flux=flux, image=np.asarray(image), ivar=np.asarray(ivar))


def _extract_small(f, image=None, ivar=None, **kw):
    return jaxspec.extract(
        f["image"] if image is None else image, f["ivar"] if ivar is None else ivar, f["psf"], f["wave"],
        nspec=25, wavesize=40, **kw,
    )


@pytest.mark.slow  # 30-80 s on 2 cores (stop 22 durations)
def test_decorrelation_modes_both_unbiased(small_frame):
    for mode in ("signal", "full"):
        ex = _extract_small(small_frame, decorrelate=mode)
        pulls = _pulls(ex, small_frame["flux"])
        assert np.all(np.isfinite(pulls))
        assert abs(pulls.mean()) < 0.05, mode
        assert 0.9 < pulls.std() < 1.1, mode


def test_masked_fiber_and_region_give_zero_ivar(small_frame):
    f = small_frame
    psf, wave = f["psf"], f["wave"]
    ivar = f["ivar"].copy()
    # kill every pixel of fiber 7's spots, and a whole block of rows
    x7 = np.asarray(psf.x(7, wave))
    cols = np.arange(ivar.shape[1])
    ivar[:, (cols > x7.min() - psf.hsizex - 1.5) & (cols < x7.max() + psf.hsizex + 1.5)] = 0.0  # all its stamps reach
    ylo, yhi = np.asarray(psf.y(0, np.array([wave[40], wave[60]]))).astype(int)
    ivar[ylo - 20:yhi + 20, :] = 0.0
    image = np.where(ivar > 0, f["image"], np.nan)  # NaN under the mask must not leak
    ex = _extract_small(f, image=image, ivar=ivar)
    for name in ("flux", "ivar", "resolution", "chi2pix"):
        assert np.all(np.isfinite(np.asarray(getattr(ex, name)))), name
    fiv = np.asarray(ex.ivar)
    assert np.all(fiv[7] == 0)
    assert np.all(fiv[:, 45:56] == 0)
    assert np.asarray(ex.pixmask_fraction)[7].min() > 0.5
    # the other fibers are still fine far from the masked rows
    assert np.all(fiv[[0, 3, 12, 20], 5:25] > 0)


def test_fully_masked_image_and_offchip_wavelengths(small_frame):
    f = small_frame
    ex = _extract_small(f, ivar=np.zeros_like(f["ivar"]))
    assert np.all(np.asarray(ex.ivar) == 0)
    assert np.all(np.isfinite(np.asarray(ex.flux)))
    # a sub-image that stops half way up: bins whose spots are off the image get ivar 0
    half = f["image"].shape[0] // 2
    ex = jaxspec.extract(f["image"][:half], f["ivar"][:half], f["psf"], f["wave"], nspec=25, wavesize=40,
                         xyrange=(0, f["image"].shape[1], 0, half))
    top = np.asarray(f["psf"].y(12, f["wave"])) > half + 10
    assert np.all(np.asarray(ex.ivar)[12, top] == 0)
    assert np.all(np.isfinite(np.asarray(ex.flux)))


def test_same_shape_does_not_recompile(small_frame):
    _extract_small(small_frame)
    n = _solve_chunk._cache_size()
    f2 = dict(small_frame, image=small_frame["image"] * 1.01)
    _extract_small(f2)
    assert _solve_chunk._cache_size() == n


def test_bad_arguments_are_refused(small_frame):
    f = small_frame
    # a partial bundle (nspec not a multiple of bundlesize) used to be refused here; it
    # is extracted now, as specter does (issue 14; tests/_extraction/test_geometry.py)
    part = jaxspec.extract(f["image"], f["ivar"], f["psf"], f["wave"], nspec=20)
    assert part.flux.shape == (20, len(f["wave"])) and np.all(np.isfinite(np.asarray(part.flux)))
    with pytest.raises(ValueError, match="fall outside"):
        jaxspec.extract(f["image"], f["ivar"], f["psf"], f["wave"] + 500, nspec=25)
    with pytest.raises(ValueError, match="fibers"):
        jaxspec.extract(f["image"], f["ivar"], f["psf"], f["wave"], specmin=25, nspec=25)
    with pytest.raises(ValueError, match="decorrelate"):
        jaxspec.extract(f["image"], f["ivar"], f["psf"], f["wave"], nspec=25, decorrelate="nope")
    with pytest.raises(ValueError, match="xyrange"):
        jaxspec.extract(f["image"], f["ivar"], f["psf"], f["wave"], nspec=25, xyrange=(0, 5, 0, 5))


# --------------------------------------------------------------------------- gradients
@pytest.fixture(scope="module")
def tiny_problem():
    """5 fibers x 24 wavelengths: small enough for finite differences."""
    wave = 5700.0 + 0.8 * np.arange(24)
    psf = jaxspec.desi_like_psf(nspec=5, bundlesize=5, wmin=wave[0] - 8, wmax=wave[-1] + 8)
    flux = 80 + 300 * np.exp(-0.5 * ((wave - 5709) / 1.2) ** 2) * np.ones((5, 1))
    image, ivar, _ = jaxspec.simulate(psf, wave, flux, readnoise=3.0, seed=2)
    geom = jaxspec.patch_geometry(psf, wave, 0, 5, bundlesize=5, nsubbundles=1, nwavestep=12)
    return dict(psf=psf, wave=wave, image=jnp.asarray(image), ivar=jnp.asarray(ivar), geom=geom)


@pytest.mark.slow  # 30-80 s on 2 cores (stop 22 durations)
def test_gradients_wrt_image_and_ivar(tiny_problem):
    t = tiny_problem
    w = jnp.asarray(np.random.default_rng(0).normal(size=(5, 24)))

    def loss(image, ivar):
        ex = extract_patches(image, ivar, t["psf"], t["geom"])
        return jnp.sum(w * ex.flux) + 1e-3 * jnp.sum(ex.ivar)

    check_grads(loss, (t["image"], t["ivar"]), order=1, modes=["rev"], eps=1e-4, atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # 30-80 s on 2 cores (stop 22 durations)
def test_gradients_wrt_psf_parameters(tiny_problem):
    t = tiny_problem
    psf = t["psf"]
    w = jnp.asarray(np.random.default_rng(1).normal(size=(5, 24)))

    # widths and Gauss-Hermite rows; the tail rows sit at TAILAMP = 0, where the stamp's
    # clip at zero makes the model one-sided (finite differences there do not converge)
    ntail = sum(name.startswith("TAIL") for name in psf.param_names)
    core = psf.params[: len(psf.param_names) - ntail]
    tail = psf.params[len(psf.param_names) - ntail:]

    def loss(core_params, xcoef):
        import equinox as eqx

        p = eqx.tree_at(lambda q: (q.params, q.xcoef), psf, (jnp.concatenate([core_params, tail]), xcoef))
        ex = extract_patches(t["image"], t["ivar"], p, t["geom"])
        return jnp.sum(w * ex.flux)

    grads = jax.grad(loss, argnums=(0, 1))(core, psf.xcoef)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    check_grads(loss, (core, psf.xcoef), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- GPU
def _has_gpu():
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="no GPU")
def test_gpu_matches_cpu(ref_path, psf_path):
    case = _load_case(ref_path, psf_path, REF_CASES[0])
    h = case["hdr"]
    out = {}
    for kind in ("cpu", "gpu"):
        with jax.default_device(jax.devices(kind)[0]):
            ex = jaxspec.extract(case["IMAGE"], case["IVAR"], case["psf"], case["WAVELENGTH"],
                                 specmin=h["SPECMIN"], nspec=h["NSPEC"], xyrange=case["xyrange"])
            out[kind] = {k: np.asarray(getattr(ex, k)) for k in ("xflux", "chi2pix", "flux", "ivar", "resolution")}
    cpu, gpu = out["cpu"], out["gpu"]
    # measured on an H100: <= 4e-13 relative on every output of both reference cases
    for k in ("xflux", "chi2pix", "flux", "ivar", "resolution"):
        np.testing.assert_allclose(gpu[k], cpu[k], rtol=1e-10, atol=1e-10 * np.abs(cpu[k]).max())


def test_cpu_kernel_equals_the_accelerator_kernel(small_frame, monkeypatch):
    """On a CPU the kernel assembles the normal equations one offset per step (faster
    there); the accelerators' fused assembly, forced here on the CPU, gives the same frame
    to 1e-10."""
    import jaxspec._extraction.extract as ex_mod

    cpu = _extract_small(small_frame)
    monkeypatch.setattr(ex_mod, "_platform", lambda x: "gpu")
    fused = _extract_small(small_frame)
    for name in ("flux", "ivar", "resolution", "chi2pix"):
        a, b = np.asarray(getattr(cpu, name)), np.asarray(getattr(fused, name))
        assert np.all(np.isfinite(a)) and np.abs(a).max() > 0, name
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-10 * np.abs(a).max(), err_msg=name)
