"""Deterministic and ancestral samplers over a denoiser callable.

One state for every model: the loops keep the VP state ``x_t = alpha x0 + sigma eps`` (what a diffusers UNet
sees) and move it with VP coefficients read from one ``Plan`` of VE sigmas ``s = sigma / alpha`` (k-diffusion's
levels). A rectified-flow level ``s_flow`` is the VE level ``s_flow / (1 - s_flow)``; its pure-noise first
level (``s = inf``: ``alpha = 0``, ``sigma = 1``) is an ordinary finite VP state, which is why the loops keep the
VP state rather than k-diffusion's ``x / alpha`` (infinite there) or the flow state (which a VP network would
need rescaled at every level). The network's own input is the denoiser's business, as k-diffusion's ``c_in``
wrappers do it: ``guidance.GuidedDenoiser`` hands a flow network ``x / (alpha + sigma)`` and converts its
velocity back to x0 (``schedule.network_input_scale``). So DDIM, Euler, Euler-ancestral, DPM-Solver++ and the
SMC and inverse-problem loops serve flow models unchanged.

Every update is written with ``x0`` and ``eps_r = (x - alpha x0_renoise) / sigma`` only, never dividing by
``alpha``, so the pure-noise level is taken exactly. The denoiser returns x0; a CFG++ guide returns two x0
estimates and the loops use ``x0`` for data terms and ``x0_renoise`` for noise terms (Chung et al. 2025, CFG++,
Sec. 3 and App. "sampler variants"). Start from ``x = torch.randn(...)`` (VP noise), as diffusers does for DDIM,
Euler and DPM-Solver (and flow schedulers, whose first state is pure noise). The loops run under
``torch.no_grad()``: no autograd graph is kept across steps (``sample_inverse`` runs solvers that need one).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import trange

from .base import DenoiseFn, Level, as_denoised
from .schedule import Plan

Callback = Callable[[dict], None]


def _level(plan: Plan, i: int, x: Tensor) -> Level:
    return Level(
        t=plan.timesteps[i],
        alpha=plan.alpha(i).to(x.device, x.dtype),
        sigma=plan.sigma_vp(i).to(x.device, x.dtype),
        index=i,
        num_steps=plan.num_steps,
    )


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device if generator is None else generator.device,
                       dtype=x.dtype).to(x.device)


def check_sample_inputs(x: Tensor, plan: Plan) -> None:
    """A sampler's ``x`` (a floating-point tensor) and ``plan`` (a ``Plan``): ``TypeError`` otherwise."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a samplers.Plan, got {type(plan).__name__}")


def _run(model: DenoiseFn, x: Tensor, plan: Plan, update, callback, disable) -> Tensor:
    """Shared loop: denoise at level i, then ``x = update(x0, x0_renoise, eps_r, levels, state)`` in VP form.

    ``eps_r = (x - alpha x0_renoise) / sigma`` is the noise direction (``sigma = 1`` at pure noise, so every
    level divides by a positive number); ``levels`` holds ``alpha, sigma, s`` of level i and ``alpha_next,
    sigma_next, s_next`` of level i + 1 as floats (``s`` the VE sigma, ``inf`` at pure noise).
    """
    check_sample_inputs(x, plan)
    state: dict = {}
    with torch.no_grad():  # no autograd graph over the run (solvers that need gradients use sample_inverse)
        for i in trange(plan.num_steps, disable=disable, desc="sampling"):
            level = _level(plan, i, x)
            d = as_denoised(model(x, level))
            eps_r = (x - level.alpha * d.x0_renoise) / level.sigma
            levels = _Levels(float(plan.alpha(i)), float(plan.sigma_vp(i)), float(plan.sigmas[i]),
                             float(plan.alpha(i + 1)), float(plan.sigma_vp(i + 1)), float(plan.sigmas[i + 1]))
            x = update(d.x0, d.x0_renoise, eps_r, levels, state)
            if callback is not None:
                callback({"x": x, "i": i, "t": level.t, "sigma": levels.s, "x0_hat": d.x0})
    return x


class _Levels(NamedTuple):
    alpha: float
    sigma: float
    s: float
    alpha_next: float
    sigma_next: float
    s_next: float


