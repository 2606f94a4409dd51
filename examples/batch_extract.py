"""Extract a directory of preproc frames with one PSF per camera, resuming where a previous run stopped.

Usage::

    python examples/batch_extract.py PREPROC_DIR PSF_DIR OUT_DIR [--pattern 'preproc-*.fits']
    mpirun -n 4 python examples/batch_extract.py PREPROC_DIR PSF_DIR OUT_DIR      # 4 ranks

Every ``preproc-CAM-EXPID.fits`` (e.g. ``preproc-r0-00012345.fits``) is extracted with
``PSF_DIR/psf-CAM.fits`` into ``OUT_DIR/frame-CAM-EXPID.fits``.  Frames whose output
exists are skipped, so running the script again after it was killed finishes the job;
a frame that fails is reported and the others go on.

The command line does the same with one PSF per exposure::

    jaxspec extract-batch --glob 'PREPROC_DIR/preproc-*.fits' \
        --psf 'PSF_DIR/psf-{tag}.fits' --output 'OUT_DIR/frame-{tag}.fits'

Its templates know the fields ``{dir}``, ``{name}``, ``{stem}`` and ``{tag}`` of each input
(``PREPROC_DIR/preproc-r0-00012345.fits``: dir ``PREPROC_DIR``, name
``preproc-r0-00012345.fits``, stem ``preproc-r0-00012345``, tag ``r0-00012345``) and no
camera field: that is why this script takes the camera (``r0``) from the file name itself,
in Python, to share one PSF per camera.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)  # a script may set JAX's config; the library never does

import jaxspec  # noqa: E402



def jobs_for(preproc_dir: str, psf_dir: str, out_dir: str, pattern: str) -> list[jaxspec.FrameJob]:
    jobs = []
    for image in sorted(glob.glob(os.path.join(preproc_dir, pattern))):
        tag = os.path.basename(image).removeprefix("preproc-").removesuffix(".fits")  # 'r0-00012345'
        camera = tag.split("-")[0]
        jobs.append(jaxspec.FrameJob(image, os.path.join(psf_dir, f"psf-{camera}.fits"),
                                    os.path.join(out_dir, f"frame-{tag}.fits")))
    return jobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preproc_dir")
    ap.add_argument("psf_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--pattern", default="preproc-*.fits", help="preproc file names (default preproc-*.fits)")
    ap.add_argument("--wavelength", default=None, help="wmin,wmax,dw (default: each PSF's range at 0.8 A)")
    args = ap.parse_args()

    world = jaxspec.world("auto")  # MPI ranks when started by mpirun/srun
    jaxspec.bind_gpus(world)  # before JAX starts: this rank's GPUs
    jobs = jobs_for(args.preproc_dir, args.psf_dir, args.out_dir, args.pattern) if world.root else None
    if world.root and not jobs:
        print(f"no {args.pattern} in {args.preproc_dir}", file=sys.stderr)
        return 2 if world.serial else world.comm.Abort(2)
    wl = tuple(float(v) for v in args.wavelength.split(",")) if args.wavelength else None
    summary = jaxspec.run_batch(jobs, jaxspec.FrameOptions(wavelength=wl), world=world)
    if world.root:
        print(summary.text())
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
