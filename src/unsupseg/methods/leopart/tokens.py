"""Leopart's PCA tokens, made the same on every machine.

The standardise + PCA products run in float64 and the tokens are rounded to multiples of 2^-16
(standardised PCA coordinates are O(1), so the grid is far below their spread). What differs
between CPUs, BLAS builds and thread counts is the order of the sums inside a matrix product: in
float32 that moves tokens by ~1e-7, enough for k-means to take another path over its iterations;
in float64 it moves them by ~1e-16, which the rounding removes, so k-means (run in float64 on the
rounded tokens) sees the same numbers everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ...features.clustering import PCA, fit_pca

GRID = 2.0 ** 16


def fit_stable_pca(chunks: Callable[[], Iterable[Tensor]], dim: int) -> PCA:
    """The PCA from float64 products, stored in float32 as the run keeps it (``pca_tokens`` reads it
    back in float64, so fit and test time see the same tokens)."""
    pca = fit_pca(chunks, dim, dtype=torch.float64)
    return PCA(pca.mean.float(), pca.std.float(), pca.components.float())


def pca_tokens(pca: PCA, x: Tensor) -> Tensor:
    """N x D features -> N x P float64 tokens on the 2^-16 grid."""
    mean, std, components = (t.double() for t in (pca.mean, pca.std, pca.components))
    return torch.round((x.double() - mean) / std @ components.T * GRID) / GRID
