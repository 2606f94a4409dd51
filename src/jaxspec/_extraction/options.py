"""Every extraction option, once: :class:`ExtractOptions`, checked in one place.

The names are those of DESI's tools (``desi_extract_spectra``): ``bundlesize``,
``nsubbundles``, ``nwavestep`` (core wavelength bins per patch; specter calls it
``wavesize``), ``wavepad_frac``, ``pixpad_frac``, ``regularize``, ``psferr``,
``decorrelate``.  The command line maps each field to the flag of the same name
(``nwavestep`` -> ``--nwavestep``, ``wavepad_frac`` -> ``--wavepad-frac``).

A bad value raises :class:`OptionError` (a :class:`ValueError`) that names the field
and says what to choose instead, when the options object is made: before any file
is read or any patch is cut.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing

__all__ = ["DECORRELATE_MODES", "ExtractOptions", "OptionError", "check_fibers", "wave_grid_size"]

#: The decorrelation modes: per fiber (``"signal"``, specter's default) or whole patch.
DECORRELATE_MODES = ("signal", "full")

#: Upper bounds that keep a typo from asking for terabytes (DESI: 0.8, 0.2, 50).
_MAX_PAD_FRAC = 10.0
_MAX_NWAVESTEP = 5000
_MAX_GRID_BINS = 100_000


class OptionError(ValueError):
    """A bad option value; ``field`` names the option (``ExtractOptions`` field or argument)."""

    def __init__(self, field: str, value, message: str, flag: str | None = None):
        self.field = field
        self.value = value
        self.message = message
        self._flag = flag
        super().__init__(f"{field} = {value!r}: {message}")

    def flag(self) -> str:
        """The message as the command line says it: ``--nwavestep 0: must be ...``."""
        return self._flag or f"--{self.field.replace('_', '-')} {self.value}: {self.message}"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _finite_range(field: str, value, lo: float, hi: float, hint: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OptionError(field, value, f"must be a number; {hint}") from None
    if not math.isfinite(v) or v < lo or v > hi:
        bound = f" and at most {hi:g}" if math.isfinite(hi) else ""
        raise OptionError(field, value, f"must be a finite number >= {lo:g}{bound}; {hint}")
    return v


# no_type_check: these validate user input themselves, with messages naming the field
# (runtime type checks in the tests would pre-empt them)
@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class ExtractOptions:
    """How a frame is cut into patches and solved (DESI's defaults).

    Attributes:
        bundlesize: fibers per bundle; bundles are extracted independently (DESI: 25).
        nsubbundles: subbundles per bundle, ``1 <= nsubbundles <= bundlesize``; each
            is one patch column, extracted with one neighbour fiber each side (5).
        nwavestep: core wavelength bins per patch (50).
        wavepad_frac: extra wavelength padding of a patch, as a fraction of the spot
            height (0.2).
        pixpad_frac: extra pixel rows of a patch, as a fraction of the spot height (0.8).
        regularize: extra diagonal regularisation of every bin, >= 0 (0).
        psferr: fractional PSF error in chi2pix, or None for the PSF's own (None).
        decorrelate: ``"signal"`` (per fiber, default) or ``"full"`` (whole patch).
        minweight_frac: bins whose pixel weight is below this fraction of the patch's
            largest are regularised toward zero (specter: 1e-4).
        chunk_size: patches per compiled call, or None to size it by device.
    """

    bundlesize: int = 25
    nsubbundles: int = 5
    nwavestep: int = 50
    wavepad_frac: float = 0.2
    pixpad_frac: float = 0.8
    regularize: float = 0.0
    psferr: float | None = None
    decorrelate: str = "signal"
    minweight_frac: float = 1e-4
    chunk_size: int | None = None

    def __post_init__(self):
        def positive_int(field, hi, hint):
            v = getattr(self, field)
            if not _is_int(v) or not 1 <= int(v) <= hi:
                raise OptionError(field, v, f"must be a positive whole number, at most {hi}; {hint}")
            object.__setattr__(self, field, int(v))

        positive_int("bundlesize", 5000, "DESI bundles have 25 fibers")
        positive_int("nsubbundles", self.bundlesize,
                     f"at most --bundlesize ({self.bundlesize}) subbundles per bundle; DESI uses 5")
        positive_int("nwavestep", _MAX_NWAVESTEP, "DESI uses 50 core bins per patch")
        for field, hint in (("wavepad_frac", "DESI uses 0.2"), ("pixpad_frac", "DESI uses 0.8")):
            object.__setattr__(self, field, _finite_range(field, getattr(self, field), 0.0, _MAX_PAD_FRAC, hint))
        object.__setattr__(self, "regularize",
                           _finite_range("regularize", self.regularize, 0.0, math.inf, "0 turns it off"))
        if self.psferr is not None:
            object.__setattr__(self, "psferr", _finite_range(
                "psferr", self.psferr, 0.0, 1.0, "leave it out to use the PSF's own (DESI: 0.01)"))
        object.__setattr__(self, "minweight_frac", _finite_range(
            "minweight_frac", self.minweight_frac, 0.0, 1.0, "specter uses 1e-4"))
        if self.decorrelate not in DECORRELATE_MODES:
            raise OptionError("decorrelate", self.decorrelate, "choose signal (per fiber, default) or full")
        if self.chunk_size is not None:
            positive_int("chunk_size", 1 << 20, "a number of patches per compiled call, e.g. 512 on a GPU")

    def replace(self, **changes) -> "ExtractOptions":
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def header_cards(self, psf_psferr: float) -> dict:
        """The options as written to a frame header (``psferr`` resolved to the PSF's)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("chunk_size", "minweight_frac")}
        d["psferr"] = psf_psferr if self.psferr is None else self.psferr
        return d


@typing.no_type_check
def check_fibers(specmin: int, nspec: int | None, npsf: int, bundlesize: int = 25) -> tuple[int, int]:
    """Check the fibers ``specmin .. specmin + nspec - 1`` against a PSF of ``npsf`` fibers.

    Returns:
        ``(specmin, nspec)`` with ``nspec`` resolved (None: to the PSF's last fiber).

    Raises:
        OptionError: ``specmin`` or ``nspec`` outside the PSF (the message gives the range).
    """
    if not _is_int(specmin) or not 0 <= int(specmin) < npsf:
        raise OptionError("specmin", specmin, f"the PSF has fibers 0..{npsf - 1}; choose a first fiber in that range")
    specmin = int(specmin)
    if nspec is None:
        nspec = npsf - specmin
    if not _is_int(nspec) or int(nspec) < 1:
        raise OptionError("nspec", nspec, "must be a positive number of fibers")
    if int(nspec) > npsf - specmin:
        text = (f"asks for fibers {specmin}..{specmin + int(nspec) - 1} but the PSF has fibers 0..{npsf - 1}; "
                f"use --nspec {npsf - specmin} or less")
        raise OptionError("nspec", nspec, text, flag=f"--specmin {specmin} --nspec {nspec} {text}")
    return specmin, int(nspec)


@typing.no_type_check
def wave_grid_size(wmin: float, wmax: float, dw: float, field: str = "wavelength") -> int:
    """Number of bins of the grid ``wmin, wmin + dw, ... <= wmax`` (end point included).

    Raises:
        OptionError: non-finite values, ``wmin >= wmax``, ``dw <= 0``, or a grid of
            more than 100,000 bins (DESI's cameras have 2326-2881).
    """
    text = f"{wmin:g},{wmax:g},{dw:g}"
    if not all(math.isfinite(v) for v in (wmin, wmax, dw)):
        raise OptionError(field, text, "wmin, wmax and dw must be finite numbers (e.g. 5760,7620,0.8)")
    if not wmin < wmax or not dw > 0:
        raise OptionError(field, text, "expected wmin,wmax,dw with wmin < wmax and dw > 0 (e.g. 5760,7620,0.8)")
    n = int(math.floor((wmax - wmin) / dw + 1e-6)) + 1
    if n > _MAX_GRID_BINS:
        raise OptionError(field, text, f"gives {n:.3g} wavelength bins (at most {_MAX_GRID_BINS:,}); "
                                       "DESI uses dw = 0.8 A")
    if n < 2:
        raise OptionError(field, text, "gives fewer than 2 wavelength bins; widen the range or shrink dw")
    return n
