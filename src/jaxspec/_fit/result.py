"""The outcome of a patch fit (:class:`FitResult`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .._simulation.calib import LineList
from ..psf._gausshermite import GaussHermitePSF
from .params import PSF_KEYS

__all__ = ["FitResult"]


@dataclasses.dataclass
class FitResult:
    """Outcome of :func:`fit_psf` on one patch (fibers x pixel box).

    Attributes:
        psf: the fitted PSF (all fibers; the fitted ones corrected, inverse trace refitted).
        params: fitted parameters by name: ``dx``, ``dy`` (nfib, trace_deg+1) [pixels],
            ``log_sigx``, ``log_sigy`` (nfib,), ``gh`` (nterm,) or (nterm, nfib),
            ``line_flux`` (narc, nfib, nline) [photons], ``flat_amp`` (nflat, nfib, flat_deg+1).
        errors: 1-sigma uncertainties, same layout (sqrt of the covariance diagonal).
        cov: (n, n) covariance of the flat parameter vector ``theta`` (Gauss-Newton).
        theta: (n,) the flat parameter vector; ``slices`` names its parts.
        chi2, ndof: final pixel chi2 and degrees of freedom.
        chi2_history, step_history, lambda_history: per accepted iteration
            (step = max |delta theta_i| / sigma_i).
        niter, converged: iterations done and whether the stopping rule was met.
        fibers, xyrange: fitted fibers (absolute) and the pixel box of the fit.
        lines: the arc lines modelled (padding dropped); line_flux columns past
            ``len(lines)`` are padding (0, error inf).
        data, ivar, model, kinds: per image: the cut-out data, ivar, final model
            and ``"arc"``/``"flat"`` (for residual plots).
        psf_init: the initial PSF; gh_terms: which GH terms were corrected.
        seconds: wall time.
        live: ``(nfib,)`` bool, False for a broken fiber (not fitted: its corrections are 0
            with an infinite error, its coefficients in ``psf`` the initial PSF's).
    """

    psf: GaussHermitePSF
    params: dict
    errors: dict
    cov: np.ndarray
    theta: np.ndarray
    slices: dict
    chi2: float
    ndof: int
    chi2_history: list
    step_history: list
    lambda_history: list
    niter: int
    converged: bool
    fibers: np.ndarray
    xyrange: tuple[int, int, int, int]
    lines: LineList | None
    data: list
    ivar: list
    model: list
    kinds: list
    psf_init: GaussHermitePSF
    gh_terms: tuple[str, ...]
    seconds: float = 0.0
    live: np.ndarray | None = None

    @property
    def psf_mask(self) -> np.ndarray:
        """Boolean mask of the PSF parameters in ``theta``."""
        m = np.zeros(len(self.theta), bool)
        for n in PSF_KEYS:
            if n in self.slices:
                m[self.slices[n]] = True
        return m

    @property
    def psf_params(self) -> dict:
        """The fitted PSF corrections only (``dx``, ``dy``, ``log_sigx``, ``log_sigy``, ``gh``)."""
        return {k: v for k, v in self.params.items() if k in PSF_KEYS}

    @property
    def psf_cov(self) -> np.ndarray:
        """Covariance of the PSF parameters, marginalised over fluxes (block of ``cov``)."""
        m = self.psf_mask
        return self.cov[np.ix_(m, m)]

    @property
    def reduced_chi2(self) -> float:
        """chi2 / ndof."""
        return float(self.chi2 / max(self.ndof, 1))

    def pulls(self, truth: dict) -> dict:
        """``(fitted - truth) / error`` for the parameters named in ``truth``."""
        return {k: (np.asarray(self.params[k]) - np.asarray(v)) / np.asarray(self.errors[k]) for k, v in truth.items()}
