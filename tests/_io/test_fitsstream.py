"""The streamed FITS writer gives astropy's bytes, checksums included."""

import io
import re
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from jaxspec._io.fitsstream import encode_checksum, ones_complement_sum, write_hdus

_STAMP = re.compile(rb"updated \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def _hdus(seed: int) -> fits.HDUList:
    rng = np.random.default_rng(seed)
    hdus = fits.HDUList([fits.PrimaryHDU(rng.normal(size=(5, 7)).astype(np.float32))])
    hdus[0].header["EXTNAME"] = "FLUX"
    hdus[0].header["CAMERA"] = ("r0", "camera")
    hdus.append(fits.ImageHDU(rng.normal(size=(3, 3, 5)), name="F8"))
    hdus.append(fits.ImageHDU(rng.integers(0, 2**32, (4, 5), dtype=np.uint32), name="MASK"))
    hdus.append(fits.ImageHDU(rng.integers(0, 2**16, (3, 5), dtype=np.uint16), name="U2"))
    hdus.append(fits.ImageHDU(rng.integers(-9, 9, (7,), dtype=np.int16), name="I2ODD"))  # 14 bytes: a partial word
    hdus.append(fits.ImageHDU(rng.integers(0, 255, (7,), dtype=np.uint8), name="U1"))
    hdus.append(fits.ImageHDU(rng.integers(-2**40, 2**40, (3,), dtype=np.int64), name="I8"))
    hdus.append(fits.ImageHDU(rng.normal(size=(2, 3)).astype(">f4"), name="BIGENDIAN"))
    table = fits.table_to_hdu(Table(dict(FIBER=np.arange(5), NAME=["a", "bb", "c", "d", "e"])))
    table.name = "FIBERMAP"
    hdus.append(table)
    hdus.append(fits.ImageHDU(None, name="EMPTY"))
    return hdus


def test_same_bytes_as_astropy_and_checksums_verify():
    ours, theirs = io.BytesIO(), io.BytesIO()
    _hdus(0).writeto(theirs, checksum=True)
    write_hdus(ours, _hdus(0))
    assert _STAMP.sub(b"", ours.getvalue()) == _STAMP.sub(b"", theirs.getvalue())
    ours.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # astropy warns on a checksum that does not verify
        with fits.open(ours, checksum=True) as back:
            np.testing.assert_array_equal(back["MASK"].data, _hdus(0)["MASK"].data)
            assert back["MASK"].data.dtype == np.uint32
            assert back["FLUX"].header["CHECKSUM"] != "0" * 16


def test_a_changed_byte_fails_astropy_checksum():
    buf = io.BytesIO()
    write_hdus(buf, _hdus(1))
    raw = bytearray(buf.getvalue())
    raw[2880 + 10] ^= 0x01  # a byte of FLUX's data
    with pytest.warns(Warning, match="[Cc]hecksum"):
        with fits.open(io.BytesIO(bytes(raw)), checksum=True) as back:
            back[0].data  # noqa: B018


def test_ones_complement_sum_folds_carries_and_pads():
    assert ones_complement_sum(b"\xff\xff\xff\xff" * 2) == 0xFFFFFFFF  # -0 + -0 = -0
    assert ones_complement_sum(b"\x80\x00\x00\x00" * 2) == 1            # end-around carry
    assert ones_complement_sum(b"\x00\x00\x00\x01\x02") == 0x02000001   # tail zero-padded
    assert ones_complement_sum(b"\x00\x00\x00\x05", start=3) == 8


def test_encode_checksum_sums_back_to_the_value():
    # the 16 characters, read as 4 big-endian words starting one byte late (as in the card), less '0's,
    # add up to the encoded value: that is what makes a header's sum come out to -0
    rng = np.random.default_rng(3)
    zeros = ones_complement_sum(b"0" * 16)
    for value in [0, 0xFFFFFFFF, 0x12345678, *rng.integers(0, 2**32, 20).tolist()]:
        text = encode_checksum(int(value)).encode("ascii")
        assert len(text) == 16 and all(0x30 <= c <= 0x72 and not (0x3A <= c <= 0x40 or 0x5B <= c <= 0x60)
                                       for c in text)
        aligned = text[1:] + text[:1]
        total = ones_complement_sum(aligned)
        # ones' complement: total = zeros + value (mod 2^32 - 1)
        assert (total - zeros - int(value)) % 0xFFFFFFFF == 0


def test_bad_card_refused_before_its_hdu_is_written():
    bad = fits.ImageHDU(np.zeros(3, np.float32), name="BAD")
    bad.header.append(fits.Card.fromstring("BAD KEY = 'x'"))
    buf = io.BytesIO()
    with pytest.raises(fits.VerifyError):
        write_hdus(buf, fits.HDUList([fits.PrimaryHDU(), bad]))
    assert len(buf.getvalue()) == 2880  # the primary header only


def test_first_hdu_must_be_primary():
    with pytest.raises(ValueError, match="PrimaryHDU"):
        write_hdus(io.BytesIO(), fits.HDUList([fits.ImageHDU(np.zeros(2))]))
