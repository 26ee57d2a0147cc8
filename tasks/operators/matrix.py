"""A dense matrix acting on vectors ``(B, d)``: the operator of the Gaussian-mixture benchmarks."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LinearOperator


class MatrixOperator(LinearOperator):
    """``A x = x M^T`` for an ``(m, d)`` matrix ``M``; adjoint ``y M``; pseudo-inverse by SVD (``linalg.pinv``)."""

    def __init__(self, matrix: Tensor, sigma_y: float = 0.0) -> None:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2 or not matrix.is_floating_point():
            raise ValueError("matrix must be a 2-D floating-point tensor")
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError("matrix must be finite")
        super().__init__((matrix.shape[1],), (matrix.shape[0],), sigma_y)
        self.matrix = matrix.to(torch.float64)
        self.matrix_pinv = torch.linalg.pinv(self.matrix)

    def _forward(self, x: Tensor) -> Tensor:
        return x @ self.matrix.to(x).T

    def _adjoint(self, y: Tensor) -> Tensor:
        return y @ self.matrix.to(y)

    def _pinv(self, y: Tensor) -> Tensor:
        return y @ self.matrix_pinv.to(y).T


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
