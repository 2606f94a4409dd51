"""File input/output for jaxspec: DESI preproc images in, DESI frames out.

Plain NumPy + astropy; nothing here imports JAX.

Formats
-------
*Preproc* (a pre-processed CCD image, as desispec writes it): HDU ``IMAGE``
(usually the primary HDU carrying ``EXTNAME = 'IMAGE'``), ``IVAR``, ``MASK``
(integer, 0 = good) and optionally ``FIBERMAP``.  Files written by
:func:`write_preproc` may also carry the simulation truth in ``TRUTH_WAVE`` /
``TRUTH_FLUX``.

*Frame* (extracted spectra, the layout read by ``desispec.io.read_frame``):
primary HDU ``FLUX`` (nspec, nwave) float32, then ``IVAR`` float32, ``MASK``
uint32, ``WAVELENGTH`` float64, ``RESOLUTION`` (nspec, ndiag, nwave) float32,
``FIBERMAP`` (binary table, when given), ``CHI2PIX`` float32 (when given) and
``SCORES`` (binary table of per-fiber scores, when given: :func:`frame_scores`).

Safety rules shared by every writer
-----------------------------------
* :func:`check_output_path` validates the destination before any work: the
  directory must exist and be writable, and an existing file is only replaced
  with ``overwrite=True``.
* The file is written to a hidden temporary file in the destination directory
  and moved into place with :func:`os.replace` (or a no-clobber hard link when
  not overwriting), so an interrupted write never leaves a partial file at the
  destination and a failed write leaves the destination untouched.
* Non-finite values never reach FLUX/IVAR (or IMAGE/IVAR): they are written as
  0 with ivar 0, the mask bit is set, and a :class:`FrameIOWarning` gives the
  count.  Negative ivar is treated the same way.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.units import UnitsWarning

from . import maskbits
from .atomic import atomic_write, check_output_path
from .fitsstream import write_hdus
from .iowarning import FrameIOWarning

__all__ = [
    "FrameIOWarning",
    "Preproc",
    "Frame",
    "read_preproc",
    "write_preproc",
    "read_frame",
    "write_frame",
    "write_model",
    "read_model",
    "check_output_path",
    "embed_subimage",
    "frame_scores",
    "psf_input",
    "read_fibermap",
    "header_camera",
    "psf_camera",
    "OPTION_KEYS",
    "IDENTIFYING_KEYS",
    "SPECMASK_ALLBADPIX",
    "CCDMASK_BAD",
]

# --------------------------------------------------------------------------
# Constants

#: desispec.maskbits.specmask.ALLBADPIX (bit 1): "All input pixels were masked
#: or ivar=0".  Set in the frame MASK wherever the written IVAR is 0.
SPECMASK_ALLBADPIX = np.uint32(1 << 1)

#: desispec.maskbits.ccdmask.BAD (bit 0): "Pre-determined bad pixel (any
#: reason)".  Set in a preproc MASK for pixels masked because of NaN/inf or
#: negative ivar.
CCDMASK_BAD = 1 << 0

#: Extraction option name -> FITS header key written by :func:`write_frame`.
#: Keys not listed here are upper-cased, stripped to [A-Z0-9_-] and cut to 8
#: characters; names that already are one of the values are accepted as is.
OPTION_KEYS: dict[str, str] = {
    "bundlesize": "BUNDLSZ",
    "nsubbundles": "NSUBBUND",
    "nwavestep": "NWAVSTEP",
    "wavepad_frac": "WPADFRAC",
    "pixpad_frac": "PPADFRAC",
    "regularize": "REGULARZ",
    "psferr": "PSFERR",
    "decorrelate": "DECORREL",
    "decorrelate_fibers": "DECORREL",
}

#: Identifying keys of an exposure.  Every non-structural key of the input
#: header is carried into outputs (as desispec does by reusing the preproc
#: header as frame meta); these are the ones that matter downstream.
IDENTIFYING_KEYS: tuple[str, ...] = (
    "CAMERA", "FLAVOR", "OBSTYPE", "NIGHT", "EXPID", "TILEID", "EXPTIME",
    "SPECGRPH", "SPECTRO", "DETECTOR", "DATE-OBS", "MJD-OBS", "PROGRAM",
    "SURVEY", "FIBERMIN",
)

# Keys that describe the HDU itself, never carried from one HDU to another.
_STRUCTURAL = {
    "SIMPLE", "BITPIX", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "EXTNAME",
    "EXTVER", "BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM", "GROUPS",
    "TFIELDS", "THEAP", "ZIMAGE", "ZBITPIX", "ZCMPTYPE", "ZQUANTIZ", "ZDITHER0",
    "ZSIMPLE", "ZEXTEND", "ZTENSION", "ZPCOUNT", "ZGCOUNT", "ZHECKSUM",
    "ZDATASUM", "ZBLANK",
}
_STRUCTURAL_RE = re.compile(r"^(NAXIS\d*|ZNAXIS\d*|ZTILE\d+|ZNAME\d+|ZVAL\d+|"
                            r"TTYPE\d+|TFORM\d+|TUNIT\d+|TDIM\d+|TNULL\d+|"
                            r"TSCAL\d+|TZERO\d+|TDISP\d+)$")
_TRUTH_KEYS = {"wave", "flux", "specmin"}
_FIBERS_PER_SPECTROGRAPH = 500  # desispec hard-codes this in Frame


# --------------------------------------------------------------------------
# Data containers


@dataclass
class Preproc:
    """A pre-processed CCD image as read by :func:`read_preproc`.

    Attributes:
        image: (ny, nx) float64 pixel values; 0 where masked for NaN/inf.
        ivar: (ny, nx) float64 inverse variance; 0 wherever MASK != 0 or the
            pixel was non-finite or had negative ivar.
        mask: (ny, nx) integer CCD mask (0 = good), of the file's width (an int64
            MASK stays int64), or None when the file has no MASK HDU.  Every pixel
            with one of desispec's extraction bits set (or any bit, with
            ``mask_rule='any'``) has ivar 0.
        header: the IMAGE HDU header merged over the primary header (IMAGE wins),
            without structural keys (NAXIS, BITPIX, EXTNAME, ...).
        fibermap: the FIBERMAP table or None.
        truth: ``{'wave', 'flux', 'specmin'}`` from TRUTH_WAVE/TRUTH_FLUX or None.
        path: the file read.
    """

    image: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray | None = None
    header: fits.Header = field(default_factory=fits.Header)
    fibermap: Table | None = None
    truth: dict | None = None
    path: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.image.shape)


@dataclass
class Frame:
    """Extracted spectra on a common wavelength grid (the DESI frame format).

    Attributes:
        wave: (nwave,) wavelengths [Angstrom].
        flux: (nspec, nwave) flux (electron/Angstrom for raw extractions).
        ivar: (nspec, nwave) inverse variance of flux.
        resolution: (nspec, ndiag, nwave) resolution-matrix diagonals.
        mask: (nspec, nwave) uint32 bitmask (0 = good) or None.
        chi2pix: (nspec, nwave) chi2 of the 2D model, or None.
        fibermap: table with one row per spectrum, or None.
        header: primary (FLUX) header.
        path: file read from, if any.
    """

    wave: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    resolution: np.ndarray
    mask: np.ndarray | None = None
    chi2pix: np.ndarray | None = None
    fibermap: Table | None = None
    header: fits.Header = field(default_factory=fits.Header)
    path: str | None = None

    @property
    def nspec(self) -> int:
        return int(np.shape(self.flux)[0])

    @property
    def nwave(self) -> int:
        return int(np.shape(self.flux)[1])

    @property
    def ndiag(self) -> int:
        return int(np.shape(self.resolution)[1])

    @property
    def specmin(self) -> int:
        return int(self.header.get("SPECMIN", 0))


# --------------------------------------------------------------------------
# Output: every file goes through the one atomic writer (:mod:`jaxspec._io.atomic`)


def _atomic_writeto(hdul: fits.HDUList, path: str | os.PathLike, overwrite: bool) -> str:
    """Write ``hdul`` through :func:`~jaxspec._io.atomic.atomic_write` (checksums, verified).

    Streamed by :func:`~jaxspec._io.fitsstream.write_hdus`: the same bytes as
    astropy's ``writeto(checksum=True)``, image data outside the interpreter lock;
    a full disk fails in our own write, with an OSError naming the file.
    """
    return atomic_write(path, lambda fh: write_hdus(fh, hdul), overwrite=overwrite)


# --------------------------------------------------------------------------
# Header helpers


def _is_structural(key: str) -> bool:
    key = key.upper()
    return key in _STRUCTURAL or bool(_STRUCTURAL_RE.match(key))


def _carry_header(*headers: Mapping | fits.Header | None) -> fits.Header:
    """Merge headers (later ones win), dropping structural keys."""
    out = fits.Header()
    for hdr in headers:
        if hdr is None:
            continue
        if isinstance(hdr, fits.Header):
            cards = hdr.cards
        else:
            cards = [fits.Card(k, v) if not isinstance(v, tuple) else fits.Card(k, *v)
                     for k, v in dict(hdr).items()]
        for card in cards:
            key = card.keyword
            if key == "COMMENT":
                out.add_comment(card.value)
                continue
            if key == "HISTORY":
                out.add_history(card.value)
                continue
            if not key or _is_structural(key):
                continue
            value = card.value
            if isinstance(value, fits.card.Undefined):
                value = None
            out[key] = (value, card.comment)
    return out


def _ascii_text(text: str) -> str:
    """``text`` with every character outside printable ASCII as a Python escape (``\\xe9``)."""
    if all(" " <= c <= "~" for c in text):
        return text
    return "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _set_key(hdr: fits.Header, key: str, value, comment: str) -> None:
    """``hdr[key] = (value, comment)``, without the comment where it would not fit on the card.

    Long strings (file paths) keep their full value (CONTINUE cards where needed);
    astropy would otherwise warn "Card is too long, comment will be truncated".
    Characters a FITS header cannot hold (non-ASCII, control characters: a path
    such as ``données/pre-é.fits``) are written as Python escapes (``donn\\xe9es``).
    """
    if isinstance(value, str):
        value = _ascii_text(value)
    card = fits.Card(key, value, comment)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fits.verify.VerifyWarning)
        try:
            card.image
        except fits.verify.VerifyWarning:
            card = fits.Card(key, value)
    hdr[key] = (card.value, card.comment)


def _set_dependency(hdr: fits.Header, name: str, version: str) -> None:
    """desiutil.depend convention: DEPNAMnn/DEPVERnn, update or first free slot."""
    for i in range(100):
        nkey, vkey = f"DEPNAM{i:02d}", f"DEPVER{i:02d}"
        if nkey not in hdr:
            hdr[nkey] = name
            hdr[vkey] = str(version)
            return
        if hdr[nkey] == name:
            hdr[vkey] = str(version)
            return
    raise ValueError("header already has 100 DEPNAMnn dependency entries")


def _add_dependencies(hdr: fits.Header, version: str | None) -> None:
    if version is None:
        from .._version import __version__ as version
    _set_dependency(hdr, "jaxspec", version)
    _set_dependency(hdr, "python", platform.python_version())
    _set_dependency(hdr, "numpy", np.__version__)
    import astropy
    _set_dependency(hdr, "astropy", astropy.__version__)
    try:  # without importing JAX
        _set_dependency(hdr, "jax", importlib.metadata.version("jax"))
    except importlib.metadata.PackageNotFoundError:
        pass


def _option_key(name: str) -> str:
    if name in OPTION_KEYS:
        return OPTION_KEYS[name]
    upper = name.upper()
    if upper in OPTION_KEYS.values():
        return upper
    key = re.sub(r"[^A-Z0-9_-]", "", upper)[:8]
    if not key:
        raise ValueError(f"cannot make a FITS header key from option name {name!r}")
    return key


def _add_options(hdr: fits.Header, options: Mapping[str, Any] | None) -> None:
    if not options:
        return
    used: dict[str, str] = {}
    for name, value in options.items():
        key = _option_key(str(name))
        if key in used and used[key] != name:
            raise ValueError(
                f"options {used[key]!r} and {name!r} both map to header key {key}")
        used[key] = name
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)):
            value = bool(value)
        elif isinstance(value, (int, np.integer)):
            value = int(value)
        elif isinstance(value, (float, np.floating)):
            value = float(value)
        elif not isinstance(value, str):
            value = str(value)
        _set_key(hdr, key, value, f"jaxspec option {name}"[:47])


def _spectrograph(hdr: Mapping) -> int | None:
    for key in ("SPECGRPH", "SPECTRO"):
        if key in hdr:
            try:
                return int(hdr[key])
            except (TypeError, ValueError):
                pass
    cam = hdr.get("CAMERA")
    if isinstance(cam, str) and len(cam) >= 2 and cam[1].isdigit():
        return int(cam[1])
    return None


# --------------------------------------------------------------------------
# Array sanitising


def _warn(msg: str) -> None:
    warnings.warn(msg, FrameIOWarning, stacklevel=4)


def _clean_pair(values: np.ndarray, ivar: np.ndarray, names: tuple[str, str],
                where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero values/ivar where either is non-finite or ivar < 0; warn with counts.

    Returns (values, ivar, bad) with ``bad`` the boolean array of altered
    elements.  Inputs are not modified.
    """
    finite = np.isfinite(values) & np.isfinite(ivar)
    nonfinite = ~finite
    negative = finite & (ivar < 0)
    bad = nonfinite | negative
    n_nonfinite = int(nonfinite.sum())
    n_negative = int(negative.sum())
    if n_nonfinite:
        _warn(f"{where}: {n_nonfinite} pixel(s) with NaN or inf in {names[0]} or "
              f"{names[1]} masked ({names[0]}=0, {names[1]}=0)")
    if n_negative:
        _warn(f"{where}: {n_negative} pixel(s) with negative {names[1]} masked "
              f"({names[1]}=0)")
    if bad.any():
        values = np.where(nonfinite, 0, values).astype(values.dtype, copy=False)
        ivar = np.where(bad, 0, ivar).astype(ivar.dtype, copy=False)
    return values, ivar, bad


