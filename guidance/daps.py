"""Decoupled annealing posterior sampling, DAPS (Zhang, Chu, Berner, Meng, Anandkumar, Song, CVPR 2025,
arXiv 2407.01521), Algorithm 1 with the Gaussian prior approximation and Langevin dynamics.

At each annealing level ``sigma_i`` (the VE level ``sigma_t / alpha_t`` of the plan's step ``i``):

    x0_hat = PF-ODE solution from x_t to level 0 (``ode_steps`` Euler steps over the plan's remaining levels;
             1 is the denoiser ``D(x_t)``; the official "diffusion_scheduler")
    x0 <- x0_hat; K times:  x0 <- x0 - lr_i [grad ||A(x0) - y||^2 / tau^2 + (x0 - x0_hat) / max(sigma_i, sigma_min)^2]
                                     + sqrt(2 lr_i) z                                   (Langevin on p(x0 | x_t, y))
    x_{t_{i+1}} = alpha_{i+1} x0 + sigma_{i+1} z                                        (decoupled re-noising)

``lr_i = lr (1 + (i / N) (lr_min_ratio - 1))``. The data term is the official code's (``operator.gradient`` of the
squared norm over ``tau^2``). The official annealing stops at ``sigma_min = 0.1``; on a plan that goes lower, the
Langevin prior term uses ``sigma_min`` there (its step ``lr / sigma^2`` would otherwise make it unstable).
Needs ``grad ||A(x) - y||^2`` only (autograd through ``A``, never through the network), so it serves nonlinear
operators. The official pixel configs anneal 200 levels with 5 ODE
steps (1000 denoiser calls) and 100 Langevin steps of ``lr = 1e-4``, ``lr_min_ratio = 0.01``, ``tau = 0.01``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffguide.samplers.base import DenoiseFn, as_denoised
from diffguide.samplers.inverse import Transition, level_at, noise_like
from diffguide.samplers.schedule import Plan

from .measurement import MeasurementSolver, check_count, check_operator, check_positive


class DAPS(MeasurementSolver):
    """DAPS with the official pixel-space defaults (``ode_steps=5``, ``langevin_steps=100``, ``lr=1e-4``,
    ``lr_min_ratio=0.01``, ``tau=0.01``); the number of annealing levels is the plan's.

    Args:
        operator: differentiable forward model (black boxes are refused).
        y: measurement ``(1 or B, *operator.out_shape)``.
        ode_steps: Euler steps of the inner PF-ODE (denoiser calls per level).
        langevin_steps: ``K``.
        lr, lr_min_ratio: the Langevin step and its linear decay over the levels.
        tau: the likelihood's standard deviation (a temperature; the official configs do not set it to ``sigma_y``).
        sigma_min: the smallest annealing level the Langevin prior term uses.
    """

    needs_grad = False
    default_eta = 0.0

    def __init__(self, operator: Any, y: Tensor, ode_steps: int = 5, langevin_steps: int = 100, lr: float = 1e-4,
                 lr_min_ratio: float = 0.01, tau: float = 0.01, sigma_min: float = 0.1) -> None:
        check_operator(operator, "DAPS", needs_gradient=True)
        super().__init__(operator, y)
        self.ode_steps = check_count("ode_steps", ode_steps)
        self.langevin_steps = check_count("langevin_steps", langevin_steps, 0)
        self.lr = check_positive("lr", lr, allow_zero=False)
        self.lr_min_ratio = check_positive("lr_min_ratio", lr_min_ratio)
        self.tau = check_positive("tau", tau, allow_zero=False)
        self.sigma_min = check_positive("sigma_min", sigma_min)
        self._model: DenoiseFn | None = None
        self._plan: Plan | None = None

    def prepare(self, model: DenoiseFn, x: Tensor, plan: Plan, index: int) -> Tensor:
        self._model, self._plan = model, plan
        return x

    def ode_x0(self, x: Tensor, x0: Tensor, index: int) -> Tensor:
        """Continue the PF-ODE from level ``index`` (where ``x0 = D(x)``) over ``ode_steps`` of the plan's levels."""
        plan, model = self._plan, self._model
        picks = torch.linspace(index, plan.num_steps - 1, self.ode_steps).round().long().unique().tolist()
        level = level_at(plan, index, x)
        for j in picks[1:]:
            nxt = level_at(plan, j, x)
            x = nxt.alpha * x0 + nxt.sigma * (x - level.alpha * x0) / level.sigma
            with torch.no_grad():
                x0 = as_denoised(model(x, nxt)).x0
            self.stats.denoiser_calls += x.shape[0]
            level = nxt
        return x0

    def data_gradient(self, x0: Tensor) -> Tensor:
        """``grad_x0 ||A(x0) - y||^2`` by autograd through the operator."""
        with torch.enable_grad():
            x0 = x0.detach().requires_grad_(True)
            loss = self.residual(x0).flatten(1).square().sum()
            (grad,) = torch.autograd.grad(loss, x0)
        return grad

    def langevin(self, x0_hat: Tensor, prior_var: float, lr: float, generator: torch.Generator | None) -> Tensor:
        x0 = x0_hat
        for _ in range(self.langevin_steps):
            drift = self.data_gradient(x0) / self.tau**2 + (x0 - x0_hat) / prior_var
            x0 = x0 - lr * drift + (2 * lr) ** 0.5 * noise_like(x0, generator)
        if not bool(torch.isfinite(x0).all()):
            raise FloatingPointError("DAPS: Langevin dynamics diverged; lower lr or raise tau")
        return x0

    def correct(self, t: Transition) -> Tensor:
        if self._plan is None:
            raise RuntimeError("DAPS runs through samplers.sample_inverse (prepare() gives it the model)")
        index, num = t.level.index, t.level.num_steps
        x0_hat = self.ode_x0(t.x, t.x0_hat, index) if self.ode_steps > 1 else t.x0_hat
        sigma_ve = float(t.level.sigma / t.level.alpha)
        lr = self.lr * (1 + index / num * (self.lr_min_ratio - 1))
        x0 = self.langevin(x0_hat, max(sigma_ve, self.sigma_min) ** 2, lr, t.generator)
        if float(t.sigma_next) == 0:
            return t.alpha_next * x0
        return t.alpha_next * x0 + t.sigma_next * noise_like(x0, t.generator)

    def __repr__(self) -> str:
        return (f"DAPS(ode_steps={self.ode_steps}, langevin_steps={self.langevin_steps}, lr={self.lr}, "
                f"lr_min_ratio={self.lr_min_ratio}, tau={self.tau}, sigma_min={self.sigma_min})")
