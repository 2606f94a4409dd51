"""desispec's mask bits: our tables equal desispec.maskbits, the input rule equals its extraction's.

desispec is installed for the tests without its heavy dependencies (README: the test
install line); in CI (``CI`` set) these tests fail rather than skip when it is missing.
"""

import importlib
import os

import numpy as np
import pytest

from jaxspec._io import frames as fio
from jaxspec._io import maskbits


def desispec_module(name: str):
    """``desispec.<name>``: required in CI, skipped elsewhere when desispec is not installed."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


def test_bit_tables_equal_desispec():
    mb = desispec_module("desispec.maskbits")
    for ours, theirs in ((maskbits.CCDMASK, mb.ccdmask), (maskbits.SPECMASK, mb.specmask)):
        for name, b in ours.items():
            assert theirs.mask(name) == 1 << b, name
        # every bit desispec defines is known here
        assert set(theirs.names()) <= set(ours), set(theirs.names()) - set(ours)
    assert maskbits.EXTRACT_MASK == int(mb.extractmaskval) == 767
    assert fio.SPECMASK_ALLBADPIX == mb.specmask.ALLBADPIX and fio.CCDMASK_BAD == mb.ccdmask.BAD


def test_names_decode():
    v = maskbits.bit("SOMEBADPIX") | maskbits.bit("BAD2DFIT")
    assert maskbits.names(v) == ["SOMEBADPIX", "BAD2DFIT"]
    assert maskbits.names(1 << 8, "ccdmask") == ["BADREADNOISE"]
    assert maskbits.names(1 << 30) == ["BIT30"]


def _every_bit_preproc(tmp_path):
    """A preproc whose MASK has each ccdmask bit alone somewhere, and pairs of bits, and 0 elsewhere."""
    rng = np.random.default_rng(3)
    shape = (40, 30)
    mask = np.zeros(shape, np.int32)
    pos = rng.permutation(shape[0] * shape[1])
    bits = sorted(maskbits.CCDMASK.values())
    k = 0
    for b in bits:  # each bit alone, 5 pixels each
        mask.flat[pos[k:k + 5]] = 1 << b
        k += 5
    for b1 in bits:  # each pair, one pixel
        for b2 in bits:
            if b2 > b1:
                mask.flat[pos[k]] = (1 << b1) | (1 << b2)
                k += 1
    image = rng.normal(size=shape)
    ivar = np.full(shape, 4.0)
    path = tmp_path / "preproc-b0.fits"
    fio.write_preproc(path, image, ivar, mask=mask, header={"CAMERA": "b0"})
    return path, mask


def test_input_mask_equals_desispec_extraction(tmp_path):
    """ivar 0 exactly where desispec's extraction zeroes it: (MASK & extractmaskval) != 0."""
    mb = desispec_module("desispec.maskbits")
    path, mask = _every_bit_preproc(tmp_path)
    pre = fio.read_preproc(path)
    theirs = (mask & mb.extractmaskval) != 0
    np.testing.assert_array_equal(pre.ivar == 0, theirs)
    np.testing.assert_array_equal(pre.ivar[~theirs], 4.0)
    # BADREADNOISE alone does not mask (desispec keeps those pixels); the mask itself is kept whole
    lone = mask == 1 << maskbits.CCDMASK["BADREADNOISE"]
    assert lone.sum() == 5 and np.all(pre.ivar[lone] == 4.0)
    np.testing.assert_array_equal(pre.mask, mask)


def test_input_mask_strict_rule(tmp_path):
    path, mask = _every_bit_preproc(tmp_path)
    pre = fio.read_preproc(path, mask_rule="any")
    np.testing.assert_array_equal(pre.ivar == 0, mask != 0)
    with pytest.raises(ValueError, match="mask rule 'some'"):
        fio.read_preproc(path, mask_rule="some")


def test_frame_mask_rules():
    """ALLBADPIX at fraction 1, SOMEBADPIX above 0.5, BAD2DFIT above 5 medians in both directions."""
    nspec, nwave = 6, 40
    rng = np.random.default_rng(0)
    chi2 = 1.0 + 0.1 * rng.random((nspec, nwave))
    ivar = np.ones((nspec, nwave))
    frac = np.zeros((nspec, nwave))
    frac[1, 3], frac[1, 4], frac[2, 5] = 0.5, 0.51, 1.0
    chi2[3, 10] = 5.6  # > 5 x both medians (~1.05)
    chi2[:, 20] = 8.0  # a sky line: high in every fiber, so not above its wavelength's median
    chi2[4, :] = 8.0  # a bright star: high along the whole fiber
    chi2[4, 30] = 60.0  # ... and a real outlier on it
    m = maskbits.frame_mask(frac, chi2, ivar)
    assert m.dtype == np.uint32
    some, allb, b2d = (maskbits.bit(n) for n in ("SOMEBADPIX", "ALLBADPIX", "BAD2DFIT"))
    assert m[1, 3] == 0 and m[1, 4] == some and m[2, 5] == some | allb
    assert m[3, 10] == b2d and m[4, 30] == b2d
    flagged = np.argwhere(m & b2d)
    assert sorted(map(tuple, flagged)) == [(3, 10), (4, 30)]
    # bins without data never count: ivar 0 there
    ivar[3, 10] = 0
    assert not maskbits.frame_mask(frac, chi2, ivar)[3, 10] & b2d


def test_frame_mask_decoded_by_desispec():
    mb = desispec_module("desispec.maskbits")
    frac = np.array([[0.0, 0.7, 1.0]])
    m = maskbits.frame_mask(frac, None, np.ones((1, 3)))
    assert [mb.specmask.names(int(v)) for v in m[0]] == [[], ["SOMEBADPIX"], ["SOMEBADPIX", "ALLBADPIX"]]


@pytest.mark.parametrize("shape", [(500, 2658), (7, 5), (1, 1), (4, 1)])
def test_median_valid_is_nanmedian_to_the_bit(shape):
    """The sort-based median equals np.nanmedian of the masked values exactly, along both axes,
    with infinities, a row with no valid entry (NaN) and even and odd counts."""
    import warnings

    rng = np.random.default_rng(7)
    v = rng.normal(size=shape) ** 2
    v[rng.random(shape) < 0.01] = np.inf
    valid = rng.random(shape) > 0.3
    if shape[0] > 2:
        valid[2] = False
    for axis in (0, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = np.nanmedian(np.where(valid, v, np.nan), axis=axis)
        got = maskbits._median_valid(v, valid, axis)
        assert got.shape == ref.shape
        assert np.array_equal(got, ref, equal_nan=True)
