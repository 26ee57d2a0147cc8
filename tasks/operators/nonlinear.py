"""Nonlinear forward models with autograd gradients."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Operator, check_shape


class PhaseRetrieval(Operator):
    """Fourier phase retrieval ``A x = |FFT2(pad(x))|`` (orthonormal FFT), as in DPS's ``PhaseRetrievalOperator``.

    The image is zero-padded by ``round(oversample / 8 * H)`` pixels per side (DPS: 2.0 on 256 -> 64).
    Invariant to translation, flips and global sign, so solvers are judged up to those ambiguities.
    The modulus is smoothed as ``sqrt(|z|^2 + eps^2) - eps`` so its gradient is finite at ``z = 0``.
    """

    def __init__(self, shape: Sequence[int], oversample: float = 2.0, sigma_y: float = 0.0, eps: float = 1e-8):
        shape = check_shape(shape)
        if not oversample >= 0:
            raise ValueError(f"oversample must be >= 0, got {oversample}")
        self.pad_h = round(oversample / 8 * shape[1])
        self.pad_w = round(oversample / 8 * shape[2])
        self.eps = float(eps)
        super().__init__(shape, (shape[0], shape[1] + 2 * self.pad_h, shape[2] + 2 * self.pad_w), sigma_y)

    def _forward(self, x: Tensor) -> Tensor:
        z = torch.fft.fft2(F.pad(x, (self.pad_w, self.pad_w, self.pad_h, self.pad_h)), norm="ortho")
        return torch.sqrt(z.real**2 + z.imag**2 + self.eps**2) - self.eps
