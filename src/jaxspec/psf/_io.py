"""Reading and writing DESI PSF files (the only place astropy is imported).

Supported on read: GAUSS-HERMITE PSFVER 3 (XTRACE, YTRACE, PSF HDUs), GAUSS-HERMITE
PSFVER 2 (a single table in HDU 1 with X and Y as rows) and trace-only files
(XTRACE, YTRACE, XSIGMA, WSIGMA).  Written: GAUSS-HERMITE PSFVER 3.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

from ._base import PSF
from ._gausshermite import GaussHermitePSF
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


def read_psf(path: str | os.PathLike) -> PSF:
    """Read a DESI PSF file and return the matching PSF model.

    Raises:
        OSError: the file is missing or not a FITS file.
        ValueError: unknown/unsupported PSFTYPE, or a missing HDU or header key
            (the message names the file and the HDU/key).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"PSF file not found: {path}")
    try:
        hdul = fits.open(path, memmap=False)
        hdul.verify("silentfix")
        names = [h.name for h in hdul]
    except OSError as err:
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
            raise ValueError(
                f"{path}: PSFTYPE GAUSS-HERMITE2 (two-core Gauss-Hermite) is not supported"
            )
        raise ValueError(
            f"{path}: unknown PSFTYPE {psftype!r} (supported: GAUSS-HERMITE PSFVER 2/3, "
            "trace-only XTRACE/YTRACE/XSIGMA/WSIGMA)"
        )


def _gh_meta(path, hdu, name):
    return dict(
        hsizex=int(_key(path, hdu, name, "HSIZEX")),
        hsizey=int(_key(path, hdu, name, "HSIZEY")),
        npix_x=int(_key(path, hdu, name, "NPIX_X")),
        npix_y=int(_key(path, hdu, name, "NPIX_Y")),
        ghdegx=int(_key(path, hdu, name, "GHDEGX")),
        ghdegy=int(_key(path, hdu, name, "GHDEGY")),
        psferr=float(hdu.header.get("PSFERR", 0.01)),
    )


def _nspec(path, hdu, name) -> tuple[int, int]:
    fmin = int(_key(path, hdu, name, "FIBERMIN"))
    fmax = int(_key(path, hdu, name, "FIBERMAX"))
    return fmin, fmax - fmin + 1


def _read_gh3(path, hdul) -> GaussHermitePSF:
    xt, yt, ps = (_hdu(path, hdul, n) for n in ("XTRACE", "YTRACE", "PSF"))
    meta = _gh_meta(path, ps, "PSF")
    fibermin, nspec = _nspec(path, ps, "PSF")
    data = ps.data
    for col in ("PARAM", "COEFF"):
        if data is None or col not in data.names:
            raise ValueError(f"{path}: HDU PSF lacks table column {col}")
    names = [str(n).strip() for n in data["PARAM"]]
    coeff = _native(data["COEFF"])
    if coeff.ndim == 2:
        coeff = coeff.reshape(len(names), nspec, -1)
    legdeg = None
    if "LEGDEGX" in data.names and "LEGDEGW" in data.names:
        legdeg = list(
            zip(np.ravel(data["LEGDEGX"]).tolist(), np.ravel(data["LEGDEGW"]).tolist())
        )
    xdom = (float(_key(path, xt, "XTRACE", "WAVEMIN")), float(_key(path, xt, "XTRACE", "WAVEMAX")))
    ydom = (float(_key(path, yt, "YTRACE", "WAVEMIN")), float(_key(path, yt, "YTRACE", "WAVEMAX")))
    pdom = (float(_key(path, ps, "PSF", "WAVEMIN")), float(_key(path, ps, "PSF", "WAVEMAX")))
    if xt.data is None or yt.data is None:
        raise ValueError(f"{path}: XTRACE or YTRACE HDU has no data")
    return GaussHermitePSF.from_arrays(
        _native(xt.data),
        _native(yt.data),
        coeff,
        names,
        xdomain=xdom,
        ydomain=ydom,
        pdomain=pdom,
        fibermin=fibermin,
        legdeg=legdeg,
        **meta,
    )


def _read_gh2(path, hdul) -> GaussHermitePSF:
    if len(hdul) < 2:
        raise ValueError(f"{path}: missing HDU 1 (the PSFVER 2 parameter table)")
    tb = hdul[1]
    meta = _gh_meta(path, tb, "1")
    fibermin, nspec = _nspec(path, tb, "1")
    data = tb.data
    for col in ("PARAM", "COEFF", "WAVEMIN", "WAVEMAX"):
        if data is None or col not in data.names:
            raise ValueError(f"{path}: HDU 1 lacks table column {col}")
    names = [str(n).strip() for n in data["PARAM"]]
    coeff = _native(data["COEFF"]).reshape(len(names), nspec, -1)
    # specter applies the last row's domain to every parameter, X and Y included
    dom = (float(data["WAVEMIN"][-1]), float(data["WAVEMAX"][-1]))
    for n in ("X", "Y"):
        if n not in names:
            raise ValueError(f"{path}: HDU 1 table has no {n} row")
    ix, iy = names.index("X"), names.index("Y")
    keep = [k for k in range(len(names)) if k not in (ix, iy)]
    return GaussHermitePSF.from_arrays(
        coeff[ix],
        coeff[iy],
        coeff[keep],
        [names[k] for k in keep],
        xdomain=dom,
        ydomain=dom,
        pdomain=dom,
        fibermin=fibermin,
        **meta,
    )


def _read_trace_only(path, hdul) -> TraceGaussianPSF:
    xt, yt, xs, ws = (_hdu(path, hdul, n) for n in ("XTRACE", "YTRACE", "XSIGMA", "WSIGMA"))
    xdom = (float(_key(path, xt, "XTRACE", "WAVEMIN")), float(_key(path, xt, "XTRACE", "WAVEMAX")))
    ydom = (
        float(yt.header.get("WAVEMIN", xdom[0])),
        float(yt.header.get("WAVEMAX", xdom[1])),
    )
    wdom = (
        float(ws.header.get("WAVEMIN", xdom[0])),
        float(ws.header.get("WAVEMAX", xdom[1])),
    )
    npix_x = int(xt.header.get("NPIX_X", 4114))
    npix_y = int(xt.header.get("NPIX_Y", 4128))
    return TraceGaussianPSF.from_arrays(
        _native(xt.data),
        _native(yt.data),
        _native(xs.data),
        _native(ws.data),
        xdomain=xdom,
        ydomain=ydom,
        wsdomain=wdom,
        npix_x=npix_x,
        npix_y=npix_y,
    )


def write_psf(path: str | os.PathLike, psf: GaussHermitePSF, overwrite: bool = False) -> Path:
    """Write a :class:`GaussHermitePSF` as a DESI GAUSS-HERMITE PSFVER 3 file.

    The file is written to a temporary name in the same directory, then moved
    into place, so an interrupted write never leaves a partial file.

    Args:
        path: the FITS file to write.
        psf: the PSF (e.g. from :func:`read_psf`, a fit, or :func:`desi_like_psf`).
        overwrite: replace an existing file.

    Returns:
        The path written.

    Raises:
        TypeError: ``psf`` is not a :class:`GaussHermitePSF`.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    if not isinstance(psf, GaussHermitePSF):
        raise TypeError(f"write_psf writes GaussHermitePSF only, got {type(psf).__name__}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
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
    hdul = fits.HDUList([x_hdu, y_hdu, t_hdu])
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        hdul.writeto(tmp, overwrite=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
