"""Reading and writing DESI PSF files (the only place astropy is imported).

Supported on read: GAUSS-HERMITE PSFVER 3 (XTRACE, YTRACE, PSF HDUs), GAUSS-HERMITE
PSFVER 2 (a single table in HDU 1 with X and Y as rows), GAUSS-HERMITE2 (the same
table layout, two cores) and trace-only files (XTRACE, YTRACE, XSIGMA, WSIGMA).
Written: GAUSS-HERMITE PSFVER 3.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from numpy.polynomial import legendre as _legendre

from ._base import PSF
from ._gausshermite import GaussHermitePSF
from ._gausshermite2 import GaussHermite2PSF
from ._tracegauss import TraceGaussianPSF

__all__ = ["read_psf", "write_psf"]


def _native(a) -> np.ndarray:
    """Float64 native-endian copy of a FITS array."""
    return np.array(a, dtype=np.float64)


def _key(path, hdu, name: str, key: str, default=None, required: bool = True):
    hdr = hdu.header
    if key in hdr:
        return hdr[key]
    if required and default is None:
        raise ValueError(f"{path}: HDU {name} lacks required header key {key}")
    return default


def _hdu(path, hdul, name):
    try:
        return hdul[name]
    except (KeyError, IndexError):
        have = [h.name for h in hdul]
        raise ValueError(f"{path}: missing HDU {name!r} (file has {have})") from None


def _psftype(hdul) -> tuple[str | None, str | None]:
    for h in hdul:
        if "PSFTYPE" in h.header:
            ver = h.header.get("PSFVER")
            return str(h.header["PSFTYPE"]).strip(), None if ver is None else str(ver).strip()
    return None, None


# ---------------------------------------------------------------- validation on read
# Every check names the file, the HDU and the key or column, and says what is wrong.


def _int_key(path, hdu, name: str, key: str, *, minimum: int | None = None, default=None) -> int:
    """Integer header key ``key`` of HDU ``name``, checked to be a whole number >= ``minimum``."""
    raw = _key(path, hdu, name, key, default)
    val = None
    if not isinstance(raw, (bool, np.bool_)):
        try:
            num = float(raw)
            if np.isfinite(num) and num == int(num):
                val = int(num)
        except (TypeError, ValueError):
            pass
    if val is None:
        raise ValueError(f"{path}: HDU {name} header key {key} = {raw!r} is not an integer")
    if minimum is not None and val < minimum:
        raise ValueError(f"{path}: HDU {name} header key {key} = {val} must be >= {minimum}")
    return val


def _float_key(path, hdu, name: str, key: str, default=None) -> float:
    """Finite float header key ``key`` of HDU ``name``."""
    raw = _key(path, hdu, name, key, default)
    try:
        val = float(raw) if not isinstance(raw, (bool, np.bool_)) else np.nan
    except (TypeError, ValueError):
        val = np.nan
    if not np.isfinite(val):
        raise ValueError(f"{path}: HDU {name} header key {key} = {raw!r} is not a finite number")
    return val


def _domain(path, hdu, name: str, default: tuple[float, float] | None = None) -> tuple[float, float]:
    """``(WAVEMIN, WAVEMAX)`` [A] of HDU ``name``: finite, WAVEMIN < WAVEMAX."""
    lo = _float_key(path, hdu, name, "WAVEMIN", None if default is None else default[0])
    hi = _float_key(path, hdu, name, "WAVEMAX", None if default is None else default[1])
    _check_domain(path, name, "header keys WAVEMIN/WAVEMAX", lo, hi)
    return lo, hi


def _check_domain(path, name: str, what: str, lo: float, hi: float) -> None:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{path}: HDU {name} {what} = ({lo}, {hi}) must be finite")
    if not lo < hi:
        hint = " (swapped?)" if lo > hi else ""
        raise ValueError(
            f"{path}: HDU {name} {what} = ({lo}, {hi}): WAVEMIN must be smaller than WAVEMAX{hint}"
        )


def _table(path, hdul, name: str | int, columns: tuple[str, ...]):
    """HDU ``name`` (an EXTNAME, or an index for PSFVER 2), checked to be a table with ``columns``."""
    hdu = _hdu(path, hdul, name) if isinstance(name, str) else hdul[name]
    label = name if isinstance(name, str) else str(name)
    if not isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
        shape = None if hdu.data is None else tuple(np.shape(hdu.data))
        raise ValueError(
            f"{path}: HDU {label} is an image (shape {shape}), not a table: a PSF parameter "
            f"HDU must be a binary table with columns {', '.join(columns)}"
        )
    data = _data(path, hdu, label)
    missing = [c for c in columns if data is None or c not in data.names]
    if missing:
        raise ValueError(f"{path}: HDU {label} lacks table column(s) {', '.join(missing)}")
    return hdu, data


def _data(path, hdu, name: str):
    """The data of ``hdu``; a clear error where astropy cannot read them."""
    try:
        return hdu.data
    except Exception as err:
        raise ValueError(f"{path}: HDU {name} data cannot be read ({err}); the file is damaged") from err


def _image(path, hdu, name: str, nspec: int | None = None) -> np.ndarray:
    """Float64 coefficients ``[nspec, ncoef]`` of the image HDU ``name``, all finite."""
    if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
        raise ValueError(f"{path}: HDU {name} is a table, expected an image of Legendre coefficients")
    data = _data(path, hdu, name)
    if data is None:
        raise ValueError(f"{path}: HDU {name} has no data")
    arr = _native(data)
    if arr.ndim == 1:
        arr = arr[:, None]  # one value per fiber (trace-only XSIGMA)
    if arr.ndim != 2 or (nspec is not None and arr.shape[0] != nspec):
        want = "(nspec, ncoef)" if nspec is None else f"({nspec}, ncoef) (FIBERMIN..FIBERMAX)"
        raise ValueError(f"{path}: HDU {name} has shape {arr.shape}, expected {want}")
    _finite(path, name, None, arr)
    return arr


def _finite(path, name: str, column: str | None, arr: np.ndarray, rows: list[str] | None = None) -> None:
    """Raise if ``arr`` holds NaN or inf (``rows``: parameter names of the first axis)."""
    bad = ~np.isfinite(arr)
    if not bad.any():
        return
    where = f"HDU {name} column {column}" if column else f"HDU {name}"
    detail = ""
    if rows is not None:
        hit = [rows[i] for i in np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))]
        detail = f" (parameters {', '.join(hit[:8])}{', ...' if len(hit) > 8 else ''})"
    raise ValueError(
        f"{path}: {where} has {int(bad.sum())} non-finite (NaN or inf) value(s){detail}; "
        "the PSF fit failed there: refit or use another PSF"
    )


def _coeff(path, data, name: str, names: list[str], nspec: int, ncoef: int | None) -> np.ndarray:
    """COEFF as ``[nparam, nspec, ncoef]``, checked against the header's fiber and degree counts."""
    coeff = _native(data["COEFF"])
    nparam = len(names)
    if coeff.ndim == 3 and coeff.shape[:2] == (nparam, nspec):
        got = coeff.shape[2]
    elif coeff.ndim >= 1 and coeff.shape[0] == nparam:
        width = int(np.prod(coeff.shape[1:]))
        if width == 0 or width % nspec:
            raise ValueError(
                f"{path}: HDU {name} column COEFF has {width} values per parameter, not a multiple "
                f"of the {nspec} fibers FIBERMIN..FIBERMAX says: the header or the table is wrong"
            )
        got = width // nspec
        coeff = coeff.reshape(nparam, nspec, got)
    else:
        raise ValueError(f"{path}: HDU {name} column COEFF has shape {coeff.shape}, "
                         f"expected ({nparam} parameters, {nspec} fibers, ncoef)")
    if ncoef is not None and got != ncoef:
        raise ValueError(
            f"{path}: HDU {name} column COEFF has {got} Legendre coefficients per fiber, the "
            f"header key LEGDEG says {ncoef} (LEGDEG + 1): the file is truncated or inconsistent"
        )
    _finite(path, name, "COEFF", coeff, names)
    return coeff


