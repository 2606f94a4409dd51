"""specter's ex2d and jaxspec's extract on the specter reference cases, timed in turn on one machine.

What it measures: for each case in ``shared/reference`` (25 fibers x 120-200 wavelengths), the
wall time of specter's ``ex2d`` (desihub/specter, in a separate process so that its NumPy/BLAS
and thread settings are its own) and of ``jaxspec.extract`` (as ``reference_cases.py`` calls
it: x64, synchronous CPU dispatch, ``block_until_ready``), alternating specter, jaxspec,
specter, jaxspec ... ``--rounds`` times after one warm-up call of each (jaxspec's compilation,
specter's numba JIT).  Both see the same machine load; the load average is printed per case.
PSF reading is outside the timings.  It also prints how far each code's flux, ivar and
resolution are from the case's REF_* arrays (max |a - b| / max |b|), so that the timings are
known to be of the same computation.

specter is not a dependency of jaxspec.  To run this, get desihub/specter (the DESI
extraction code on GitHub, not the unrelated PyPI package named "specter") and give its
``py`` folder; it needs numpy, scipy, astropy and numba, in this interpreter or another::

    git clone https://github.com/desihub/specter /tmp/specter
    python benchmarks/specter_side_by_side.py --specter-path /tmp/specter/py \\
        [--specter-python /path/to/venv/bin/python] [--blas-threads 1] [--rounds 5] \\
        [--cases specter-r0-67784-f000-024.fits ...] [--json out.json]

Exit status 2 (with that advice) when specter cannot be imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = (
    "specter-r0-67784-f000-024.fits",
    "specter-r0-67784-f100-124.fits",
    "specter-r0-67784-f000-024-edge.fits",
    "specter-r0-67784-f200-224-edge.fits",
    "specter-r0-51060-f475-499-edge.fits",
    "specter-r0-51060-f060-084-nsub4.fits",
)

HOWTO = (
    "specter (desihub/specter) is not importable.  Clone https://github.com/desihub/specter "
    "(not the PyPI package named 'specter') and pass --specter-path CHECKOUT/py; it needs numpy, "
    "scipy, astropy and numba (use --specter-python to run it with another interpreter)."
)


def _load_case(shared: Path, name: str) -> dict:
    """The case's header values and arrays (float64)."""
    import numpy as np
    from astropy.io import fits

    with fits.open(shared / "reference" / name) as h:
        hdr = h[0].header
        out = {k: h[k].data.astype(np.float64) for k in ("IMAGE", "IVAR", "WAVELENGTH", "REF_FLUX", "REF_IVAR", "REF_RESOLUTION")}
        for k in ("PSF", "SPECMIN", "NSPEC", "XMIN", "YMIN", "NSUB", "WAVESIZE", "EXTIME"):
            out[k] = hdr[k]
    ny, nx = out["IMAGE"].shape
    out["xyrange"] = (int(out["XMIN"]), int(out["XMIN"]) + nx, int(out["YMIN"]), int(out["YMIN"]) + ny)
    return out


def _agreement(case: dict, flux, ivar, res) -> dict:
    """max |a - b| / max |b| for flux, ivar and the resolution diagonals against REF_*."""
    import numpy as np

    def rel(a, b):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        return float(np.abs(a - b).max() / np.abs(b).max()) if a.shape == b.shape else float("nan")

    return {"flux": rel(flux, case["REF_FLUX"]), "ivar": rel(ivar, case["REF_IVAR"]), "R": rel(res, case["REF_RESOLUTION"])}


