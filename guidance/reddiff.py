"""RED-diff: variational regularisation by denoising diffusion (Mardani, Song, Kautz, Vahdat, ICLR 2024,
arXiv 2305.04391), Algorithm 1.

The estimate ``mu`` minimises ``||y - A(mu)||^2 / 2 + lam E_t[w_t ||eps(alpha_t mu + sigma_t z, t) - z||^2]`` by
Adam, one level per step from high to low noise, with a stop-gradient through the network (paper Sec. 4):
at step ``i``

    x_t  = alpha_t mu + sigma_t z                  (fresh z; the sampler's start noise at step 0)
    grad = w_obs A^T (A mu - y) / m  +  lam (sigma_t / alpha_t) (sg[eps_hat(x_t)] - z) / d
    mu  <- Adam(mu, grad)

``m`` and ``d`` are the measurement and image sizes (the official code's means); ``w_t = sigma_t / alpha_t`` is the
official ``"linear"`` weighting (inverse square-root SNR). ``mu`` starts at ``argmin ||A x - y||^2 + sigma_y^2 ||x||^2``
for linear operators: the official ``A^+ y`` when ``sigma_y = 0``, and not the pseudo-inverse of noisy data, which on
an ill-conditioned operator (blur) is mostly amplified noise; 0 for nonlinear ones. No gradient through the network. Official defaults: ``lam = 0.25``, ``lr = 0.1``,
Adam betas ``(0.9, 0.99)``, 1000 steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffguide.samplers.base import DenoiseFn
from diffguide.samplers.inverse import Transition, noise_like
from diffguide.samplers.schedule import Plan

from .measurement import MeasurementSolver, check_operator, check_positive


class REDDiff(MeasurementSolver):
    """RED-diff with the official defaults (``lam=0.25``, ``lr=0.1``, ``obs_weight=1``).

    Args:
        operator: differentiable forward model (black boxes are refused).
        y: measurement ``(1 or B, *operator.out_shape)``.
        lam: weight of the denoising (score-matching) regulariser.
        lr: Adam's learning rate on ``mu`` (betas ``(0.9, 0.99)``).
        obs_weight: weight of the data term.
    """

    needs_grad = False
    default_eta = 0.0

    def __init__(self, operator: Any, y: Tensor, lam: float = 0.25, lr: float = 0.1, obs_weight: float = 1.0) -> None:
        check_operator(operator, "REDDiff", needs_gradient=True)
        super().__init__(operator, y)
        self.lam = check_positive("lam", lam)
        self.lr = check_positive("lr", lr, allow_zero=False)
        self.obs_weight = check_positive("obs_weight", obs_weight)
        self.mu: Tensor | None = None
        self._noise: Tensor | None = None
        self._next_noise: Tensor | None = None
        self._optimizer: torch.optim.Adam | None = None

    def reset(self) -> None:
        super().reset()
        self.mu, self._noise, self._next_noise, self._optimizer = None, None, None, None

    def initial_mu(self, like: Tensor) -> Tensor:
        if not getattr(self.operator, "is_linear", False):
            return torch.zeros_like(like)
        self.stats.forward_model_calls += like.shape[0]
        y = self.y.to(like).expand(like.shape[0], *self.y.shape[1:])
        sigma_y = getattr(self.operator, "sigma_y", 0.0)
        if sigma_y == 0 or not callable(getattr(self.operator, "prox_l2", None)):
            return self.operator.pinv(y)
        return self.operator.prox_l2(torch.zeros_like(like), y, sigma_y**2)

    def prepare(self, model: DenoiseFn, x: Tensor, plan: Plan, index: int) -> Tensor:
        if index == 0 or self.mu is None:
            self.mu = self.initial_mu(x).detach().clone().requires_grad_(True)
            self._optimizer = torch.optim.Adam([self.mu], lr=self.lr, betas=(0.9, 0.99))
            self._next_noise = x                       # the sampler's seeded start noise
        alpha, sigma = plan.alpha(index).to(x), plan.sigma_vp(index).to(x)
        self._noise = self._next_noise
        return alpha * self.mu.detach() + sigma * self._noise

    def correct(self, t: Transition) -> Tensor:
        mu = self.mu
        with torch.enable_grad():
            data = self.residual(mu).flatten(1).square().sum(1) / 2
            (grad,) = torch.autograd.grad(data.sum(), mu)
        grad = self.obs_weight * grad / self.y[0].numel()
        if float(t.level.alpha) > 0:
            weight = self.lam * float(t.level.sigma / t.level.alpha) / mu[0].numel()
            grad = grad + weight * (t.eps_hat.detach() - self._noise)
        self._optimizer.zero_grad()
        mu.grad = grad
        self._optimizer.step()
        self._next_noise = noise_like(mu, t.generator)   # for the next step's x_t
        return mu.detach().clone()

    def __repr__(self) -> str:
        return f"REDDiff(lam={self.lam}, lr={self.lr}, obs_weight={self.obs_weight})"