def _check_gh_widths(path, psf: GaussHermitePSF, name: str) -> None:
    """GHSIGX and GHSIGY finite and > 0 for every fiber over the PSF's wavelength range."""
    if not (np.isfinite(psf.wmin) and np.isfinite(psf.wmax) and psf.wmin < psf.wmax):
        raise ValueError(
            f"{path}: HDU YTRACE does not map wavelengths onto the CCD rows 0..NPIX_Y "
            f"(wavelength range {psf.wmin}..{psf.wmax} A)"
        )
    wave = np.linspace(psf.wmin, psf.wmax, 65)
    lo, hi = psf.pdomain
    t = (wave - lo) * (2.0 / (hi - lo)) - 1.0
    for par in ("GHSIGX", "GHSIGY"):
        coef = np.asarray(psf.params[psf.param_index(par)], dtype=np.float64)  # [nspec, ncoef]
        width = _legendre.legval(t, coef.T)  # [nspec, nwave]
        bad = ~(np.isfinite(width) & (width > 0))
        if bad.any():
            fib = np.flatnonzero(bad.any(axis=1))
            raise ValueError(
                f"{path}: HDU {name} parameter {par} (a Gaussian width) is not positive for "
                f"{fib.size} fiber(s) (fiber index {fib[0]} first; minimum {np.nanmin(width):.3g} "
                f"pixels over {psf.wmin:.1f}-{psf.wmax:.1f} A): the PSF fit failed; refit or use "
                "another PSF"
            )


