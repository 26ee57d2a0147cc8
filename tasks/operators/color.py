"""Colorization: the measurement is a weighted sum over channels (RGB -> gray)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import LinearOperator, check_shape
from .svd import SVDView, orthonormal_completion

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601


class Grayscale(SVDView, LinearOperator):
    """``A x = sum_c w_c x_c``: ``(C, H, W) -> (1, H, W)`` with one weight per channel.

    The default weights are the channel mean ``1/C`` (MCG's colorization; for 1-channel images this is
    the identity). ``A A^T = ||w||^2 I``, so ``A^+ y = w y / ||w||^2``. SVD: ``V`` an orthogonal channel mix whose
    first column is ``w / ||w||``, ``s = ||w||`` on spectral channel 0, ``U`` the identity onto that channel.
    """

    def __init__(self, shape: Sequence[int], weights: Sequence[float] | Tensor | None = None,
                 sigma_y: float = 0.0) -> None:
        shape = check_shape(shape)
        channels = shape[0]
        w = torch.full((channels,), 1.0 / channels, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.numel() != channels:
            raise ValueError(f"need one weight per channel ({channels}), got {w.numel()}")
        if not bool(torch.isfinite(w).all()) or float(w.norm()) == 0:
            raise ValueError("weights must be finite and not all zero")
        super().__init__(shape, (1, shape[1], shape[2]), sigma_y)
        self.weights = w
        self.channel_basis = orthonormal_completion(w)          # (C, C), column 0 = w / ||w||
        self.singular_values = torch.zeros(shape, dtype=torch.float64)
        self.singular_values[0] = w.norm()

    def _w(self, like: Tensor) -> Tensor:
        return self.weights.to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1)

    def _forward(self, x: Tensor) -> Tensor:
        return (x * self._w(x)).sum(1, keepdim=True)

    def _adjoint(self, y: Tensor) -> Tensor:
        return y * self._w(y)

    def _pinv(self, y: Tensor) -> Tensor:
        return y * self._w(y) / float(self.weights.square().sum())

    def _mix(self, x: Tensor, matrix: Tensor) -> Tensor:
        return torch.einsum("dc,bchw->bdhw", matrix.to(device=x.device, dtype=x.dtype), x)

    def _V_adjoint(self, x: Tensor) -> Tensor:
        return self._mix(x, self.channel_basis.T)

    def _V(self, z: Tensor) -> Tensor:
        return self._mix(z, self.channel_basis)

    def _U_adjoint(self, y: Tensor) -> Tensor:
        return torch.cat([y, y.new_zeros(y.shape[0], self.in_shape[0] - 1, *y.shape[2:])], 1)

    def _U(self, z: Tensor) -> Tensor:
        return z[:, :1]
