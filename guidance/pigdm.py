"""Pseudoinverse-guided diffusion models, PiGDM (Song, Vahdat, Mardani, Kautz, ICLR 2023).

PiGDM approximates ``p(x0 | x_t) ~ N(x0_hat, r_t^2 I)`` with ``r_t^2 = sigma_t^2 / (alpha_t^2 + sigma_t^2)`` (the
exact posterior variance for unit-variance data), so that for a linear ``A`` (the paper's pseudoinverse guidance,
Sec. 3)

    grad_{x_t} log p(y | x_t) ~ (d x0_hat / d x_t)^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat)

a vector-Jacobian product through the denoiser. ``A^T (r^2 A A^T + s^2 I)^{-1} v = prox_l2(0, v, s^2 / r^2) / r^2``
(push-through identity), or ``A^+ v / r^2`` when ``sigma_y = 0``; with an SVD view it is applied exactly in the
spectral coordinates. The score enters the sampler with its Bayes (Tweedie) weight, as ``DPS(normalize=
"likelihood")``: ``x_{t-1} = x'_{t-1} + scale * (d x_{t-1} / d x0_hat) (sigma_t^2 / alpha_t) * score``. For a
Gaussian prior of unit variance this is exact Bayes; the paper's Algorithm 1 adds ``sqrt(alpha_bar_t) g`` instead,
a hand-set weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffguide.samplers.inverse import Transition

from .measurement import MeasurementSolver, check_operator, check_positive


class PiGDM(MeasurementSolver):
    """PiGDM for linear operators, DDIM with ``eta = 0`` (the official configs), one backward pass per step.

    Args:
        operator: linear operator (``adjoint``, ``pinv``, ``prox_l2``; an SVD view is used when present).
        y: measurement ``(1 or B, *operator.out_shape)``.
        scale: factor on the Bayes-weighted score (1: the paper's likelihood with no extra weight).
        sigma_y: measurement noise (default ``operator.sigma_y``).
    """

    needs_grad = True
    default_eta = 0.0

    def __init__(self, operator: Any, y: Tensor, scale: float = 1.0, sigma_y: float | None = None) -> None:
        check_operator(operator, "PiGDM", needs_gradient=True, needs_linear=True)
        super().__init__(operator, y)
        self.scale = check_positive("scale", scale)
        self.sigma_y = check_positive("sigma_y", operator.sigma_y if sigma_y is None else sigma_y)

    def weighted_adjoint(self, residual: Tensor, r2: float) -> Tensor:
        """``A^T (r2 A A^T + sigma_y^2 I)^{-1} residual``."""
        op = self.operator
        if getattr(op, "has_svd", False):
            s = op.singular_values.to(residual)
            coeffs = op.U_adjoint(residual) * s / (r2 * s**2 + self.sigma_y**2).clamp_min(torch.finfo(s.dtype).tiny)
            return op.V(torch.where(s > 0, coeffs, 0.0))
        if self.sigma_y == 0:
            return op.pinv(residual) / r2
        return op.prox_l2(torch.zeros(residual.shape[0], *op.in_shape, device=residual.device, dtype=residual.dtype),
                          residual, self.sigma_y**2 / r2) / r2

    def likelihood_score(self, x: Tensor, x0_hat: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """PiGDM's ``grad_{x_t} log p(y | x_t)``, ``x0_hat`` carrying a graph to ``x``."""
        r2 = float(sigma**2 / (alpha**2 + sigma**2))
        direction = self.weighted_adjoint(self.residual(x0_hat).detach(), r2)
        (score,) = torch.autograd.grad((x0_hat * direction).sum(), x)
        self.stats.gradient_calls += x.shape[0]
        return score

    def correct(self, t: Transition) -> Tensor:
        if float(t.level.alpha) == 0.0:             # pure noise: x_t carries nothing of x0 (see guidance.DPS)
            return t.x_next.detach()
        score = self.likelihood_score(t.x, t.x0_hat, t.level.alpha, t.level.sigma)
        weight = self.scale * t.x0_weight * float(t.level.sigma**2 / t.level.alpha)
        return t.x_next.detach() + weight * score

    def __repr__(self) -> str:
        return f"PiGDM(scale={self.scale}, sigma_y={self.sigma_y})"
