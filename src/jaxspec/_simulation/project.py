"""Forward model: photons per (fiber, wavelength) bin -> CCD pixels through a PSF."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ..psf._base import PSF

__all__ = ["project", "simulate"]


def _box(psf: PSF, xyrange) -> tuple[int, int, int, int]:
    if xyrange is None:
        return 0, int(psf.npix_x), 0, int(psf.npix_y)
    xmin, xmax, ymin, ymax = (int(v) for v in xyrange)
    if xmax <= xmin or ymax <= ymin:
        raise ValueError(f"empty xyrange {xyrange}: need xmin < xmax and ymin < ymax")
    return xmin, xmax, ymin, ymax


@eqx.filter_jit
def _project(psf: PSF, wave, phot, specmin, box):
    x0, x1, y0, y1 = box
    nspec = phot.shape[0]
    ispec = specmin + jnp.arange(nspec)
    xmin, ymin, stamps = psf.spots(ispec[:, None], wave[None, :])
    ny, nx = stamps.shape[-2:]
    vals = stamps * phot[..., None, None]
    rows = ymin[..., None] + (jnp.arange(ny, dtype=ymin.dtype) - y0)[None, None, :]  # (nspec, nwave, ny)
    cols = xmin[..., None] + (jnp.arange(nx, dtype=xmin.dtype) - x0)[None, None, :]  # (nspec, nwave, nx)
    h, w = y1 - y0, x1 - x0
    # out-of-box pixels get an index past the end and are dropped
    rows = jnp.where((rows >= 0) & (rows < h), rows, h)
    cols = jnp.where((cols >= 0) & (cols < w), cols, w)
    image = jnp.zeros((h, w), dtype=vals.dtype)
    return image.at[rows[..., :, None], cols[..., None, :]].add(vals, mode="drop")


def project(
    psf: PSF,
    wave: Float[ArrayLike, "nwave"],
    phot: Float[ArrayLike, "nspec _nwave"],  # its length is checked below, with a clear message
    specmin: int = 0,
    xyrange: tuple[int, int, int, int] | None = None,
) -> Float[Array, "ny nx"]:
    """Scatter photons through the PSF spots into a CCD (sub-)image.

    Args:
        psf: the PSF model.
        wave: wavelengths [A] of the bins, shape ``(nwave,)``.
        phot: photons per bin of fibers ``specmin .. specmin + nspec - 1``,
            shape ``(nspec, nwave)``.
        specmin: first fiber.
        xyrange: static pixel box ``(xmin, xmax, ymin, ymax)`` (upper bounds
            exclusive); default the full CCD.  Spot pixels outside it are dropped.

    Returns:
        Image ``(ymax - ymin, xmax - xmin)``; ``image[0, 0]`` is CCD pixel
        ``(xmin, ymin)``.  Differentiable in ``phot`` and the PSF's arrays.
    """
    wave = jnp.asarray(wave)
    phot = jnp.asarray(phot)
    if wave.ndim != 1 or phot.ndim != 2 or phot.shape[1] != wave.shape[0]:
        raise ValueError(
            f"need wave (nwave,) and phot (nspec, nwave); got {wave.shape} and {phot.shape}"
        )
    if isinstance(specmin, (int, np.integer)):
        psf.check_fibers(int(specmin), int(phot.shape[0]))
    return _project(psf, wave, phot, specmin, _box(psf, xyrange))


def simulate(
    psf: PSF,
    wave: Float[ArrayLike, "nwave"],
    flux: Float[ArrayLike, "nspec nwave"],
    specmin: int = 0,
    xyrange: tuple[int, int, int, int] | None = None,
    readnoise: float = 3.0,
    seed: int = 0,
    dw: Float[ArrayLike, "nwave"] | float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulate a noisy CCD (sub-)image of spectra.

    ``flux`` is in photons per A; the photons per bin are ``flux * dw`` with ``dw``
    the bin widths [A] (default ``numpy.gradient(wave)``).  The noise is drawn on
    the host with ``numpy.random.default_rng(seed)``: Poisson photon noise on the
    noiseless model plus Gaussian read noise of ``readnoise`` electrons.

    Returns:
        ``(image, ivar, model)`` NumPy arrays of shape ``(ny, nx)``, with
        ``ivar = 1 / (max(model, 0) + readnoise**2)``.
    """
    wave_np = np.asarray(wave, dtype=float)
    if dw is None:
        dw = np.gradient(wave_np) if wave_np.size > 1 else np.ones_like(wave_np)
    flux = jnp.asarray(flux)
    phot = flux * jnp.broadcast_to(jnp.asarray(dw, dtype=flux.dtype), flux.shape[-1:])[None, :]
    model = np.asarray(project(psf, wave, phot, specmin=specmin, xyrange=xyrange))
    rng = np.random.default_rng(seed)
    pos = np.clip(model, 0.0, None)
    image = rng.poisson(pos).astype(model.dtype) + rng.normal(0.0, readnoise, model.shape)
    ivar = 1.0 / (pos + readnoise**2)
    return image, ivar, model