def _worker(args: argparse.Namespace) -> None:
    """specter side: JSON requests on stdin, one JSON reply per line on stdout."""
    if args.specter_path:
        sys.path.insert(0, args.specter_path)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything specter prints stays off the protocol
    try:
        import specter
        from specter.extract import ex2d
        from specter.psf import load_psf
    except Exception as err:  # noqa: BLE001 - report any import failure to the parent
        out.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"ready": True, "specter": str(Path(specter.__file__).resolve().parent),
                          "version": getattr(specter, "__version__", "?")}) + "\n")
    out.flush()
    shared = Path(args.shared)
    psfs, cases = {}, {}
    for line in sys.stdin:
        req = json.loads(line)
        name = req["case"]
        if name not in cases:
            cases[name] = _load_case(shared, name)
        c = cases[name]
        if c["PSF"] not in psfs:
            psfs[c["PSF"]] = load_psf(str(shared / "data" / "psf" / c["PSF"]))
        t0 = time.perf_counter()
        flux, ivar, res = ex2d(c["IMAGE"], c["IVAR"], psfs[c["PSF"]], c["SPECMIN"], c["NSPEC"], c["WAVELENGTH"],
                               xyrange=c["xyrange"], regularize=0.0, ndecorr=False, bundlesize=25,
                               nsubbundles=c["NSUB"], wavesize=c["WAVESIZE"], psferr=0.01,
                               pixpad_frac=0.8, wavepad_frac=0.2)
        dt = time.perf_counter() - t0
        reply = {"seconds": dt}
        if req.get("check"):
            reply["agreement"] = _agreement(c, flux, ivar, res)
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _Specter:
    """The specter worker process."""

    def __init__(self, args: argparse.Namespace):
        env = dict(os.environ)
        if args.blas_threads:
            for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[k] = str(args.blas_threads)
        cmd = [args.specter_python or sys.executable, str(Path(__file__).resolve()), "--worker", "--shared", args.shared]
        if args.specter_path:
            cmd += ["--specter-path", args.specter_path]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the specter worker exited")
        return json.loads(line)

    def run(self, case: str, check: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"case": case, "check": check}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specter-path", default=None, help="folder holding the specter package (a checkout's py/)")
    ap.add_argument("--specter-python", default=None, help="interpreter for specter (default: this one)")
    ap.add_argument("--blas-threads", type=int, default=0, help="BLAS/OpenMP threads for specter (default: library's)")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--rounds", type=int, default=5, help="timed specter/jaxspec alternations per case")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return

    sp = _Specter(args)
    if "error" in sp.hello:
        print(f"{HOWTO}\n({sp.hello['error']})", file=sys.stderr)
        sp.close()
        sys.exit(2)

    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # as in reference_cases.py
    import jaxspec

    shared = Path(args.shared)
    print(f"jaxspec {Path(jaxspec.__file__).resolve().parent}, jax {jax.__version__}, {jax.devices()[0]}")
    print(f"specter {sp.hello['specter']} ({sp.hello['version']}), BLAS threads {args.blas_threads or 'default'}")
    psfs, rows = {}, []
    for name in args.cases:
        c = _load_case(shared, name)
        if c["PSF"] not in psfs:
            psfs[c["PSF"]] = jaxspec.read_psf(shared / "data" / "psf" / c["PSF"])
        opts = jaxspec.ExtractOptions(nsubbundles=int(c["NSUB"]), nwavestep=int(c["WAVESIZE"]))

        def run_jax():
            t0 = time.perf_counter()
            ex = jaxspec.extract(c["IMAGE"], c["IVAR"], psfs[c["PSF"]], c["WAVELENGTH"], specmin=int(c["SPECMIN"]),
                                 nspec=int(c["NSPEC"]), xyrange=c["xyrange"], options=opts)
            jax.block_until_ready(ex.flux)
            return time.perf_counter() - t0, ex

        load0 = os.getloadavg()[0]
        first_s = sp.run(name, check=True)
        first_j, ex = run_jax()
        agree_j = _agreement(c, ex.flux, ex.ivar, ex.resolution)
        ts, tj = [], []
        for _ in range(args.rounds):
            ts.append(sp.run(name)["seconds"])
            tj.append(run_jax()[0])
        load1 = os.getloadavg()[0]
        row = {
            "case": name, "extime": float(c["EXTIME"]),
            "specter_first": first_s["seconds"], "specter_min": min(ts), "specter_median": statistics.median(ts),
            "jaxspec_first": first_j, "jaxspec_min": min(tj), "jaxspec_median": statistics.median(tj),
            "specter_times": ts, "jaxspec_times": tj, "load": [load0, load1],
            "specter_vs_ref": first_s["agreement"], "jaxspec_vs_ref": agree_j,
        }
        rows.append(row)
        print(f"{name}: specter min {row['specter_min']:.2f} s median {row['specter_median']:.2f} s | "
              f"jaxspec min {row['jaxspec_min']:.3f} s median {row['jaxspec_median']:.3f} s | "
              f"ratio (min/min) {row['specter_min'] / row['jaxspec_min']:.1f}x, "
              f"(median/median) {row['specter_median'] / row['jaxspec_median']:.1f}x | "
              f"load {load0:.1f}->{load1:.1f} | EXTIME {row['extime']:.2f} s", flush=True)
        print("    vs REF (max rel): specter " + ", ".join(f"{k} {v:.1e}" for k, v in row["specter_vs_ref"].items())
              + "; jaxspec " + ", ".join(f"{k} {v:.1e}" for k, v in agree_j.items()), flush=True)
    sp.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"blas_threads": args.blas_threads, "specter": sp.hello, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