def _clean_finite(arr: np.ndarray, name: str, where: str) -> np.ndarray:
    bad = ~np.isfinite(arr)
    n = int(bad.sum())
    if n:
        _warn(f"{where}: {n} non-finite value(s) in {name} written as 0")
        arr = np.where(bad, 0, arr).astype(arr.dtype, copy=False)
    return arr


def _as_f32(arr, name: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(arr, dtype=np.float64).astype(np.float32)


# --------------------------------------------------------------------------
# Reading helpers


def _open_fits(path: str | os.PathLike, kind: str) -> tuple[str, fits.HDUList]:
    spath = os.fspath(path)
    if not os.path.exists(spath):
        raise FileNotFoundError(f"{kind} file not found: {spath}")
    if os.path.isdir(spath):
        raise IsADirectoryError(f"{kind} path is a directory, not a FITS file: {spath}")
    try:
        hdul = fits.open(spath, memmap=False, uint=True, lazy_load_hdus=False)
    except Exception as err:  # astropy raises OSError / ValueError / TypeError
        raise OSError(f"{spath} is not a readable FITS file ({kind}): {err}") from err
    if len(hdul) == 0:
        hdul.close()
        raise OSError(f"{spath} is not a readable FITS file ({kind}): no HDUs")
    return spath, hdul


def _hdu_names(hdul: fits.HDUList) -> list[str]:
    return [h.name or f"#{i}" for i, h in enumerate(hdul)]


def _get_hdu(hdul: fits.HDUList, name: str, spath: str, kind: str, required: bool = True):
    if name in hdul:
        return hdul[name]
    if required:
        raise ValueError(
            f"{spath}: missing {name} HDU in {kind} file (HDUs present: "
            f"{', '.join(_hdu_names(hdul))})")
    return None


def _read_data(hdu, name: str, spath: str, ndim: int | None = None) -> np.ndarray:
    try:
        data = hdu.data
    except Exception as err:
        raise OSError(f"{spath}: cannot read data of {name} HDU: {err}") from err
    if data is None:
        raise ValueError(f"{spath}: {name} HDU has no data")
    data = np.asarray(data)
    if ndim is not None and data.ndim != ndim:
        raise ValueError(
            f"{spath}: {name} HDU should be {ndim}-D, found shape {data.shape}")
    return data


def _read_table(hdu, name: str = "FIBERMAP", spath: str | None = None) -> Table:
    """The table of HDU ``name``; a clear error when it is an image or cannot be read."""
    where = f"{spath}: " if spath else ""
    if not isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
        shape = None if hdu.data is None else tuple(np.shape(hdu.data))
        raise ValueError(f"{where}{name} HDU is an image (shape {shape}), not a table: "
                         f"{name} must be a binary table with one row per fiber")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnitsWarning)
        try:
            return Table.read(hdu)
        except Exception as err:
            raise ValueError(f"{where}{name} HDU table cannot be read ({err})") from err


