"""Blur (circular by FFT, or with a boundary mode), with Gaussian and random motion kernels.

``A x = k ⊛ x`` (circular convolution, kernel centred), so ``A = F^* diag(k̂) F``: the adjoint multiplies
by ``conj(k̂)`` and the pseudo-inverse by ``conj(k̂) / |k̂|^2`` on frequencies with ``|k̂| > rcond max|k̂|``
(0 elsewhere). The DPS operators use zero/reflect padding and ``transpose = identity``; this one is exact.

Other boundaries (``"reflect"``, ``"replicate"``: the image padded by ``F.pad`` then convolved; ``"valid"``: only
the ``(H - kh + 1, W - kw + 1)`` outputs whose window lies inside the image) are direct convolutions whose adjoint
is the exact vector-Jacobian product; their pseudo-inverse and prox use conjugate gradients and they have no SVD.

SVD of the circular blur: with ``P = k̂ / |k̂|`` (1 where ``k̂ = 0``), ``A = (F^* P F)(F^* |k̂| F)``; the first factor
is a real orthogonal map and the second a real symmetric one diagonalised by the (orthonormal, self-inverse) 2-D
Hartley transform ``H``, because ``|k̂|`` is even. So ``V = H``, ``s = |k̂|`` and ``U = F^* P F H``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LinearOperator, check_shape
from .svd import SVDView, hartley2

BOUNDARIES = ("circular", "reflect", "replicate", "valid")


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


class Blur(SVDView, LinearOperator):
    """Circular convolution with a centred ``(kh, kw)`` kernel (odd sizes, at most the image size).

    The kernel is shared by all channels. ``rcond`` sets the pseudo-inverse's spectral cut-off (circular only).
    ``boundary``: ``"circular"`` (FFT, with an SVD view), ``"reflect"``, ``"replicate"`` or ``"valid"``.
    """

    def __init__(self, shape: Sequence[int], kernel: Tensor, sigma_y: float = 0.0, rcond: float = 1e-3,
                 boundary: str = "circular") -> None:
        shape = check_shape(shape)
        if not isinstance(kernel, Tensor) or kernel.ndim != 2:
            raise ValueError("kernel must be a 2-D tensor")
        kh, kw = kernel.shape
        if kh % 2 == 0 or kw % 2 == 0 or kh > shape[1] or kw > shape[2]:
            raise ValueError(f"kernel {kh}x{kw} must have odd sides no larger than the image {shape[1]}x{shape[2]}")
        if not 0 <= rcond < 1:
            raise ValueError(f"rcond must lie in [0, 1), got {rcond}")
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
        if boundary == "reflect" and (kh // 2 >= shape[1] or kw // 2 >= shape[2]):
            raise ValueError(f"reflect padding needs the kernel's half-width below the image size, got {kh}x{kw}")
        out = shape if boundary != "valid" else (shape[0], shape[1] - kh + 1, shape[2] - kw + 1)
        super().__init__(shape, out, sigma_y)
        self.kernel = kernel.to(torch.float64)
        self.rcond = float(rcond)
        self.boundary = boundary
        self.has_svd = boundary == "circular"
        padded = torch.zeros(shape[1], shape[2], dtype=torch.float64)
        padded[:kh, :kw] = self.kernel
        padded = torch.roll(padded, (-(kh // 2), -(kw // 2)), (0, 1))   # kernel centre at pixel (0, 0)
        self.spectrum = torch.fft.rfft2(padded)
        power = self.spectrum.abs() ** 2
        keep = power > (self.rcond**2) * power.max()
        self.inverse_spectrum = torch.where(keep, self.spectrum.conj() / power.clamp_min(1e-300),
                                            torch.zeros_like(self.spectrum))
        full = torch.fft.fft2(padded)
        self.singular_values = full.abs().expand(shape).clone()
        self.phase = torch.where(full.abs() > 0, full / full.abs().clamp_min(1e-300), torch.ones_like(full))

    # -- non-circular boundaries: direct convolution ---------------------------------------------------------
    def _convolve(self, x: Tensor) -> Tensor:
        kh, kw = self.kernel.shape
        if self.boundary != "valid":
            x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode=self.boundary)
        channels = x.shape[1]
        weight = self.kernel.flip(0, 1).to(x)[None, None].expand(channels, 1, kh, kw)
        return F.conv2d(x, weight, groups=channels)

    def _convolve_adjoint(self, y: Tensor) -> Tensor:
        with torch.enable_grad():
            _, vjp = torch.func.vjp(self._convolve, y.new_zeros(y.shape[0], *self.in_shape))
            return vjp(y)[0]

    def _filter(self, x: Tensor, spectrum: Tensor) -> Tensor:
        cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        out = torch.fft.irfft2(torch.fft.rfft2(x) * spectrum.to(device=x.device, dtype=cdtype), s=x.shape[-2:])
        return out.to(x.dtype)

    def _forward(self, x: Tensor) -> Tensor:
        if self.boundary != "circular":
            return self._convolve(x)
        return self._filter(x, self.spectrum)

    def _adjoint(self, y: Tensor) -> Tensor:
        if self.boundary != "circular":
            return self._convolve_adjoint(y)
        return self._filter(y, self.spectrum.conj())

    def _pinv(self, y: Tensor) -> Tensor:
        if self.boundary != "circular":
            return super()._pinv(y)
        return self._filter(y, self.inverse_spectrum)

    # -- SVD view (circular only) ----------------------------------------------------------------------------
    def _rotate(self, x: Tensor, phase: Tensor) -> Tensor:
        cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        out = torch.fft.ifft2(torch.fft.fft2(x) * phase.to(device=x.device, dtype=cdtype))
        return out.real.to(x.dtype)

    def _check_svd(self) -> None:
        if not self.has_svd:
            raise ValueError(f"only circular blur has an SVD view, this one has boundary={self.boundary!r}")

    def V_adjoint(self, x: Tensor) -> Tensor:
        self._check_svd()
        return SVDView.V_adjoint(self, x)

    def V(self, z: Tensor) -> Tensor:
        self._check_svd()
        return SVDView.V(self, z)

    def U_adjoint(self, y: Tensor) -> Tensor:
        self._check_svd()
        return SVDView.U_adjoint(self, y)

    def U(self, z: Tensor) -> Tensor:
        self._check_svd()
        return SVDView.U(self, z)

    def _V_adjoint(self, x: Tensor) -> Tensor:
        return hartley2(x)

    _V = _V_adjoint

    def _U(self, z: Tensor) -> Tensor:
        return self._rotate(hartley2(z), self.phase)

    def _U_adjoint(self, y: Tensor) -> Tensor:
        return hartley2(self._rotate(y, self.phase.conj()))

    def _prox_l2(self, z: Tensor, y: Tensor, weight: float) -> Tensor:
        if self.boundary != "circular":
            return super()._prox_l2(z, y, weight)
        spectrum = self.spectrum.to(z.device)
        cdtype = torch.complex128 if z.dtype == torch.float64 else torch.complex64
        numerator = torch.fft.rfft2(y) * spectrum.conj().to(cdtype) + weight * torch.fft.rfft2(z)
        out = torch.fft.irfft2(numerator / (spectrum.abs() ** 2 + weight).to(cdtype), s=z.shape[-2:])
        return out.to(z.dtype)
