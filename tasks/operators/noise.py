"""Measurement noise models: Gaussian (``sigma_y``) and Poisson (photon counts with a ``gain``).

Images live in [-1, 1]. Poisson noise counts photons on the [0, 1] intensity ``I = (A x + 1) / 2`` (clamped at 0):
``y = 2 gain * Poisson(I / gain) - 1``, so ``E[y] = A x`` where ``A x >= -1`` and ``Var[y] = 4 gain I``
(DeepInverse's ``PoissonNoise(gain)`` on [0, 1] images, mapped to [-1, 1]).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class PoissonNoise:
    """Poisson noise with ``gain`` (the intensity of one photon on [0, 1]; smaller = less noise)."""

    def __init__(self, gain: float) -> None:
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain) or gain <= 0:
            raise ValueError(f"gain must be a finite number > 0, got {gain!r}")
        self.gain = float(gain)

    @property
    def gaussian_std(self) -> float:
        """The standard deviation on [-1, 1] at mid-grey (``I = 1/2``): ``sqrt(2 gain)``, the Gaussian surrogate
        ``sigma_y`` that solvers with a Gaussian likelihood use."""
        return math.sqrt(2 * self.gain)

    def sample(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        intensity = ((y.detach() + 1) / 2).clamp_min(0) / self.gain
        device = generator.device if generator is not None else y.device
        counts = torch.poisson(intensity.to(device, torch.float64), generator=generator)
        return (2 * self.gain * counts - 1).to(device=y.device, dtype=y.dtype)

    def __repr__(self) -> str:
        return f"PoissonNoise(gain={self.gain})"
