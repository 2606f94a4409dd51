"""The ONE frame job: read -> check -> extract -> write, used by ``extract`` and ``extract-batch``.

A :class:`FrameJob` names the files (preproc image, PSF, output frame, optional model
image); :class:`FrameOptions` the fibers, the wavelength grid and the
:class:`~jaxspec._extraction.options.ExtractOptions`.  The job runs in four steps,
each a function here, so that the batch runner can overlap them (read the next frame
and write the last one while the device works on this one) without a second copy:

1. :func:`check_paths` - inputs exist, outputs are writable and distinct from the
   inputs (nothing read yet);
2. :func:`prepare` - the PSF (from a :class:`PsfCache`), the options against it, the
   grid, the preproc image and every check of the image against the PSF;
3. :func:`compute` - the extraction (all fibers, or one rank's bundles), host arrays;
4. :func:`write` - the frame (and model) through the one atomic writer.

What DESI's pipeline relies on happens here, once, for both commands: the default
grid of the camera (:data:`CAMERA_GRIDS`), the input mask bits
(:mod:`jaxspec._io.maskbits`), the fibermap (``--fibermap`` or the preproc's,
sliced to the fibers), the barycentric correction (HELIOCOR), and in :func:`write`
the output mask bits and the SCORES table.  :mod:`jaxspec._pipeline.ranks` runs
the same steps with one frame's bundles over MPI ranks.

:func:`run_frame` runs all four in turn.  Errors are :class:`ValueError` /
:class:`OSError` whose messages name the file and the option (``labels`` gives the
names: the command line's flags by default).

The file layer (:mod:`jaxspec._io.frames`, astropy: 0.4-1.7 s to import) is imported by
the steps that read and write, not with this module: :func:`check_paths` and the
options need neither astropy nor JAX, so ``jaxspec extract`` checks them, starts JAX's
backend in a thread and imports astropy while the backend starts
(:mod:`jaxspec._cli.extract`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
import typing
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._extraction.options import ExtractOptions, OptionError, check_fibers, wave_grid_size
from .._io import maskbits
from .._io.atomic import check_output_path

log = logging.getLogger("jaxspec")

__all__ = ["CAMERA_GRIDS", "FrameJob", "FrameOptions", "Prepared", "PsfCache", "ReadAhead", "check_paths", "compute",
           "default_grid", "fetch_arrays", "prepare", "run_frame", "wave_grid", "write"]

#: The grid desi_proc passes to the extraction of each arm: (wmin, wmax, dw) [A], end point included.
CAMERA_GRIDS: dict[str, tuple[float, float, float]] = {
    "b": (3600.0, 5800.0, 0.8), "r": (5760.0, 7620.0, 0.8), "z": (7520.0, 9824.0, 0.8),
}

#: How the job's files are named in messages: the command line's flags.
CLI_LABELS = {"image": "--input", "psf": "--psf", "output": "--output", "model": "--model"}


@dataclasses.dataclass(frozen=True)
class FrameJob:
    """One frame to extract: preproc ``image``, ``psf`` file, ``output`` frame file, optional ``model`` image."""

    image: str | os.PathLike
    psf: str | os.PathLike
    output: str | os.PathLike
    model: str | os.PathLike | None = None

    def __post_init__(self):
        for name in ("image", "psf", "output", "model"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))


@dataclasses.dataclass(frozen=True)
class FrameOptions:
    """What a frame job extracts, besides the files.

    Attributes:
        wavelength: ``(wmin, wmax, dw)`` [A], end point included, or None for the
            camera's grid (:data:`CAMERA_GRIDS`, CAMERA of the preproc or the PSF),
            else the PSF's common range at 0.8 A.
        specmin: first fiber.
        nspec: number of fibers, or None for the PSF's last.
        extraction: the patch and solve options.
        allow_camera_mismatch: extract even when the preproc's CAMERA is not the
            PSF's (the default refuses: the wrong PSF gives wrong spectra).
        fibermap: a file whose FIBERMAP to use (desi_extract_spectra's
            ``--fibermap``), or None for the preproc's (else none).
        barycentric: extract at ``wave / HELIOCOR`` and write HELIOCOR
            (``--barycentric-correction``).
        scores: write the SCORES table (``--no-scores`` turns it off).
        mask_rule: which preproc MASK values zero a pixel's ivar: ``"desispec"``
            (the extraction bits, :data:`jaxspec._io.maskbits.EXTRACT_MASK`) or
            ``"any"`` (any nonzero value).
    """

    wavelength: tuple[float, float, float] | None = None
    specmin: int = 0
    nspec: int | None = None
    extraction: ExtractOptions = ExtractOptions()
    allow_camera_mismatch: bool = False
    fibermap: str | None = None
    barycentric: bool = False
    scores: bool = True
    mask_rule: str = "desispec"

    def __post_init__(self):
        if self.wavelength is not None:
            wmin, wmax, dw = (float(v) for v in self.wavelength)
            wave_grid_size(wmin, wmax, dw)
            object.__setattr__(self, "wavelength", (wmin, wmax, dw))
        if not isinstance(self.extraction, ExtractOptions):
            raise TypeError(f"extraction must be an ExtractOptions, not {type(self.extraction).__name__}")
        if isinstance(self.specmin, bool) or not isinstance(self.specmin, (int, np.integer)) or self.specmin < 0:
            raise OptionError("specmin", self.specmin, "must be a fiber number >= 0")
        if self.mask_rule not in maskbits.MASK_RULES:
            raise OptionError("mask_rule", self.mask_rule,
                              "choose 'desispec' (the pipeline's extraction bits) or 'any' (every nonzero MASK)")
        if self.fibermap is not None:
            object.__setattr__(self, "fibermap", os.fspath(self.fibermap))


def default_grid(psf, camera: str | None) -> tuple[tuple[float, float, float], str]:
    """``((wmin, wmax, dw), source)``: the camera's grid (:data:`CAMERA_GRIDS`), else the PSF's range.

    ``camera`` is e.g. ``"r0"`` (its arm letter is used) or None; ``source`` says
    which (``"camera r"`` or ``"psf"``).
    """
    arm = (camera or "")[:1].lower()
    if arm in CAMERA_GRIDS:
        return CAMERA_GRIDS[arm], f"camera {arm}"
    return (float(np.ceil(psf.wmin_all)), float(np.floor(psf.wmax_all)), 0.8), "psf"


def wave_grid(psf, spec: tuple[float, float, float] | None, camera: str | None = None) -> np.ndarray:
    """The extraction grid [A]: ``spec = (wmin, wmax, dw)``, else :func:`default_grid`."""
    wmin, wmax, dw = spec if spec is not None else default_grid(psf, camera)[0]
    n = wave_grid_size(wmin, wmax, dw)
    return wmin + dw * np.arange(n)


@typing.runtime_checkable
class PsfSource(typing.Protocol):
    """Anything that gives the PSF model of a file: :class:`PsfCache`, or the batch's loader."""

    def get(self, path: str): ...


