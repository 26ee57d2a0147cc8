"""Inpainting ``y = m * x`` with a binary mask (1 = measured), and the box / random mask generators."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import LinearOperator, check_shape
from .svd import SVDView


class Inpainting(SVDView, LinearOperator):
    """``A x = m * x`` for a binary mask ``m`` of shape ``(1 or C, H, W)`` (1 on measured pixels).

    ``A`` is an orthogonal projection, so ``A^T = A^+ = A`` and ``project(x, y) = (1 - m) x + m y``.
    The measurement keeps the image shape (zeros where unmeasured) and noise lands on measured pixels only.
    SVD: ``U = V = I``, ``s = m``.
    """

    def __init__(self, mask: Tensor, shape: Sequence[int] | None = None, sigma_y: float = 0.0) -> None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3:
            raise ValueError(f"mask must have shape (H, W) or (C, H, W), got {tuple(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be binary (0 = missing, 1 = measured)")
        shape = check_shape(shape if shape is not None else mask.shape)
        if mask.shape[0] not in (1, shape[0]) or tuple(mask.shape[1:]) != shape[1:]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit images of shape {shape}")
        super().__init__(shape, shape, sigma_y)
        self.mask = mask.to(torch.float64)
        self.singular_values = self.mask.expand(shape).clone()

    def _m(self, like: Tensor) -> Tensor:
        return self.mask.to(device=like.device, dtype=like.dtype)

    def _forward(self, x: Tensor) -> Tensor:
        return x * self._m(x)

    def _adjoint(self, y: Tensor) -> Tensor:
        return y * self._m(y)

    def _pinv(self, y: Tensor) -> Tensor:
        return y * self._m(y)

    def _prox_l2(self, z: Tensor, y: Tensor, weight: float) -> Tensor:
        m = self._m(z)
        return (m * y + weight * z) / (m + weight)

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        """``(1 - m) x + m y``: measured pixels are set to ``y`` exactly."""
        m = self._m(x)
        return x * (1 - m) + y * m

    def add_noise(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        m = self._m(y)
        return y * (1 - m) + super().add_noise(y, generator) * m

    def _V(self, z: Tensor) -> Tensor:
        return z

    _V_adjoint = _U = _U_adjoint = _V

    @property
    def measured_fraction(self) -> float:
        return float(self.mask.mean())


def box_mask(shape: Sequence[int], box_size: int | tuple[int, int], top_left: tuple[int, int] | None = None,
             generator: torch.Generator | None = None, margin: int = 0) -> Tensor:
    """A ``(1, H, W)`` mask that is 0 inside one ``box_size`` box and 1 elsewhere.

    The box sits at ``top_left`` or, if omitted, at a random position at least ``margin`` pixels from the
    border (DPS: 128x128 box, margin 16, on 256x256 images).
    """
    _, height, width = check_shape(shape)
    bh, bw = (box_size, box_size) if isinstance(box_size, int) else box_size
    if not (0 < bh <= height - 2 * margin and 0 < bw <= width - 2 * margin):
        raise ValueError(f"box {bh}x{bw} with margin {margin} does not fit a {height}x{width} image")
    if top_left is None:
        top = int(torch.randint(margin, height - margin - bh + 1, (1,), generator=generator))
        left = int(torch.randint(margin, width - margin - bw + 1, (1,), generator=generator))
    else:
        top, left = top_left
        if not (0 <= top <= height - bh and 0 <= left <= width - bw):
            raise ValueError(f"box at {top_left} of size {bh}x{bw} leaves the {height}x{width} image")
    mask = torch.ones(1, height, width)
    mask[:, top:top + bh, left:left + bw] = 0
    return mask


def random_mask(shape: Sequence[int], missing_fraction: float, generator: torch.Generator | None = None,
                per_channel: bool = False) -> Tensor:
    """A mask with ``round(missing_fraction * H * W)`` missing pixels chosen uniformly (DPS: 70 % missing).

    Shared by all channels unless ``per_channel``.
    """
    channels, height, width = check_shape(shape)
    if not 0.0 <= float(missing_fraction) <= 1.0:
        raise ValueError(f"missing_fraction must lie in [0, 1], got {missing_fraction}")
    rows = channels if per_channel else 1
    num = height * width
    missing = round(float(missing_fraction) * num)
    mask = torch.ones(rows, num)
    for r in range(rows):
        mask[r, torch.randperm(num, generator=generator)[:missing]] = 0
    return mask.view(rows, height, width)
