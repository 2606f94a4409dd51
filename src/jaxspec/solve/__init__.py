"""Batched dense linear algebra of spectro-perfectionism (knows nothing of PSFs or files).

All functions act on ONE patch (unbatched arrays); wrap them in ``jax.vmap`` to
batch.  Shape-like and mode arguments are static Python values.
"""

from ._cholesky import cholesky_factor, cholesky_inverse_blocks, cholesky_solve
from ._decorrelate import decorrelate_full, decorrelate_signal, normalize_rows
from ._normal import SPECTER_MINWEIGHT_FRAC, regularize_normal
from ._patch import PatchSolution, solve_patch
from ._resolution import apply_resolution, resolution_diagonals, resolution_offsets
from ._sqrtm import eigen_threshold, inv_sqrtm_sym, inv_sym, sqrtm_sym

__all__ = [
    "apply_resolution",
    "SPECTER_MINWEIGHT_FRAC",
    "PatchSolution",
    "cholesky_factor",
    "cholesky_inverse_blocks",
    "cholesky_solve",
    "decorrelate_full",
    "decorrelate_signal",
    "eigen_threshold",
    "inv_sqrtm_sym",
    "inv_sym",
    "normalize_rows",
    "regularize_normal",
    "resolution_diagonals",
    "resolution_offsets",
    "solve_patch",
    "sqrtm_sym",
]
