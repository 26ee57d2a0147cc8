"""A dense matrix acting on vectors ``(B, d)``: the operator of the Gaussian-mixture benchmarks."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LinearOperator
from .svd import SVDView


class MatrixOperator(SVDView, LinearOperator):
    """``A x = x M^T`` for an ``(m, d)`` matrix ``M``; adjoint ``y M``; pseudo-inverse by SVD (``linalg.pinv``).

    SVD view from ``torch.linalg.svd`` (full ``V``, ``d`` spectral coordinates, the first ``min(m, d)`` measured).
    """

    def __init__(self, matrix: Tensor, sigma_y: float = 0.0) -> None:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2 or not matrix.is_floating_point():
            raise ValueError("matrix must be a 2-D floating-point tensor")
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError("matrix must be finite")
        super().__init__((matrix.shape[1],), (matrix.shape[0],), sigma_y)
        self.matrix = matrix.to(torch.float64)
        self.matrix_pinv = torch.linalg.pinv(self.matrix)
        left, values, right_t = torch.linalg.svd(self.matrix, full_matrices=True)
        self.rank_dims = len(values)
        self.left, self.right = left[:, :self.rank_dims], right_t.T          # (m, k), (d, d)
        self.singular_values = torch.zeros(matrix.shape[1], dtype=torch.float64)
        self.singular_values[:self.rank_dims] = values

    def _forward(self, x: Tensor) -> Tensor:
        return x @ self.matrix.to(x).T

    def _adjoint(self, y: Tensor) -> Tensor:
        return y @ self.matrix.to(y)

    def _pinv(self, y: Tensor) -> Tensor:
        return y @ self.matrix_pinv.to(y).T

    def _V_adjoint(self, x: Tensor) -> Tensor:
        return x @ self.right.to(x)

    def _V(self, z: Tensor) -> Tensor:
        return z @ self.right.to(z).T

    def _U_adjoint(self, y: Tensor) -> Tensor:
        coeffs = y @ self.left.to(y)
        return torch.cat([coeffs, coeffs.new_zeros(y.shape[0], self.in_shape[0] - self.rank_dims)], 1)

    def _U(self, z: Tensor) -> Tensor:
        return z[:, :self.rank_dims] @ self.left.to(z).T


def random_matrix(rows: int, cols: int, generator: torch.Generator | None = None,
                  singular_values: Tensor | None = None) -> Tensor:
    """An ``(rows, cols)`` matrix ``U diag(s) V^T`` with Haar-random ``U, V`` (float64).

    ``singular_values`` default to ``U[0.5, 1.5)`` draws (the MCGdiff/FPS Gaussian-mixture benchmarks use
    random SVDs).
    """
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    s = 0.5 + torch.rand(k, generator=generator, dtype=torch.float64) if singular_values is None else \
        torch.as_tensor(singular_values, dtype=torch.float64)
    if s.shape != (k,):
        raise ValueError(f"need {k} singular values, got shape {tuple(s.shape)}")
    return u[:, :k] @ torch.diag(s) @ v[:, :k].T
