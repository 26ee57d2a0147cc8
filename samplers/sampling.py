"""Deterministic and ancestral samplers over a denoiser callable.

Every loop keeps the VP state ``x_t = alpha x0 + sigma eps`` (what a diffusers UNet sees) and does its
maths on the scale-free ``x / alpha`` with VE sigmas (k-diffusion form), so one ``Plan`` serves all.
The denoiser returns x0; a CFG++ guide returns two x0 estimates and the loops use ``x0`` for data terms
and ``x0_renoise`` for noise terms (Chung et al. 2025, CFG++, Sec. 3 and App. "sampler variants").
Start from ``x = torch.randn(...)`` (VP noise), as diffusers does for DDIM, Euler and DPM-Solver.
"""

from __future__ import annotations

import math
from typing import Callable

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


def _check(x: Tensor, plan: Plan) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a samplers.Plan, got {type(plan).__name__}")


def _run(model: DenoiseFn, x: Tensor, plan: Plan, update, callback, disable) -> Tensor:
    """Shared loop: denoise at level i, move the VE state with ``update``, convert back to VP."""
    _check(x, plan)
    state: dict = {}
    for i in trange(plan.num_steps, disable=disable, desc="sampling"):
        level = _level(plan, i, x)
        d = as_denoised(model(x, level))
        s, s_next = plan.sigmas[i].item(), plan.sigmas[i + 1].item()
        x_ve = update(x / level.alpha, d.x0, d.x0_renoise, s, s_next, i, state)
        x = x_ve * plan.alpha(i + 1).to(x.device, x.dtype)
        if callback is not None:
            callback({"x": x, "i": i, "t": level.t, "sigma": s, "x0_hat": d.x0})
    return x


def sample_ddim(model: DenoiseFn, x: Tensor, plan: Plan, eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callback | None = None, disable: bool = False) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12) with stochasticity ``eta`` in [0, 1]."""
    if not 0.0 <= float(eta) <= 1.0 or math.isnan(eta):
        raise ValueError(f"eta must lie in [0, 1], got {eta}")

    def update(x, x0, x0_r, s, s_next, i, state):
        ab, ab_next = 1 / (1 + s**2), 1 / (1 + s_next**2)
        std = eta * math.sqrt((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)) if s_next > 0 else 0.0
        eps_r = (x - x0_r) / s  # epsilon of the renoise estimate
        out = math.sqrt(ab_next) * x0 + math.sqrt(max(1 - ab_next - std**2, 0.0)) * eps_r
        if std > 0:
            out = out + std * _noise_like(x, generator)
        return out / math.sqrt(ab_next)

    return _run(model, x, plan, update, callback, disable)


def sample_euler(model: DenoiseFn, x: Tensor, plan: Plan, callback: Callback | None = None,
                 disable: bool = False) -> Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn): ``x' = D + s' (x - D_r)/s``."""

    def update(x, x0, x0_r, s, s_next, i, state):
        return x0 + s_next * (x - x0_r) / s

    return _run(model, x, plan, update, callback, disable)


def ancestral_sigmas(s: float, s_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to ``sigma_down`` and fresh noise ``sigma_up``."""
    if s_next == 0:
        return 0.0, 0.0
    up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    return math.sqrt(s_next**2 - up**2), up


def sample_euler_ancestral(model: DenoiseFn, x: Tensor, plan: Plan, eta: float = 1.0,
                           generator: torch.Generator | None = None, callback: Callback | None = None,
                           disable: bool = False) -> Tensor:
    """Euler-ancestral (k-diffusion ``sample_euler_ancestral``), noise in the scale-free state."""
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")

    def update(x, x0, x0_r, s, s_next, i, state):
        down, up = ancestral_sigmas(s, s_next, eta)
        out = x0 + down * (x - x0_r) / s
        return out + up * _noise_like(x, generator) if up > 0 else out

    return _run(model, x, plan, update, callback, disable)


def sample_dpmpp_2m(model: DenoiseFn, x: Tensor, plan: Plan, callback: Callback | None = None,
                    disable: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep in log-sigma time ``lambda = -log s``.

    First-order on the first step and when moving to sigma 0. With a CFG++ guide the second-order term
    uses ``x0 - x0_renoise_prev`` (the convention of CFG++'s SD1.5 code).
    """

    def update(x, x0, x0_r, s, s_next, i, state):
        prev = state.get("x0_r_prev")
        h = math.log(s / s_next) if s_next > 0 else math.inf
        state["x0_r_prev"], h_prev = x0_r, state.get("h")
        state["h"] = h
        if s_next == 0:
            return x0
        out = x0 + math.exp(-h) * (x - x0_r)
        if prev is not None and h_prev is not None and math.isfinite(h_prev):
            r = h_prev / h
            out = out + (-math.expm1(-h)) / (2 * r) * (x0 - prev)
        return out

    return _run(model, x, plan, update, callback, disable)


SAMPLERS = {
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
}
