"""Tiny simulated frames on disk for the batch, sharding and MPI tests (no shared data needed).

``make_frames(d, n)`` writes a DESI-like PSF (50 fibers, two bundles), ``n`` noisy
preproc images of it and ``jobs.txt`` listing ``IMAGE PSF OUTPUT`` with outputs in
``d/out``.  Extraction options that keep each frame to a second: :data:`CLI_OPTIONS`.
"""

from __future__ import annotations

import os

import numpy as np

from jaxspec import ExtractOptions

NSPEC = 50
WAVE = 5650.0 + 0.8 * np.arange(60)
#: 38 wavelength bins, 4 patches per subbundle: quick to compile and run
WAVELENGTH = (5660.0, 5690.0, 0.8)
CLI_OPTIONS = ["-w", "5660,5690,0.8", "--nwavestep", "20", "--chunk-size", "8"]
EXTRACT_KW = dict(options=ExtractOptions(nwavestep=20, chunk_size=8))


def tiny_psf():
    import jaxspec

    return jaxspec.desi_like_psf(nspec=NSPEC, bundlesize=25, wmin=WAVE[0] - 10, wmax=WAVE[-1] + 10)


def make_frames(d: str | os.PathLike, n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """Write the PSF, ``n`` preproc files and ``jobs.txt`` into ``d``; return the triples."""
    import jaxspec
    from jaxspec._io import frames as _frameio

    d = os.fspath(d)
    os.makedirs(d, exist_ok=True)
    psf = tiny_psf()
    psf_path = os.path.join(d, "psf-r0.fits")
    jaxspec.write_psf(psf_path, psf, overwrite=True)
    jobs = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        flux = 50 + 30 * rng.random((NSPEC, 1)) + 300 * np.exp(-0.5 * ((WAVE - 5675 - i) / 1.0) ** 2)
        image, ivar, _ = jaxspec.simulate(psf, WAVE, flux, readnoise=3.0, seed=seed + i)
        img = os.path.join(d, f"preproc-r0-{i:08d}.fits")
        _frameio.write_preproc(img, np.asarray(image), np.asarray(ivar),
                               header={"CAMERA": "r0", "EXPID": i, "FLAVOR": "science"}, overwrite=True)
        jobs.append((img, psf_path, os.path.join(d, "out", f"frame-r0-{i:08d}.fits")))
    with open(os.path.join(d, "jobs.txt"), "w") as fh:
        fh.write("# image psf output\n")
        fh.writelines(f"{a} {b} {c}\n" for a, b, c in jobs)
    return jobs


def frame_arrays(path) -> dict[str, np.ndarray]:
    """Every image HDU of a frame file (and the header cards that are not checksums)."""
    from astropy.io import fits

    out = {}
    with fits.open(path) as h:
        for hdu in h:
            if hdu.data is not None and hdu.name != "FIBERMAP":
                out[hdu.name] = np.array(hdu.data)
        out["header"] = {k: v for k, v in h[0].header.items() if k not in ("CHECKSUM", "DATASUM")}
    return out


def desispec_vet(path) -> None:
    """desispec's own reader loads the frame with ``vet() == 0`` (required in CI; skipped elsewhere without it)."""
    import importlib

    try:
        dio = importlib.import_module("desispec.io")
    except ImportError:
        if os.environ.get("CI"):
            raise
        return
    fr = dio.read_frame(str(path))
    assert fr.vet() == 0, (path, fr.vet())


def assert_same_frames(a_paths, b_paths, maxulp: int = 0) -> None:
    """Frame files with identical arrays and headers (checksums aside).

    ``maxulp``: allowed float32 ulps (float64 results of different processes can
    round to neighbouring float32 values when their thread counts differ).
    """
    assert len(a_paths) == len(b_paths)
    for pa, pb in zip(a_paths, b_paths):
        desispec_vet(pb)
        fa, fb = frame_arrays(pa), frame_arrays(pb)
        assert fa.keys() == fb.keys(), (pa, pb)
        for k in fa:
            if k == "header":
                assert fa[k] == fb[k], (pa, pb)
            elif maxulp and fa[k].dtype.kind == "f":
                np.testing.assert_array_max_ulp(fa[k], fb[k], maxulp=maxulp)
            elif maxulp and fa[k].dtype.names:  # SCORES: float64 sums of those float32 values
                for col in fa[k].dtype.names:
                    np.testing.assert_allclose(fb[k][col], fa[k][col], rtol=1e-6 * maxulp, err_msg=f"{pa} {k} {col}")
            else:
                np.testing.assert_array_equal(fa[k], fb[k], err_msg=f"{pa} {k}")
