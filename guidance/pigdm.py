"""Pseudoinverse-guided diffusion models, PiGDM (Song, Vahdat, Mardani, Kautz, ICLR 2023).

PiGDM approximates ``p(x0 | x_t) ~ N(x0_hat, r_t^2 I)`` with ``r_t^2 = sigma_t^2 / (alpha_t^2 + sigma_t^2)`` (the
exact posterior variance for unit-variance data), so that for a linear ``A`` (the paper's pseudoinverse guidance,
Sec. 3)

    grad_{x_t} log p(y | x_t) ~ (d x0_hat / d x_t)^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat)

a vector-Jacobian product through the denoiser. ``A^T (r^2 A A^T + s^2 I)^{-1} v = prox_l2(0, v, s^2 / r^2) / r^2``
(push-through identity), or ``A^+ v / r^2`` when ``sigma_y = 0``; with an SVD view it is applied exactly in the
spectral coordinates. After the DDIM move ``x'_{t-1}``, the score ``g`` enters with one of two weights:

* ``weighting="code"`` (default): the authors' implementation (NVlabs/RED-diff ``algos/pgdm.py``),
  ``x_{t-1} = x'_{t-1} + scale * alpha_{t-1} alpha_t r_t^2 g`` (``r_t^2 g`` is their ``J^T A^+ (y - A x0_hat)`` when
  ``sigma_y = 0``): strong at low noise, vanishing at high noise;
* ``weighting="bayes"``: the Tweedie weight of ``DPS(normalize="likelihood")``,
  ``x_{t-1} = x'_{t-1} + scale * (d x_{t-1} / d x0_hat) (sigma_t^2 / alpha_t) g``: exact Bayes for a unit-variance
  Gaussian prior, but on a trained network its large high-noise steps diverge (as DPS's likelihood step does).
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
        scale: factor on the weighted score.
        sigma_y: measurement noise (default ``operator.sigma_y``).
        weighting: ``"code"`` (the authors' weight) or ``"bayes"`` (see the module docstring).
    """

    needs_grad = True
    default_eta = 0.0

    def __init__(self, operator: Any, y: Tensor, scale: float = 1.0, sigma_y: float | None = None,
                 weighting: str = "code") -> None:
        check_operator(operator, "PiGDM", needs_gradient=True, needs_linear=True)
        super().__init__(operator, y)
        self.scale = check_positive("scale", scale)
        if weighting not in ("code", "bayes"):
            raise ValueError(f"weighting must be 'code' or 'bayes', got {weighting!r}")
        self.weighting = weighting
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
        alpha, sigma = t.level.alpha, t.level.sigma
        score = self.likelihood_score(t.x, t.x0_hat, alpha, sigma)
        if self.weighting == "bayes":
            weight = t.x0_weight * float(sigma**2 / alpha)
        else:
            weight = float(t.alpha_next * alpha * sigma**2 / (alpha**2 + sigma**2))
        return t.x_next.detach() + self.scale * weight * score

    def __repr__(self) -> str:
        return f"PiGDM(scale={self.scale}, sigma_y={self.sigma_y}, weighting={self.weighting!r})"
