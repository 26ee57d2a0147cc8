"""Second-order single-step samplers on the derivative ``e = (x_VE - D) / s`` (k-diffusion's Heun, DPM-2, DPM-2-a).

Each step evaluates the denoiser twice: at the current level and at the step's end (Heun) or its log-midpoint (DPM-2).
A step to sigma 0 is an Euler step (``x' = D``), as in k-diffusion; a step from pure noise (flow plans, ``s = inf``)
is an Euler step too (the trapezoid / midpoint would span an infinite sigma interval). CFG++ is not defined here: the
second derivative mixes the data and noise terms of a new state, so a CFG++ guide is refused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import trange

from .base import DenoiseFn
from .noise import NoiseSampler, default_noise
from .sampling import ancestral_sigmas
from .schedule import Plan
from .stepping import (Callback, add_churn, check_churn, check_plan, check_renoise_estimate, check_unit, churn_level,
                       evaluate, refuse_renoise, report, to_vp)

_WHY = "its second stage takes the derivative (x - D) / s of a new state, which has no separate noise term"


def _log_midpoint(a: float, b: float) -> float:
    return math.exp(math.log(a) + 0.5 * (math.log(b) - math.log(a)))


def _prepare(model: DenoiseFn, x: Tensor, plan: Plan, churn: tuple[float, float, float, float], name: str,
             noise_sampler: NoiseSampler | None, generator: torch.Generator | None) -> NoiseSampler:
    """Check the arguments of a churned second-order sampler; its noise sampler."""
    check_plan(x, plan)
    check_churn(*churn)
    refuse_renoise(model, name, _WHY)
    return default_noise(x, plan.sigmas, noise_sampler, generator, brownian=False)


def _churned_estimate(model: DenoiseFn, x: Tensor, plan: Plan, i: int, churn: tuple[float, float, float, float],
                      noise: NoiseSampler, name: str):
    """Step ``i``'s first stage (Karras et al. 2022, Alg. 2 lines 5-7): the state raised to ``s_hat``, ``s_hat``,
    the step's end ``s_next`` and the estimate there."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    s, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
    s_hat = churn_level(s, plan.num_steps, s_churn, s_tmin, s_tmax)
    if s_hat > s:
        x = add_churn(x, s, s_hat, noise(s_hat, s), s_noise)
    est = evaluate(model, x, plan, i, s_hat)
    check_renoise_estimate(est, name, _WHY)
    return x, s_hat, s_next, est


def _dpm_2_step(model: DenoiseFn, plan: Plan, i: int, est, s: float, s_to: float) -> Tensor:
    """The VE state at ``s_to`` from the estimate at ``s``: ``x0 + s e + (s_to - s) e(s_mid)`` with ``s_mid`` the
    log-midpoint (DPM-Solver-2); an Euler step to sigma 0 or from pure noise."""
    if s_to == 0 or math.isinf(s):
        return est.x0 + s_to * est.eps
    s_mid = _log_midpoint(s, s_to)
    est_2 = evaluate(model, to_vp(est.x0 + s_mid * est.eps, s_mid), plan, i, s_mid)
    return est.x0 + s * est.eps + (s_to - s) * est_2.eps


def sample_heun(model: DenoiseFn, x: Tensor, plan: Plan, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0, generator: torch.Generator | None = None,
                noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                disable: bool = False) -> Tensor:
    """Heun's method with churn (Karras et al. 2022, Alg. 2; k-diffusion ``sample_heun``): raise the level to
    ``s_hat`` (:func:`stepping.churn_level`), Euler to ``s'``, then average the two derivatives (Alg. 2 line 11)."""
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    noise = _prepare(model, x, plan, churn, "sample_heun", noise_sampler, generator)
    with torch.no_grad():
        for i in trange(plan.num_steps, disable=disable, desc="sampling"):
            x, s_hat, s_next, est = _churned_estimate(model, x, plan, i, churn, noise, "sample_heun")
            y = est.x0 + s_next * est.eps  # Euler step
            if s_next > 0 and not math.isinf(s_hat):
                est_2 = evaluate(model, to_vp(y, s_next), plan, i, s_next)
                y = est.x0 + s_hat * est.eps + (s_next - s_hat) * (est.eps + est_2.eps) / 2
            x = to_vp(y, s_next)
            report(callback, x, i, plan, est)
    return x


def sample_dpm_2(model: DenoiseFn, x: Tensor, plan: Plan, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0, generator: torch.Generator | None = None,
                 noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                 disable: bool = False) -> Tensor:
    """DPM-Solver-2 in Karras' derivative form (k-diffusion ``sample_dpm_2``; Lu et al. 2022, Alg. 1 with the
    midpoint ``sqrt(s_hat s')``), with Alg. 2's churn: ``x' = x + (s' - s_hat) e(x + (s_mid - s_hat) e, s_mid)``."""
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    noise = _prepare(model, x, plan, churn, "sample_dpm_2", noise_sampler, generator)
    with torch.no_grad():
        for i in trange(plan.num_steps, disable=disable, desc="sampling"):
            x, s_hat, s_next, est = _churned_estimate(model, x, plan, i, churn, noise, "sample_dpm_2")
            y = _dpm_2_step(model, plan, i, est, s_hat, s_next)
            x = to_vp(y, s_next)
            report(callback, x, i, plan, est)
    return x


def sample_dpm_2_ancestral(model: DenoiseFn, x: Tensor, plan: Plan, eta: float = 1.0, s_noise: float = 1.0,
                           generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                           callback: Callback | None = None, disable: bool = False) -> Tensor:
    """DPM-2 down to ``sigma_down``, then fresh noise ``sigma_up`` (k-diffusion ``sample_dpm_2_ancestral``;
    :func:`sampling.ancestral_sigmas`)."""
    check_plan(x, plan)
    eta, s_noise = check_unit("eta", eta), check_unit("s_noise", s_noise, high=math.inf)
    refuse_renoise(model, "sample_dpm_2_ancestral", _WHY)
    noise = default_noise(x, plan.sigmas, noise_sampler, generator, brownian=False)
    with torch.no_grad():
        for i in trange(plan.num_steps, disable=disable, desc="sampling"):
            s, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
            est = evaluate(model, x, plan, i, s)
            check_renoise_estimate(est, "sample_dpm_2_ancestral", _WHY)
            down, up = ancestral_sigmas(s, s_next, eta)
            y = _dpm_2_step(model, plan, i, est, s, down)
            if s_next > 0 and up > 0:
                y = y + up * s_noise * noise(s, s_next)
            x = to_vp(y, s_next)
            report(callback, x, i, plan, est)
    return x
