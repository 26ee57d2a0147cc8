"""Colorization: the measurement is a weighted sum over channels (RGB -> gray)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import LinearOperator, check_shape

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601


class Grayscale(LinearOperator):
    """``A x = sum_c w_c x_c``: ``(C, H, W) -> (1, H, W)`` with one weight per channel.

    The default weights are the channel mean ``1/C`` (MCG's colorization; for 1-channel images this is
    the identity). ``A A^T = ||w||^2 I``, so ``A^+ y = w y / ||w||^2``.
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

    def _w(self, like: Tensor) -> Tensor:
        return self.weights.to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1)

    def _forward(self, x: Tensor) -> Tensor:
        return (x * self._w(x)).sum(1, keepdim=True)

    def _adjoint(self, y: Tensor) -> Tensor:
        return y * self._w(y)

    def _pinv(self, y: Tensor) -> Tensor:
        return y * self._w(y) / float(self.weights.square().sum())
