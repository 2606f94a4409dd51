"""Batched linear algebra of spectro-perfectionism (knows nothing of PSFs or files).

All functions act on ONE patch (unbatched arrays); wrap them in ``jax.vmap`` to
batch.  Shape-like and mode arguments are static Python values.  A patch's normal
matrix comes dense (n, n) or as its lower block band over fibers (``_banded``:
factored block by block, the dense path kept as the reference and for ``full``).
"""

from ._banded import band_factor, band_from_dense, band_inverse_blocks, band_solve, dense_from_band
from ._cholesky import cholesky_factor, cholesky_inverse_blocks, cholesky_solve
from ._decorrelate import decorrelate_full, decorrelate_signal, normalize_rows
from ._normal import SPECTER_MINWEIGHT_FRAC, regularize_band, regularize_normal
from ._patch import PatchSolution, solve_patch
from ._resolution import apply_resolution, resolution_diagonals, resolution_offsets
from ._sqrtm import eigen_threshold, inv_sqrtm_sym, inv_sym, sqrtm_sym

__all__ = [
    "apply_resolution",
    "SPECTER_MINWEIGHT_FRAC",
    "PatchSolution",
    "band_factor",
    "band_from_dense",
    "band_inverse_blocks",
    "band_solve",
    "cholesky_factor",
    "cholesky_inverse_blocks",
    "cholesky_solve",
    "decorrelate_full",
    "decorrelate_signal",
    "dense_from_band",
    "eigen_threshold",
    "inv_sqrtm_sym",
    "inv_sym",
    "normalize_rows",
    "regularize_band",
    "regularize_normal",
    "resolution_diagonals",
    "resolution_offsets",
    "solve_patch",
    "sqrtm_sym",
]
