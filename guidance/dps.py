"""Diffusion posterior sampling (Chung, Kim, McCann, Klasky, Ye, ICLR 2023, arXiv 2209.14687).

After each reverse step (paper Alg. 1, DDPM ancestral with ``x0_hat = x0_hat(x_i)`` by Tweedie):

    x_{i-1} = x'_{i-1} - zeta_i * grad_{x_i} ||y - A(x0_hat(x_i))||^2,    zeta_i = zeta' / ||y - A(x0_hat)||

The official code instead takes ``x_{i-1} = x'_{i-1} - scale * grad_{x_i} ||y - A(x0_hat)||`` with the
*non-squared* norm. Since ``grad ||r|| = grad ||r||^2 / (2 ||r||)`` the two agree for ``scale = 2 zeta'``
(:meth:`DPS.from_paper`). ``normalize="squared"`` gives ``scale * grad ||r||^2`` (unnormalised).
Norms are per sample (the official code's batch-wide norm couples the samples of a batch).

``clip_x0=(low, high)`` is the official code's ``clip_denoised``: ``x0_hat`` is clamped to the data range before
both the reverse step and the residual (so clamped pixels get no gradient). The official configs clip to
[-1, 1] (``configs/diffusion_config.yaml``: ``clip_denoised: True``); here it is off by default, because the
operators carry no data range and the solver also serves unbounded data (the Gaussian-mixture benchmarks),
where clamping would bias the posterior.

``normalize="likelihood"`` uses DPS's Gaussian likelihood ``log p(y | x_t) ≈ -||y - A(x0_hat)||^2 / (2 sigma_y^2)``
(paper Eq. 16) as a score term with its Bayes weight instead of a tuned step: the Tweedie shift
``x0_hat <- x0_hat + (sigma_t^2 / alpha_t) grad log p(y | x_t)`` carried through the sampler's move, i.e.
``x_{i-1} = x'_{i-1} - scale * (d x_{i-1} / d x0_hat) * (sigma_t^2 / alpha_t) * grad ||r||^2 / (2 sigma_y^2)``.
It is exact Bayes for an exact likelihood, but DPS's likelihood drops ``Cov[x0 | x_t]``, so at high noise and
small ``sigma_y`` the step overshoots (on the digits with ``sigma_y = 0.05`` it diverges); use ``scale < 1`` there.
At a pure-noise level (``alpha = 0``, a flow schedule's first) ``x_t`` carries nothing of ``x0``: the gradient is 0
and the weight ``sigma_t^2 / alpha_t`` infinite, and the limit of their product needs ``Cov[x0 | x_t]``, which
autograd cannot give at ``alpha = 0``; that step takes no correction.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from diffguide.samplers.inverse import Transition

from .measurement import MeasurementSolver, check_operator, check_positive

NORMALIZATIONS = ("norm", "squared", "likelihood")


def check_range(name: str, value: tuple[float, float] | None) -> tuple[float, float] | None:
    """``None`` or a pair of finite real numbers ``(low, high)`` with ``low < high``."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != 2 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
        raise TypeError(f"{name} must be None or a pair of finite numbers (low, high), got {value!r}")
    if not value[0] < value[1]:
        raise ValueError(f"{name} must have low < high, got {tuple(value)}")
    return float(value[0]), float(value[1])


