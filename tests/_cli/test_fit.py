"""``jaxspec simulate-calib`` and ``jaxspec fit-psf`` end to end on a small patch."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec._cli.main import main
from jaxspec import apply_psf_params

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


def test_fit_psf_refuses_to_replace_its_own_input(cli_run, capsys):
    """-o PSF --psf-init PSF --overwrite: refused before any work, the input untouched."""
    d = cli_run["d"]
    init = d / "psf-init.fits"
    before = init.read_bytes()
    argv = ["fit-psf", "--flat", str(d / "flat.fits"), "--psf-init", str(init), "-o", str(init), "--overwrite",
            "--specmin", "0", "--nspec", "5", "--bundlesize", "5", "--nblocks", "1", "--wavelength", WAVE]
    assert main(argv) == 2
    assert "input PSF" in capsys.readouterr().err
    assert init.read_bytes() == before


def test_fitted_files_respect_the_umask(cli_run):
    """The fitted PSF and the residual plot are ordinary files: 0666 & ~umask (0644 under 022)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    d = cli_run["d"]
    for name in ("psf-fit.fits", "resid.png"):
        assert (d / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_fitted_psf_has_bundle_status(cli_run):
    """Per-bundle chi2 / status keys (specex's BnnRCHI2, BnnNDATA, BnnNPAR, plus BnnSTAT) in the PSF HDU."""
    from astropy.io import fits

    with fits.open(cli_run["d"] / "psf-fit.fits") as h:
        hdr = h["PSF"].header
        # (this fixture's line list leaves most lamp lines unmodelled: chi2/dof well above 1)
        assert hdr["B00STAT"] == 0 and hdr["B00RCHI2"] > 1.0
        assert hdr["B00NDATA"] > 1000 and hdr["B00NPAR"] > 20
        assert "B01STAT" not in hdr  # one bundle fitted
        status = h["PSF"].data["COEFF"][list(h["PSF"].data["PARAM"]).index("STATUS")]
        assert np.all(status[:5] == 0)


def test_fit_psf_block_without_lines_fails_before_fitting(cli_run, capsys):
    """A wavelength block without arc lines is found before the first block is fitted: exit 2, no output."""
    import time

    d = cli_run["d"]
    lines = d / "two-lines.txt"
    lines.write_text("5852.488\n5881.895\n")
    out = d / "never.fits"
    argv = ["fit-psf", "--arc", str(d / "arc.fits"), "--flat", str(d / "flat.fits"), "--psf-init",
            str(d / "psf-init.fits"), "-o", str(out), "--specmin", "0", "--nspec", "5", "--bundlesize", "5",
            "--nblocks", "2", "--wavelength", "5800,6000", "--lines", str(lines)]
    t0 = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no arc line falls" in err and "--lines" in err
    assert time.perf_counter() - t0 < 10.0  # no fitting happened
    assert not out.exists()


def test_fit_psf_arc_without_light_fails_before_fitting(cli_run, capsys):
    """Lines listed where the arc has no lamp light (here: fibers the arc does not light): exit 2."""
    d = cli_run["d"]
    out = d / "never2.fits"
    argv = ["fit-psf", "--arc", str(d / "arc.fits"), "--psf-init", str(d / "psf-init.fits"), "-o", str(out),
            "--specmin", "5", "--nspec", "5", "--bundlesize", "5", "--nblocks", "1", "--wavelength", WAVE]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no lamp light" in err or "no valid pixel" in err
    assert not out.exists()


def test_fit_psf_full_model_options_checked_before_fitting(cli_run, capsys):
    """--model full with specex's option names: bad degrees and options misused refused at once."""
    d = cli_run["d"]
    out = d / "psf-full.fits"
    base = ["fit-psf", "--input-image", str(d / "arc.fits"), "--input-image", str(d / "flat.fits"),
            "--input-psf", str(d / "psf-init.fits"), "-o", str(out), "-s", "0", "-n", "5", "--bundlesize", "5",
            "--model", "full", "--wavelength", WAVE]
    assert main([*base, "--legendre-deg-wave", "9"]) == 2
    assert "--legendre-deg-wave 9" in capsys.readouterr().err
    assert main([*base, "--legendre-deg-x", "5"]) == 2
    assert "--legendre-deg-x 5" in capsys.readouterr().err
    assert main([*base, "--plot", str(out)]) == 2  # the residual plot over the output PSF
    assert "--plot" in capsys.readouterr().err
    blocks = [a for a in base if a not in ("--model", "full")]
    for opt in ("--fit-continuum", "--fit-psf-tails"):  # options of the full model: refused, not ignored, without it
        assert main([*blocks, opt]) == 2
        err = capsys.readouterr().err
        assert opt in err and "--model full" in err
    assert main([*base, "--fit-continuum", "--continuum-deg", "-1"]) == 2
    assert "--continuum-deg -1" in capsys.readouterr().err
    assert main([*base[:2], *base[4:], "--fit-continuum"]) == 2  # the flat only: no arc continuum to fit
    assert "at least one arc" in capsys.readouterr().err
    assert not out.exists()


def test_fit_psf_bad_ranges_fail_before_fitting(cli_run, capsys):
    """-s/-n beyond the PSF, --wavelength outside it or reversed: exit 2 at once, no output."""
    d = cli_run["d"]
    out = d / "never3.fits"
    base = ["fit-psf", "--arc", str(d / "arc.fits"), "--flat", str(d / "flat.fits"), "--psf-init",
            str(d / "psf-init.fits"), "-o", str(out), "--bundlesize", "5", "--nblocks", "1"]
    for extra, msg in ((["-s", "498", "-n", "5"], "fibers 0..499"), (["-s", "-1", "-n", "5"], "fibers 0..499"),
                       (["-s", "0", "-n", "0"], "fibers 0..499"),
                       (["-s", "0", "-n", "5", "--wavelength", "5000,5900"], "outside the PSF's"),
                       (["-s", "0", "-n", "5", "--wavelength", "5900,5800"], "need wmin < wmax"),
                       (["-s", "0", "-n", "5", "--wavelength", "5800"], "expected two numbers")):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err, (extra, err)
    assert not out.exists()


def test_fit_psf_broken_fibers_checked_before_fitting(cli_run, capsys):
    """--broken-fibers: non-integers, duplicates, fibers not in the PSF, every fiber broken: exit 2
    at once with a message naming the option; nothing written.  Other fibers of the PSF (a
    camera's whole list, as desispec passes it to each bundle's fit) are ignored."""
    d = cli_run["d"]
    out = d / "never4.fits"
    base = ["fit-psf", "--arc", str(d / "arc.fits"), "--flat", str(d / "flat.fits"), "--psf-init",
            str(d / "psf-init.fits"), "-o", str(out), "-s", "0", "-n", "5", "--bundlesize", "5", "--nblocks", "1",
            "--wavelength", WAVE]
    for value, msg in (("2,x", "'x' is not a fiber number"), ("2.5", "'2.5' is not a fiber number"),
                       ("1,,3", "'' is not a fiber number"), ("3,1,3", "fiber(s) 3 given more than once"),
                       ("100000", "fiber(s) 100000 not in the PSF (fibers 0.."), ("-1", "fiber(s) -1 not in the PSF"),
                       ("0,1,2,3,4", "every fitted fiber (0..4) is broken")):
        assert main([*base, "--broken-fibers", value]) == 2, value
        err = capsys.readouterr().err
        assert "--broken-fibers" in err and msg in err, (value, err)
    assert not out.exists()


@pytest.fixture(scope="module")
def dead_run(cli_run):
    """An arc and a flat of fibers 0-9 from the true PSF with fiber 2 dead and fibers 5-9 dark
    (zero throughput), written as preproc files; the line list of ``cli_run``."""
    from jaxspec._simulation.calib import read_lines, simulate_arc, simulate_flat

    d, psf = cli_run["d"], cli_run["psf"]
    lines = read_lines(d / "lines.txt")
    box = psf.xyrange((0, 10), (5780.0, 5920.0))
    xy = (0, min(box[1] + psf.hsizex, psf.npix_x), 0, min(box[3] + psf.hsizey, psf.npix_y))
    tp = np.array([1.0, 0.95, 0.0, 1.05, 1.0, 0, 0, 0, 0, 0])
    arc = simulate_arc(psf, lines, specmin=0, nspec=10, xyrange=xy, throughput=tp, seed=11)
    flat = simulate_flat(psf, specmin=0, nspec=10, xyrange=xy, throughput=tp, seed=12)
    for name, cal, kind in (("arc-dead.fits", arc, "ARC"), ("flat-dead.fits", flat, "FLAT")):
        jaxspec.write_preproc(d / name, cal.image, cal.ivar, header={"FLAVOR": kind, "EXPTIME": 1.0})
    base = ["fit-psf", "--input-image", str(d / "arc-dead.fits"), "--input-image", str(d / "flat-dead.fits"),
            "--input-psf", str(d / "psf-init.fits"), "--bundlesize", "5", "--nblocks", "1", "--wavelength", WAVE,
            "--lines", str(d / "lines.txt")]
    return dict(d=d, base=base)


def _psf_hdu(path):
    from astropy.io import fits

    with fits.open(path) as h:
        hdr = h["PSF"].header
        names = [str(n).strip() for n in h["PSF"].data["PARAM"]]
        return (dict(hdr), np.array(h["XTRACE"].data), np.array(h["YTRACE"].data),
                np.array(h["PSF"].data["COEFF"]), names)


def test_fit_psf_full_model_dead_fiber_refused_before_fitting(dead_run, capsys):
    """--model full: a dead fiber not in --broken-fibers is found before any fitting (exit 2)."""
    import time

    d, base = dead_run["d"], dead_run["base"]
    out = d / "psf-full-dead.fits"
    t0 = time.perf_counter()
    assert main([*base, "-o", str(out), "-s", "0", "-n", "5", "--model", "full"]) == 2
    err = capsys.readouterr().err
    assert "fiber(s) 2 (0%) show no light" in err and "--broken-fibers" in err
    # a camera's list whose fibers here are all lit but fiber 2: 5 and 40 ignored, 2 still refused
    assert main([*base, "-o", str(out), "-s", "0", "-n", "5", "--model", "full", "--broken-fibers", "5,40"]) == 2
    err = capsys.readouterr().err
    assert "fiber(s) 2 (0%) show no light" in err
    assert time.perf_counter() - t0 < 10.0 and not out.exists()


@pytest.mark.slow
def test_fit_psf_broken_fiber_end_to_end(cli_run, dead_run, capsys, caplog):
    """A dead fiber: refused without --broken-fibers (exit 2, naming it and the option); with it,
    the other fibers fit as well as in ``cli_run`` (traces within 0.02 px of the truth) and the
    dead fiber's XTRACE, YTRACE and PSF rows are the input file's bit for bit (but the traces'
    constant coefficient, shifted with its bundle's by the alignment: B00ALDX, B00ALDY), STATUS 3,
    NBROKEN / BROKEN in the header.  Over fibers 0-9 in two bundles, bundle 1 without lamp light
    is flagged (status 2, exit 1) while bundle 0 is fitted exactly as alone; declared broken,
    bundle 1 gets status 3 and the exit status is 0."""
    import time

    d, base = dead_run["d"], dead_run["base"]
    out = d / "psf-dead.fits"
    t0 = time.perf_counter()
    assert main([*base, "-o", str(out), "-s", "0", "-n", "5"]) == 2
    err = capsys.readouterr().err
    assert "fiber(s) 2 (0%) show no light" in err and "--broken-fibers" in err
    assert time.perf_counter() - t0 < 10.0 and not out.exists()

    assert main([*base, "-o", str(out), "-s", "0", "-n", "5", "--broken-fibers", "2"]) == 0
    assert "1 broken fiber(s) not fitted" in capsys.readouterr().out
    hdr, xt, yt, coeff, names = _psf_hdu(out)
    hdr0, xt0, yt0, coeff0, names0 = _psf_hdu(d / "psf-init.fits")
    assert names == names0
    st = names.index("STATUS")
    assert xt[2, 1:].tobytes() == xt0[2, 1:].tobytes() and yt[2, 1:].tobytes() == yt0[2, 1:].tobytes()
    np.testing.assert_allclose([xt[2, 0] - xt0[2, 0], yt[2, 0] - yt0[2, 0]], [hdr["B00ALDX"], hdr["B00ALDY"]],
                               rtol=0, atol=1e-9)
    keep = [i for i in range(len(names)) if i != st]
    assert coeff[keep][:, 2].tobytes() == coeff0[keep][:, 2].tobytes()
    np.testing.assert_array_equal(coeff[st, :6, 0], [0, 0, 3, 0, 0, coeff0[st, 5, 0]])
    assert hdr["NBROKEN"] == 1 and hdr["BROKEN"] == "2" and hdr["B00STAT"] == 0
    fit, psf = jaxspec.read_psf(out), cli_run["psf"]
    fib, w = np.array([0, 1, 3, 4])[:, None], np.array([5810.0, 5850.0, 5890.0])[None, :]
    for fn in ("x", "y"):
        err_fit = np.abs(np.asarray(getattr(fit, fn)(fib, w) - getattr(psf, fn)(fib, w)))
        assert err_fit.max() < 0.02, (fn, err_fit.max())

    two = d / "psf-two.fits"
    assert main([*base, "-o", str(two), "-s", "0", "-n", "10", "--broken-fibers", "2"]) == 1
    cap = capsys.readouterr()
    assert "1 of 2 bundles FAILED" in cap.out
    assert "bundle 1 (fibers 5-9) will not be fitted" in caplog.text and "no lamp light" in caplog.text
    hdr2, xt2, yt2, coeff2, _ = _psf_hdu(two)
    assert hdr2["B00STAT"] == 0 and hdr2["B01STAT"] == 2 and hdr2["B01RCHI2"] == -1.0
    np.testing.assert_array_equal(coeff2[st, :10, 0], [0, 0, 3, 0, 0, 2, 2, 2, 2, 2])
    assert xt2[5:10].tobytes() == xt0[5:10].tobytes()
    assert coeff2[keep][:, 5:10].tobytes() == coeff0[keep][:, 5:10].tobytes()
    np.testing.assert_allclose(xt2[:5], xt[:5], rtol=0, atol=1e-10)  # bundle 0 as when fitted alone
    np.testing.assert_allclose(coeff2[keep][:, :5], coeff[keep][:, :5], rtol=1e-10, atol=1e-12)

    three = d / "psf-three.fits"
    assert main([*base, "-o", str(three), "-s", "0", "-n", "10", "--broken-fibers", "2,5,6,7,8,9"]) == 0
    hdr3, _, _, coeff3, _ = _psf_hdu(three)
    assert hdr3["B01STAT"] == 3 and hdr3["NBROKEN"] == 6 and hdr3["BROKEN"] == "2,5,6,7,8,9"
    np.testing.assert_array_equal(coeff3[st, :10, 0], [0, 0, 3, 0, 0, 3, 3, 3, 3, 3])


def test_fit_psf_alignment_options(cli_run, capsys):
    """--max-shift below 1 px: refused at once.  A start 3.4 px, -2.7 px off the images searched over
    --max-shift 2 (both models): the peak at the window's edge, refused before any fitting (exit 2,
    naming the fibers and --max-shift).  --no-align and --max-shift are parsed and in the help."""
    import time

    from jaxspec._cli.main import build_parser
    from jaxspec._fit.align import TraceOffset, apply_trace_offsets

    d = cli_run["d"]
    shifted = apply_trace_offsets(cli_run["psf"], [TraceOffset(np.arange(5), -3.4, 2.7, "", "", np.nan, np.nan,
                                                               np.nan, np.nan, 8.0)])
    jaxspec.write_psf(d / "psf-shifted.fits", shifted, overwrite=True)
    out = d / "never-aligned.fits"
    base = ["fit-psf", "--arc", str(d / "arc.fits"), "--flat", str(d / "flat.fits"), "--psf-init",
            str(d / "psf-shifted.fits"), "-o", str(out), "-s", "0", "-n", "5", "--bundlesize", "5", "--nblocks", "1",
            "--wavelength", WAVE, "--lines", str(d / "lines.txt")]
    assert main([*base, "--max-shift", "0.5"]) == 2
    assert "--max-shift 0.5" in capsys.readouterr().err
    t0 = time.perf_counter()
    for model in ("blocks", "full"):
        assert main([*base, "--max-shift", "2", "--model", model]) == 2, model
        err = capsys.readouterr().err
        assert "fibers 0-4 match best at the edge of the search window (+-2 px" in err and "--max-shift" in err, err
    assert time.perf_counter() - t0 < 10.0 and not out.exists()
    parser = build_parser()
    args = parser.parse_args(["fit-psf", "-o", "x.fits", "--no-align", "--max-shift", "4.5"])
    assert args.align is False and args.max_shift == 4.5
    args = parser.parse_args(["fit-psf", "-o", "x.fits"])
    assert args.align is True and args.max_shift == 8.0
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = sub.choices["fit-psf"].format_help()
    assert "--no-align" in text and "--max-shift PIXELS" in text
