"""Calibration images: arc-lamp line lists and simulated arc / continuum-flat exposures.

The line list holds air wavelengths [A] of the strong lines of the lamps DESI's
calibration system uses (Hg, Ar, Cd, Ne, Kr, Xe), with rough relative intensities.
Wavelengths are the standard (NIST-style) air values to ~0.01 A; the intensities
are indicative only (they depend on the lamp, its current and the spectrograph
throughput) and are written from public lamp atlases from memory: they make
realistic-looking simulations but are **not** a flux calibration.  Users with a
measured line list pass their own (:func:`read_lines`).

:func:`simulate_arc` and :func:`simulate_flat` project lines / a smooth continuum
through a PSF and add Poisson + read noise, returning a :class:`CalibImage` with
the truth (per-fiber line photons, flat spectra) used to make them.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from .project import project
from ..psf._base import PSF

__all__ = [
    "ARC_LINES",
    "CAMERA_RANGES",
    "CalibImage",
    "LineList",
    "arc_lines",
    "flat_spectrum",
    "read_lines",
    "simulate_arc",
    "simulate_flat",
    "write_lines",
]

#: Wavelength coverage [A] of the DESI spectrograph arms.
CAMERA_RANGES: dict[str, tuple[float, float]] = {
    "b": (3600.0, 5930.0),
    "r": (5660.0, 7720.0),
    "z": (7470.0, 9800.0),
}

#: Strong arc lines per lamp: (air wavelength [A], relative intensity).
ARC_LINES: dict[str, tuple[tuple[float, float], ...]] = {
    "Hg": (
        (3650.153, 500), (3654.836, 100), (3662.883, 60), (4046.563, 300), (4077.837, 40),
        (4358.328, 800), (5460.735, 1000), (5769.598, 120), (5790.663, 120),
    ),
    "Cd": (
        (3466.200, 100), (3610.508, 300), (4678.149, 200), (4799.912, 300), (5085.822, 400),
        (6438.470, 600),
    ),
    "Ne": (
        (5037.751, 20), (5330.778, 30), (5400.562, 50), (5764.419, 60), (5852.488, 800),
        (5881.895, 300), (5944.834, 400), (6029.997, 150), (6074.338, 300), (6096.163, 300),
        (6143.063, 500), (6163.594, 200), (6217.281, 200), (6266.495, 300), (6304.789, 200),
        (6334.428, 400), (6382.991, 500), (6402.246, 1000), (6506.528, 600), (6532.882, 250),
        (6598.953, 350), (6678.276, 450), (6717.043, 250), (6929.467, 400), (7032.413, 600),
        (7173.938, 150), (7245.167, 400), (7438.899, 150), (7488.871, 150), (7535.774, 150),
        (8136.406, 100), (8300.326, 200), (8377.607, 300), (8495.360, 200), (8591.259, 100),
        (8634.647, 150), (8654.383, 200), (8780.621, 150), (8853.867, 100), (9148.672, 60),
        (9201.759, 60), (9534.163, 50), (9665.424, 80),
    ),
    "Ar": (
        (4158.590, 50), (4200.674, 40), (4259.362, 30), (6965.431, 400), (7067.218, 400),
        (7147.042, 150), (7272.936, 150), (7383.980, 300), (7503.869, 700), (7514.652, 500),
        (7635.106, 900), (7723.761, 300), (7948.176, 600), (8006.157, 400), (8014.786, 500),
        (8103.693, 600), (8115.311, 1000), (8264.522, 500), (8408.210, 500), (8424.648, 600),
        (8521.442, 400), (9122.967, 800), (9224.499, 300), (9657.786, 500), (9784.503, 200),
    ),
    "Kr": (
        (4273.969, 60), (4319.580, 60), (4376.122, 80), (5562.225, 80), (5570.289, 300),
        (5870.914, 400), (7587.413, 300), (7601.544, 400), (7685.246, 150), (7694.539, 200),
        (7854.821, 200), (8059.503, 100), (8104.364, 300), (8112.899, 500), (8190.054, 300),
        (8263.240, 200), (8281.050, 100), (8298.107, 200), (8508.870, 200), (8776.748, 300),
        (8928.692, 200), (9751.758, 100),
    ),
    "Xe": (
        (4500.977, 60), (4624.276, 100), (4671.226, 200), (4734.152, 60), (7642.025, 100),
        (7887.393, 100), (7967.342, 100), (8231.634, 400), (8280.117, 300), (8346.822, 200),
        (8409.189, 200), (8819.410, 500), (8952.251, 200), (9045.446, 100), (9162.652, 300),
        (9799.697, 200),
    ),
}


@dataclasses.dataclass(frozen=True)
class LineList:
    """Arc lines: ``wave`` [A, air], relative ``flux`` (arbitrary units), ``element``."""

    wave: np.ndarray
    flux: np.ndarray
    element: np.ndarray

    def __len__(self) -> int:
        return int(len(self.wave))

    def select(self, mask) -> "LineList":
        """The lines where ``mask`` is true."""
        mask = np.asarray(mask)
        return LineList(self.wave[mask], self.flux[mask], self.element[mask])

    def between(self, wmin: float, wmax: float) -> "LineList":
        """The lines with ``wmin <= wave <= wmax``."""
        return self.select((self.wave >= wmin) & (self.wave <= wmax))


def arc_lines(
    waverange: str | tuple[float, float] | None = None,
    lamps: tuple[str, ...] = ("Hg", "Ar", "Cd", "Ne", "Kr", "Xe"),
    min_separation: float = 0.0,
    min_flux: float = 0.0,
) -> LineList:
    """The built-in arc lines of ``lamps`` inside ``waverange``, sorted by wavelength.

    Args:
        waverange: a DESI arm (``"b"``, ``"r"``, ``"z"``), a ``(wmin, wmax)``
            tuple [A], or None for all lines.
        lamps: lamp elements to include (keys of :data:`ARC_LINES`).
        min_separation: drop lines closer than this [A] to a brighter line
            (blends a PSF fit can hardly use).
        min_flux: drop lines fainter than this relative intensity.
    """
    unknown = [lamp for lamp in lamps if lamp not in ARC_LINES]
    if unknown:
        raise ValueError(f"unknown lamps {unknown}; known: {sorted(ARC_LINES)}")
    rows = [(w, f, lamp) for lamp in lamps for w, f in ARC_LINES[lamp]]
    rows.sort()
    lines = LineList(
        np.array([r[0] for r in rows], dtype=float),
        np.array([r[1] for r in rows], dtype=float),
        np.array([r[2] for r in rows], dtype="U4"),
    )
    if isinstance(waverange, str):
        if waverange not in CAMERA_RANGES:
            raise ValueError(f"unknown arm {waverange!r}; use one of {sorted(CAMERA_RANGES)}")
        waverange = CAMERA_RANGES[waverange]
    if waverange is not None:
        lines = lines.between(*waverange)
    lines = lines.select(lines.flux >= min_flux)
    if min_separation > 0 and len(lines):
        keep = np.ones(len(lines), bool)
        for i in np.argsort(-lines.flux, kind="stable"):
            if not keep[i]:
                continue
            close = np.abs(lines.wave - lines.wave[i]) < min_separation
            close[i] = False
            keep &= ~close | (lines.flux > lines.flux[i])
        lines = lines.select(keep)
    return lines


def read_lines(path: str | os.PathLike) -> LineList:
    """Read a line list: whitespace-separated ``wavelength flux [element]``, ``#`` comments."""
    waves, fluxes, elems = [], [], []
    with open(path) as fh:
        for n, raw in enumerate(fh, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            try:
                waves.append(float(parts[0]))
                fluxes.append(float(parts[1]) if len(parts) > 1 else 1.0)
            except ValueError:
                raise ValueError(f"{path}:{n}: expected 'wavelength [flux [element]]', got {raw.strip()!r}") from None
            elems.append(parts[2] if len(parts) > 2 else "")
    if not waves:
        raise ValueError(f"{path}: no lines")
    order = np.argsort(waves)
    return LineList(
        np.asarray(waves, float)[order], np.asarray(fluxes, float)[order], np.asarray(elems, dtype="U8")[order]
    )


def write_lines(path: str | os.PathLike, lines: LineList) -> None:
    """Write ``lines`` in the format :func:`read_lines` reads.

    Args:
        path: output text file (one line per row: wavelength [A], relative flux, element).
        lines: the line list.
    """
    with open(path, "w") as fh:
        fh.write("# wavelength[A, air]  relative_flux  element\n")
        for w, f, e in zip(lines.wave, lines.flux, lines.element):
            fh.write(f"{w:.3f} {f:.6g} {e}\n")


def flat_spectrum(wave) -> np.ndarray | float:
    """Shape of a continuum (quartz-halogen-like) flat lamp, ~1 in the red (a float for a scalar ``wave``).

    A 3000 K black body (photon units) normalised at 6500 A: smooth, rising to
    the red; the absolute level is set by :func:`simulate_flat`.
    """
    wave = np.asarray(wave, dtype=float)
    hc_k = 1.4388e8  # h c / k [A K]

    def bb(w):
        return w**-4 / np.expm1(hc_k / (w * 3000.0))

    return bb(wave) / bb(6500.0)


@dataclasses.dataclass
class CalibImage:
    """A (simulated) calibration exposure of fibers ``specmin .. specmin+nspec-1``.

    Attributes:
        image, ivar: (ny, nx) pixels [photons] and inverse variance.
        kind: ``"arc"`` or ``"flat"``.
        xyrange: ``(xmin, xmax, ymin, ymax)`` of ``image`` on the CCD.
        model: noiseless image.
        specmin, nspec: the lit fibers.
        lines: the arc lines (arcs) or None.
        line_photons: (nspec, nline) photons of each line in each fiber (arcs).
        wave, flux: (nwave,) grid and (nspec, nwave) photons / A (flats; arcs: their continuum, when
            one was simulated).
    """

    image: np.ndarray
    ivar: np.ndarray
    kind: str
    xyrange: tuple[int, int, int, int]
    model: np.ndarray
    specmin: int
    nspec: int
    lines: LineList | None = None
    line_photons: np.ndarray | None = None
    wave: np.ndarray | None = None
    flux: np.ndarray | None = None


def _box(psf: PSF, xyrange):
    if xyrange is None:
        return (0, int(psf.npix_x), 0, int(psf.npix_y))
    return tuple(int(v) for v in xyrange)


def _noisy(model: np.ndarray, readnoise: float, rng) -> tuple[np.ndarray, np.ndarray]:
    pos = np.clip(model, 0.0, None)
    image = rng.poisson(pos).astype(model.dtype) + rng.normal(0.0, readnoise, model.shape)
    ivar = 1.0 / (pos + readnoise**2)
    return image, ivar


def _fibers(psf: PSF, specmin: int, nspec: int | None) -> tuple[int, int]:
    nspec = psf.nspec - specmin if nspec is None else int(nspec)
    psf.check_fibers(int(specmin), nspec)
    return int(specmin), nspec


def simulate_arc(
    psf: PSF,
    lines: LineList | None = None,
    specmin: int = 0,
    nspec: int | None = None,
    xyrange: tuple[int, int, int, int] | None = None,
    peak_photons: float = 3.0e4,
    throughput: np.ndarray | float | None = None,
    readnoise: float = 3.0,
    seed: int = 0,
    continuum=None,
    dw: float = 0.5,
) -> CalibImage:
    """Simulate an arc-lamp exposure: lines of ``lines`` in every lit fiber.

    The brightest line carries ``peak_photons`` photons (in total, over its
    spot) times the fiber's ``throughput`` (default: seeded random 0.9-1.1 per
    fiber); the others scale with their relative flux.  Lines outside the
    PSF's wavelength range are left out.  Poisson + Gaussian read noise.

    The default is about half of one DESI 5 s arc: in those ("CALIB short Arcs all",
    the arcs of DESI's nightly PSF, which averages the fits of about five) a central
    r0 fiber gets ~5.7e4 electrons in Ne 6402 and ~1.05e5 in Ne 7032 (desihub/nightwatch
    ``py/nightwatch/calib_files/CALIB-ARCS-20240701.json``; desihub/desispec
    ``py/desispec/workflow/calibration_selection.py``, ``scripts/proc_joint_fit.py``).
    ``peak_photons=6e4`` (Ne 6402 is this list's brightest r line) is one DESI arc;
    docs/fitting.md ("Accuracy") compares the lines.

    Args:
        psf: the PSF that makes the image.
        lines: arc lines (default: :func:`arc_lines` over the PSF's range).
        specmin: first lit fiber.
        nspec: number of lit fibers (default: all of the PSF's from ``specmin``).
        xyrange: ``(xmin, xmax, ymin, ymax)`` CCD box of the image (default: the CCD).
        peak_photons: photons of the brightest line in a fiber of throughput 1.
        throughput: per-fiber throughput, (nspec,) or a scalar.
        readnoise: Gaussian read noise [electrons].
        seed: random seed.
        continuum: the lamp's faint continuum under the lines, photons / A of a fiber of
            throughput 1: a number or a function of wavelength [A] (None: no continuum); sampled
            every ``dw`` A as :func:`simulate_flat` does and stored in ``wave``, ``flux``.
        dw: sampling step of the continuum [A].

    Returns:
        A :class:`CalibImage` (image, ivar, noiseless model, lines and photons per fiber).
    """
    specmin, nspec = _fibers(psf, specmin, nspec)
    rng = np.random.default_rng(seed)
    if lines is None:
        lines = arc_lines((psf.wmin, psf.wmax))
    lines = lines.between(psf.wmin, psf.wmax)
    if len(lines) == 0:
        raise ValueError(f"no arc lines between {psf.wmin:.1f} and {psf.wmax:.1f} A")
    if throughput is None:
        throughput = rng.uniform(0.9, 1.1, nspec)
    throughput = np.broadcast_to(np.asarray(throughput, float), (nspec,))
    phot = peak_photons * np.outer(throughput, lines.flux / lines.flux.max())
    box = _box(psf, xyrange)
    model = np.asarray(project(psf, jnp.asarray(lines.wave), jnp.asarray(phot), specmin=specmin, xyrange=box))
    wave = flux = None
    if continuum is not None:
        if not dw > 0:
            raise ValueError(f"dw must be positive, got {dw}")
        wave = flat_wave_grid(psf, specmin, nspec, box, dw)
        level = continuum(wave) if callable(continuum) else np.full(wave.shape, float(continuum))
        level = np.broadcast_to(np.asarray(level, float), wave.shape)
        flux = throughput[:, None] * level[None, :]
        model = model + np.asarray(project(psf, jnp.asarray(wave), jnp.asarray(flux * dw), specmin=specmin,
                                           xyrange=box))
    image, ivar = _noisy(model, readnoise, rng)
    return CalibImage(
        image=image, ivar=ivar, kind="arc", xyrange=box, model=model, specmin=specmin, nspec=nspec,
        lines=lines, line_photons=phot, wave=wave, flux=flux,
    )


def simulate_flat(
    psf: PSF,
    specmin: int = 0,
    nspec: int | None = None,
    xyrange: tuple[int, int, int, int] | None = None,
    level: float = 2.0e4,
    dw: float = 0.5,
    throughput: np.ndarray | float | None = None,
    readnoise: float = 3.0,
    seed: int = 1,
) -> CalibImage:
    """Simulate a continuum flat: ``level * throughput * flat_spectrum(w)`` photons / A.

    The continuum is sampled every ``dw`` A over the PSF's range (``dw`` well
    below the line-spread width, so the sampling is invisible); ``throughput``
    defaults to seeded random 0.9-1.1 per fiber.  Poisson + read noise.

    Args:
        psf: the PSF that makes the image.
        specmin: first lit fiber.
        nspec: number of lit fibers (default: all of the PSF's from ``specmin``).
        xyrange: ``(xmin, xmax, ymin, ymax)`` CCD box of the image (default: the CCD).
        level: photons per A of a fiber of throughput 1 where the lamp peaks.
        dw: sampling step of the continuum [A].
        throughput: per-fiber throughput, (nspec,) or a scalar.
        readnoise: Gaussian read noise [electrons].
        seed: random seed.

    Returns:
        A :class:`CalibImage`.
    """
    specmin, nspec = _fibers(psf, specmin, nspec)
    rng = np.random.default_rng(seed)
    if throughput is None:
        throughput = rng.uniform(0.9, 1.1, nspec)
    throughput = np.broadcast_to(np.asarray(throughput, float), (nspec,))
    box = _box(psf, xyrange)
    wave = flat_wave_grid(psf, specmin, nspec, box, dw)
    flux = level * throughput[:, None] * flat_spectrum(wave)[None, :]
    model = np.asarray(project(psf, jnp.asarray(wave), jnp.asarray(flux * dw), specmin=specmin, xyrange=box))
    image, ivar = _noisy(model, readnoise, rng)
    return CalibImage(
        image=image, ivar=ivar, kind="flat", xyrange=box, model=model, specmin=specmin, nspec=nspec,
        wave=wave, flux=flux,
    )


def flat_wave_grid(psf: PSF, specmin: int, nspec: int, box, dw: float) -> np.ndarray:
    """Wavelength grid (step ``dw``) whose spots cover the rows of ``box`` (with a stamp margin)."""
    fibers = np.arange(specmin, specmin + nspec)
    margin = psf.hsizey + 2
    rows = np.array([box[2] - margin, box[3] + margin], dtype=float)
    w = np.asarray(psf.wavelength(fibers[:, None], rows[None, :]))
    lo = max(float(w.min()), psf.wmin)
    hi = min(float(w.max()), psf.wmax)
    n = int(np.floor((hi - lo) / dw)) + 1
    return lo + dw * np.arange(n)
