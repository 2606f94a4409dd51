"""PSF models: where each fiber's light lands on the CCD, and its pixel-integrated spots."""

from ._base import PSF, FiberIndexError
from ._gausshermite import GaussHermitePSF, desi_like_psf
from ._gausshermite2 import GaussHermite2PSF
from ._gaussian import GaussianPSF
from ._io import read_psf, write_psf
from ._tracegauss import TraceGaussianPSF

__all__ = [
    "PSF",
    "GaussHermitePSF",
    "GaussHermite2PSF",
    "FiberIndexError",
    "TraceGaussianPSF",
    "GaussianPSF",
    "read_psf",
    "write_psf",
    "desi_like_psf",
]