class DPS(MeasurementSolver):
    """DPS with step ``scale`` in the official code's convention (``normalize="norm"``).

    Args:
        operator: differentiable forward model (``tasks.operators``; black boxes are refused).
        y: measurement ``(1 or B, *operator.out_shape)`` in the operator's data range.
        scale: step on ``grad ||y - A(x0_hat)||`` (code: 0.3 SR/deblur, 0.5 inpainting, 1.0 phase retrieval
            at 1000 DDPM steps; fewer steps need retuning).
        normalize: ``"norm"`` (code), ``"squared"`` or ``"likelihood"`` (Bayes weight, ``scale = 1`` is exact
            Bayes with DPS's likelihood approximation; needs ``sigma_y > 0``).
        decode: latent -> image map for latent diffusion (latent DPS); ``None`` in pixel space.
        sigma_y: noise level for ``"likelihood"`` (default: ``operator.sigma_y``).
        clip_x0: ``(low, high)``: clamp ``x0_hat`` to the data range as the official code does (``(-1, 1)`` for
            its images); ``None`` (default) does not clamp. Pixel space only.
    """

    needs_grad = True
    default_eta = 1.0

    def __init__(self, operator: Any, y: Tensor, scale: float = 1.0, normalize: str = "norm",
                 decode: Callable[[Tensor], Tensor] | None = None, sigma_y: float | None = None,
                 clip_x0: tuple[float, float] | None = None) -> None:
        check_operator(operator, type(self).__name__, needs_gradient=True)
        super().__init__(operator, y, decode)
        self.scale = check_positive("scale", scale)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.normalize = normalize
        self.sigma_y = check_positive("sigma_y", getattr(operator, "sigma_y", 0.0) if sigma_y is None else sigma_y)
        if normalize == "likelihood" and self.sigma_y == 0:
            raise ValueError("normalize='likelihood' needs a noise level sigma_y > 0 (operator.sigma_y or sigma_y=)")
        self.clip_x0 = check_range("clip_x0", clip_x0)
        if self.clip_x0 is not None and decode is not None:
            raise ValueError("clip_x0 clamps a pixel-space x0_hat; latent models (decode=...) have no data range")

    @classmethod
    def from_paper(cls, operator: Any, y: Tensor, zeta: float, **kwargs) -> "DPS":
        """DPS with the paper's step ``zeta_i = zeta / ||y - A(x0_hat)||`` on the squared norm.

        Equals the code convention with ``scale = 2 zeta``.
        """
        return cls(operator, y, scale=2 * check_positive("zeta", zeta), **kwargs)

    def data_loss(self, x0_hat: Tensor) -> Tensor:
        """Per-sample ``||y - A(x0_hat)||`` (or its square), shape ``(B,)``."""
        squared = self.residual(x0_hat).flatten(1).square().sum(1)
        if self.normalize != "norm":
            return squared
        return squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt()   # gradient 0, not NaN, at r = 0

    def gradient(self, x: Tensor, x0_hat: Tensor) -> tuple[Tensor, Tensor]:
        """``(grad_x sum_b loss_b, loss)``: the measurement gradient through the denoiser (needs a graph)."""
        if not x.requires_grad:
            raise RuntimeError(f"{type(self).__name__} needs x0_hat computed with gradients to x "
                               "(run it through samplers.sample_inverse)")
        loss = self.data_loss(x0_hat)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        self.stats.gradient_calls += x.shape[0]
        return grad, loss.detach()

    def step_weight(self, transition: Transition) -> float:
        """The factor on ``grad loss``: ``scale``, or the Bayes weight for ``normalize="likelihood"``."""
        if self.normalize != "likelihood":
            return self.scale
        level = transition.level
        if float(level.alpha) == 0.0:  # pure noise: see the module docstring
            return 0.0
        tweedie = float(level.sigma**2 / level.alpha)
        return self.scale * transition.x0_weight * tweedie / (2 * self.sigma_y**2)

    def clipped(self, transition: Transition) -> tuple[Tensor, Tensor]:
        """``(x0_hat, x_next)`` of the move with ``x0_hat`` clamped to ``clip_x0`` (unchanged if ``None``).

        The move is affine in ``x0_hat`` at fixed ``x`` and noise, so the clamped move is
        ``x_next + x0_weight * (clamp(x0_hat) - x0_hat)`` exactly.
        """
        if self.clip_x0 is None:
            return transition.x0_hat, transition.x_next
        x0_hat = transition.x0_hat.clamp(*self.clip_x0)
        return x0_hat, transition.x_next + transition.x0_weight * (x0_hat - transition.x0_hat)

    def correct(self, transition: Transition) -> Tensor:
        x0_hat, x_next = self.clipped(transition)
        grad, _ = self.gradient(transition.x, x0_hat)
        return x_next.detach() - self.step_weight(transition) * grad

    def __repr__(self) -> str:
        clip = "" if self.clip_x0 is None else f", clip_x0={self.clip_x0}"
        return f"{type(self).__name__}(scale={self.scale}, normalize={self.normalize!r}{clip})"
