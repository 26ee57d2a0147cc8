"""What the k-diffusion-style loops share: the denoiser at any VE level of a plan, and Karras et al.'s churn.

The loops keep the VP state ``x = alpha x0 + sigma eps`` (``samplers.sampling``) and write each step in k-diffusion's
VE form ``x / alpha = D + s e`` through an :class:`Estimate`: the data estimate ``D`` (guided x0), the renoise
estimate ``D_r`` and the noise direction ``e = (x - alpha D_r) / sigma``. A step's VE result ``y`` (finite wherever
the step is defined) becomes the VP state ``alpha(s') y``; nothing divides by ``alpha``, so a flow plan's pure-noise
first level (``s = inf``) is an ordinary state. A second evaluation within step ``i`` (Heun, DPM-2, DPM++ 2S / SDE)
is handed ``Level.index = i`` too, so a guide that keeps state across steps sees two calls per step;
``GuidedDenoiser`` resets its guide once per run, at the first of them.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .base import DenoiseFn, Level, as_denoised
from .sampling import check_sample_inputs
from .schedule import Plan
from .sigmas import timestep_at

Callback = Callable[[dict], None]


def vp_coefs(s: float) -> tuple[float, float]:
    """``(alpha, sigma)`` of VE level ``s``: ``(1, s) / sqrt(1 + s^2)``, ``(0, 1)`` at ``s = inf``."""
    if math.isinf(s):
        return 0.0, 1.0
    alpha = 1 / math.sqrt(1 + s * s)
    return alpha, s * alpha


class Estimate(NamedTuple):
    x0: Tensor      # D: data term (guided)
    x0_r: Tensor    # D_r: renoise estimate (the unconditional one under a CFG++ guide)
    eps: Tensor     # e = (x - alpha D_r) / sigma: noise direction


def evaluate(model: DenoiseFn, x: Tensor, plan: Plan, i: int, s: float) -> Estimate:
    """The denoiser at VP state ``x`` of VE level ``s`` during step ``i`` (timestep: ``sigmas.timestep_at``)."""
    alpha, sigma = vp_coefs(s)
    like = dict(dtype=x.dtype, device=x.device)
    level = Level(t=timestep_at(plan, s, i), alpha=torch.tensor(alpha, **like), sigma=torch.tensor(sigma, **like),
                  index=i, num_steps=plan.num_steps)
    d = as_denoised(model(x, level))
    return Estimate(d.x0, d.x0_renoise, (x - alpha * d.x0_renoise) / sigma)


def to_vp(y: Tensor, s: float) -> Tensor:
    """VE state ``y`` at level ``s`` -> VP state ``alpha(s) y``."""
    return vp_coefs(s)[0] * y


def uses_renoise(model: DenoiseFn) -> bool:
    """Whether ``model`` is guided with a separate renoise estimate (a CFG++-style guide)."""
    return bool(getattr(getattr(model, "guide", None), "changes_renoise", False))


def refuse_renoise(model: DenoiseFn, name: str, why: str) -> None:
    """ValueError for a CFG++-style guide on a sampler where CFG++ is not defined."""
    if uses_renoise(model):
        raise ValueError(f"{name} has no CFG++ form: {why}; CFG++ is defined for the samplers whose step is a data "
                         "term plus a noise term (ddim, euler, euler_ancestral, dpmpp_2m, dpmpp_2s_ancestral, "
                         "dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde)")


def check_renoise_estimate(est: Estimate, name: str, why: str) -> None:
    """The same refusal for a plain denoiser callable that returns two different x0 estimates."""
    if est.x0_r is not est.x0 and not torch.equal(est.x0_r, est.x0):
        raise ValueError(f"{name} has no CFG++ form ({why}); the denoiser returned a separate renoise estimate")


def check_unit(name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def check_plan(x: Tensor, plan: Plan) -> None:
    check_sample_inputs(x, plan)


def churn_level(s: float, num_steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """Karras et al. (2022) Alg. 2 lines 4-5: ``s_hat = s (1 + gamma)``, ``gamma = min(s_churn / N, sqrt 2 - 1)``
    for ``s`` in ``[s_tmin, s_tmax]`` (0 elsewhere, and at pure noise, where no noise can be added)."""
    if s_churn <= 0 or math.isinf(s) or not s_tmin <= s <= s_tmax:
        return s
    return s * (1 + min(s_churn / num_steps, math.sqrt(2) - 1))


def add_churn(x: Tensor, s: float, s_hat: float, z: Tensor, s_noise: float) -> Tensor:
    """Alg. 2 line 6 in VP form: VE ``x + sqrt(s_hat^2 - s^2) s_noise z`` moved to level ``s_hat``."""
    x_ve = x / vp_coefs(s)[0] + math.sqrt(s_hat**2 - s**2) * s_noise * z
    return to_vp(x_ve, s_hat)


def check_churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(s_tmax, bool) or not isinstance(s_tmax, (int, float)) or not s_tmax >= s_tmin:
        raise ValueError(f"s_tmax must be a number >= s_tmin, got {s_tmax!r}")


def report(callback: Callback | None, x: Tensor, i: int, plan: Plan, est: Estimate) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "t": plan.timesteps[i], "sigma": float(plan.sigmas[i]), "x0_hat": est.x0})
