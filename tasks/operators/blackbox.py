"""A black-box forward model: explicit time steps of a 2-D heat (or Allen-Cahn) equation in NumPy.

Solvers can only evaluate it; there is no autograd graph and no adjoint (as for the PDE solvers
EnKG targets). Tensors that require gradients are refused so that a gradient-based solver fails loudly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Operator, check_shape


class HeatEquation(Operator):
    """Evolve ``u_t = kappa * Lap(u) + reaction * u (1 - u^2)`` for ``num_steps`` explicit Euler steps of ``dt``
    on a periodic unit grid, then observe every ``stride``-th pixel.

    Explicit stability needs ``kappa * dt <= 1/4``. With ``reaction = 0`` the map is linear (a heat-kernel
    blur) but still exposed only as a black box; ``reaction > 0`` makes it nonlinear.
    """

    is_blackbox = True

    def __init__(self, shape: Sequence[int], kappa: float = 1.0, dt: float = 0.2, num_steps: int = 5,
                 stride: int = 2, reaction: float = 0.0, sigma_y: float = 0.0) -> None:
        shape = check_shape(shape)
        if not kappa > 0 or not dt > 0 or kappa * dt > 0.25:
            raise ValueError(f"need kappa > 0, dt > 0 and kappa * dt <= 1/4 for stability, got {kappa} * {dt}")
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if not reaction >= 0:
            raise ValueError(f"reaction must be >= 0, got {reaction}")
        c, h, w = shape
        super().__init__(shape, (c, -(-h // stride), -(-w // stride)), sigma_y)
        self.kappa, self.dt, self.num_steps, self.stride, self.reaction = kappa, dt, num_steps, stride, reaction

    def _forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise TypeError(f"{self.name} is a black-box forward model without gradients; detach the input, "
                            "or use a derivative-free solver such as guidance.EnKG")
        u = x.detach().cpu().numpy().astype(np.float64)
        for _ in range(self.num_steps):
            lap = (np.roll(u, 1, -1) + np.roll(u, -1, -1) + np.roll(u, 1, -2) + np.roll(u, -1, -2) - 4 * u)
            u = u + self.dt * (self.kappa * lap + self.reaction * u * (1 - u * u))
        if not np.isfinite(u).all():
            raise FloatingPointError(f"{self.name} produced non-finite values; lower dt or reaction")
        y = u[..., :: self.stride, :: self.stride]
        return torch.from_numpy(np.ascontiguousarray(y)).to(device=x.device, dtype=x.dtype)