def _parsed_header(hdu, name: str, spath: str) -> fits.Header:
    """A copy of ``hdu.header`` without the cards astropy cannot parse.

    An unparsable card of an identifying key (CAMERA, EXPID, ...: :data:`IDENTIFYING_KEYS`)
    raises ``ValueError``; any other is dropped with a :class:`FrameIOWarning`.
    """
    out = fits.Header()
    for card in hdu.header.cards:
        try:
            card.value  # parses the card
            out.append(card)
        except Exception:  # astropy's VerifyError / ValueError
            raw = getattr(card, "_image", None)  # the card as stored, before any fix
            text = f" ({raw.strip()!r})" if isinstance(raw, str) else ""
            if card.keyword.upper() in IDENTIFYING_KEYS:
                raise ValueError(
                    f"{spath}: {name} HDU header card {card.keyword}{text} is not a valid FITS "
                    "value; fix the card (e.g. quote a string value) or delete it"
                ) from None
            _warn(f"{spath}: {name} HDU header card {card.keyword}{text} is not a valid FITS "
                  "value and is ignored")
    return out


def _table_hdu(table, name: str) -> fits.BinTableHDU:
    table = Table(table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnitsWarning)
        hdu = fits.table_to_hdu(table)
    hdu.name = name
    return hdu


