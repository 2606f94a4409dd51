"""ExtractOptions: every option once, checked in one place; extract's keyword-only signature."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import jaxspec
from jaxspec._extraction.options import ExtractOptions, OptionError, check_fibers, wave_grid_size


def test_defaults_are_desis():
    o = ExtractOptions()
    assert (o.bundlesize, o.nsubbundles, o.nwavestep) == (25, 5, 50)
    assert (o.wavepad_frac, o.pixpad_frac, o.regularize, o.psferr) == (0.2, 0.8, 0.0, None)
    assert (o.decorrelate, o.minweight_frac, o.chunk_size) == ("signal", 1e-4, None)
    # the header cards resolve psferr to the PSF's own and leave out the run-time knobs
    cards = o.header_cards(0.01)
    assert cards["psferr"] == 0.01 and "chunk_size" not in cards and cards["nwavestep"] == 50


@pytest.mark.parametrize("field,value,text", [
    ("bundlesize", 0, "positive whole number"),
    ("bundlesize", 2.5, "positive whole number"),
    ("bundlesize", True, "positive whole number"),
    ("nsubbundles", 0, "positive whole number"),
    ("nsubbundles", 26, "at most --bundlesize (25)"),
    ("nwavestep", 0, "positive whole number"),
    ("nwavestep", 10**6, "at most 5000"),
    ("wavepad_frac", -0.1, ">= 0"),
    ("wavepad_frac", 1e6, "at most 10"),
    ("pixpad_frac", math.nan, "finite"),
    ("pixpad_frac", "big", "must be a number"),
    ("regularize", -1.0, ">= 0"),
    ("regularize", math.inf, "finite"),
    ("psferr", -0.01, ">= 0"),
    ("psferr", 2.0, "at most 1"),
    ("decorrelate", "cols", "choose signal"),
    ("minweight_frac", 1.5, "at most 1"),
    ("chunk_size", 0, "positive whole number"),
])
def test_each_bad_value_names_its_field(field, value, text):
    with pytest.raises(OptionError, match=field) as exc:
        ExtractOptions(**{field: value})
    assert exc.value.field == field and text in str(exc.value)
    assert exc.value.flag().startswith(f"--{field.replace('_', '-')} ")


def test_options_are_frozen_and_replace_checks_again():
    o = ExtractOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.nwavestep = 10
    assert o.replace(nwavestep=30).nwavestep == 30
    with pytest.raises(OptionError, match="nwavestep"):
        o.replace(nwavestep=-3)


def test_fibers_and_grids():
    assert check_fibers(0, None, 500) == (0, 500)
    assert check_fibers(475, 25, 500) == (475, 25)
    with pytest.raises(OptionError, match="fibers 0..499") as exc:
        check_fibers(490, 25, 500)
    assert exc.value.flag().startswith("--specmin 490 --nspec 25 asks for fibers 490..514")
    with pytest.raises(OptionError, match="specmin"):
        check_fibers(-1, 25, 500)
    assert wave_grid_size(5760.0, 7620.0, 0.8) == 2326  # DESI's r grid, end point included
    assert wave_grid_size(3600.0, 5800.0, 0.8) == 2751
    assert wave_grid_size(7520.0, 9824.0, 0.8) == 2881
    for bad in ((6000, math.inf, 0.8), (math.nan, 6080, 0.8), (6000, 6080, 1e-12), (6000, 5000, 0.8),
                (6000, 6080, 0.0)):
        with pytest.raises(OptionError, match="wavelength"):
            wave_grid_size(*bad)


@pytest.fixture(scope="module")
def small():
    wave = 5650.0 + 0.8 * np.arange(40)
    psf = jaxspec.desi_like_psf(nspec=25, wmin=wave[0] - 10, wmax=wave[-1] + 10)
    image, ivar, _ = jaxspec.simulate(psf, wave, np.full((25, 40), 100.0), seed=3)
    return image, ivar, psf, wave


def test_old_keywords_warn_and_give_the_same_result(small):
    image, ivar, psf, wave = small
    new = jaxspec.extract(image, ivar, psf, wave, nspec=25, options=ExtractOptions(nwavestep=20, chunk_size=8))
    with pytest.warns(DeprecationWarning, match=r"options=jaxspec.ExtractOptions\(nwavestep=..., chunk_size=...\)"):
        old = jaxspec.extract(image, ivar, psf, wave, nspec=25, wavesize=20, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(new.flux), np.asarray(old.flux))
    np.testing.assert_array_equal(np.asarray(new.resolution), np.asarray(old.resolution))


def test_extract_is_keyword_only_past_wave(small):
    image, ivar, psf, wave = small
    with pytest.raises(TypeError):
        jaxspec.extract(image, ivar, psf, wave, 0, 25)
    with pytest.raises(TypeError, match="unexpected keyword"):
        jaxspec.extract(image, ivar, psf, wave, nspec=25, nwavesteps=20)
    with pytest.raises(TypeError, match="ExtractOptions"):
        jaxspec.extract(image, ivar, psf, wave, nspec=25, options={"nwavestep": 20})
