"""Run in a fresh process: one-device vs sharded extraction on simulated CPU devices.

    python tests/_shard_worker.py NDEV CHUNK [NDEV2 ...]

JAX must start with ``NDEV`` CPU devices, so this runs as a subprocess of the test
(set ``PJRT_NPROC`` >= 2 NDEV: see :func:`jaxspec._pipeline.devices._check_cpu_pool`).
Prints one JSON line: per device count, the largest relative difference of every
output to the one-device result, and the device count JAX saw.
"""

import json
import os
import sys

import jax

ndev = int(sys.argv[1])
chunk = int(sys.argv[2])
counts = [int(v) for v in sys.argv[3:]] or [ndev]
jax.config.update("jax_num_cpu_devices", ndev)
jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for _frames
import _frames  # noqa: E402

import jaxspec  # noqa: E402
from jaxspec._pipeline.devices import extract_sharded  # noqa: E402

psf = _frames.tiny_psf()
rng = np.random.default_rng(11)
flux = 50 + 30 * rng.random((_frames.NSPEC, 1)) + 500 * np.exp(-0.5 * ((_frames.WAVE - 5672) / 1.0) ** 2)
image, ivar, _ = jaxspec.simulate(psf, _frames.WAVE, flux, readnoise=3.0, seed=4)
wave = np.arange(*_frames.WAVELENGTH[:2], _frames.WAVELENGTH[2])
kw = dict(nspec=_frames.NSPEC, options=jaxspec.ExtractOptions(nwavestep=20, chunk_size=chunk, decorrelate="signal"))
geom = jaxspec.patch_geometry(psf, wave, 0, _frames.NSPEC, nwavestep=20)
ref = jaxspec.extract(image, ivar, psf, wave, **kw)
names = ("flux", "ivar", "resolution", "xflux", "chi2pix", "pixmask_fraction")
out = dict(devices=len(jax.devices()), npatch=int(geom.npatch), chunk=chunk, results={})
for n in counts:
    ex = extract_sharded(image, ivar, psf, wave, devices=jax.devices()[:n], **kw)
    rel = {}
    for k in names:
        a, b = np.asarray(getattr(ref, k)), np.asarray(getattr(ex, k))
        rel[k] = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-300))
    rel["finite"] = bool(np.all(np.isfinite(np.asarray(ex.flux))))
    rel["device"] = str(ex.flux.devices())
    out["results"][str(n)] = rel
print(json.dumps(out))
