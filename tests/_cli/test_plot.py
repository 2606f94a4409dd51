"""``jaxspec plot``: the PNGs of a frame written by ``jaxspec extract``, and its usage errors.

One small frame (25 fibers x 100 wavelengths of a DESI-like PSF, on the bottom rows of a
1400-row CCD) is simulated,
written as PSF + preproc files and extracted through the command line with
``--model``; the plot command then reads those files like an operator would.
"""

import logging
import os

import numpy as np
import pytest

import jaxspec
from jaxspec._cli.main import main

matplotlib = pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("plot")
    wave = 5650.0 + 0.8 * np.arange(100)
    # a CCD taller than the plot's default region (1024 pixels) with the light in its bottom
    # 200 rows: the default image panels must find the light, not the CCD's empty centre
    psf = jaxspec.desi_like_psf(nspec=25, wmin=wave[0] - 8, wmax=wave[-1] + 8, margin=12.0, npix_y=1400)
    rng = np.random.default_rng(3)
    flux = 80.0 + 20.0 * rng.random((25, 1)) + 900.0 * np.exp(-0.5 * ((wave - 5690.0) / 1.0) ** 2)
    image, ivar, _ = jaxspec.simulate(psf, wave, flux, readnoise=3.0, seed=4)
    paths = {k: str(d / v) for k, v in dict(psf="psf.fits", pre="preproc.fits", frame="frame.fits",
                                              model="model.fits").items()}
    jaxspec.write_psf(paths["psf"], psf)
    jaxspec.write_preproc(paths["pre"], image, ivar, header={"CAMERA": "r0", "EXPID": 7, "NIGHT": 20250101})
    rc = main(["extract", "-i", paths["pre"], "-p", paths["psf"], "-o", paths["frame"], "-m", paths["model"],
               "-w", f"{wave[0]},{wave[-1]},0.8", "-n", "25", "--quiet", "--loglevel", "WARNING"])
    assert rc == 0
    paths["dir"] = d
    return paths


def _is_png(path, min_bytes=20_000):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG_MAGIC and os.path.getsize(path) > min_bytes


def _png_shape(path):
    import matplotlib.image as mpimg

    return mpimg.imread(path).shape


def test_plot_spectra_and_chi2pix(files, capsys):
    out = str(files["dir"] / "spectra.png")
    rc = main(["plot", files["frame"], "--fibers", "0,12,24", "-o", out, "--quiet"])
    assert rc == 0
    assert _is_png(out)
    h, w, _ = _png_shape(out)
    assert w > h  # two stacked full-width panels on a 12-inch-wide figure
    assert "3 fibers" in capsys.readouterr().out


def test_plot_with_image_model_and_region(files):
    out = str(files["dir"] / "panels.png")
    rc = main(["plot", files["frame"], "--image", files["pre"], "--model", files["model"],
               "--region", "0,80,100,220", "--wave", "5670,5720", "--fibers", "3", "-o", out, "--quiet"])
    assert rc == 0
    assert _is_png(out)
    # three rows of panels are taller than two
    spectra = str(files["dir"] / "spectra-only.png")
    main(["plot", files["frame"], "--fibers", "3", "-o", spectra, "--quiet"])
    assert _png_shape(out)[0] > _png_shape(spectra)[0]


