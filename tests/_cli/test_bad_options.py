"""Bad options and job lists are refused before any work, by every command (exit 2, the flag named).

All of these are refused before JAX starts, so they run in a fraction of a second.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jaxspec._cli.main import main
from jaxspec._pipeline.batch import read_job_list


@pytest.fixture()
def files(tmp_path):
    """Inputs that exist (their content is never read: every case fails earlier)."""
    img, psf = tmp_path / "preproc.fits", tmp_path / "psf.fits"
    img.write_bytes(b"x")
    psf.write_bytes(b"x")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"{img} {psf} {tmp_path / 'out' / 'frame.fits'}\n")
    return img, psf, jobs


def _refused(argv, capsys, *expect):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert "Traceback" not in err
    for text in expect:
        assert text in err, (text, err)
    return err


BAD = [
    (["-r", "-1"], ["--regularize -1.0", ">= 0"]),
    (["--wavepad-frac", "1e6"], ["--wavepad-frac 1000000.0", "at most 10"]),
    (["--pixpad-frac", "1e6"], ["--pixpad-frac 1000000.0", "at most 10"]),
    (["--pixpad-frac", "nan"], ["--pixpad-frac nan"]),
    (["--psferr", "-0.01"], ["--psferr -0.01"]),
    (["--psferr", "2"], ["--psferr 2.0", "at most 1"]),
    (["--nwavestep", "0"], ["--nwavestep 0", "positive"]),
    (["--bundlesize", "0"], ["--bundlesize 0", "positive"]),
    (["--nsubbundles", "0"], ["--nsubbundles 0", "positive"]),
    (["--nsubbundles", "26"], ["--nsubbundles 26", "at most --bundlesize (25)"]),
    (["--chunk-size", "0"], ["--chunk-size 0"]),
    (["-n", "0"], ["--nspec 0", "positive"]),
    (["-w", "6000,inf,0.8"], ["--wavelength '6000,inf,0.8'", "finite"]),
    (["-w", "nan,6080,0.8"], ["--wavelength 'nan,6080,0.8'", "finite"]),
    (["-w", "6000,6080,1e-12"], ["--wavelength '6000,6080,1e-12'", "wavelength bins", "at most 100,000"]),
    (["-w", "6000,5000,0.8"], ["--wavelength '6000,5000,0.8'", "wmin < wmax"]),
    (["-w", "6000,6100"], ["--wavelength '6000,6100'", "wmin,wmax,dw"]),
]


@pytest.mark.parametrize("extra,expect", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_extract_and_batch_refuse_the_same_options(files, tmp_path, capsys, extra, expect):
    img, psf, jobs = files
    _refused(["extract", "-i", img, "-p", psf, "-o", tmp_path / "frame.fits", *extra], capsys, *expect)
    _refused(["extract-batch", jobs, *extra], capsys, *expect)
    assert not (tmp_path / "frame.fits").exists() and not (tmp_path / "out").exists()


def test_hash_inside_a_path_is_part_of_the_path(tmp_path):
    lst = tmp_path / "jobs.txt"
    lst.write_text("# a comment line\n"
                   "in/pre#1.fits psf/psf#1.fits out/frame#1.fits   # the first frame\n"
                   "in/pre2.fits psf/psf2.fits out/frame2.fits#not-a-comment\n")
    jobs = read_job_list(lst)
    assert [(j.image, j.psf, j.output) for j in jobs] == [
        ("in/pre#1.fits", "psf/psf#1.fits", "out/frame#1.fits"),
        ("in/pre2.fits", "psf/psf2.fits", "out/frame2.fits#not-a-comment"),
    ]


def test_reports_are_never_overwritten_nor_the_job_list(files, tmp_path, capsys):
    img, psf, jobs = files
    old = tmp_path / "failures.txt"
    old.write_text("precious\n")
    _refused(["extract-batch", jobs, "--failures", old], capsys, "--failures", "already exists; use --overwrite")
    _refused(["extract-batch", jobs, "--summary-json", old], capsys, "--summary-json", "already exists")
    _refused(["extract-batch", jobs, "--failures", jobs, "--overwrite"], capsys, "--failures", "is a job list")
    _refused(["extract-batch", jobs, "--summary-json", img, "--overwrite"], capsys, "an input")
    assert old.read_text() == "precious\n"
    assert jobs.read_text().startswith(str(img))


def test_help_and_argument_errors_do_not_start_jax():
    code = ("import sys\n"
            "from jaxspec._cli.main import main\n"
            "for argv in (['--help'], ['extract', '--help'], ['extract', '-n', 'many']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'jax' not in sys.modules and 'astropy' not in sys.modules, sorted(sys.modules)\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_a_missing_input_is_reported_before_jax_starts(tmp_path):
    code = ("import sys\n"
            "from jaxspec._cli.main import main\n"
            f"rc = main(['extract', '-i', {str(tmp_path / 'nope.fits')!r}, '-p', {str(tmp_path / 'psf.fits')!r}, "
            f"'-o', {str(tmp_path / 'f.fits')!r}])\n"
            "assert rc == 2 and 'jax' not in sys.modules\n"
            "print('ok')\n")
    Path(tmp_path / "psf.fits").write_bytes(b"x")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--input" in res.stderr and "nope.fits: no such file" in res.stderr
