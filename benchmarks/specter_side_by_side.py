"""specter's ex2d and jaxspec.extract on the same case files, timed in turn on one machine.

What it measures: for each case file (by default the two ``shared/reference`` cases of
psf-r0-00067784, 25 fibers x 200 wavelengths each), the wall time of

* specter's ``ex2d`` (desihub/specter, the CPU reference), run the way the case was made:
  NSUB and WAVESIZE from the case header, and the settings the reference README lists
  (bundlesize 25, regularize 0, psferr 0.01, pixpad_frac 0.8, wavepad_frac 0.2, signal
  decorrelation).  It runs in a child process, so its NumPy and BLAS (OpenBLAS, default
  thread count unless ``--blas-threads``) are not touched by jaxspec's own BLAS settings;
* ``jaxspec.extract`` as ``benchmarks/reference_cases.py`` calls it (x64, synchronous CPU
  dispatch, ``block_until_ready``), with the case's NSUB and WAVESIZE.

One untimed-for-the-statistics warm-up call of each comes first (jaxspec's compilation),
then ``--repeat`` rounds alternating specter, jaxspec, so both see the same load.  PSF
reading is outside the timings.  Printed per case: min and median of each, their ratio,
the EXTIME recorded in the case header, the load average before and after, and how far
the two codes' fluxes are apart in pull units, max |f_jaxspec - f_specter| * sqrt(ivar_specter)
(also each code against the case's REF_FLUX).

specter is not a dependency of jaxspec: pass a desihub/specter checkout (its root, its
``py`` folder, or any folder holding the ``specter`` package) with ``--specter``.  If the
given specter's ``ex2d`` lacks one of the settings above, the run goes on without it and
says so: the timing is then not of the configuration the case was made with.  specter
needs numpy, scipy and astropy (and numba in recent versions); ``--specter-python`` runs
it with another interpreter (e.g. a venv with numpy < 2.4, which still has ``np.in1d``).

    python benchmarks/specter_side_by_side.py --specter PATH [--specter-python PY]
        [--shared ../shared] [--repeat 5] [--case FILE ...] [--blas-threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

CASES = ("specter-r0-67784-f000-024.fits", "specter-r0-67784-f100-124.fits")

# How the reference cases were extracted (shared/reference/README.md); NSUB and WAVESIZE
# come from each case's header.
CASE_SETTINGS = dict(bundlesize=25, regularize=0.0, ndecorr=False, psferr=0.01, pixpad_frac=0.8, wavepad_frac=0.2)


def _specter_root(path: str) -> Path:
    """The folder to put on sys.path so that ``import specter`` finds the given checkout."""
    p = Path(path).expanduser().resolve()
    for cand in (p / "py", p, p.parent):
        if (cand / "specter" / "__init__.py").is_file() and (cand / "specter" / "extract").is_dir():
            return cand
    raise FileNotFoundError(
        f"--specter {path}: no specter package there (looked for specter/__init__.py in {p / 'py'}, {p} "
        f"and {p.parent}).  Give a desihub/specter checkout (github.com/desihub/specter; the PyPI "
        "package named 'specter' is unrelated).")


def _read_case(path: Path) -> dict:
    import numpy as np
    from astropy.io import fits

    with fits.open(path) as h:
        hdr = h[0].header
        case = {k: h[k].data.astype(np.float64) for k in ("IMAGE", "IVAR", "WAVELENGTH")}
        for k in ("REF_FLUX", "REF_IVAR"):
            case[k] = h[k].data.astype(np.float64) if k in h else None
        for k in ("PSF", "SPECMIN", "NSPEC", "XMIN", "YMIN", "NSUB", "WAVESIZE", "EXTIME"):
            case[k] = hdr.get(k)
    ny, nx = case["IMAGE"].shape
    case["xyrange"] = (int(case["XMIN"]), int(case["XMIN"]) + nx, int(case["YMIN"]), int(case["YMIN"]) + ny)
    return case


def _psf_path(case: dict, case_path: Path, shared: Path) -> Path:
    name = case["PSF"]
    for cand in (Path(name), shared / "data" / "psf" / name, case_path.parent / name):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"{case_path}: PSF {name} not found (tried {shared / 'data' / 'psf'})")


def _blas_report() -> str:
    """The BLAS thread count this process sees (threadpoolctl if present, else OpenBLAS's C API)."""
    try:
        import threadpoolctl

        info = [f"{d.get('internal_api')} {d.get('num_threads')} threads" for d in threadpoolctl.threadpool_info()
                if d.get("user_api") == "blas"]
        if info:
            return ", ".join(info)
    except ImportError:
        pass
    import ctypes

    seen, out = set(), []
    try:
        libs = [line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()]
    except OSError:
        libs = []
    for lib in libs:
        if lib in seen:
            continue
        seen.add(lib)
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("openblas_get_num_threads", "openblas_get_num_threads64_", "scipy_openblas_get_num_threads64_",
                    "scipy_openblas_get_num_threads"):
            fn = getattr(handle, sym, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                out.append(f"{Path(lib).name} {fn()} threads")
                break
    env = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    return (", ".join(out) or "BLAS thread count unknown") + (f" (env {env})" if env else " (no thread env set)")


# ----------------------------------------------------------------------------------- specter side
def _worker(args: argparse.Namespace) -> None:
    """Child process: one JSON request per stdin line, one JSON reply per stdout line."""
    out = sys.stdout
    sys.stdout = sys.stderr  # whatever specter prints stays off the reply channel
    try:
        sys.path.insert(0, str(_specter_root(args.specter)))
        import numpy as np
        import specter
        from specter.extract import ex2d
        from specter.psf import load_psf
    except Exception as err:  # noqa: BLE001 - any import failure goes back to the parent
        out.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n")
        out.flush()
        return
    accepted = set(inspect.signature(ex2d).parameters)
    kwargs = {k: v for k, v in CASE_SETTINGS.items() if k in accepted}
    missing = sorted(set(CASE_SETTINGS) - accepted)
    out.write(json.dumps({"ready": True, "specter": str(Path(specter.__file__).resolve().parent),
                          "version": getattr(specter, "__version__", "?"), "numpy": np.__version__,
                          "python": sys.executable, "blas": _blas_report(), "missing": missing}) + "\n")
    out.flush()
    psfs, cases = {}, {}
    for line in sys.stdin:
        req = json.loads(line)
        path = Path(req["case"])
        try:
            if path not in cases:
                cases[path] = _read_case(path)
            c = cases[path]
            psf_file = _psf_path(c, path, Path(args.shared))
            if psf_file not in psfs:
                psfs[psf_file] = load_psf(str(psf_file))
            t0 = time.perf_counter()
            flux, ivar, _ = ex2d(c["IMAGE"], c["IVAR"], psfs[psf_file], int(c["SPECMIN"]), int(c["NSPEC"]),
                                 c["WAVELENGTH"], xyrange=c["xyrange"], nsubbundles=int(c["NSUB"]),
                                 wavesize=int(c["WAVESIZE"]), **kwargs)
            reply = {"seconds": time.perf_counter() - t0}
            if req.get("arrays"):
                reply["flux"], reply["ivar"] = np.asarray(flux).tolist(), np.asarray(ivar).tolist()
        except Exception as err:  # noqa: BLE001
            reply = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _SpecterProcess:
    def __init__(self, args: argparse.Namespace):
        env = dict(os.environ)
        if args.blas_threads:
            for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[k] = str(args.blas_threads)
        cmd = [args.specter_python or sys.executable, str(Path(__file__).resolve()), "--worker",
               "--specter", args.specter, "--shared", args.shared]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the specter process exited (its error is above)")
        return json.loads(line)

    def run(self, case: Path, arrays: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"case": str(case), "arrays": arrays}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            sys.stderr.write(reply.get("traceback", "") + "\n")
            hint = ("  (numpy >= 2.4 has no np.in1d, which older specter uses: run specter with "
                    "--specter-python pointing at an interpreter with numpy < 2.4)") if "in1d" in reply["error"] else ""
            raise RuntimeError(f"specter's ex2d failed on {case.name}: {reply['error']}{hint}")
        return reply

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------------- comparison
def _pulls(flux, ref_flux, ref_ivar) -> dict:
    """|flux - ref_flux| * sqrt(ref_ivar): max, 99th percentile, and max away from 10 bins at each end."""
    import numpy as np

    d = np.abs(np.asarray(flux, dtype=float) - ref_flux) * np.sqrt(np.clip(ref_ivar, 0, None))
    inner = d[:, 10:-10] if d.shape[1] > 20 else d
    return {"max": float(d.max()), "p99": float(np.percentile(d, 99)), "max_inner": float(inner.max())}


def _fmt(p: dict) -> str:
    return f"max {p['max']:.3g} (99% {p['p99']:.3g}, away from the ends {p['max_inner']:.3g})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specter", required=True, help="desihub/specter checkout (root, its py/, or a folder holding specter/)")
    ap.add_argument("--specter-python", default=None, help="interpreter for specter (default: this one)")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--repeat", type=int, default=5, help="timed specter/jaxspec rounds per case (after one warm-up)")
    ap.add_argument("--case", action="append", default=None, help="case file of the reference format (repeatable)")
    ap.add_argument("--blas-threads", type=int, default=0, help="BLAS threads for specter (default: the library's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    try:
        _specter_root(args.specter)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    shared = Path(args.shared)
    cases = [Path(c) for c in args.case] if args.case else [shared / "reference" / n for n in CASES]
    for c in cases:
        if not c.is_file():
            sys.exit(f"error: case file {c} not found")

    sp = _SpecterProcess(args)
    if "error" in sp.hello:
        sp.close()
        sys.exit(f"error: specter at {args.specter} is not importable: {sp.hello['error']}")

    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # as in reference_cases.py
    import numpy as np

    import jaxspec

    h = sp.hello
    print(f"jaxspec {Path(jaxspec.__file__).resolve().parent}, jax {jax.__version__}, {jax.devices()[0]}, "
          f"numpy {np.__version__}; {os.cpu_count()} CPUs")
    print(f"specter {h['specter']} (version {h['version']}), numpy {h['numpy']}, python {h['python']}")
    print(f"specter BLAS: {h['blas']}" + ("" if args.blas_threads else " [library default]"))
    print(f"specter settings: {CASE_SETTINGS} + NSUB/WAVESIZE from each header")
    if h["missing"]:
        print(f"WARNING: this specter's ex2d has no {', '.join(h['missing'])}: it runs without them, so it is NOT "
              "the configuration the cases were made with (timings and agreement are of an older ex2d)")
    rows, psfs = [], {}
    for path in cases:
        c = _read_case(path)
        psf_file = _psf_path(c, path, shared)
        if psf_file not in psfs:
            psfs[psf_file] = jaxspec.read_psf(psf_file)
        opts = jaxspec.ExtractOptions(nsubbundles=int(c["NSUB"]), nwavestep=int(c["WAVESIZE"]))

        def run_jax():
            t0 = time.perf_counter()
            ex = jaxspec.extract(c["IMAGE"], c["IVAR"], psfs[psf_file], c["WAVELENGTH"], specmin=int(c["SPECMIN"]),
                                 nspec=int(c["NSPEC"]), xyrange=c["xyrange"], options=opts)
            jax.block_until_ready(ex.flux)
            return time.perf_counter() - t0, ex

        load0 = os.getloadavg()
        first_s = sp.run(path, arrays=True)
        first_j, ex = run_jax()
        ts, tj = [], []
        for _ in range(args.repeat):
            ts.append(sp.run(path)["seconds"])
            tj.append(run_jax()[0])
        load1 = os.getloadavg()
        fs, ivs = np.asarray(first_s["flux"]), np.asarray(first_s["ivar"])
        fj = np.asarray(ex.flux)
        row = {"case": str(path), "extime": c["EXTIME"], "load_before": load0, "load_after": load1,
               "specter_first": first_s["seconds"], "jaxspec_first": first_j, "specter_times": ts, "jaxspec_times": tj,
               "jax_vs_specter": _pulls(fj, fs, ivs)}
        if c["REF_FLUX"] is not None:
            row["specter_vs_ref"] = _pulls(fs, c["REF_FLUX"], c["REF_IVAR"])
            row["jaxspec_vs_ref"] = _pulls(fj, c["REF_FLUX"], c["REF_IVAR"])
        rows.append(row)
        s_min, s_med = (min(ts), statistics.median(ts)) if ts else (first_s["seconds"],) * 2
        j_min, j_med = (min(tj), statistics.median(tj)) if tj else (first_j,) * 2
        ext = f"{c['EXTIME']:.2f} s" if c["EXTIME"] is not None else "n/a"
        print(f"\n{path.name}  (load average {load0[0]:.2f} -> {load1[0]:.2f}; {args.repeat} rounds)")
        print(f"  specter : min {s_min:.3f} s  median {s_med:.3f} s  (first {first_s['seconds']:.3f} s)")
        print(f"  jaxspec : min {j_min:.3f} s  median {j_med:.3f} s  (first, with compilation, {first_j:.2f} s)")
        print(f"  ratio specter/jaxspec: {s_min / j_min:.1f}x (min/min), {s_med / j_med:.1f}x (median/median); "
              f"EXTIME recorded {ext}")
        print(f"  |f_jaxspec - f_specter| sqrt(ivar_specter): {_fmt(row['jax_vs_specter'])}")
        if "specter_vs_ref" in row:
            print(f"  vs the case's REF_FLUX (pulls): specter {_fmt(row['specter_vs_ref'])}")
            print(f"                                  jaxspec {_fmt(row['jaxspec_vs_ref'])}")
    sp.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"specter": h, "blas_threads": args.blas_threads,
                                               "settings": CASE_SETTINGS, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
