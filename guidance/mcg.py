"""Manifold constrained gradients (Chung, Sim, Ryu, Ye, NeurIPS 2022, arXiv 2206.00941).

Per reverse step, with ``x0_hat = x0_hat(x_i)`` (paper Eqs. 14-16, official inpainting code):

    x'_{i-1} = reverse step (DDPM ancestral)
    x'_{i-1} <- x'_{i-1} - scale * (I - A^+ A) grad_{x_i} ||y - A x0_hat||        (MCG: gradient on the unmeasured part)
    x_{i-1}  = x'_{i-1} + A^+ (y_{i-1} - A x'_{i-1}),   y_{i-1} = alpha_{i-1} y + sigma_{i-1} A z   (projection)

For inpainting ``(I - A^+ A) g = (1 - m) g`` and the projection is ``(1 - m) x + m y_{i-1}``. The measurement
is noised to the *next* level (the official code uses ``q_sample(y, t)``, one level off). The hard
projection is exact for noiseless data; with noise it copies the noise into the sample (why DPS exists).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from diffguide.samplers.inverse import Transition, noise_like

from .dps import DPS
from .measurement import check_operator


class MCG(DPS):
    """MCG for a linear operator with ``pinv``/``project`` (inpainting, SR, blur, colorization).

    Args:
        operator: linear operator (``tasks.operators.LinearOperator``).
        y: measurement ``(1 or B, *operator.out_shape)``.
        scale: step ``alpha`` on ``grad ||y - A x0_hat||`` (official inpainting code: 1 at 1000 DDPM steps).
        project: apply the measurement-set projection after the gradient (``False`` leaves the gradient only).
        clip_x0: ``(low, high)`` clamps ``x0_hat`` to the data range, as the official code does (see :class:`DPS`).
    """

    def __init__(self, operator: Any, y: Tensor, scale: float = 1.0, project: bool = True,
                 clip_x0: tuple[float, float] | None = None) -> None:
        check_operator(operator, "MCG", needs_gradient=True, needs_linear=True)
        super().__init__(operator, y, scale=scale, normalize="norm", clip_x0=clip_x0)
        if not isinstance(project, bool):
            raise TypeError(f"project must be True or False, got {project!r}")
        self.project = project
        if project and self.sigma_y > 0 and getattr(operator, "mask", None) is None:
            warnings.warn(f"MCG's projection x + A^+ (y_t - A x) copies the measurement noise (sigma_y = "
                          f"{self.sigma_y}) into the estimate, amplified by A^+ on {type(operator).__name__} (on noisy "
                          "deblurring it returns the pseudo-inverse A^+ y); use project=False, or DPS, PiGDM, DiffPIR "
                          "or DDRM, which weigh the noise", UserWarning, stacklevel=2)

    def noised_measurement(self, alpha: Tensor, sigma: Tensor, like: Tensor,
                           generator: torch.Generator | None) -> Tensor:
        """``y_t = alpha y + sigma A z``: a draw of ``A x_t`` given ``A x0 = y`` (VP marginal)."""
        y = self.y.to(like).expand(like.shape[0], *self.y.shape[1:])
        if float(sigma) == 0.0:
            return alpha * y
        self.stats.forward_model_calls += like.shape[0]
        return alpha * y + sigma * self.operator.forward(noise_like(like, generator))

    def correct(self, transition: Transition) -> Tensor:
        x0_hat, x_next = self.clipped(transition)
        grad, _ = self.gradient(transition.x, x0_hat)
        x_next = x_next.detach() - self.step_weight(transition) * self.operator.project_null(grad)
        self.stats.forward_model_calls += x_next.shape[0]          # project_null evaluates A once
        if not self.project:
            return x_next
        y_next = self.noised_measurement(transition.alpha_next, transition.sigma_next, x_next, transition.generator)
        self.stats.forward_model_calls += x_next.shape[0]          # and so does project
        return self.operator.project(x_next, y_next)
