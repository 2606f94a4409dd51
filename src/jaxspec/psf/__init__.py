"""PSF models: where each fiber's light lands on the CCD, and its pixel-integrated spots."""

from ._base import PSF

__all__ = ["PSF"]
