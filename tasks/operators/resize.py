"""Super-resolution operators: average pooling and anti-aliased bicubic downsampling, with true adjoints.

DPS's SR operator pairs a bicubic resizer with nearest upsampling as its "transpose", which is not the
adjoint; here both operators are explicit linear maps whose adjoint and pseudo-inverse are exact.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LinearOperator, check_shape


def _check_factor(factor: int, shape: tuple[int, int, int]) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(f"image size {shape[1]}x{shape[2]} is not divisible by factor {factor}")
    return factor


class AveragePooling(LinearOperator):
    """``A x`` = means over ``factor x factor`` blocks.

    ``A^T y`` spreads each value over its block divided by ``factor^2``; since ``A A^T = I / factor^2``,
    ``A^+ y`` is nearest-neighbour upsampling.
    """

    def __init__(self, shape: Sequence[int], factor: int, sigma_y: float = 0.0) -> None:
        shape = check_shape(shape)
        self.factor = _check_factor(factor, shape)
        c, h, w = shape
        super().__init__(shape, (c, h // factor, w // factor), sigma_y)

    def _forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.factor)

    def _pinv(self, y: Tensor) -> Tensor:
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._pinv(y) / self.factor**2


def cubic(s: Tensor, a: float = -0.5) -> Tensor:
    """Keys' cubic convolution kernel (``a = -0.5``: MATLAB ``imresize``, PIL, torch antialias)."""
    s = s.abs()
    near = ((a + 2) * s - (a + 3)) * s * s + 1
    far = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    return torch.where(s <= 1, near, torch.where(s < 2, far, torch.zeros_like(s)))


def bicubic_matrix(size_in: int, size_out: int) -> Tensor:
    """The ``(size_out, size_in)`` matrix of anti-aliased bicubic downsampling along one axis (float64).

    The kernel is stretched by the scale ``size_in / size_out`` and taps that fall outside the signal are
    dropped with the remaining weights renormalised: the convention of
    ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``.
    """
    scale = size_in / size_out
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    rows = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), size_in)
        taps = torch.arange(lo, hi, dtype=torch.float64)
        weights = cubic((taps - center + 0.5) * inv)
        rows[i, lo:hi] = weights / weights.sum()
    return rows


class BicubicDownsampling(LinearOperator):
    """``A x = W_h x W_w^T``: separable anti-aliased bicubic downsampling by an integer ``factor``.

    Adjoint ``W_h^T y W_w``; pseudo-inverse ``W_h^+ y W_w^{+T}`` (``(W_h ⊗ W_w)^+ = W_h^+ ⊗ W_w^+``).
    """

    def __init__(self, shape: Sequence[int], factor: int, sigma_y: float = 0.0) -> None:
        shape = check_shape(shape)
        self.factor = _check_factor(factor, shape)
        c, h, w = shape
        super().__init__(shape, (c, h // factor, w // factor), sigma_y)
        self.matrix_h = bicubic_matrix(h, h // factor)
        self.matrix_w = bicubic_matrix(w, w // factor)
        self.pinv_h = torch.linalg.pinv(self.matrix_h)
        self.pinv_w = torch.linalg.pinv(self.matrix_w)

    @staticmethod
    def _apply(left: Tensor, x: Tensor, right: Tensor) -> Tensor:
        left, right = left.to(x), right.to(x)
        return left @ x @ right.transpose(0, 1)

    def _forward(self, x: Tensor) -> Tensor:
        return self._apply(self.matrix_h, x, self.matrix_w)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._apply(self.matrix_h.T, y, self.matrix_w.T)

    def _pinv(self, y: Tensor) -> Tensor:
        return self._apply(self.pinv_h, y, self.pinv_w)

