"""``jaxspec simulate-calib`` and ``jaxspec fit-psf`` end to end on a small patch."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec._cli.main import main
from jaxspec._fit.fit import apply_psf_params

PSF_NAME = "psf-r0-00067784.fits"
WAVE = "5800,5900"


@pytest.fixture(scope="module")
def cli_run(psf_path, tmp_path_factory):
    """True PSF -> simulated arc + flat (fibers 0-4); perturbed PSF -> fit-psf."""
    d = tmp_path_factory.mktemp("fitcli")
    true_path = psf_path(PSF_NAME)
    psf = jaxspec.read_psf(true_path)
    fibers = np.arange(5)
    shift = np.array([0.3, -0.25, 0.35, -0.3, 0.2])[:, None]
    init = apply_psf_params(psf, {"dx": jnp.asarray(shift), "dy": jnp.asarray(-shift),
                                  "log_sigx": jnp.full(5, 0.05)}, fibers).with_traces()
    init_path = jaxspec.write_psf(d / "psf-init.fits", init)
    common = ["--psf", str(true_path), "--specmin", "0", "--nspec", "5", "--wavelength", "5780,5920"]
    rc_arc = main(["simulate-calib", *common, "--kind", "arc", "-o", str(d / "arc.fits"), "--seed", "1"])
    rc_flat = main(["simulate-calib", *common, "--kind", "flat", "-o", str(d / "flat.fits"), "--seed", "2"])
    lines = d / "lines.txt"
    lines.write_text("# Ne lines\n5852.488\n5881.895 300\n5944.834\n5820.156 5\n")
    argv = ["fit-psf", "--arc", str(d / "arc.fits"), "--flat", str(d / "flat.fits"), "--psf-init", str(init_path),
            "-o", str(d / "psf-fit.fits"), "--specmin", "0", "--nspec", "5", "--bundlesize", "5",
            "--nblocks", "1", "--wavelength", WAVE, "--lines", str(lines), "--plot", str(d / "resid.png")]
    rc_fit = main(argv)
    return dict(d=d, psf=psf, init=init, rcs=(rc_arc, rc_flat, rc_fit), argv=argv)


def test_simulate_calib_and_fit_psf_run(cli_run):
    assert cli_run["rcs"] == (0, 0, 0)
    d = cli_run["d"]
    pre = jaxspec.read_preproc(d / "arc.fits")
    assert pre.header["FLAVOR"] == "ARC"
    assert pre.image.shape[0] < 1000 and pre.image.shape[1] < 200  # the lower-left sub-image only
    assert (d / "resid.png").stat().st_size > 10_000


def test_fit_psf_recovers_the_traces(cli_run):
    """The fitted file's traces are within 0.02 px of the truth (0.2-0.35 px off at the start)."""
    fit = jaxspec.read_psf(cli_run["d"] / "psf-fit.fits")
    psf, init = cli_run["psf"], cli_run["init"]
    fib = np.arange(5)[:, None]
    w = np.array([5810.0, 5850.0, 5890.0])[None, :]
    for fn in ("x", "y"):
        err_init = np.abs(np.asarray(getattr(init, fn)(fib, w) - getattr(psf, fn)(fib, w)))
        err_fit = np.abs(np.asarray(getattr(fit, fn)(fib, w) - getattr(psf, fn)(fib, w)))
        assert err_init.min() > 0.15
        assert err_fit.max() < 0.02, (fn, err_fit.max())
    sig = np.asarray(fit.xsigma(fib, w) / psf.xsigma(fib, w))
    assert np.all(np.abs(sig - 1) < 0.01)
    # fibers outside --specmin/--nspec are copied
    np.testing.assert_array_equal(np.asarray(fit.xcoef[5:]), np.asarray(init.xcoef[5:]))
    np.testing.assert_array_equal(np.asarray(fit.params[:, 5:]), np.asarray(init.params[:, 5:]))


def test_fit_psf_refuses_to_overwrite_and_bad_options(cli_run, capsys):
    argv = cli_run["argv"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    d = cli_run["d"]
    out = ["-o", str(d / "other.fits")]
    base = ["fit-psf", "--psf-init", str(d / "psf-init.fits")]
    assert main([*base, *out]) == 2
    assert "at least one --arc or --flat" in capsys.readouterr().err
    assert main([*base, *out, "--flat", str(d / "flat.fits"), "--what", "xtrace,wings"]) == 2
    assert "--what" in capsys.readouterr().err
    assert main([*base, *out, "--flat", str(d / "missing.fits")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([*base, *out, "--flat", str(d / "flat.fits"), "--nspec", "501"]) == 2
    assert "fibers 0..499" in capsys.readouterr().err
    assert not (d / "other.fits").exists()
