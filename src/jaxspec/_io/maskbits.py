"""DESI's mask bits (desispec.maskbits) and the rules that set them in an extraction.

Plain NumPy; nothing here imports JAX or desispec.

* :data:`CCDMASK`: the bits of a preproc image's MASK (``ccdmask``).
* :data:`SPECMASK`: the bits of a frame's MASK (``specmask``).
* :data:`EXTRACT_MASK`: the ccdmask bits that make a pixel unusable for the
  extraction (desispec's ``extractmaskval``: BAD, HOT, DEAD, SATURATED, COSMIC,
  PIXFLATZERO, PIXFLATLOW, HIGHVAR, BADAMP; not BADREADNOISE, which only flags an
  amplifier's noise).
* :func:`input_masked`: which preproc pixels get ivar 0 (the pipeline's rule, or the
  stricter "any bit").
* :func:`frame_mask`: the frame MASK from the extraction's pixmask fraction and
  chi2pix (ALLBADPIX, SOMEBADPIX, BAD2DFIT).
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["CCDMASK", "SPECMASK", "EXTRACT_MASK", "MASK_RULES", "BAD2DFIT_FACTOR", "bit", "names",
           "input_masked", "bad2dfit", "frame_mask"]

#: desispec's ccdmask: name -> bit number (preproc MASK).
CCDMASK: dict[str, int] = {
    "BAD": 0, "HOT": 1, "DEAD": 2, "SATURATED": 3, "COSMIC": 4, "PIXFLATZERO": 5, "PIXFLATLOW": 6,
    "HIGHVAR": 7, "BADREADNOISE": 8, "BADAMP": 9,
}

#: desispec's specmask: name -> bit number (frame MASK).
SPECMASK: dict[str, int] = {
    "SOMEBADPIX": 0, "ALLBADPIX": 1, "COSMIC": 2, "LOWFLAT": 3, "BADFIBERFLAT": 4, "BRIGHTSKY": 5,
    "BADSKY": 6, "BAD2DFIT": 7, "NODATA": 8, "BADFIBER": 9, "BADCOLUMN": 10,
}

#: ccdmask bits that zero a pixel's ivar for the extraction (desispec's ``extractmaskval``, 767).
EXTRACT_MASK = int(sum(1 << CCDMASK[n] for n in (
    "BAD", "HOT", "DEAD", "SATURATED", "COSMIC", "PIXFLATZERO", "PIXFLATLOW", "HIGHVAR", "BADAMP")))

#: How a preproc MASK becomes ivar 0: desispec's extraction bits, or any nonzero value.
MASK_RULES = ("desispec", "any")

#: BAD2DFIT: chi2pix above this many times its median along the fiber and along the wavelength.
BAD2DFIT_FACTOR = 5.0


def bit(name: str, mask: str = "specmask") -> int:
    """The value (``1 << bit``) of bit ``name`` of ``"specmask"`` or ``"ccdmask"``."""
    table = SPECMASK if mask == "specmask" else CCDMASK
    return 1 << table[name]


def names(value: int, mask: str = "specmask") -> list[str]:
    """The names of the bits set in ``value`` (an unknown bit as ``BIT<n>``)."""
    table = SPECMASK if mask == "specmask" else CCDMASK
    by_bit = {b: n for n, b in table.items()}
    value = int(value)
    return [by_bit.get(b, f"BIT{b}") for b in range(64) if value >> b & 1]


def input_masked(mask: np.ndarray, rule: str = "desispec") -> np.ndarray:
    """Which pixels of a preproc MASK are unusable: (ny, nx) bool.

    Args:
        mask: (ny, nx) integer ccdmask values (any width; int64 keeps bits 32-63).
        rule: ``"desispec"``: any of :data:`EXTRACT_MASK`'s bits (as desispec's
            extraction); ``"any"``: any nonzero value (stricter).
    """
    if rule not in MASK_RULES:
        raise ValueError(f"mask rule {rule!r}: choose 'desispec' (the pipeline's extraction bits) or 'any'")
    mask = np.asarray(mask)
    if rule == "any":
        return mask != 0
    return (mask & np.asarray(EXTRACT_MASK, dtype=mask.dtype)) != 0


def _median_valid(values: np.ndarray, valid: np.ndarray, axis: int) -> np.ndarray:
    """Median of ``values`` over ``valid`` entries along ``axis`` (NaN where none).

    ``np.nanmedian`` of the masked values, to the bit, in one sort: ``nanmedian``
    along a long axis loops over the other one in Python (500 calls per frame),
    holding the interpreter lock the batch's main thread needs; a sort does not.
    """
    x = np.sort(np.where(valid, values, np.inf), axis=axis)  # masked entries last
    n = np.count_nonzero(valid, axis=axis, keepdims=True)
    lo = np.take_along_axis(x, np.maximum(n - 1, 0) // 2, axis=axis)
    hi = np.take_along_axis(x, n // 2, axis=axis)
    with np.errstate(invalid="ignore"):
        med = np.where(lo == hi, lo, (lo + hi) / 2.0)  # equal middles as is (inf stays inf)
    return np.squeeze(np.where(n > 0, med, np.nan), axis=axis)


def bad2dfit(chi2pix: np.ndarray, ivar: np.ndarray, factor: float = BAD2DFIT_FACTOR) -> np.ndarray:
    """BAD2DFIT bins: chi2pix above ``factor`` times its median both along the fiber and along the wavelength.

    The medians are over bins with ivar > 0: per fiber (over wavelengths; a bright
    star does not get masked) and per wavelength (over fibers; a bright sky line,
    where the PSF model's floor raises chi2pix of every fiber, does not either).
    The rule desispec adopted in 2026 (desispec PR 2612), instead of chi2pix > 100.

    Args:
        chi2pix: (nspec, nwave) chi2 per pixel of the 2D model.
        ivar: (nspec, nwave) inverse variance of the flux.
        factor: the threshold in medians.

    Returns:
        (nspec, nwave) bool.
    """
    chi2pix = np.asarray(chi2pix, dtype=np.float64)
    valid = (np.asarray(ivar) > 0) & np.isfinite(chi2pix)
    along_wave = _median_valid(chi2pix, valid, axis=1)[:, None]  # (nspec, 1): each fiber's median
    along_fiber = _median_valid(chi2pix, valid, axis=0)[None, :]  # (1, nwave): each wavelength's median
    with np.errstate(invalid="ignore"):
        return valid & (chi2pix > factor * along_wave) & (chi2pix > factor * along_fiber)


def frame_mask(pixmask_fraction: np.ndarray, chi2pix: np.ndarray | None, ivar: np.ndarray,
               factor: float = BAD2DFIT_FACTOR) -> np.ndarray:
    """The frame MASK (nspec, nwave) uint32 as the pipeline sets it.

    * ALLBADPIX: every pixel of the bin masked (``pixmask_fraction == 1``);
    * SOMEBADPIX: more than half of them (``pixmask_fraction > 0.5``);
    * BAD2DFIT: :func:`bad2dfit` (when ``chi2pix`` is given).

    (:func:`jaxspec._io.frames.write_frame` adds ALLBADPIX wherever the written ivar is 0.)
    """
    frac = np.asarray(pixmask_fraction, dtype=np.float64)
    out = np.zeros(frac.shape, dtype=np.uint32)
    out[frac > 0.5] |= np.uint32(bit("SOMEBADPIX"))
    out[frac >= 1.0] |= np.uint32(bit("ALLBADPIX"))
    if chi2pix is not None:
        out[bad2dfit(chi2pix, ivar, factor)] |= np.uint32(bit("BAD2DFIT"))
    return out
