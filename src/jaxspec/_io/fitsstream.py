"""FITS files streamed to an open binary file, with checksums, image data outside the interpreter lock.

:func:`write_hdus` writes an ``astropy.io.fits.HDUList`` as ``HDUList.writeto(fh,
checksum=True)`` would, with the same headers and data bytes, but image data (FLUX,
IVAR, RESOLUTION, ... in a frame: 70 MB) goes from the array to the file in three
NumPy passes that release the interpreter lock (the cast to big-endian, the
checksum sum, the file write) and no in-memory copy of the whole file.  The batch
runner's writer threads then leave the lock to the thread that feeds the device.
Tables and empty HDUs (small) are serialised by astropy itself.

Checksums are the FITS standard's (Seaman, Pence & Rots, the FITS checksum
convention): ``DATASUM`` is the 32-bit ones' complement sum of the data's
big-endian words, ``CHECKSUM`` the 16-character ASCII encoding of the complement of
the whole HDU's sum, so that a reader's sum over header and data comes to -0.
"""

from __future__ import annotations

import datetime
import io

import numpy as np
from astropy.io import fits

__all__ = ["write_hdus", "ones_complement_sum", "encode_checksum"]

#: A binary file open for writing (``open(path, "wb")``, ``io.BytesIO()``).
_BinaryFile = io.BufferedIOBase | io.RawIOBase
_BLOCK = 2880
#: Unsigned integer images are stored signed, offset by BZERO = 2^(bits - 1) (FITS standard).
_UNSIGNED_OFFSET = {np.dtype(np.uint16): 1 << 15, np.dtype(np.uint32): 1 << 31, np.dtype(np.uint64): 1 << 63}
#: BITPIX of the image dtypes streamed here (others go through astropy).
_BITPIX = {"f4": -32, "f8": -64, "i2": 16, "i4": 32, "i8": 64, "u1": 8, "u2": 16, "u4": 32, "u8": 64}
#: Code points the checksum encoding avoids (punctuation between digits and letters).
_EXCLUDED = frozenset(range(0x3A, 0x41)) | frozenset(range(0x5B, 0x61))
_MASK32 = 0xFFFFFFFF
#: Words summed per NumPy call: a uint64 sum of 2^30 32-bit words cannot overflow.
_CHUNK_WORDS = 1 << 30


def _fold(total: int) -> int:
    """A sum of 32-bit words reduced to 32 bits with end-around carry (ones' complement)."""
    while total >> 32:
        total = (total & _MASK32) + (total >> 32)
    return total


def ones_complement_sum(data: bytes | bytearray | memoryview | np.ndarray, start: int = 0) -> int:
    """The FITS 32-bit ones' complement sum of ``data``'s bytes read as big-endian words.

    A byte count that is not a multiple of 4 is summed as if zero-padded (FITS pads
    every unit with zeros to 2880 bytes, which adds nothing).  ``start``: a sum to add to.
    """
    raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    whole = raw.size - raw.size % 4
    words = raw[:whole].view(">u4")
    total = start
    for i in range(0, words.size, _CHUNK_WORDS):
        total += int(np.add.reduce(words[i:i + _CHUNK_WORDS], dtype=np.uint64))
    if whole < raw.size:
        tail = np.zeros(4, np.uint8)
        tail[: raw.size - whole] = raw[whole:]
        total += int(tail.view(">u4")[0])
    return _fold(total)


def encode_checksum(value: int) -> str:
    """The 16-character ASCII form of a 32-bit checksum value (the FITS convention's encoding).

    Each byte is spread over four characters from '0' upward (quotient by 4 in
    each, the remainder in the first), pairs are nudged off punctuation keeping
    their sum, and the string is rotated by one so that it adds up word-aligned in
    the card (the value starts at byte 11 of its 80-byte card).
    """
    value &= _MASK32
    chars = [0] * 16
    for i in range(4):
        byte = (value >> (24 - 8 * i)) & 0xFF
        q, r = divmod(byte, 4)
        ch = [0x30 + q] * 4
        ch[0] += r
        moved = True
        while moved:
            moved = False
            for j in (0, 2):
                if ch[j] in _EXCLUDED or ch[j + 1] in _EXCLUDED:
                    ch[j] += 1
                    ch[j + 1] -= 1
                    moved = True
        for j in range(4):
            chars[4 * j + i] = ch[j]
    return "".join(chr(chars[(i + 15) % 16]) for i in range(16))