def sample_ddim(model: DenoiseFn, x: Tensor, plan: Plan, eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callback | None = None, disable: bool = False) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12) with stochasticity ``eta`` in [0, 1].

    ``x' = alpha' x0 + sqrt(sigma'^2 - std^2) eps_r + std z``, ``std = eta (sigma'/sigma) sqrt(1 - alpha^2/alpha'^2)``.
    """
    if not 0.0 <= float(eta) <= 1.0 or math.isnan(eta):
        raise ValueError(f"eta must lie in [0, 1], got {eta}")

    def update(x0, x0_r, eps_r, lv, state):
        std = eta * lv.sigma_next / lv.sigma * math.sqrt(max(1 - (lv.alpha / lv.alpha_next) ** 2, 0.0))
        out = lv.alpha_next * x0 + math.sqrt(max(lv.sigma_next**2 - std**2, 0.0)) * eps_r
        return out + std * _noise_like(x0, generator) if std > 0 else out

    return _run(model, x, plan, update, callback, disable)


def sample_euler(model: DenoiseFn, x: Tensor, plan: Plan, callback: Callback | None = None,
                 disable: bool = False) -> Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn): ``x' = D + s' (x - D_r)/s``
    in VE form, i.e. ``x' = alpha' x0 + sigma' eps_r`` in VP form (the flow Euler step ``x + (s' - s) v``)."""

    def update(x0, x0_r, eps_r, lv, state):
        return lv.alpha_next * x0 + lv.sigma_next * eps_r

    return _run(model, x, plan, update, callback, disable)


def ancestral_sigmas(s: float, s_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to ``sigma_down`` and fresh noise ``sigma_up`` (VE sigmas;
    ``s = inf`` gives ``sigma_up = eta s_next``)."""
    if s_next == 0:
        return 0.0, 0.0
    up = min(s_next, eta * s_next * math.sqrt(1 - (s_next / s) ** 2))
    return math.sqrt(max(s_next**2 - up**2, 0.0)), up


def sample_euler_ancestral(model: DenoiseFn, x: Tensor, plan: Plan, eta: float = 1.0,
                           generator: torch.Generator | None = None, callback: Callback | None = None,
                           disable: bool = False) -> Tensor:
    """Euler-ancestral (k-diffusion ``sample_euler_ancestral``): ``x'_VE = D + down eps_r + up z``, VP
    ``alpha' x'_VE``."""
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")

    def update(x0, x0_r, eps_r, lv, state):
        down, up = ancestral_sigmas(lv.s, lv.s_next, eta)
        out = lv.alpha_next * (x0 + down * eps_r)
        return out + lv.alpha_next * up * _noise_like(x0, generator) if up > 0 else out

    return _run(model, x, plan, update, callback, disable)


def sample_renoise(model: DenoiseFn, x: Tensor, plan: Plan, generator: torch.Generator | None = None,
                   callback: Callback | None = None, disable: bool = False) -> Tensor:
    """Denoise, then renoise with fresh noise: ``x' = alpha' x0 + sigma' z`` (multistep consistency sampling,
    Song et al. 2023, Alg. 1; diffusers' ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``).

    Euler-ancestral's limit ``sigma_down = 0``: nothing of the current noise is kept (with a CFG++ guide the
    renoise estimate is therefore unused).
    """

    def update(x0, x0_r, eps_r, lv, state):
        return lv.alpha_next * x0 + lv.sigma_next * _noise_like(x0, generator) if lv.sigma_next > 0 else x0

    return _run(model, x, plan, update, callback, disable)


def sample_dpmpp_2m(model: DenoiseFn, x: Tensor, plan: Plan, callback: Callback | None = None,
                    disable: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep in log-sigma time ``lambda = -log s``.

    VP form: ``x' = alpha' x0 + sigma' eps_r + alpha' (1 - s'/s) / (2 r) (x0 - x0_prev)``, ``r = h_prev / h``.
    First-order on the first step, after a step from pure noise (``h_prev = inf``, the limit of the formula) and
    when moving to sigma 0. With a CFG++ guide the second-order term uses ``x0 - x0_renoise_prev`` (the
    convention of CFG++'s SD1.5 code).
    """

    def update(x0, x0_r, eps_r, lv, state):
        prev, h_prev = state.get("x0_r_prev"), state.get("h")
        h = math.log(lv.s / lv.s_next) if lv.s_next > 0 else math.inf
        state["x0_r_prev"], state["h"] = x0_r, h
        if lv.s_next == 0:
            return x0
        out = lv.alpha_next * x0 + lv.sigma_next * eps_r
        if prev is not None and math.isfinite(h_prev):
            out = out + lv.alpha_next * (-math.expm1(-h)) / (2 * h_prev / h) * (x0 - prev)
        return out

    return _run(model, x, plan, update, callback, disable)


SAMPLERS = {
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "renoise": sample_renoise,
}