# --------------------------------------------------------------------------
# Preproc


def read_preproc(path: str | os.PathLike, mask_rule: str = "desispec") -> Preproc:
    """Read a DESI preproc image.

    Pixels with any of desispec's extraction mask bits in MASK get ivar 0
    (:func:`jaxspec._io.maskbits.input_masked`; ``mask_rule='any'``: any nonzero
    MASK value).  NaN/inf in IMAGE or IVAR, and negative
    IVAR, are masked (ivar 0; image 0 where non-finite; CCD mask bit BAD set
    when there is a MASK) with a :class:`FrameIOWarning` giving the count.
    MASK keeps the file's integer width (an int64 MASK keeps bits 32-63).  A header
    card astropy cannot parse is dropped with a :class:`FrameIOWarning`, unless it
    is one of :data:`IDENTIFYING_KEYS` (then ``ValueError``).

    Raises:
        FileNotFoundError: no such file.
        OSError: not a readable FITS file.
        ValueError: IMAGE or IVAR HDU missing or empty, or IMAGE/IVAR/MASK
            shapes disagree, or only one of TRUTH_WAVE/TRUTH_FLUX present, an
            unparsable CAMERA/EXPID/... card, or a FIBERMAP HDU that is not a table.

    Every message names the file and, where relevant, the HDU.
    """
    spath, hdul = _open_fits(path, "preproc")
    with hdul:
        img_hdu = _get_hdu(hdul, "IMAGE", spath, "preproc")
        ivar_hdu = _get_hdu(hdul, "IVAR", spath, "preproc")
        mask_hdu = _get_hdu(hdul, "MASK", spath, "preproc", required=False)

        image = _read_data(img_hdu, "IMAGE", spath, ndim=2).astype(np.float64)
        ivar = _read_data(ivar_hdu, "IVAR", spath, ndim=2).astype(np.float64)
        if ivar.shape != image.shape:
            raise ValueError(f"{spath}: IVAR HDU shape {ivar.shape} does not match "
                             f"IMAGE HDU shape {image.shape}")
        mask = None
        if mask_hdu is not None:
            mask = _read_data(mask_hdu, "MASK", spath, ndim=2)
            if mask.shape != image.shape:
                raise ValueError(f"{spath}: MASK HDU shape {mask.shape} does not "
                                 f"match IMAGE HDU shape {image.shape}")
            if not np.issubdtype(mask.dtype, np.integer):
                raise ValueError(f"{spath}: MASK HDU has non-integer dtype {mask.dtype}")
            # the file's full width (an int64 mask keeps bits 32..63), native byte order
            mask = mask.astype(mask.dtype.newbyteorder("="))

        if img_hdu is hdul[0]:
            header = _carry_header(_parsed_header(img_hdu, "IMAGE", spath))
        else:
            header = _carry_header(_parsed_header(hdul[0], "primary", spath),
                                   _parsed_header(img_hdu, "IMAGE", spath))

        fibermap = None
        if "FIBERMAP" in hdul:
            fibermap = _read_table(hdul["FIBERMAP"], "FIBERMAP", spath)

        truth = None
        has_w, has_f = "TRUTH_WAVE" in hdul, "TRUTH_FLUX" in hdul
        if has_w != has_f:
            missing = "TRUTH_FLUX" if has_w else "TRUTH_WAVE"
            raise ValueError(f"{spath}: has {'TRUTH_WAVE' if has_w else 'TRUTH_FLUX'} "
                             f"but missing {missing} HDU")
        if has_w:
            twave = _read_data(hdul["TRUTH_WAVE"], "TRUTH_WAVE", spath, ndim=1)
            tflux = _read_data(hdul["TRUTH_FLUX"], "TRUTH_FLUX", spath, ndim=2)
            if tflux.shape[1] != twave.shape[0]:
                raise ValueError(f"{spath}: TRUTH_FLUX shape {tflux.shape} does not "
                                 f"match TRUTH_WAVE length {twave.shape[0]}")
            specmin = hdul["TRUTH_FLUX"].header.get(
                "SPECMIN", hdul["TRUTH_WAVE"].header.get("SPECMIN", 0))
            truth = {"wave": twave.astype(np.float64), "flux": tflux.astype(np.float64),
                     "specmin": int(specmin)}

    where = f"{spath} (IMAGE/IVAR)"
    image, ivar, bad = _clean_pair(image, ivar, ("IMAGE", "IVAR"), where)
    if mask is not None:
        if bad.any():
            mask = mask.copy()
            mask[bad] |= CCDMASK_BAD
        ivar[maskbits.input_masked(mask, mask_rule)] = 0.0
    return Preproc(image=image, ivar=ivar, mask=mask, header=header,
                   fibermap=fibermap, truth=truth, path=spath)


