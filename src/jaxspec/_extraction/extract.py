"""Extraction of a (sub-)image: geometry, projection, batched solve, stitching.

``extract`` cuts the requested fibers x wavelengths into patches on the host
(:mod:`jaxspec._extraction.geometry`), then runs every patch through one jit-compiled,
vmapped function (spots -> normal equations -> Cholesky solve -> decorrelation ->
diagnostics) in chunks of patches, and stitches the patch centres into the output
arrays on the device.  The compiled function depends only on static shapes, so a
second frame of the same shape does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .geometry import PatchGeometry, patch_geometry
from .options import ExtractOptions
from .patch import _kernel_psf, _patch_inputs, _round_up, _solve_chunk, _Static, blas_threads, default_chunk_size
from ..psf import PSF


class Extraction(eqx.Module):
    """Extracted spectra of fibers ``specmin .. specmin + nspec - 1``.

    Attributes:
        wave: (nwave,) wavelength grid [A].
        flux: (nspec, nwave) decorrelated flux [photons / A].
        ivar: (nspec, nwave) inverse variance of ``flux`` [(photons / A)^-2]; 0 where
            no unmasked pixel constrains the bin.
        resolution: (nspec, 2 ndiag + 1, nwave) resolution-matrix diagonals, DESI
            convention (row d holds offset ndiag - d).
        xflux: (nspec, nwave) undecorrelated (deconvolved) flux [photons / A].
        chi2pix: (nspec, nwave) reduced chi2 of the pixels each bin touches.
        pixmask_fraction: (nspec, nwave) fraction of each bin's spot on masked pixels.
        model: model image (same shape as the input image) or None.
        specmin: first fiber.
    """

    wave: Float[Array, " nwave"]
    flux: Float[Array, "nspec nwave"]
    ivar: Float[Array, "nspec nwave"]
    resolution: Float[Array, "nspec ndiag2 nwave"]
    xflux: Float[Array, "nspec nwave"]
    chi2pix: Float[Array, "nspec nwave"]
    pixmask_fraction: Float[Array, "nspec nwave"]
    model: Float[Array, "ny nx"] | None
    specmin: int = eqx.field(static=True)

    @property
    def nspec(self) -> int:
        """Number of fibers."""
        return int(self.flux.shape[0])


def _canvas(image, ivar, xyrange, geom: PatchGeometry, psf: PSF):
    """Place the (sub-)image on a zero-padded canvas that holds every margin box."""
    ny, nx = psf.stamp_shape
    nby, nbx = geom.box_shape
    box = geom.box
    ih, iw = image.shape
    if xyrange is None:
        xyrange = (0, iw, 0, ih)
    xmin, xmax, ymin, ymax = (int(v) for v in xyrange)
    if (ymax - ymin, xmax - xmin) != (ih, iw):
        raise ValueError(
            f"xyrange {xyrange} describes a {ymax - ymin} x {xmax - xmin} image but image is {ih} x {iw}"
        )
    oy = min(ymin, int(box[:, 2].min())) - ny
    ox = min(xmin, int(box[:, 0].min())) - nx
    hy = max(ymax, int(box[:, 2].max()) + nby) + 2 * ny - oy
    hx = max(xmax, int(box[:, 0].max()) + nbx) + 2 * nx - ox
    img, ivr = _place(image, ivar, (hy, hx), ymin - oy, xmin - ox)
    return img, ivr, (oy, ox)


@functools.partial(jax.jit, static_argnums=(2,))
def _place(image, ivar, shape, y0, x0):
    """Zero canvas of ``shape`` with the finite, positive-ivar pixels at (y0, x0)."""
    good = jnp.isfinite(image) & jnp.isfinite(ivar) & (ivar > 0)
    zero = jnp.zeros(shape, image.dtype)
    img = jax.lax.dynamic_update_slice(zero, jnp.where(good, image, 0.0), (y0, x0))
    ivr = jax.lax.dynamic_update_slice(zero, jnp.where(good, ivar, 0.0), (y0, x0))
    return img, ivr


def _as_array(a):
    """A JAX array of ``a`` (NumPy arrays of any byte order, e.g. from FITS, converted)."""
    if isinstance(a, np.ndarray) or not hasattr(a, "dtype"):
        a = np.asarray(a)
        a = a.astype(a.dtype.newbyteorder("="), copy=False) if a.dtype.byteorder not in ("=", "|") else a
    return jnp.asarray(a)


_OLD_KEYWORDS = {
    "bundlesize": "bundlesize", "nsubbundles": "nsubbundles", "wavesize": "nwavestep", "nwavestep": "nwavestep",
    "wavepad_frac": "wavepad_frac", "pixpad_frac": "pixpad_frac", "regularize": "regularize",
    "decorrelate": "decorrelate", "psferr": "psferr", "minweight_frac": "minweight_frac",
    "chunk_size": "chunk_size",
}


def _resolve_options(options: ExtractOptions | None, old: dict, where: str) -> ExtractOptions:
    """``options``, or one made from the keywords of the previous release (with a DeprecationWarning)."""
    unknown = sorted(set(old) - set(_OLD_KEYWORDS))
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {unknown}")
    options = ExtractOptions() if options is None else options
    if not isinstance(options, ExtractOptions):
        raise TypeError(f"{where}(options=...) must be an ExtractOptions, not {type(options).__name__}")
    if old:
        fields = {_OLD_KEYWORDS[k]: v for k, v in old.items()}
        warnings.warn(
            f"{where}({', '.join(f'{k}=' for k in old)}) is deprecated and will be removed in the next release; "
            f"pass options=jaxspec.ExtractOptions({', '.join(f'{k}=...' for k in fields)})",
            DeprecationWarning, stacklevel=3)
        options = dataclasses.replace(options, **fields)
    return options


def extract(
    image: Float[ArrayLike, "ny nx"],
    ivar: Float[ArrayLike, "ny nx"],
    psf: PSF,
    wave: Float[ArrayLike, " nwave"],
    *,
    specmin: int = 0,
    nspec: int = 25,
    xyrange: tuple[int, int, int, int] | None = None,
    options: ExtractOptions | None = None,
    model: bool = False,
    geometry: PatchGeometry | None = None,
    progress: Callable[[int, int], None] | None = None,
    solve_chunk: Callable | None = None,
    **deprecated,
) -> Extraction:
    """Spectro-perfectionism extraction of fibers ``specmin .. specmin+nspec-1``.

    Args:
        image: (ny, nx) pixel values [electrons]; a sub-image of the CCD when
            ``xyrange`` is given.
        ivar: (ny, nx) pixel inverse variances [electrons^-2]; 0 marks bad pixels.
        psf: the PSF model.
        wave: (nwave,) linear wavelength grid [A].
        specmin: first fiber to extract.
        nspec: number of fibers to extract.
        xyrange: ``(xmin, xmax, ymin, ymax)``: where ``image[0, 0]`` sits on the
            CCD (pixel (xmin, ymin)); None for a full-CCD image.
        options: how patches are cut and solved (:class:`ExtractOptions`; DESI's
            defaults when None).
        model: also return the model image ``A xflux``.
        geometry: the patch geometry of exactly these ``psf``, ``wave``, fibers and
            options, when the caller keeps one (e.g. a cache per PSF file); None
            cuts it here.
        progress: optional callback ``progress(done, total)`` after each chunk.
        solve_chunk: replacement for the compiled chunk solver (e.g. sharded over
            devices, see :mod:`jaxspec._pipeline.devices`).
        **deprecated: the previous release's keywords (``bundlesize``,
            ``nsubbundles``, ``wavesize``, ``wavepad_frac``, ``pixpad_frac``,
            ``regularize``, ``decorrelate``, ``psferr``, ``minweight_frac``,
            ``chunk_size``), accepted with a DeprecationWarning.

    Returns:
        An :class:`Extraction` of fibers ``specmin .. specmin + nspec - 1`` on ``wave``.

    Raises:
        OptionError: a bad option (a ValueError naming the field).
        ValueError: image and ivar of different shapes, fibers or wavelengths
            outside the PSF.

    Example:
        ```python
        import jax
        jax.config.update("jax_enable_x64", True)
        import numpy as np, jaxspec

        wave = 5650.0 + 0.8 * np.arange(100)
        psf = jaxspec.desi_like_psf(nspec=25, wmin=wave[0] - 10, wmax=wave[-1] + 10)
        image, ivar, _ = jaxspec.simulate(psf, wave, np.full((25, 100), 100.0))
        ex = jaxspec.extract(image, ivar, psf, wave, nspec=25,
                             options=jaxspec.ExtractOptions(nwavestep=40))
        ex.flux.shape   # (25, 100), electrons / A
        ```
    """
    options = _resolve_options(options, deprecated, "extract")
    image = _as_array(image)
    ivar = _as_array(ivar)
    if image.ndim != 2 or image.shape != ivar.shape:
        raise ValueError(f"image {image.shape} and ivar {ivar.shape} must be 2D arrays of one shape")
    if geometry is None:
        geometry = patch_geometry_for(psf, wave, specmin, nspec, options)
    return extract_patches(image, ivar, psf, geometry, xyrange=xyrange, options=options, model=model,
                           progress=progress, solve_chunk=solve_chunk)


def patch_geometry_for(psf: PSF, wave, specmin: int, nspec: int, options: ExtractOptions) -> PatchGeometry:
    """:func:`patch_geometry` of fibers ``specmin..specmin+nspec-1`` x ``wave`` with ``options``' sizes."""
    return patch_geometry(
        psf, np.asarray(wave, dtype=float), specmin, nspec, options.bundlesize, options.nsubbundles,
        options.nwavestep, options.wavepad_frac, options.pixpad_frac,
    )


