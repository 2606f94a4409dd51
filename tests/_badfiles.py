"""Edits that turn a good PSF or preproc file into one of the bad inputs of issue 15's table.

Shared by the readers' tests (tests/psf/test_io.py, tests/_io/test_frames.py) and by the
test that runs both commands on every case (tests/_cli/test_both_commands.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits


def _param_row(hl, name):
    names = [str(n).strip() for n in hl["PSF"].data["PARAM"]]
    return names.index(name)


def _set_coeff(name, value, index=(Ellipsis,)):
    def edit(hl):
        coeff = np.array(hl["PSF"].data["COEFF"])
        row = coeff[_param_row(hl, name)]
        row[index] = value
        hl["PSF"].data["COEFF"] = coeff
    return edit


def _set_header(hdu, key, value):
    def edit(hl):
        hl[hdu].header[key] = value
    return edit


def _psf_as_image(hl):
    hdr = fits.Header([c for c in hl["PSF"].header.cards
                       if c.keyword not in ("XTENSION", "BITPIX", "PCOUNT", "GCOUNT", "TFIELDS")
                       and not c.keyword.startswith(("NAXIS", "TTYPE", "TFORM", "TDIM"))])
    hl["PSF"] = fits.ImageHDU(np.array(hl["PSF"].data["COEFF"]).reshape(-1, 3), header=hdr, name="PSF")


def _nan_xtrace(hl):
    hl["XTRACE"].data[3, 1] = np.nan


def _swap_wave(hdu):
    def edit(hl):
        h = hl[hdu].header
        h["WAVEMIN"], h["WAVEMAX"] = h["WAVEMAX"], h["WAVEMIN"]
    return edit


def _flat_width(name, value):
    """Set the width ``name`` to the constant ``value`` for fiber 2 (Legendre c0 only)."""
    def edit(hl):
        coeff = np.array(hl["PSF"].data["COEFF"])
        coeff[_param_row(hl, name), 2, :] = 0.0
        coeff[_param_row(hl, name), 2, 0] = value
        hl["PSF"].data["COEFF"] = coeff
    return edit


def _with_card(src, dst, key, raw):
    """Copy ``src`` with the header card of ``key`` replaced by the raw 80-byte ``raw``."""
    data = bytearray(Path(src).read_bytes())
    i = data.index(key.ljust(8).encode() + b"=")
    data[i:i + 80] = raw.ljust(80).encode()
    Path(dst).write_bytes(bytes(data))
    return dst
