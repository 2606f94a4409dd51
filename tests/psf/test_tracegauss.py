import numpy as np
import pytest
from scipy.special import erf

from jaxspec.psf import TraceGaussianPSF, read_psf


@pytest.mark.parametrize("cam", ["b", "r", "z"])
def test_read_trace_only(psf_path, cam):
    psf = read_psf(psf_path(f"trace-only-psf-{cam}0.fits"))
    assert isinstance(psf, TraceGaussianPSF)
    assert psf.nspec == 500
    w = np.linspace(psf.wmin_all + 10, psf.wmax_all - 10, 5)
    y = np.asarray(psf.y(7, w))
    np.testing.assert_allclose(psf.wavelength(7, y), w, atol=1e-6)
    sy = np.asarray(psf.ysigma(7, w))
    assert np.all((sy > 0.8) & (sy < 2.0))
    assert psf.hsizey >= 4 * sy.max() and psf.hsizex >= 4 * float(psf.xsigma(7, w[0]))


def test_spot_is_pixel_integrated_gaussian(psf_path):
    psf = read_psf(psf_path("trace-only-psf-r0.fits"))
    assert (psf.npix_x, psf.npix_y) == (4114, 4128)
    ispec, wave = 42, 6543.21
    xmin, ymin, st = psf.spots(ispec, wave)
    x, y = float(psf.x(ispec, wave)), float(psf.y(ispec, wave))
    sx, sy = float(psf.xsigma(ispec, wave)), float(psf.ysigma(ispec, wave))
    ny, nx = psf.stamp_shape
    ex = int(xmin) - 0.5 + np.arange(nx + 1)
    ey = int(ymin) - 0.5 + np.arange(ny + 1)
    gx = np.diff(erf((ex - x) / (np.sqrt(2) * sx)))
    gy = np.diff(erf((ey - y) / (np.sqrt(2) * sy)))
    ref = np.outer(gy, gx)
    np.testing.assert_allclose(st, ref / ref.sum(), atol=1e-14)
    # ysigma = wsigma [A] / (dw/dy)
    dwdy = float(psf.angstroms_per_pixel(ispec, wave))
    np.testing.assert_allclose(sy * dwdy, float(psf.wsigma(ispec, wave)), rtol=1e-3)