def write_preproc(path: str | os.PathLike, image, ivar, mask=None, header=None,
                  truth: Mapping | None = None, overwrite: bool = False,
                  fibermap=None, version: str | None = None) -> str:
    """Write a DESI-layout preproc file.

    HDUs: primary ``IMAGE`` float32, ``IVAR`` float32, ``MASK`` int32 (0 good),
    ``FIBERMAP`` when given, and ``TRUTH_WAVE`` (nwave,) / ``TRUTH_FLUX``
    (nspec, nwave) float64 with ``SPECMIN`` in their headers when ``truth``
    (``{'wave', 'flux', 'specmin'}``, flux in photons/A) is given.

    Every non-structural key of ``header`` (CAMERA, FLAVOR, NIGHT, EXPID,
    SPECTRO, DETECTOR, EXPTIME, ...) is carried into the IMAGE header, and
    DEPNAMnn/DEPVERnn record the jaxspec version.  Non-finite image/ivar and
    negative ivar are written as 0 with ivar 0 and MASK bit BAD, with a warning.

    Returns:
        The absolute path written.
    """
    apath = check_output_path(path, overwrite)
    img = _as_f32(image, "IMAGE")
    iv = _as_f32(ivar, "IVAR")
    if img.ndim != 2:
        raise ValueError(f"{apath}: image must be 2-D, got shape {img.shape}")
    if iv.shape != img.shape:
        raise ValueError(f"{apath}: ivar shape {iv.shape} does not match image "
                         f"shape {img.shape}")
    if mask is None:
        msk = np.zeros(img.shape, dtype=np.int32)
    else:
        msk = np.asarray(mask)
        if msk.shape != img.shape:
            raise ValueError(f"{apath}: mask shape {msk.shape} does not match image "
                             f"shape {img.shape}")
        if not (np.issubdtype(msk.dtype, np.integer) or msk.dtype == bool):
            raise ValueError(f"{apath}: mask must be integer, got dtype {msk.dtype}")
        msk = msk.astype(np.int32)
    img, iv, bad = _clean_pair(img, iv, ("IMAGE", "IVAR"), apath)
    if bad.any():
        msk = msk.copy()
        msk[bad] |= CCDMASK_BAD

    hdr = _carry_header(header)
    hdr["EXTNAME"] = "IMAGE"
    _add_dependencies(hdr, version)
    hdus = fits.HDUList([fits.PrimaryHDU(img, header=hdr)])
    hdus[0].header["EXTNAME"] = "IMAGE"
    hdus.append(fits.ImageHDU(iv, name="IVAR"))
    hdus.append(fits.ImageHDU(msk, name="MASK"))
    if fibermap is not None:
        hdus.append(_table_hdu(fibermap, "FIBERMAP"))

    if truth is not None:
        extra = set(truth) - _TRUTH_KEYS
        if extra or not {"wave", "flux"} <= set(truth):
            raise ValueError(f"{apath}: truth must be a dict with keys 'wave', 'flux' "
                             f"and optional 'specmin'; got {sorted(truth)}")
        twave = np.asarray(truth["wave"], dtype=np.float64)
        tflux = np.asarray(truth["flux"], dtype=np.float64)
        if twave.ndim != 1 or tflux.ndim != 2 or tflux.shape[1] != twave.shape[0]:
            raise ValueError(f"{apath}: truth flux {tflux.shape} must be "
                             f"(nspec, nwave) with wave ({twave.shape[0]},)")
        specmin = int(truth.get("specmin", 0))
        wh = fits.ImageHDU(twave, name="TRUTH_WAVE")
        wh.header["BUNIT"] = "Angstrom"
        wh.header["SPECMIN"] = (specmin, "first spectrum of TRUTH_FLUX")
        fh = fits.ImageHDU(tflux, name="TRUTH_FLUX")
        fh.header["BUNIT"] = "photon/Angstrom"
        fh.header["SPECMIN"] = (specmin, "first spectrum of TRUTH_FLUX")
        hdus.extend([wh, fh])

    return _atomic_writeto(hdus, apath, overwrite)


# --------------------------------------------------------------------------
# Frame


