"""Input checks shared by the metrics: every metric takes float images ``(N, C, H, W)`` in [0, 1]."""

from __future__ import annotations

import torch
from torch import Tensor

RANGE_TOLERANCE = 1e-4


def check_images(images: Tensor, name: str = "images") -> Tensor:
    """Validate a float batch ``(N, 1 or 3, H, W)`` of finite values in [0, 1]; returns it unchanged."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be float in [0, 1], got dtype {images.dtype} (divide uint8 images by 255)")
    finite = torch.isfinite(images).flatten(1).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise ValueError(f"{name} must be finite in [0, 1], got NaN or inf in {len(bad)} of {len(images)} images "
                         f"(indices {shown}): a diverged sample cannot be scored")
    low, high = images.min().item(), images.max().item()
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        hint = " (they look like [-1, 1]: map them with tasks.digits.to_unit)" if low < 0 else ""
        raise ValueError(f"{name} must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]{hint}")
    return images


def check_same_shape(images: Tensor, target: Tensor) -> None:
    """Reference metrics (PSNR, SSIM, LPIPS) compare images pairwise: shapes must match."""
    if images.shape != target.shape:
        raise ValueError(f"images and target must have the same shape, got {tuple(images.shape)} "
                         f"and {tuple(target.shape)}")


def to_rgb(images: Tensor) -> Tensor:
    """Repeat a gray channel three times (RGB batches pass through)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def to_uint8(images: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 [0, 255], rounding to nearest (what saving a PNG does)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)