def _truncation_message(path, err: Warning) -> str:
    """Name the HDUs that end past the end of a truncated file (uncompressed files)."""
    msg = f"{path}: the file is truncated ({err})"
    try:
        size = os.path.getsize(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False) as hdul:
                cut = [h.name or str(i) for i, h in enumerate(hdul)
                       if hdul.fileinfo(i)["datLoc"] + hdul.fileinfo(i)["datSpan"] > size]
        if cut:
            msg += f"; HDU {', '.join(cut)} is incomplete"
    except Exception:
        pass
    return msg + ": copy or write the file again"


def read_psf(path: str | os.PathLike) -> PSF:
    """Read a DESI PSF file and return the matching PSF model.

    Raises:
        OSError: the file is missing or not a FITS file.
        ValueError: unknown/unsupported PSFTYPE, a missing HDU or header key, a key
            that is not a number (NPIX_X, HSIZEX, ...) or out of range (HSIZEX <= 0,
            WAVEMIN >= WAVEMAX), a parameter HDU that is not a table, a truncated
            file, COEFF sizes that disagree with FIBERMIN/FIBERMAX/LEGDEG, NaN or
            inf anywhere in the coefficients, or Gaussian widths (GHSIGX, GHSIGY)
            that are not positive somewhere over the PSF's fibers and wavelengths.
            The message names the file, the HDU and the key or column.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"PSF file not found: {path}")
    hdul = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="File may have been truncated")
            hdul = fits.open(path, memmap=False)
            hdul.verify("silentfix")
            names = [h.name for h in hdul]
    except UserWarning as err:
        if hdul is not None:
            hdul.close()
        raise ValueError(_truncation_message(path, err)) from None
    except OSError as err:
        if hdul is not None:
            hdul.close()
        raise OSError(f"{path}: not a readable FITS file ({err})") from err
    with hdul:
        psftype, psfver = _psftype(hdul)
        if (
            all(n in names for n in ("XTRACE", "YTRACE", "XSIGMA", "WSIGMA"))
            and "PSF" not in names
        ):
            return _read_trace_only(path, hdul)
        if psftype is None:
            raise ValueError(f"{path}: no PSFTYPE keyword in any HDU header")
        if psftype == "GAUSS-HERMITE":
            try:
                ver = float(psfver) if psfver is not None else None
            except ValueError:
                ver = None
            if ver is None:
                raise ValueError(f"{path}: GAUSS-HERMITE PSF without a valid PSFVER key")
            if ver >= 3:
                return _read_gh3(path, hdul)
            return _read_gh2(path, hdul)
        if psftype == "GAUSS-HERMITE2":
            return _read_gauss_hermite2(path, hdul)
        raise ValueError(
            f"{path}: unknown PSFTYPE {psftype!r} (supported: GAUSS-HERMITE PSFVER 2/3, "
            "GAUSS-HERMITE2, trace-only XTRACE/YTRACE/XSIGMA/WSIGMA)"
        )


def _gh_meta(path, hdu, name):
    psferr = _float_key(path, hdu, name, "PSFERR", 0.01)
    if psferr < 0:
        raise ValueError(f"{path}: HDU {name} header key PSFERR = {psferr} must be >= 0")
    return dict(
        hsizex=_int_key(path, hdu, name, "HSIZEX", minimum=1),
        hsizey=_int_key(path, hdu, name, "HSIZEY", minimum=1),
        npix_x=_int_key(path, hdu, name, "NPIX_X", minimum=1),
        npix_y=_int_key(path, hdu, name, "NPIX_Y", minimum=1),
        ghdegx=_int_key(path, hdu, name, "GHDEGX", minimum=0),
        ghdegy=_int_key(path, hdu, name, "GHDEGY", minimum=0),
        psferr=psferr,
    )


def _nspec(path, hdu, name) -> tuple[int, int]:
    fmin = _int_key(path, hdu, name, "FIBERMIN", minimum=0)
    fmax = _int_key(path, hdu, name, "FIBERMAX", minimum=fmin)
    return fmin, fmax - fmin + 1


def _ncoef(path, hdu, name) -> int | None:
    """LEGDEG + 1 when the header has LEGDEG (the COEFF length per fiber), else None."""
    if "LEGDEG" not in hdu.header:
        return None
    return _int_key(path, hdu, name, "LEGDEG", minimum=0) + 1


def _param_names(path, data, name) -> list[str]:
    names = [str(n).strip() for n in data["PARAM"]]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: HDU {name} column PARAM lists {', '.join(dup)} more than once")
    return names


def _read_gh3(path, hdul) -> GaussHermitePSF:
    xt, yt = (_hdu(path, hdul, n) for n in ("XTRACE", "YTRACE"))
    ps, data = _table(path, hdul, "PSF", ("PARAM", "COEFF"))
    meta = _gh_meta(path, ps, "PSF")
    fibermin, nspec = _nspec(path, ps, "PSF")
    names = _param_names(path, data, "PSF")
    coeff = _coeff(path, data, "PSF", names, nspec, _ncoef(path, ps, "PSF"))
    legdeg = None
    if "LEGDEGX" in data.names and "LEGDEGW" in data.names:
        legdeg = list(
            zip(np.ravel(data["LEGDEGX"]).tolist(), np.ravel(data["LEGDEGW"]).tolist())
        )
    xdom = _domain(path, xt, "XTRACE")
    ydom = _domain(path, yt, "YTRACE")
    pdom = _domain(path, ps, "PSF")
    xcoef = _image(path, xt, "XTRACE", nspec)
    ycoef = _image(path, yt, "YTRACE", nspec)
    try:
        psf = GaussHermitePSF.from_arrays(
            xcoef,
            ycoef,
            coeff,
            names,
            xdomain=xdom,
            ydomain=ydom,
            pdomain=pdom,
            fibermin=fibermin,
            legdeg=legdeg,
            **meta,
        )
    except ValueError as err:
        raise ValueError(f"{path}: HDU PSF: {err}") from None
    _check_gh_widths(path, psf, "PSF")
    return psf


def _xy_rows_table(path, tb, data):
    """HDU 1 of the row-per-parameter layouts (PSFVER 2, GAUSS-HERMITE2): X and Y are rows too.

    Returns ``(fibermin, xcoef, ycoef, pcoef, pnames, domain)``; specter applies the last
    row's WAVEMIN/WAVEMAX to every parameter, X and Y included.
    """
    fibermin, nspec = _nspec(path, tb, "1")
    names = _param_names(path, data, "1")
    coeff = _coeff(path, data, "1", names, nspec, _ncoef(path, tb, "1"))
    dom = (float(data["WAVEMIN"][-1]), float(data["WAVEMAX"][-1]))
    _check_domain(path, "1", f"columns WAVEMIN/WAVEMAX of row {names[-1]}", *dom)
    for n in ("X", "Y"):
        if n not in names:
            raise ValueError(f"{path}: HDU 1 table has no {n} row")
    ix, iy = names.index("X"), names.index("Y")
    keep = [k for k in range(len(names)) if k not in (ix, iy)]
    return fibermin, coeff[ix], coeff[iy], coeff[keep], [names[k] for k in keep], dom


def _read_gh2(path, hdul) -> GaussHermitePSF:
    if len(hdul) < 2:
        raise ValueError(f"{path}: missing HDU 1 (the PSFVER 2 parameter table)")
    tb, data = _table(path, hdul, 1, ("PARAM", "COEFF", "WAVEMIN", "WAVEMAX"))
    meta = _gh_meta(path, tb, "1")
    fibermin, xcoef, ycoef, pcoef, pnames, dom = _xy_rows_table(path, tb, data)
    try:
        psf = GaussHermitePSF.from_arrays(
            xcoef,
            ycoef,
            pcoef,
            pnames,
            xdomain=dom,
            ydomain=dom,
            pdomain=dom,
            fibermin=fibermin,
            **meta,
        )
    except ValueError as err:
        raise ValueError(f"{path}: HDU 1: {err}") from None
    _check_gh_widths(path, psf, "1")
    return psf


def _read_gauss_hermite2(path, hdul) -> GaussHermite2PSF:
    """PSFTYPE GAUSS-HERMITE2 (specter's GaussHermite2PSF): HDU 1 is a table of PARAM,
    WAVEMIN, WAVEMAX, COEFF rows (X and Y among them); keys HSIZEX/Y, NPIX_X/Y,
    FIBERMIN/MAX, GHDEGX/Y, GHDEGX2/Y2 and PSFERR (default 0.01) in its header."""
    if len(hdul) < 2:
        raise ValueError(f"{path}: missing HDU 1 (the GAUSS-HERMITE2 parameter table)")
    tb, data = _table(path, hdul, 1, ("PARAM", "COEFF", "WAVEMIN", "WAVEMAX"))
    ver = str(tb.header.get("PSFVER", "")).strip()
    if not ver or ver < "1":  # specter's own test (a string comparison)
        raise ValueError(f"{path}: HDU 1 header key PSFVER = {ver!r}: GAUSS-HERMITE2 needs version 1 or later")
    meta = _gh_meta(path, tb, "1")
    ghdeg = (meta.pop("ghdegx"), meta.pop("ghdegy"),
             _int_key(path, tb, "1", "GHDEGX2", minimum=0), _int_key(path, tb, "1", "GHDEGY2", minimum=0))
    fibermin, xcoef, ycoef, pcoef, pnames, dom = _xy_rows_table(path, tb, data)
    try:
        psf = GaussHermite2PSF.from_arrays(
            xcoef, ycoef, pcoef, pnames,
            domain=dom, ghdeg=ghdeg, fibermin=fibermin, **meta,
        )
    except ValueError as err:
        raise ValueError(f"{path}: HDU 1: {err}") from None
    return psf


def _read_trace_only(path, hdul) -> TraceGaussianPSF:
    xt, yt, xs, ws = (_hdu(path, hdul, n) for n in ("XTRACE", "YTRACE", "XSIGMA", "WSIGMA"))
    xdom = _domain(path, xt, "XTRACE")
    ydom = _domain(path, yt, "YTRACE", default=xdom)
    wdom = _domain(path, ws, "WSIGMA", default=xdom)
    npix_x = _int_key(path, xt, "XTRACE", "NPIX_X", minimum=1, default=4114)
    npix_y = _int_key(path, xt, "XTRACE", "NPIX_Y", minimum=1, default=4128)
    xcoef = _image(path, xt, "XTRACE")
    nspec = xcoef.shape[0]
    return TraceGaussianPSF.from_arrays(
        xcoef,
        _image(path, yt, "YTRACE", nspec),
        _image(path, xs, "XSIGMA", nspec),
        _image(path, ws, "WSIGMA", nspec),
        xdomain=xdom,
        ydomain=ydom,
        wsdomain=wdom,
        npix_x=npix_x,
        npix_y=npix_y,
    )


def write_psf(
    path: str | os.PathLike, psf: GaussHermitePSF, overwrite: bool = False, header: dict | None = None
) -> Path:
    """Write a :class:`GaussHermitePSF` as a DESI GAUSS-HERMITE PSFVER 3 file.

    Written through :func:`jaxspec._io.atomic.atomic_write`: a temporary file
    beside ``path`` (created with mode 0666, so the umask applies: 0644 under
    the usual 022), then published, so an interrupted write never leaves a
    partial file.

    Args:
        path: the FITS file to write.
        psf: the PSF (e.g. from :func:`read_psf`, a fit, or :func:`desi_like_psf`).
        overwrite: replace an existing file.
        header: extra keys for the PSF HDU's header (e.g. a fit's per-bundle
            ``B00RCHI2``, ``B00NDATA``, ``B00NPAR``, ``B00STAT`` as specex writes
            them); values must be FITS scalars.

    Returns:
        The path written.

    Raises:
        TypeError: ``psf`` is not a :class:`GaussHermitePSF`.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from .._io.atomic import atomic_write, check_output_path

    if not isinstance(psf, GaussHermitePSF):
        raise TypeError(f"write_psf writes GaussHermitePSF only, got {type(psf).__name__}")
    path = Path(path)
    check_output_path(path, overwrite)
    params = np.asarray(psf.params, dtype=np.float64)
    nparam, nspec, ncoef = params.shape

    def trace_hdu(cls, data, name, dom):
        h = cls(np.asarray(data, dtype=np.float64))
        h.header["EXTNAME"] = name
        h.header["FIBERMIN"] = psf.fibermin
        h.header["FIBERMAX"] = psf.fibermin + nspec - 1
        h.header["WAVEMIN"] = dom[0]
        h.header["WAVEMAX"] = dom[1]
        h.header["PSFTYPE"] = "GAUSS-HERMITE"
        h.header["PSFVER"] = 3
        return h

    x_hdu = trace_hdu(fits.PrimaryHDU, psf.xcoef, "XTRACE", psf.xdomain)
    y_hdu = trace_hdu(fits.ImageHDU, psf.ycoef, "YTRACE", psf.ydomain)
    legdeg = psf.legdeg if psf.legdeg is not None else [(ncoef - 1, ncoef - 1)] * nparam
    width = max(len(n) for n in psf.param_names)
    cols = [
        fits.Column("PARAM", format=f"{max(width, 8)}A", array=np.array(psf.param_names)),
        fits.Column(
            "COEFF", format=f"{nspec * ncoef}D", dim=f"({ncoef}, {nspec})", array=params
        ),
        fits.Column("LEGDEGX", format="J", array=np.array([a for a, _ in legdeg], np.int32)),
        fits.Column("LEGDEGW", format="J", array=np.array([b for _, b in legdeg], np.int32)),
    ]
    t_hdu = fits.BinTableHDU.from_columns(cols, name="PSF")
    hdr = t_hdu.header
    hdr["PSFTYPE"] = "GAUSS-HERMITE"
    hdr["PSFVER"] = "3"
    for key, val in (
        ("NPIX_X", psf.npix_x),
        ("NPIX_Y", psf.npix_y),
        ("HSIZEX", psf.hsizex),
        ("HSIZEY", psf.hsizey),
        ("FIBERMIN", psf.fibermin),
        ("FIBERMAX", psf.fibermin + nspec - 1),
        ("NPARAMS", nparam),
        ("LEGDEG", ncoef - 1),
        ("GHDEGX", psf.ghdegx),
        ("GHDEGY", psf.ghdegy),
        ("WAVEMIN", psf.pdomain[0]),
        ("WAVEMAX", psf.pdomain[1]),
        ("PSFERR", psf.psferr),
    ):
        hdr[key] = val
    for key, val in (header or {}).items():
        hdr[key] = val
    hdul = fits.HDUList([x_hdu, y_hdu, t_hdu])
    atomic_write(path, lambda fh: hdul.writeto(fh, output_verify="exception"), overwrite=overwrite)
    return path