def write_frame(path: str | os.PathLike, frame: Frame | None = None, *,
                wave=None, flux=None, ivar=None, resolution=None, mask=None,
                chi2pix=None, fibermap=None, header=None, specmin: int | None = None,
                input_path: str | os.PathLike | None = None,
                psf_path: str | os.PathLike | None = None,
                options: Mapping[str, Any] | None = None,
                version: str | None = None, units: str | None = "electron/Angstrom",
                scores: Mapping[str, tuple[Any, str]] | None = None,
                overwrite: bool = False) -> str:
    """Write extracted spectra in the DESI frame format.

    Give either a :class:`Frame` or the arrays (``wave``, ``flux``, ``ivar``,
    ``resolution``; optional ``mask``, ``chi2pix``, ``fibermap``, and ``scores``:
    name -> ((nspec,) values, comment), written as the SCORES table, see
    :func:`frame_scores`).  ``header``
    (e.g. the preproc header) is merged over ``frame.header``; all its
    non-structural keys are carried (CAMERA, FLAVOR, NIGHT, EXPID, ...).

    Written keys: EXTNAME=FLUX, BUNIT (``units``), SPECMIN (``specmin``, else the
    header's, else 0), SPECMAX (= SPECMIN + NSPEC, as desispec.io.write_frame),
    NSPEC, FIBERMIN, WAVEMIN/WAVEMAX/WAVESTEP, IN_IMG/IN_PSF (``input_path`` /
    ``psf_path``), one key per extraction option (see :data:`OPTION_KEYS`), and
    DEPNAMnn/DEPVERnn for jaxspec (``version`` or ``jaxspec.__version__``),
    python, numpy, astropy, jax.

    Non-finite flux/ivar and negative ivar are written as flux 0 / ivar 0 with a
    warning; MASK gets bit ALLBADPIX (:data:`SPECMASK_ALLBADPIX`) wherever the
    written IVAR is 0, OR-ed with any given mask.

    Returns:
        The absolute path written.
    """
    apath = check_output_path(path, overwrite)
    arrays = dict(wave=wave, flux=flux, ivar=ivar, resolution=resolution,
                  mask=mask, chi2pix=chi2pix, fibermap=fibermap)
    if frame is not None:
        given = [k for k, v in arrays.items() if v is not None]
        if given:
            raise TypeError(f"write_frame: pass either a Frame or arrays, not both "
                            f"(got frame and {', '.join(given)})")
        arrays = dict(wave=frame.wave, flux=frame.flux, ivar=frame.ivar,
                      resolution=frame.resolution, mask=frame.mask,
                      chi2pix=frame.chi2pix, fibermap=frame.fibermap)
        base_header = frame.header
    else:
        missing = [k for k in ("wave", "flux", "ivar", "resolution") if arrays[k] is None]
        if missing:
            raise TypeError(f"write_frame: missing {', '.join(missing)}")
        base_header = None

    # ---- validate shapes
    fl = _as_f32(arrays["flux"], "FLUX")
    iv = _as_f32(arrays["ivar"], "IVAR")
    wv = np.asarray(arrays["wave"], dtype=np.float64)
    res = _as_f32(arrays["resolution"], "RESOLUTION")
    if fl.ndim != 2:
        raise ValueError(f"{apath}: flux must be (nspec, nwave), got shape {fl.shape}")
    nspec, nwave = fl.shape
    if iv.shape != fl.shape:
        raise ValueError(f"{apath}: ivar shape {iv.shape} != flux shape {fl.shape}")
    if wv.shape != (nwave,):
        raise ValueError(f"{apath}: wave shape {wv.shape} != ({nwave},)")
    if not np.all(np.isfinite(wv)):
        raise ValueError(f"{apath}: wave contains non-finite values")
    if res.ndim != 3 or res.shape[0] != nspec or res.shape[2] != nwave:
        raise ValueError(f"{apath}: resolution shape {res.shape} must be "
                         f"(nspec={nspec}, ndiag, nwave={nwave})")
    if res.shape[1] % 2 != 1:
        raise ValueError(f"{apath}: resolution ndiag={res.shape[1]} must be odd")
    msk_in = arrays["mask"]
    if msk_in is not None:
        msk_in = np.asarray(msk_in)
        if msk_in.shape != fl.shape:
            raise ValueError(f"{apath}: mask shape {msk_in.shape} != flux shape {fl.shape}")
        if not (np.issubdtype(msk_in.dtype, np.integer) or msk_in.dtype == bool):
            raise ValueError(f"{apath}: mask must be integer, got dtype {msk_in.dtype}")
        if np.issubdtype(msk_in.dtype, np.signedinteger) and (msk_in < 0).any():
            raise ValueError(f"{apath}: mask has negative values")
    c2 = arrays["chi2pix"]
    if c2 is not None:
        c2 = _as_f32(c2, "CHI2PIX")
        if c2.shape != fl.shape:
            raise ValueError(f"{apath}: chi2pix shape {c2.shape} != flux shape {fl.shape}")
    fmap = arrays["fibermap"]
    if fmap is not None:
        fmap = Table(fmap)
        if len(fmap) != nspec:
            raise ValueError(f"{apath}: fibermap has {len(fmap)} rows, expected nspec={nspec}")
        if "FIBER" not in fmap.colnames:
            _warn(f"{apath}: fibermap has no FIBER column; desispec.io.read_frame "
                  f"takes the fiber numbers from it")

    # ---- sanitise
    fl, iv, _ = _clean_pair(fl, iv, ("FLUX", "IVAR"), apath)
    res = _clean_finite(res, "RESOLUTION", apath)
    if c2 is not None:
        c2 = _clean_finite(c2, "CHI2PIX", apath)
    msk = np.zeros(fl.shape, dtype=np.uint32) if msk_in is None else msk_in.astype(np.uint32)
    msk = msk | np.where(iv == 0, SPECMASK_ALLBADPIX, np.uint32(0)).astype(np.uint32)

    # ---- header
    hdr = _carry_header(base_header, header)
    if units is not None:
        hdr["BUNIT"] = (str(units), "flux unit")
    if specmin is None:
        specmin = int(hdr.get("SPECMIN", 0))
    specmin = int(specmin)
    hdr["SPECMIN"] = (specmin, "first spectrum")
    hdr["SPECMAX"] = (specmin + nspec, "SPECMIN + NSPEC (desispec convention)")
    hdr["NSPEC"] = (nspec, "Number of spectra")
    if fmap is not None and "FIBER" in fmap.colnames:
        fibermin = int(np.min(fmap["FIBER"]))
    else:
        sp = _spectrograph(hdr)
        fibermin = specmin + (sp * _FIBERS_PER_SPECTROGRAPH if sp is not None else 0)
    hdr["FIBERMIN"] = (fibermin, "first fiber")
    hdr["WAVEMIN"] = (float(wv[0]), "First wavelength [Angstroms]")
    hdr["WAVEMAX"] = (float(wv[-1]), "Last wavelength [Angstroms]")
    step = float(np.mean(np.diff(wv))) if nwave > 1 else 0.0
    hdr["WAVESTEP"] = (step, "Wavelength step size [Angstroms]")
    if input_path is not None:
        _set_key(hdr, "IN_IMG", os.path.abspath(os.fspath(input_path)), "Input image")
    if psf_path is not None:
        _set_key(hdr, "IN_PSF", os.path.abspath(os.fspath(psf_path)), "Input spectral PSF")
    _add_options(hdr, options)
    _add_dependencies(hdr, version)

    # ---- HDUs, in desispec's order
    hdus = fits.HDUList([fits.PrimaryHDU(fl, header=hdr)])
    hdus[0].header["EXTNAME"] = "FLUX"
    hdus.append(fits.ImageHDU(iv, name="IVAR"))
    hdus.append(fits.ImageHDU(msk, name="MASK"))
    wh = fits.ImageHDU(wv, name="WAVELENGTH")
    wh.header["BUNIT"] = "Angstrom"
    hdus.append(wh)
    hdus.append(fits.ImageHDU(res, name="RESOLUTION"))
    if fmap is not None:
        hdus.append(_table_hdu(fmap, "FIBERMAP"))
    if c2 is not None:
        hdus.append(fits.ImageHDU(c2, name="CHI2PIX"))
    if scores:
        hdus.append(_scores_hdu(scores, nspec, apath))
    return _atomic_writeto(hdus, apath, overwrite)


#: desispec's top-hat ranges [A] of the frame scores, per camera arm (its ``tophat_wave``).
SCORE_RANGES: dict[str, tuple[float, float]] = {"b": (4000.0, 5800.0), "r": (5800.0, 7600.0),
                                                 "z": (7600.0, 9800.0)}