def extract_patches(
    image: Float[ArrayLike, "ny nx"],
    ivar: Float[ArrayLike, "ny nx"],
    psf: PSF,
    geom: PatchGeometry,
    *,
    xyrange: tuple[int, int, int, int] | None = None,
    options: ExtractOptions | None = None,
    model: bool = False,
    progress: Callable[[int, int], None] | None = None,
    solve_chunk: Callable | None = None,
    **deprecated,
) -> Extraction:
    """Extract with a fixed patch geometry (see :func:`extract` for the arguments).

    :func:`extract` computes ``geom = patch_geometry(psf, wave, ...)`` on the host
    and calls this; call it directly to reuse one geometry for many images, or to
    differentiate with respect to the PSF's parameters (the geometry's integer
    boxes stay fixed while the spots move).  Only the solve options of ``options``
    are used here (``regularize``, ``decorrelate``, ``psferr``, ``minweight_frac``,
    ``chunk_size``); the patch sizes are the geometry's.

    Args:
        image: (ny, nx) pixel values [electrons].
        ivar: (ny, nx) pixel inverse variances.
        psf: the PSF model.
        geom: patches from :func:`patch_geometry`.
        xyrange: where the image sits on the CCD, as in :func:`extract`.
        options: the solve options (:class:`ExtractOptions`).
        model: also return the model image.
        progress: callback ``progress(done, total)``.
        solve_chunk: replacement for the compiled chunk solver (same signature as
            ``_solve_chunk``), e.g. one sharded over several devices.
        **deprecated: ``regularize``, ``decorrelate``, ``psferr``,
            ``minweight_frac``, ``chunk_size`` as in the previous release.

    Returns:
        An :class:`Extraction`.

    Example:
        >>> geom = jaxspec.patch_geometry(psf, wave, 0, 25)
        >>> grad = jax.grad(lambda p: extract_patches(image, ivar, p, geom).flux.sum())(psf)
    """
    options = _resolve_options(options, deprecated, "extract_patches")
    regularize, decorrelate = options.regularize, options.decorrelate
    psferr, minweight_frac, chunk_size = options.psferr, options.minweight_frac, options.chunk_size
    solve_chunk = _solve_chunk if solve_chunk is None else solve_chunk
    ny, nx = psf.stamp_shape
    psferr = psf.psferr if psferr is None else float(psferr)
    canvas_img, canvas_ivar, origin = _canvas(image, ivar, xyrange, geom, psf)
    nbin = _round_up(geom.nbin, 4)
    static = _Static(
        nfiber=geom.nfiber,
        nbin=nbin,
        box=(_round_up(geom.box_shape[0], 8) + 2 * ny, _round_up(geom.box_shape[1], 8) + 2 * nx),
        band=geom.band,
        fiber_band=geom.fiber_band if geom.fiber_band >= 0 else geom.nfiber - 1,
        ndiag=geom.ndiag,
        decorrelate=decorrelate,
        nkeep=max(1, int((geom.out_fiber >= 0).sum(axis=1).max())),
        offset_steps=_platform(canvas_img) == "cpu",
    )
    # keep every margin box inside the canvas (a fixed pad: two frames whose static
    # shapes agree get canvases of one shape, so they share the compiled program)
    canvas_img, canvas_ivar = _pad_canvas(canvas_img, canvas_ivar, static.box)
    inputs = _patch_inputs(geom, origin, (ny, nx), nbin)

    npatch = geom.npatch
    chunk = min(chunk_size or default_chunk_size(), npatch)
    nchunk = -(-npatch // chunk)
    # the same number of calls with chunks just big enough: the last one wraps around
    # by fewer than 8 patches instead of up to a whole chunk
    chunk = min(chunk, _round_up(-(-npatch // nchunk), 8))
    nchunk = -(-npatch // chunk)
    dtype = canvas_img.dtype
    nwave = len(geom.wave)
    nout = geom.nspec * nwave
    out = {
        name: jnp.zeros((nout,), dtype)
        for name in ("flux", "ivar", "xflux", "chi2pix", "pixmask_fraction")
    }
    out["resolution"] = jnp.zeros((2 * geom.ndiag + 1, nout), dtype)
    # every chunk's inputs and output indices, sent to the device once; the last chunk
    # wraps around to the first patches (same shape) and drops their results
    sel = np.arange(nchunk * chunk) % npatch
    stacked = {k: jnp.asarray(v[sel].reshape((nchunk, chunk) + v.shape[1:])) for k, v in inputs.items()}
    places = {k: jnp.asarray(v[sel].reshape((nchunk, chunk) + v.shape[1:])) for k, v in _stitch_places(geom).items()}
    places["real"] = jnp.asarray((np.arange(nchunk * chunk) < npatch).reshape(nchunk, chunk))

    if progress is not None:
        progress(0, npatch)
    kpsf = _kernel_psf(psf)  # one compiled program for every exposure's PSF of a camera
    # CPU: one BLAS thread while the chunks run (XLA's threads have the cores), restored
    # once they are done
    with blas_threads(1 if static.offset_steps else None):
        for c in range(nchunk):
            chunk_inputs, where = _take_chunk(stacked, places, c)
            res = solve_chunk(kpsf, canvas_img, canvas_ivar, chunk_inputs, regularize, minweight_frac, psferr, static)
            out = _stitch(out, res, where, nwave)
            if progress is not None:
                progress(min((c + 1) * chunk, npatch), npatch)
        if static.offset_steps:
            _wait(out)

    shape = (geom.nspec, nwave)
    dw = np.gradient(geom.wave)[None, :]
    flux = out["flux"].reshape(shape) / dw
    ivar_out = out["ivar"].reshape(shape) * dw**2
    xflux = out["xflux"].reshape(shape) / dw
    resolution = out["resolution"].reshape(2 * geom.ndiag + 1, *shape).transpose(1, 0, 2)
    model_img = None
    if model:
        from .._simulation.project import project

        model_img = project(psf, geom.wave, xflux * dw, specmin=geom.specmin, xyrange=xyrange if xyrange is not None else (0, image.shape[1], 0, image.shape[0]))
    return Extraction(
        wave=jnp.asarray(geom.wave),
        flux=flux,
        ivar=ivar_out,
        resolution=resolution,
        xflux=xflux,
        chi2pix=out["chi2pix"].reshape(shape),
        pixmask_fraction=out["pixmask_fraction"].reshape(shape),
        model=model_img,
        specmin=geom.specmin,
    )


@functools.partial(jax.jit, static_argnums=(2,))
def _pad_canvas(img, ivr, box):
    """Room for every margin box past the canvas's far edges."""
    pad = ((0, box[0]), (0, box[1]))
    return jnp.pad(img, pad), jnp.pad(ivr, pad)


@jax.jit
def _take_chunk(stacked: dict, places: dict, c):
    """Chunk ``c`` of the stacked per-patch inputs and of their places in the outputs."""
    return {k: v[c] for k, v in stacked.items()}, {k: v[c] for k, v in places.items()}


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _stitch(out: dict, res: dict, where: dict, nwave: int):
    """Scatter one chunk's patch results into the flat outputs (one compiled call).

    The flat output index of every unknown is computed here from the chunk's few
    per-patch numbers (:func:`_stitch_places`; ``real`` False for the patches that only
    fill the last chunk, whose results are dropped), not sent from the host.
    """
    nout = out["flux"].shape[0]
    nbin = res["flux"].shape[-1]
    local = jnp.arange(nbin, dtype=jnp.int32)[None, None, :] - where["keep_lo"][:, None, None]
    fiber = where["out_fiber"][:, :, None]
    kept = (local >= 0) & (local < where["keep_n"][:, None, None]) & (fiber >= 0) & where["real"][:, None, None]
    tgt = jnp.where(kept, fiber * nwave + where["out_wave"][:, None, None] + local, nout).reshape(-1)
    new = {}
    for name, arr in out.items():
        if name == "resolution":
            vals = jnp.moveaxis(res[name], 2, 0).reshape(arr.shape[0], -1)
            new[name] = arr.at[:, tgt].set(vals, mode="drop")
        else:
            new[name] = arr.at[tgt].set(res[name].reshape(-1), mode="drop")
    return new


def _wait(tree) -> None:
    """Wait for the arrays of ``tree`` (not tracers: under jit or grad there is nothing to wait for)."""
    tracer = getattr(jax.core, "Tracer", None) or jax._src.core.Tracer  # public in jax 0.10, moving
    jax.block_until_ready([x for x in jax.tree_util.tree_leaves(tree)
                           if isinstance(x, jax.Array) and not isinstance(x, tracer)])


def _platform(x) -> str:
    """The platform the array ``x`` lives on (JAX's default backend for a tracer)."""
    try:
        return next(iter(x.devices())).platform
    except (AttributeError, TypeError, StopIteration, jax.errors.ConcretizationTypeError):
        return jax.default_backend()


def _stitch_places(geom: PatchGeometry) -> dict[str, np.ndarray]:
    """Per patch, where its kept unknowns go in the flat outputs (host, a few numbers a patch).

    ``out_fiber`` (P, F): output row of each fiber slot (-1: a neighbour, not kept);
    ``out_wave`` (P,): output column of the first kept bin; ``keep_lo``, ``keep_n`` (P,):
    the kept bins' first index in the patch and their count.  Unknown ``(f, k)`` of a
    patch lands at ``out_fiber[f] * nwave + out_wave + k - keep_lo`` (:func:`_stitch`).
    """
    return dict(
        out_fiber=geom.out_fiber.astype(np.int32),
        out_wave=geom.out_wave.astype(np.int32),
        keep_lo=geom.keep_lo.astype(np.int32),
        keep_n=geom.keep_n.astype(np.int32),
    )
