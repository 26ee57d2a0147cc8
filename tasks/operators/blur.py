"""Circular (periodic) blur by FFT, with Gaussian and random motion kernels.

``A x = k ⊛ x`` (circular convolution, kernel centred), so ``A = F^* diag(k̂) F``: the adjoint multiplies
by ``conj(k̂)`` and the pseudo-inverse by ``conj(k̂) / |k̂|^2`` on frequencies with ``|k̂| > rcond max|k̂|``
(0 elsewhere). The DPS operators use zero/reflect padding and ``transpose = identity``; this one is exact.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .base import LinearOperator, check_shape


def gaussian_kernel(size: int, std: float) -> Tensor:
    """A normalised ``(size, size)`` sampled Gaussian (DPS: size 61, std 3 on 256x256 images)."""
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd int, got {size!r}")
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-0.5 * (r / std) ** 2)
    k = g[:, None] * g[None, :]
    return k / k.sum()


def motion_kernel(size: int, intensity: float = 0.5, generator: torch.Generator | None = None,
                  num_points: int | None = None) -> Tensor:
    """A normalised ``(size, size)`` camera-shake kernel from a random smooth trajectory.

    A point moves ``num_points`` unit-speed steps; its heading turns by ``N(0, (intensity * pi / 4)^2)``
    per step (``intensity`` 0: a straight streak; 1: a tangled path). The path is scaled to fit the
    kernel, centred, and splatted bilinearly.
    """
    if not isinstance(size, int) or size < 3 or size % 2 == 0:
        raise ValueError(f"kernel size must be an odd int >= 3, got {size!r}")
    if not 0.0 <= float(intensity) <= 1.0:
        raise ValueError(f"intensity must lie in [0, 1], got {intensity}")
    num_points = num_points or 4 * size
    heading0 = 2 * math.pi * torch.rand((), generator=generator, dtype=torch.float64)
    turns = torch.randn(num_points, generator=generator, dtype=torch.float64) * (float(intensity) * math.pi / 4)
    heading = heading0 + torch.cumsum(turns, 0)
    path = torch.cumsum(torch.stack([torch.cos(heading), torch.sin(heading)], 1), 0)
    path = path - path.mean(0)
    extent = path.abs().max().clamp_min(1e-12)
    path = path / extent * (size // 2 - 1)                   # fit inside the kernel with a 1-pixel border
    pos = path + size // 2
    kernel = torch.zeros(size, size, dtype=torch.float64)
    base = pos.floor()
    frac = pos - base
    base = base.long()
    for dy in (0, 1):
        for dx in (0, 1):
            w = (frac[:, 0] if dy else 1 - frac[:, 0]) * (frac[:, 1] if dx else 1 - frac[:, 1])
            kernel.index_put_((base[:, 0] + dy, base[:, 1] + dx), w, accumulate=True)
    return kernel / kernel.sum()


class Blur(LinearOperator):
    """Circular convolution with a centred ``(kh, kw)`` kernel (odd sizes, at most the image size).

    The kernel is shared by all channels. ``rcond`` sets the pseudo-inverse's spectral cut-off.
    """

    def __init__(self, shape: Sequence[int], kernel: Tensor, sigma_y: float = 0.0, rcond: float = 1e-3) -> None:
        shape = check_shape(shape)
        if not isinstance(kernel, Tensor) or kernel.ndim != 2:
            raise ValueError("kernel must be a 2-D tensor")
        kh, kw = kernel.shape
        if kh % 2 == 0 or kw % 2 == 0 or kh > shape[1] or kw > shape[2]:
            raise ValueError(f"kernel {kh}x{kw} must have odd sides no larger than the image {shape[1]}x{shape[2]}")
        if not 0 <= rcond < 1:
            raise ValueError(f"rcond must lie in [0, 1), got {rcond}")
        super().__init__(shape, shape, sigma_y)
        self.kernel = kernel.to(torch.float64)
        self.rcond = float(rcond)
        padded = torch.zeros(shape[1], shape[2], dtype=torch.float64)
        padded[:kh, :kw] = self.kernel
        padded = torch.roll(padded, (-(kh // 2), -(kw // 2)), (0, 1))   # kernel centre at pixel (0, 0)
        self.spectrum = torch.fft.rfft2(padded)
        power = self.spectrum.abs() ** 2
        keep = power > (self.rcond**2) * power.max()
        self.inverse_spectrum = torch.where(keep, self.spectrum.conj() / power.clamp_min(1e-300),
                                            torch.zeros_like(self.spectrum))

    def _filter(self, x: Tensor, spectrum: Tensor) -> Tensor:
        cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        out = torch.fft.irfft2(torch.fft.rfft2(x) * spectrum.to(device=x.device, dtype=cdtype), s=x.shape[-2:])
        return out.to(x.dtype)

    def _forward(self, x: Tensor) -> Tensor:
        return self._filter(x, self.spectrum)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._filter(y, self.spectrum.conj())

    def _pinv(self, y: Tensor) -> Tensor:
        return self._filter(y, self.inverse_spectrum)

    def _prox_l2(self, z: Tensor, y: Tensor, weight: float) -> Tensor:
        spectrum = self.spectrum.to(z.device)
        cdtype = torch.complex128 if z.dtype == torch.float64 else torch.complex64
        numerator = torch.fft.rfft2(y) * spectrum.conj().to(cdtype) + weight * torch.fft.rfft2(z)
        out = torch.fft.irfft2(numerator / (spectrum.abs() ** 2 + weight).to(cdtype), s=z.shape[-2:])
        return out.to(z.dtype)