def frame_scores(wave, flux, ivar, suffix: str = "RAW", band: str | None = None
                 ) -> dict[str, tuple[np.ndarray, str]]:
    """The scores desispec's extraction appends to a raw frame (SCORES HDU).

    For the arm's fixed range (:data:`SCORE_RANGES`; the arm from the grid's mean
    wavelength unless ``band`` is given), per fiber, of a flux in electron/A on
    bins ``dw = gradient(wave)``: ``SUM_<suffix>_COUNT_<ARM>`` (sum of the flux
    values), ``MEDIAN_<suffix>_COUNT_<ARM>`` (median of flux / dw) and
    ``MEDIAN_<suffix>_SNR_<ARM>`` (median of flux sqrt(ivar / dw)), as desispec
    scores a frame "per bin" (its extraction's call).  Non-finite flux or ivar
    counts as 0, as :func:`write_frame` writes it.

    Args:
        wave: (nwave,) [A].
        flux, ivar: (nspec, nwave).
        suffix: the score family (desispec: RAW for extracted frames).
        band: ``"b"``, ``"r"`` or ``"z"``, or None to choose from the grid.

    Returns:
        name -> ((nspec,) float64 values, header comment); empty when the grid
        misses the arm's range.
    """
    wave = np.asarray(wave, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.clip(np.asarray(ivar, dtype=np.float64), 0.0, None)
    bad = ~(np.isfinite(flux) & np.isfinite(ivar))  # scored as written: write_frame zeroes them
    flux, ivar = np.where(bad, 0.0, flux), np.where(bad, 0.0, ivar)
    if band is None:
        mean = float(np.mean(wave))
        band = "b" if mean <= SCORE_RANGES["b"][1] else ("z" if mean >= SCORE_RANGES["z"][0] else "r")
    lo, hi = SCORE_RANGES[band]
    sel = (wave >= lo) & (wave < hi)
    if not sel.any():
        return {}
    dw = np.gradient(wave)[sel][None, :]
    f, iv = flux[:, sel], ivar[:, sel]
    arm, rng = band.upper(), f"{lo:.0f}-{hi:.0f} A"
    return {
        f"SUM_{suffix}_COUNT_{arm}": (np.sum(f, axis=1), f"sum of flux values, {rng}"),
        f"MEDIAN_{suffix}_COUNT_{arm}": (np.median(f / dw, axis=1), f"median of flux/dw, {rng}"),
        f"MEDIAN_{suffix}_SNR_{arm}": (np.median(np.sqrt(iv) * f / np.sqrt(dw), axis=1),
                                       f"median S/N per sqrt(A), {rng}"),
    }


def _scores_hdu(scores: Mapping[str, tuple[Any, str]], nspec: int, apath: str) -> fits.BinTableHDU:
    """The SCORES table: one float64 column per score, its comment on the TTYPE card."""
    cols = []
    for name, (values, _comment) in scores.items():
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (nspec,):
            raise ValueError(f"{apath}: score {name} has shape {v.shape}, expected ({nspec},)")
        cols.append(fits.Column(name=str(name), format="D", array=v))
    hdu = fits.BinTableHDU.from_columns(cols, name="SCORES")
    for i, (name, (_v, comment)) in enumerate(scores.items(), start=1):
        _set_key(hdu.header, f"TTYPE{i}", str(name), str(comment))
    return hdu


def read_frame(path: str | os.PathLike) -> Frame:
    """Read a DESI frame file (as written by :func:`write_frame` or desispec).

    FLUX, IVAR, WAVELENGTH and RESOLUTION are required; MASK, CHI2PIX and
    FIBERMAP are optional (None when absent).  Arrays come back as float64
    (mask uint32) holding exactly the stored values; ``header`` is the primary
    (FLUX) header.

    Raises:
        FileNotFoundError: no such file.
        OSError: not a readable FITS file.
        ValueError: a required HDU is missing or the shapes disagree.

    Every message names the file and the HDU.
    """
    spath, hdul = _open_fits(path, "frame")
    with hdul:
        flux = _read_data(_get_hdu(hdul, "FLUX", spath, "frame"), "FLUX", spath, 2)
        ivar = _read_data(_get_hdu(hdul, "IVAR", spath, "frame"), "IVAR", spath, 2)
        wave = _read_data(_get_hdu(hdul, "WAVELENGTH", spath, "frame"), "WAVELENGTH",
                          spath, 1)
        res = _read_data(_get_hdu(hdul, "RESOLUTION", spath, "frame"), "RESOLUTION",
                         spath, 3)
        mask = chi2pix = fibermap = None
        if "MASK" in hdul:
            mask = _read_data(hdul["MASK"], "MASK", spath, 2).astype(np.uint32)
        if "CHI2PIX" in hdul:
            chi2pix = _read_data(hdul["CHI2PIX"], "CHI2PIX", spath, 2).astype(np.float64)
        if "FIBERMAP" in hdul:
            fibermap = _read_table(hdul["FIBERMAP"], "FIBERMAP", spath)
        header = hdul["FLUX"].header.copy()

    nspec, nwave = flux.shape
    checks = [("IVAR", ivar.shape, flux.shape), ("WAVELENGTH", wave.shape, (nwave,))]
    if mask is not None:
        checks.append(("MASK", mask.shape, flux.shape))
    if chi2pix is not None:
        checks.append(("CHI2PIX", chi2pix.shape, flux.shape))
    for name, got, want in checks:
        if got != want:
            raise ValueError(f"{spath}: {name} HDU shape {got} does not match expected "
                             f"{want} (FLUX shape {flux.shape})")
    if res.shape[0] != nspec or res.shape[2] != nwave:
        raise ValueError(f"{spath}: RESOLUTION HDU shape {res.shape} does not match "
                         f"(nspec={nspec}, ndiag, nwave={nwave})")
    if fibermap is not None and len(fibermap) != nspec:
        raise ValueError(f"{spath}: FIBERMAP HDU has {len(fibermap)} rows, expected {nspec}")
    return Frame(wave=wave.astype(np.float64), flux=flux.astype(np.float64),
                 ivar=ivar.astype(np.float64), resolution=res.astype(np.float64),
                 mask=mask, chi2pix=chi2pix, fibermap=fibermap, header=header,
                 path=spath)


def write_model(path: str | os.PathLike, model, header=None, overwrite: bool = False,
                version: str | None = None) -> str:
    """Write a 2D pixel model image (separate from the frame): primary HDU MODEL float32.

    Non-finite model pixels are written as 0 with a warning.  Returns the path.
    """
    apath = check_output_path(path, overwrite)
    m = _as_f32(model, "MODEL")
    if m.ndim != 2:
        raise ValueError(f"{apath}: model must be 2-D, got shape {m.shape}")
    m = _clean_finite(m, "MODEL", apath)
    hdr = _carry_header(header)
    _add_dependencies(hdr, version)
    hdus = fits.HDUList([fits.PrimaryHDU(m, header=hdr)])
    hdus[0].header["EXTNAME"] = "MODEL"
    return _atomic_writeto(hdus, apath, overwrite)


def read_model(path: str | os.PathLike) -> np.ndarray:
    """The (ny, nx) float64 model image of :func:`write_model` (HDU MODEL, else the first image).

    Raises:
        FileNotFoundError: no such file.
        OSError: not a readable FITS file.
        ValueError: no 2-D image in the file (the message names the file).
    """
    spath, hdul = _open_fits(path, "model")
    with hdul:
        if "MODEL" in hdul:
            hdu, name = hdul["MODEL"], "MODEL"
        else:
            hdu = next((h for h in hdul if h.is_image and h.data is not None), None)
            name = "first image"
        if hdu is None or not hdu.is_image or hdu.data is None or np.ndim(hdu.data) != 2:
            raise ValueError(f"{spath}: no 2-D model image in the file ({name} HDU)")
        return np.asarray(hdu.data, dtype=np.float64)


# --------------------------------------------------------------------------
# Cameras


def _norm_camera(value) -> str | None:
    """'r0', "'R0      '" -> 'r0'; None for empty or missing values."""
    if value is None or isinstance(value, fits.card.Undefined):
        return None
    text = str(value).strip().strip("'").strip().lower()
    return text or None


def header_camera(header: Mapping | None) -> str | None:
    """The CAMERA key of a header, normalised (lower case, no padding), or None."""
    if header is None:
        return None
    return _norm_camera(header.get("CAMERA"))


def psf_camera(path: str | os.PathLike) -> str | None:
    """The CAMERA of a PSF file (first HDU header that has one), or None.

    Never raises: an unreadable file gives None (the PSF reader reports it).
    """
    try:
        with fits.open(os.fspath(path), memmap=False) as hdul:
            for hdu in hdul:
                cam = _norm_camera(hdu.header.get("CAMERA"))
                if cam:
                    return cam
    except Exception:
        return None
    return None


def psf_input(path: str | os.PathLike) -> str | None:
    """IN_PSF of a PSF file's PSF HDU (the PSF it was shifted from: the frame's ORIG_PSF), or None."""
    try:
        with fits.open(os.fspath(path), memmap=False) as hdul:
            if "PSF" in hdul and "IN_PSF" in hdul["PSF"].header:
                return str(hdul["PSF"].header["IN_PSF"])
    except Exception:
        return None
    return None


def read_fibermap(path: str | os.PathLike) -> Table:
    """The FIBERMAP table of a file (a fibermap, preproc or frame file), with its header in ``meta``.

    Raises:
        FileNotFoundError, OSError: no such or unreadable file.
        ValueError: no FIBERMAP HDU, or it is not a table (the message names the file).
    """
    spath, hdul = _open_fits(path, "fibermap")
    with hdul:
        hdu = _get_hdu(hdul, "FIBERMAP", spath, "fibermap")
        table = _read_table(hdu, "FIBERMAP", spath)
    return table


# --------------------------------------------------------------------------
# Sub-images


def embed_subimage(sub, ivar, xyrange: Sequence[int], shape: Sequence[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Place a sub-image into a full CCD-size image.

    Args:
        sub: (h, w) sub-image pixels.
        ivar: (h, w) inverse variance of ``sub``.
        xyrange: ``(xmin, xmax, ymin, ymax)`` (specter convention, max
            exclusive) or ``(xmin, ymin)``; the sub-image lands at
            ``[ymin:ymin+h, xmin:xmin+w]``.
        shape: full image shape ``(ny, nx)``.

    Returns:
        ``(image, ivar)`` float64 arrays of ``shape``, zero (ivar 0) outside
        the sub-image.
    """
    sub = np.asarray(sub, dtype=np.float64)
    iv = np.asarray(ivar, dtype=np.float64)
    if sub.ndim != 2:
        raise ValueError(f"sub-image must be 2-D, got shape {sub.shape}")
    if iv.shape != sub.shape:
        raise ValueError(f"ivar shape {iv.shape} does not match sub-image shape {sub.shape}")
    h, w = sub.shape
    xy = [int(v) for v in xyrange]
    if len(xy) == 4:
        xmin, xmax, ymin, ymax = xy
        if (xmax - xmin, ymax - ymin) != (w, h):
            raise ValueError(f"xyrange {tuple(xy)} spans {(ymax - ymin, xmax - xmin)} "
                             f"(ny, nx) but sub-image is {sub.shape}")
    elif len(xy) == 2:
        xmin, ymin = xy
    else:
        raise ValueError("xyrange must be (xmin, xmax, ymin, ymax) or (xmin, ymin)")
    ny, nx = (int(s) for s in shape)
    if xmin < 0 or ymin < 0 or xmin + w > nx or ymin + h > ny:
        raise ValueError(f"sub-image {sub.shape} at (xmin={xmin}, ymin={ymin}) does not "
                         f"fit in image shape {(ny, nx)}")
    image = np.zeros((ny, nx), dtype=np.float64)
    full_ivar = np.zeros((ny, nx), dtype=np.float64)
    image[ymin:ymin + h, xmin:xmin + w] = sub
    full_ivar[ymin:ymin + h, xmin:xmin + w] = iv
    return image, full_ivar