def _image_bytes(data: np.ndarray) -> np.ndarray:
    """``data`` as the bytes a FITS image holds: big-endian, unsigned ints offset to signed (C order)."""
    be = data.astype(data.dtype.newbyteorder(">"), order="C")
    offset = _UNSIGNED_OFFSET.get(data.dtype.newbyteorder("="))
    if offset is not None:  # x - 2^(n-1) mod 2^n: flip the top bit
        np.bitwise_xor(be, np.array(offset, dtype=be.dtype), out=be)
    return be


def _streamable(hdu) -> bool:
    """An image HDU whose data this module writes itself (plain, unscaled or unsigned-offset)."""
    if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU)) or isinstance(hdu, fits.CompImageHDU):
        return False
    data = hdu.data
    if data is None or not isinstance(data, np.ndarray) or data.size == 0:
        return False
    code = data.dtype.newbyteorder("=").str[1:]
    if code not in _BITPIX or hdu.header.get("BITPIX") != _BITPIX[code]:
        return False
    offset = _UNSIGNED_OFFSET.get(data.dtype.newbyteorder("="), 0)
    return hdu.header.get("BSCALE", 1) == 1 and hdu.header.get("BZERO", 0) == offset


def _stamp() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _write_image(fh: _BinaryFile, hdu) -> None:
    """One image HDU: header with DATASUM/CHECKSUM, then its data and the zero padding."""
    hdu.verify("exception")
    data = _image_bytes(np.ascontiguousarray(hdu.data))
    datasum = ones_complement_sum(data)
    header = hdu.header.copy()
    when = _stamp()
    header["CHECKSUM"] = ("0" * 16, f"HDU checksum updated {when}")
    header["DATASUM"] = (str(datasum), f"data unit checksum updated {when}")
    total = ones_complement_sum(header.tostring().encode("ascii"), datasum)
    header["CHECKSUM"] = (encode_checksum(~total), f"HDU checksum updated {when}")
    fh.write(header.tostring().encode("ascii"))
    fh.write(memoryview(data.reshape(-1).view(np.uint8)))
    pad = -data.nbytes % _BLOCK
    if pad:
        fh.write(bytes(pad))


def _astropy_bytes(hdu, primary: bool) -> bytes:
    """One HDU as astropy writes it (checksums included): tables and empty HDUs."""
    buf = io.BytesIO()
    if primary:
        fits.HDUList([hdu]).writeto(buf, checksum=True, output_verify="exception")
        return buf.getvalue()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf, checksum=True, output_verify="exception")
    both = buf.getvalue()
    with fits.open(io.BytesIO(both)) as back:  # where the HDU starts, after astropy's dummy primary
        start = back.fileinfo(1)["hdrLoc"]
    return both[start:]


def write_hdus(fh: _BinaryFile, hdus: fits.HDUList) -> None:
    """Write ``hdus`` to the binary file ``fh`` with CHECKSUM/DATASUM in every HDU.

    The first HDU must be a ``PrimaryHDU``.  Image HDUs of float32/64, (u)int8-64
    data are streamed (:func:`_write_image`); others are serialised by astropy.
    Cards are verified as ``output_verify="exception"`` does (a ``VerifyError``
    before anything of that HDU is written).
    """
    if not len(hdus) or not isinstance(hdus[0], fits.PrimaryHDU):
        raise ValueError("write_hdus: the first HDU must be a PrimaryHDU")
    for i, hdu in enumerate(hdus):
        if i > 0 and isinstance(hdu, fits.PrimaryHDU):
            raise ValueError(f"write_hdus: HDU {i} is a second PrimaryHDU")
        if _streamable(hdu):
            _write_image(fh, hdu)
        else:
            fh.write(_astropy_bytes(hdu, primary=i == 0))