class PsfCache:
    """The last few PSFs read, keyed by absolute path and modification time (explicit, per run)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._d: collections.OrderedDict = collections.OrderedDict()

    def get(self, path: str):
        """The PSF model of ``path`` (read once while the file is unchanged)."""
        from ..psf import read_psf

        key = (os.path.abspath(path), os.stat(path).st_mtime_ns)
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        psf = read_psf(path)
        self._d[key] = psf
        while len(self._d) > self.size:
            self._d.popitem(last=False)
        return psf


class ReadAhead:
    """A preproc file read ahead (the CLI: while JAX's backend starts), handed to :func:`prepare` at its turn.

    ``ReadAhead(path, mask_rule)`` reads the file now (NumPy and astropy only) and keeps
    the result, or the exception, and the warnings the read gave.  :func:`prepare`
    still checks the PSF and the options first; then, called as ``read(path,
    mask_rule)`` in place of :func:`jaxspec._io.frames.read_preproc`, it gives the
    warnings and the result or the error as if the file were read there (so an
    option's error still comes first and names no input).  Another path or mask rule,
    or a second call, reads the file afresh.
    """

    def __init__(self, path: str, mask_rule: str = "desispec"):
        from .._io import frames

        self.path, self.mask_rule = os.fspath(path), mask_rule
        self._result = self._error = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # all kept; the real filters apply when they are given back
            try:
                self._result = frames.read_preproc(self.path, mask_rule=mask_rule)
            except Exception as err:  # given back by __call__, at prepare's turn
                self._error = err
        self._caught = list(caught)
        self._used = False

    def __call__(self, path: str, mask_rule: str = "desispec"):
        from .._io import frames

        if self._used or os.fspath(path) != self.path or mask_rule != self.mask_rule:
            return frames.read_preproc(path, mask_rule=mask_rule)
        self._used = True
        for w in self._caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        result, error, self._result, self._error = self._result, self._error, None, None
        if error is not None:
            raise error
        return result


def _same_file(a, b) -> bool:
    a, b = os.path.abspath(os.fspath(a)), os.path.abspath(os.fspath(b))
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_paths(job: FrameJob, overwrite: bool = False, labels: Mapping[str, str] = CLI_LABELS) -> None:
    """Step 1: inputs exist, outputs writable and not an input (nothing read).

    Raises:
        FileNotFoundError, FileExistsError, PermissionError, ValueError: with the
        file and its label in the message.
    """
    for what in ("psf", "image"):
        path = getattr(job, what)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{labels[what]} {path}: no such file")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{labels[what]} {path}: is a directory, not a FITS file")
    for what in ("output", "model"):
        path = getattr(job, what)
        if path is None:
            continue
        for other in ("image", "psf"):
            if _same_file(path, getattr(job, other)):
                raise ValueError(f"{labels[what]} {path} is the {labels[other]} file; choose another output name")
    if job.model is not None and _same_file(job.model, job.output):
        raise ValueError(f"{labels['model']} {job.model} is the {labels['output']} file; "
                         "choose another name for the model image")
    check_output_path(job.output, overwrite)
    if job.model is not None:
        check_output_path(job.model, overwrite)


@dataclasses.dataclass
class Prepared:
    """A frame read and checked, ready for the device (step 2's result).

    Attributes:
        job, options: what was asked.
        psf: the PSF model.
        wave: (nwave,) grid the extraction runs on [A] (the detector's: the frame's
            grid divided by HELIOCOR).
        specmin, nspec: the fibers.
        image, ivar: (ny, nx) pixels and inverse variance (host or device arrays).
        xyrange: where the image sits on the CCD, ``(0, nx, 0, ny)``.
        header: the preproc header (carried into the frame).
        fibermap: the FIBERMAP rows of the fibers, or None.
        read_s: seconds spent reading and checking.
        frame_wave: (nwave,) grid written to the frame [A] (barycentric with
            HELIOCOR; None: ``wave``).
        wave_source: where the grid came from: ``"option"``, ``"camera r"``, ``"psf"``.
        heliocor: the barycentric factor (1: none).
        orig_psf: the PSF the PSF file was shifted from (its IN_PSF), or None.
    """

    job: FrameJob
    options: FrameOptions
    psf: object
    wave: np.ndarray
    specmin: int
    nspec: int
    image: object
    ivar: object
    xyrange: tuple[int, int, int, int]
    header: object
    fibermap: object
    read_s: float
    frame_wave: np.ndarray | None = None
    wave_source: str = "option"
    heliocor: float = 1.0
    orig_psf: str | None = None


def _spectrograph(camera: str | None) -> int | None:
    """'r3' -> 3 (None when unknown)."""
    if camera and len(camera) >= 2 and camera[1:].isdigit():
        return int(camera[1:])
    return None


def _pick_fibermap(fibermap, specmin: int, nspec: int, path: str, camera: str | None = None,
                   required: bool = False, label: str = "--input"):
    """The FIBERMAP rows of fibers specmin..specmin+nspec-1, or None.

    With a FIBER column holding every fiber ``500 * spectrograph + specmin + i`` of
    this camera once, those rows (a whole-exposure fibermap works too); otherwise
    rows ``specmin .. specmin + nspec - 1`` (desispec slices rows); a table of
    ``nspec`` rows is taken as it is.  Too few rows: a warning and None, or with
    ``required`` (the user named the file) a ValueError.
    """
    if fibermap is None:
        return None
    from .._io import frames

    n = len(fibermap)
    sp = _spectrograph(camera)
    if "FIBER" in fibermap.colnames and sp is not None:
        fibers = np.asarray(fibermap["FIBER"])
        want = sp * frames._FIBERS_PER_SPECTROGRAPH + specmin + np.arange(nspec)
        rows = [np.flatnonzero(fibers == f) for f in want]
        if all(len(r) == 1 for r in rows):
            return fibermap[np.array([int(r[0]) for r in rows])]
    if n == nspec:
        return fibermap
    if n >= specmin + nspec:
        return fibermap[specmin:specmin + nspec]
    text = f"FIBERMAP of {path} has {n} rows, too few for fibers {specmin}..{specmin + nspec - 1}"
    if required:
        raise ValueError(f"{label} {path}: {text}; give the fibermap of this exposure (or leave {label} out)")
    log.warning("%s: the frame is written without FIBERMAP", text)
    return None


def prepare(job: FrameJob, options: FrameOptions, psfs: PsfSource | None = None, *,
            labels: Mapping[str, str] = CLI_LABELS, device_put: bool = False,
            read_preproc: Callable | None = None) -> Prepared:
    """Step 2: read the PSF and the preproc image, and check everything against each other.

    Args:
        job, options: the frame and what to extract.
        psfs: a cache of PSFs (a night's frames share few PSF files); None reads afresh.
        labels: how files are named in messages.
        device_put: place image and ivar on the default device (the batch reader
            does, so the copy overlaps the previous frame's compute).
        read_preproc: reads the preproc file (``frames.read_preproc``'s signature),
            e.g. a :class:`ReadAhead`; None reads it here.

    Raises:
        OptionError: an option that does not fit the PSF (``.flag()`` says it as a flag).
        ValueError, OSError: unreadable or inconsistent files (named in the message).
    """
    from .._io import frames  # astropy: imported here, not with the module (see the module docstring)

    t0 = time.perf_counter()
    psf = (psfs or PsfCache(1)).get(job.psf)
    specmin, nspec = check_fibers(options.specmin, options.nspec, psf.nspec, options.extraction.bundlesize)
    if specmin % options.extraction.bundlesize:
        log.warning("--specmin %d does not start a bundle of %d fibers", specmin, options.extraction.bundlesize)

    def check_grid(wave, spec, source):
        try:
            psf.check_wavelengths(wave)
        except ValueError as err:
            hint = ("or leave --wavelength out for the camera's grid" if source == "option" else
                    f"the {source} default grid does not fit this PSF; give --wavelength")
            raise OptionError("wavelength", f"{spec[0]:g},{spec[1]:g},{spec[2]:g}",
                              f"{err}; choose wmin,wmax inside {psf.wmin:.1f},{psf.wmax:.1f} of {labels['psf']} "
                              f"{job.psf} ({hint})") from None

    if options.wavelength is not None:  # an option's error before any image is read
        check_grid(wave_grid(psf, options.wavelength), options.wavelength, "option")
    pre = (read_preproc or frames.read_preproc)(job.image, mask_rule=options.mask_rule)
    ccd = (psf.npix_y, psf.npix_x)
    if pre.image.shape[0] > ccd[0] or pre.image.shape[1] > ccd[1]:
        raise ValueError(
            f"{labels['image']} {job.image}: IMAGE is {pre.image.shape[0]} x {pre.image.shape[1]} pixels, larger "
            f"than the {ccd[0]} x {ccd[1]} CCD of {labels['psf']} {job.psf}; is this the PSF of this camera?")
    if pre.image.shape != ccd:
        log.warning("IMAGE of %s is %d x %d pixels, the PSF's CCD %d x %d: treating it as the lower-left "
                    "sub-image (pixels beyond it count as masked)", job.image, *pre.image.shape, *ccd)
    cam_in = frames.header_camera(pre.header)
    cam_psf = frames.psf_camera(job.psf)
    if cam_in and cam_psf and cam_in != cam_psf:
        text = (f"{labels['image']} {job.image} is camera {cam_in} but {labels['psf']} {job.psf} is camera "
                f"{cam_psf}")
        if not options.allow_camera_mismatch:
            raise ValueError(f"{text}: use the PSF of camera {cam_in} (or --allow-camera-mismatch if a header is "
                             "wrong)")
        log.warning("%s", text)
    camera = cam_in or cam_psf

    # ---- the grid: the option's, else the camera's (as desi_proc passes it), else the PSF's
    if options.wavelength is not None:
        spec, source = options.wavelength, "option"
    else:
        spec, source = default_grid(psf, camera)
        log.info("wavelength grid %g-%g A step %g from %s (give --wavelength to choose another)", *spec,
                 f"the {source} default" if source != "psf" else "the PSF's range (camera unknown)")
    frame_wave = np.asarray(wave_grid(psf, spec))

    # ---- the fibermap: --fibermap's, else the preproc's, else none
    if options.fibermap is not None:
        fibermap = _pick_fibermap(frames.read_fibermap(options.fibermap), specmin, nspec, options.fibermap,
                                  camera, required=True, label="--fibermap")
    else:
        fibermap = _pick_fibermap(pre.fibermap, specmin, nspec, job.image, camera)

    # ---- the barycentric correction: extract at the detector's wavelengths, label barycentric
    heliocor = 1.0
    if options.barycentric:
        from .._io.barycentric import barycentric_factor

        meta = pre.header
        if not any(k in meta for k in ("RA", "TARGTRA")) and fibermap is not None and \
                any(k in fibermap.meta for k in ("RA", "TARGTRA")):
            meta, where = fibermap.meta, f"FIBERMAP header of {options.fibermap or job.image}"
        else:
            where = f"{labels['image']} {job.image}"
        heliocor = barycentric_factor(meta, where)
        log.info("barycentric correction: HELIOCOR = %.9f (extracting at wave / HELIOCOR)", heliocor)
    wave = frame_wave / heliocor if heliocor != 1.0 else frame_wave
    check_grid(wave, spec, source)
    if not np.any(pre.ivar > 0):
        log.warning("%s: every pixel is masked (IVAR 0); the frame will have ivar 0 everywhere", job.image)
    image, ivar = pre.image, pre.ivar
    if device_put:
        import jax

        image, ivar = jax.device_put(image), jax.device_put(ivar)
    return Prepared(job, options, psf, np.asarray(wave), specmin, nspec, image, ivar,
                    (0, pre.image.shape[1], 0, pre.image.shape[0]), pre.header, fibermap,
                    time.perf_counter() - t0, frame_wave=frame_wave, wave_source=source, heliocor=heliocor,
                    orig_psf=frames.psf_input(job.psf))


def compute(prep: Prepared, first: int | None = None, n: int | None = None, *, solve_chunk: Callable | None = None,
            chunk_size: int | None = None, progress: Callable[[int, int], None] | None = None,
            geometry=None, fetch: bool = True) -> dict:
    """Step 3: extract fibers ``first .. first + n - 1`` (default: all of the job's).

    Args:
        geometry: the patch geometry of exactly these fibers, grid and options
            (the batch reader cuts it ahead, beside the previous frame's device
            work); None cuts it here, while the pixels go to the device.
        fetch: False returns the device arrays as soon as the work is queued
            (JAX's dispatch is asynchronous); :func:`fetch_arrays` brings them to the host.

    Returns:
        Host arrays ``wave, flux, ivar, resolution, chi2pix, pixmask_fraction`` and,
        when the job has a model path, ``model``.
    """
    from .._extraction.extract import extract

    first = prep.specmin if first is None else first
    n = prep.nspec if n is None else n
    opts = prep.options.extraction
    if chunk_size is not None:
        opts = opts.replace(chunk_size=chunk_size)
    want_model = prep.job.model is not None
    image, ivar = prep.image, prep.ivar
    if geometry is None:
        geometry, image, ivar = _geometry_beside_transfer(prep, first, n, opts)
    ex = extract(image, ivar, prep.psf, prep.wave, specmin=first, nspec=n, xyrange=prep.xyrange,
                 options=opts, model=want_model, geometry=geometry, progress=progress, solve_chunk=solve_chunk)
    names = ["flux", "ivar", "resolution", "chi2pix", "pixmask_fraction"] + (["model"] if want_model else [])
    out = {k: getattr(ex, k) for k in names}
    out["wave"] = ex.wave
    return fetch_arrays(out) if fetch else out


def _geometry_beside_transfer(prep: Prepared, first: int, n: int, opts: ExtractOptions):
    """``(geometry, image, ivar)``: the patch geometry cut while the pixels go to the device.

    The geometry is Python and small JAX programs (0.6 s in a fresh process on an H200);
    the copy of a full CCD's image and ivar (2 x 136 MB in float64, 0.2-0.35 s there) is
    not, so it runs in a thread meanwhile.  The arrays are placed as :func:`extract`
    places them (uncommitted, on the default device): the same compiled programs.
    """
    from .._extraction.extract import _as_array, patch_geometry_for

    with ThreadPoolExecutor(1, thread_name_prefix="jaxspec-pixels") as pool:
        pixels = pool.submit(lambda: (_as_array(prep.image), _as_array(prep.ivar)))
        geometry = patch_geometry_for(prep.psf, prep.wave, first, n, opts)
        image, ivar = pixels.result()
    return geometry, image, ivar


def fetch_arrays(arrays: dict) -> dict:
    """The arrays of ``compute(..., fetch=False)`` on the host (waits for the device)."""
    import jax

    return {k: np.asarray(v) for k, v in jax.device_get(arrays).items()}


def _ranges(values) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out, vals, i = [], [int(v) for v in values], 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ", ".join(out)


def write(prep: Prepared, arrays: dict, overwrite: bool = False) -> str:
    """Step 4: the frame file (and the model image), through the one atomic writer.

    Returns:
        The absolute path of the frame written.
    """
    from .._io import frames

    dead = np.flatnonzero(~np.any(arrays["ivar"] > 0, axis=1))
    if dead.size:
        log.warning("%d of %d fibers have no unmasked pixels (ivar 0, MASK set in the frame): %s",
                    dead.size, prep.nspec, _ranges(prep.specmin + dead))
    wave = prep.wave if prep.frame_wave is None else prep.frame_wave
    mask = maskbits.frame_mask(arrays["pixmask_fraction"], arrays["chi2pix"], arrays["ivar"])
    header = prep.header.copy()
    header["WAVEGRID"] = (prep.wave_source, "source of the wavelength grid")
    header["MASKRULE"] = (prep.options.mask_rule, "input MASK bits that zero ivar")
    if prep.heliocor != 1.0:
        header["HELIOCOR"] = (float(prep.heliocor), "barycentric correction factor")
    if prep.orig_psf is not None:
        header["ORIG_PSF"] = prep.orig_psf
    # scored on the float32 values the file holds: what any reader of the frame recomputes
    scores = (frames.frame_scores(wave, np.asarray(arrays["flux"], np.float32), np.asarray(arrays["ivar"], np.float32))
              if prep.options.scores else None)
    if prep.options.scores and not scores:
        log.warning("no SCORES: the grid %.1f-%.1f A misses the arm's score range", wave[0], wave[-1])
    path = frames.write_frame(
        prep.job.output, wave=wave, flux=arrays["flux"], ivar=arrays["ivar"], mask=mask,
        resolution=arrays["resolution"], chi2pix=arrays["chi2pix"], fibermap=prep.fibermap, header=header,
        specmin=prep.specmin, input_path=prep.job.image, psf_path=prep.job.psf,
        options=prep.options.extraction.header_cards(prep.psf.psferr), scores=scores, overwrite=overwrite,
    )
    if prep.job.model is not None:
        frames.write_model(prep.job.model, arrays["model"], header=prep.header, overwrite=overwrite)
    return path


def run_frame(job: FrameJob, options: FrameOptions = FrameOptions(), *, overwrite: bool = False,
              psfs: PsfSource | None = None, progress: Callable[[int, int], None] | None = None,
              solve_chunk: Callable | None = None, labels: Mapping[str, str] = CLI_LABELS,
              read_preproc: Callable | None = None) -> dict:
    """The whole job for one frame: check, read, extract, write.

    ``read_preproc``: as :func:`prepare`'s (e.g. a :class:`ReadAhead`).

    Returns:
        ``{"output", "nspec", "nwave", "seconds"}``.
    """
    t0 = time.perf_counter()
    check_paths(job, overwrite, labels)
    prep = prepare(job, options, psfs, labels=labels, read_preproc=read_preproc)
    wave = prep.wave
    log.info("extracting fibers %d-%d, %d wavelengths %.1f-%.1f A from %s",
             prep.specmin, prep.specmin + prep.nspec - 1, len(wave), wave[0], wave[-1], job.image)
    arrays = compute(prep, progress=progress, solve_chunk=solve_chunk)
    path = write(prep, arrays, overwrite)
    return dict(output=path, nspec=prep.nspec, nwave=len(wave), seconds=time.perf_counter() - t0)
