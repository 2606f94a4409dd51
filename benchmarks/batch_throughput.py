"""Frames per GPU-hour of ``jaxspec extract-batch``: IO overlapped vs serial, one process vs several.

Makes ``--frames`` simulated preproc files (one noiseless model, a different noise
draw per frame) and a job list in ``--workdir``, then times

* ``serial``: :func:`jaxspec._pipeline.batch.run_batch` in this process, read -> extract ->
  write one frame after another (``--no-overlap``);
* ``overlap``: the same with reading and writing in threads beside the extraction;
* ``mpirun-K`` for each K of ``--ranks``: ``mpirun -n K jaxspec extract-batch`` in
  fresh processes, all sharing the device(s) this machine has (each rank gets
  ``XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / K`` when K ranks share one GPU).

Compilation is kept out of the numbers: the in-process modes run after a warm-up
frame, and the mpirun modes use a persistent compilation cache filled by a warm-up
run (``--cache``); their time is the batch's own (``run_batch`` seconds, after
JAX has started).  Prints seconds, frames per hour and frames per GPU-hour (frames
per hour divided by the GPUs used; on a CPU the same number per CPU "device").

Sizes (``--size``):

* ``tiny``: 50 fibers x 38 bins of a DESI-like PSF (seconds on a CPU; for tests);
* ``small``: 100 fibers x 250 bins of a DESI-like PSF;
* ``full``: a full r-camera frame, 500 fibers x 2326 bins through
  ``psf-r0-00067784.fits`` (``--psf``), the whole 4k x 4k CCD (a GPU job; ~200 MB
  per preproc file).

Examples::

    python benchmarks/batch_throughput.py --size tiny --frames 4 --ranks 2      # CPU smoke test
    python benchmarks/batch_throughput.py --size full --frames 10 --ranks 2,4   # one H100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve()
_PSF_CANDIDATES = [
    _HERE.parents[1] / ".devdata" / "psf-r0-00067784.fits",
    _HERE.parents[2] / "shared" / "data" / "psf" / "psf-r0-00067784.fits",
]
SIZES = {
    "tiny": dict(nspec=50, wave=(5660.0, 5690.0, 0.8), nwavestep=20, chunk_size=8),
    "small": dict(nspec=100, wave=(5600.0, 5799.2, 0.8), nwavestep=50, chunk_size=None),
    "full": dict(nspec=500, wave=(5760.0, 7620.0, 0.8), nwavestep=50, chunk_size=None),
}


def _default_psf() -> str:
    return str(next((p for p in _PSF_CANDIDATES if p.exists()), _PSF_CANDIDATES[-1]))


def make_frames(workdir: Path, size: str, nframes: int, psf_file: str | None) -> tuple[Path, dict]:
    """Write the PSF, ``nframes`` preproc files and ``jobs.txt``; return (list path, size spec)."""
    import numpy as np

    import jaxspec
    from jaxspec._io import frames as _frameio

    spec = SIZES[size]
    wmin, wmax, dw = spec["wave"]
    wave = wmin + dw * np.arange(int(round((wmax - wmin) / dw)) + 1)
    nspec = spec["nspec"]
    if size == "full":
        psf_path = Path(psf_file or _default_psf())
        if not psf_path.exists():
            raise SystemExit(f"--psf {psf_path}: no such file (a DESI GaussHermite PSF for --size full)")
        psf = jaxspec.read_psf(psf_path)
        xyrange = None
    else:
        psf = jaxspec.desi_like_psf(nspec=nspec, wmin=wave[0] - 10, wmax=wave[-1] + 10)
        psf_path = workdir / "psf.fits"
        jaxspec.write_psf(psf_path, psf, overwrite=True)
        xyrange = None
    rng = np.random.default_rng(0)
    flux = 50.0 + 30.0 * rng.random((nspec, 1)) * np.ones((1, len(wave)))
    for k in rng.integers(0, len(wave), size=max(3, len(wave) // 60)):
        flux[:, k] += 2000.0 * rng.random(nspec)
    t0 = time.perf_counter()
    model = np.asarray(jaxspec.project(psf, wave, flux * np.gradient(wave), specmin=0, xyrange=xyrange))
    pos = np.clip(model, 0.0, None)
    ivar = 1.0 / (pos + 9.0)
    lines = []
    for i in range(nframes):
        r = np.random.default_rng(100 + i)
        image = r.poisson(pos).astype(np.float64) + r.normal(0.0, 3.0, pos.shape)
        path = workdir / f"preproc-r0-{i:08d}.fits"
        _frameio.write_preproc(path, image, ivar, header={"CAMERA": "r0", "EXPID": i}, overwrite=True)
        lines.append(f"{path} {psf_path} {workdir / 'OUT' / f'frame-r0-{i:08d}.fits'}")
    (workdir / "jobs.txt").write_text("\n".join(lines) + "\n")
    print(f"made {nframes} frames of {nspec} fibers x {len(wave)} bins, image {model.shape}, "
          f"in {time.perf_counter() - t0:.1f} s")
    return workdir / "jobs.txt", dict(spec, nwave=len(wave), psf=str(psf_path))


def _jobs(list_path: Path, sub: str):
    from jaxspec._pipeline import batch as _batch

    return [_batch.FrameJob(j.image, j.psf, j.output.replace("/OUT/", f"/{sub}/"))
            for j in _batch.read_job_list(list_path)]


def _opts(spec):
    import jaxspec

    return jaxspec.FrameOptions(wavelength=spec["wave"], nspec=spec["nspec"],
                                extraction=jaxspec.ExtractOptions(nwavestep=spec["nwavestep"],
                                                                  chunk_size=spec["chunk_size"]))


def _cli_options(spec) -> list[str]:
    w = ",".join(str(v) for v in spec["wave"])
    out = ["-w", w, "-n", str(spec["nspec"]), "--nwavestep", str(spec["nwavestep"])]
    if spec["chunk_size"]:
        out += ["--chunk-size", str(spec["chunk_size"])]
    return out


def _gpus_used() -> int:
    import jax

    devs = jax.local_devices()
    return len(devs) if devs[0].platform != "cpu" else 1


def run_inprocess(list_path: Path, spec: dict, overlap: bool, tag: str) -> dict:
    from jaxspec._pipeline import batch as _batch

    jobs = _jobs(list_path, tag)
    s = _batch.run_batch(jobs, _opts(spec), overlap=overlap)
    if s.failed:
        raise SystemExit(f"{tag}: {s.failed} frame(s) failed: {s.failures()[:3]}")
    recs = s.records
    return dict(mode=tag, ranks=1, overlap=overlap, frames=s.done, seconds=s.seconds,
                read_s=sum(r["read_s"] for r in recs) / len(recs),
                compute_s=sum(r["compute_s"] for r in recs) / len(recs),
                write_s=sum(r["write_s"] for r in recs) / len(recs))


def run_mpirun(list_path: Path, spec: dict, ranks: int, tag: str, cache: Path, device: str | None,
               overlap: bool = True) -> dict:
    mpirun = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
    jobs = _jobs(list_path, tag)
    lst = list_path.parent / f"jobs-{tag}.txt"
    lst.write_text("".join(f"{j.image} {j.psf} {j.output}\n" for j in jobs))
    summary = list_path.parent / f"summary-{tag}.json"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [mpirun, "-n", str(ranks), "--bind-to", "none", sys.executable, "-m", "jaxspec._cli.main", "extract-batch",
           str(lst), *_cli_options(spec), "--quiet", "--loglevel", "WARNING", "--summary-json", str(summary)]
    if device:
        cmd += ["--device", device]
    if not overlap:
        cmd.append("--no-overlap")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{tag}: mpirun failed ({res.returncode}):\n{res.stderr[-3000:]}")
    s = json.loads(summary.read_text())
    recs = s["records"]
    return dict(mode=tag, ranks=ranks, overlap=overlap, frames=s["done"], seconds=s["seconds"], wall_s=wall,
                read_s=sum(r["read_s"] for r in recs) / len(recs),
                compute_s=sum(r["compute_s"] for r in recs) / len(recs),
                write_s=sum(r["write_s"] for r in recs) / len(recs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=10, help="frames in the batch (default 10)")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny", help="frame size (default tiny)")
    ap.add_argument("--psf", default=None, help="PSF file for --size full (default psf-r0-00067784.fits)")
    ap.add_argument("--ranks", default="", help="comma-separated rank counts for mpirun runs, e.g. 2,4")
    ap.add_argument("--modes", default="serial,overlap", help="in-process modes: serial, overlap (default both)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default=None, help="--device for the mpirun runs")
    ap.add_argument("--workdir", default=None, help="where the frames go (default: a temporary folder)")
    ap.add_argument("--cache", default=None, help="persistent compilation cache folder (default: in workdir)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="jaxspec-batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache or work / "jax-cache")
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}) x {len(jax.local_devices())}, jax {jax.__version__}")
    list_path, spec = make_frames(work, args.size, args.frames, args.psf)
    ngpu = _gpus_used()

    rows = []
    modes = [m for m in args.modes.split(",") if m]
    if modes:  # warm-up: compile on one frame
        from jaxspec._pipeline import batch as _batch

        warm = _jobs(list_path, "WARM")[:1]
        t0 = time.perf_counter()
        _batch.run_batch(warm, _opts(spec), overlap=False)
        print(f"warm-up (compile + 1 frame): {time.perf_counter() - t0:.1f} s")
    for m in modes:
        if m not in ("serial", "overlap"):
            raise SystemExit(f"--modes: unknown mode {m!r}")
        rows.append(run_inprocess(list_path, spec, overlap=(m == "overlap"), tag=m))
    ranks = [int(v) for v in args.ranks.split(",") if v]
    if ranks:
        run_mpirun(list_path, spec, 1, "cachewarm", cache, args.device)  # fills the compilation cache
        for k in ranks:
            rows.append(run_mpirun(list_path, spec, k, f"mpirun-{k}", cache, args.device))

    print(f"\n{args.frames} frames of {spec['nspec']} fibers x {spec['nwave']} bins on {ngpu} "
          f"{'GPU' if dev.platform != 'cpu' else 'CPU device'}(s)")
    print(f"{'mode':12s} {'ranks':>5s} {'overlap':>7s} {'s':>8s} {'frames/h':>9s} {'frames/GPU-h':>13s} "
          f"{'read s':>7s} {'extract s':>9s} {'write s':>8s}  (per frame, mean)")
    for r in rows:
        r["frames_per_hour"] = 3600.0 * r["frames"] / r["seconds"]
        r["frames_per_gpu_hour"] = r["frames_per_hour"] / ngpu
        print(f"{r['mode']:12s} {r['ranks']:5d} {str(r['overlap']):>7s} {r['seconds']:8.2f} "
              f"{r['frames_per_hour']:9.0f} {r['frames_per_gpu_hour']:13.0f} {r['read_s']:7.2f} "
              f"{r['compute_s']:9.2f} {r['write_s']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=str(dev.device_kind), size=args.size, spec=spec,
                                                   gpus=ngpu, rows=rows), indent=1, default=str))


if __name__ == "__main__":
    main()
