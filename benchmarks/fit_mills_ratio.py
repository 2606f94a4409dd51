"""Reproduce the Mills-ratio coefficients of ``jaxspec/psf/_normal_dist.py``.

Fits ``M(a) / t`` (``M = Q / phi``, ``t = 1 / (1 + a / 4)``) as a degree-18
Chebyshev series in ``s`` over ``a in [0, 8.6]`` by least squares on 400
Chebyshev nodes, with values from mpmath at 40 digits, then prints the
coefficients in monomial form and the largest relative error on a fine grid.

Needs mpmath (``pip install mpmath``); not part of the test suite.
Usage: python benchmarks/fit_mills_ratio.py
"""

from __future__ import annotations

import mpmath as mp
import numpy as np

AMAX, SCALE, DEG, NODES = 8.6, 4.0, 18, 400


def mills(a):
    a = mp.mpf(a)
    return mp.erfc(a / mp.sqrt(2)) / 2 * mp.sqrt(2 * mp.pi) * mp.exp(a * a / 2)


def main() -> None:
    mp.mp.dps = 40
    t0 = 1 / (1 + AMAX / SCALE)
    s = np.cos(np.pi * (np.arange(NODES) + 0.5) / NODES)
    t = [mp.mpf(t0) + (mp.mpf(v) + 1) / 2 * (1 - mp.mpf(t0)) for v in s]
    rhs = mp.matrix([mills(SCALE * (1 / tk - 1)) / tk for tk in t])
    van = mp.matrix(NODES, DEG + 1)
    for r, v in enumerate(s):
        for k in range(DEG + 1):
            van[r, k] = mp.cos(k * mp.acos(mp.mpf(v)))
    cheb = mp.lu_solve(van.T * van, van.T * rhs)
    cheb = np.array([float(c) for c in cheb])
    mono = np.polynomial.chebyshev.cheb2poly(cheb)
    a = np.linspace(0.0, AMAX, 4001)
    tt = 1 / (1 + a / SCALE)
    approx = tt * np.polynomial.polynomial.polyval(2 * (tt - t0) / (1 - t0) - 1, mono)
    exact = np.array([float(mills(v)) for v in a])
    print("coefficients (monomial in s, lowest first):")
    for c in mono:
        print(f"    {float(c)!r},")
    print(f"max relative error on [0, {AMAX}]: {np.max(np.abs(approx / exact - 1)):.2e}")


if __name__ == "__main__":
    main()