def test_model_matches_image_that_is_plotted(files):
    """The residual panel is meaningful: the model written by extract fits the image."""
    pre = jaxspec.read_preproc(files["pre"])
    from jaxspec._cli.plot import read_model_image

    model = read_model_image(files["model"])
    good = pre.ivar > 0
    pull = (pre.image - model)[good] * np.sqrt(pre.ivar[good])
    lit = model[good] > 5 * model.max() * 1e-3
    assert abs(pull[lit].mean()) < 0.1
    assert 0.6 < pull[lit].std() < 1.2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fibers", "30"], "not in the frame"),
        (["--fibers", "a,b"], "comma-separated integers"),
        (["--image", "IMAGE"], "together"),
        (["--region", "0,10,5"], "4 comma-separated"),
        (["--wave", "5800,5700"], "increasing"),
        (["--wave", "9000,9100"], "covers"),
        (["-o", "x.pdf"], "ending in .png"),
    ],
)
def test_usage_errors(files, capsys, extra, message):
    extra = [files["pre"] if a == "IMAGE" else a for a in extra]
    if "-o" not in extra:
        extra += ["-o", str(files["dir"] / "never.png")]
    rc = main(["plot", files["frame"], *extra, "--quiet"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(files["dir"] / "never.png")


def test_region_outside_image_and_existing_output(files, capsys):
    rc = main(["plot", files["frame"], "--image", files["pre"], "--model", files["model"],
               "--region", "0,10000,0,10", "-o", str(files["dir"] / "never.png"), "--quiet"])
    assert rc == 2 and "--region" in capsys.readouterr().err
    out = files["dir"] / "exists.png"
    out.write_bytes(b"keep me")
    rc = main(["plot", files["frame"], "-o", str(out), "--quiet"])
    assert rc == 2
    assert out.read_bytes() == b"keep me"
    assert main(["plot", files["frame"], "-o", str(out), "--overwrite", "--quiet"]) == 0
    assert _is_png(out)


def test_default_region_crops_large_images():
    from jaxspec._cli.plot import default_region

    assert default_region((500, 300)) == (0, 300, 0, 500)
    x0, x1, y0, y1 = default_region((4128, 4114))
    assert (x1 - x0, y1 - y0) == (256, 256)
    assert x0 < 4114 // 2 < x1 and y0 < 4128 // 2 < y1


def test_default_region_shows_the_frames_light(files, caplog):
    """Without --region the image panels show where the model has light (issue 15)."""
    from jaxspec._cli.plot import default_region

    pre = jaxspec.read_preproc(files["pre"])
    from jaxspec._cli.plot import read_model_image

    model = read_model_image(files["model"])
    ny, nx = model.shape
    assert ny > 1024  # a crop is needed
    x0, x1, y0, y1 = default_region(model.shape, model)
    assert 0 <= x0 < x1 <= nx and 0 <= y0 < y1 <= ny and y1 - y0 <= 1024
    inside = model[y0:y1, x0:x1].sum()
    assert inside > 0.999 * model.sum()  # all the light of the frame is in the panels
    assert (y1 - y0) < 0.3 * ny  # and the box is cut down to it
    # the old default, a central crop, showed an empty image and a flat model
    cx0, cx1, cy0, cy1 = default_region(model.shape)
    assert model[cy0:cy1, cx0:cx1].max() < 1e-6 * model.max()
    # the command uses it and says so
    out = str(files["dir"] / "default-region.png")
    with caplog.at_level(logging.INFO, logger="jaxspec"):
        rc = main(["plot", files["frame"], "--image", files["pre"], "--model", files["model"], "-o", out,
                   "--loglevel", "INFO"])
    assert rc == 0 and _is_png(out)
    assert f"x {x0}..{x1}, y {y0}..{y1}" in caplog.text and "where the model has light" in caplog.text
    assert pre.image.shape == model.shape


def test_default_region_of_a_few_fibers_on_a_full_ccd():
    """Fibers 0-49 on a 4128 x 4114 CCD: the box of their traces, cut to 256 rows round the light."""
    from jaxspec._cli.plot import default_region

    ny, nx = 4128, 4114
    model = np.zeros((ny, nx))
    cols = 8 + 7.4 * np.arange(50) + 12 * (np.arange(50) // 25)
    for c in cols.astype(int):
        model[:, c - 1:c + 2] = 50.0 + 10 * np.sin(np.arange(ny) / 300.0)[:, None]
    x0, x1, y0, y1 = default_region((ny, nx), model)
    assert (x0, x1) == (int(cols[0]) - 1, int(cols[-1]) + 2)  # every lit column, under 1024 wide
    assert y1 - y0 == 256 and abs((y0 + y1) / 2 - ny / 2) < 40
    assert (model[y0:y1, x0:x1] > 0).any(axis=0).sum() == 150  # the panels show all 50 traces
    cx0, cx1, cy0, cy1 = default_region((ny, nx))
    assert model[cy0:cy1, cx0:cx1].max() == 0  # the old default: nothing
    # no light at all (an empty model): the old default
    assert default_region((ny, nx), np.zeros((ny, nx))) == (cx0, cx1, cy0, cy1)


def test_plot_replaces_only_with_overwrite_and_leaves_no_temp(files):
    out = files["dir"] / "again.png"
    assert main(["plot", files["frame"], "-o", str(out), "--quiet"]) == 0
    first = out.read_bytes()
    assert main(["plot", files["frame"], "--fibers", "5", "-o", str(out), "--quiet"]) == 2
    assert out.read_bytes() == first
    assert main(["plot", files["frame"], "--fibers", "5", "-o", str(out), "--overwrite", "--quiet"]) == 0
    assert _is_png(out) and out.read_bytes() != first
    assert not [p for p in files["dir"].iterdir() if p.name.endswith(".tmp")]
