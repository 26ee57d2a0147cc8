"""Scheduler steps for guides whose renoise prediction differs from the denoise one (CFG++).

First-order diffusers steps are affine in the prediction, so the CFG++ step is the scheduler's own step
on the guided prediction plus a correction along ``eps_renoise - eps_denoise`` (CFG++ Alg. 2):

* DDIM: ``+ sqrt(1 - abar_prev - std^2) (eps_r - eps_d)``
* Euler: ``+ sigma_next (eps_r - eps_d)`` and Euler-ancestral ``+ sigma_down (eps_r - eps_d)`` (VE state)

DPM-Solver++(2M) keeps guided x0 in its history, so its step is computed here (CFG++'s SD1.5 convention:
``x' = D_l + e^{-h}(x - D_u) + (1 - e^{-h})/(2r) (D_l - D_u_prev)``, first order on the first and last
step) and the scheduler's own step only advances its state.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffguide.samplers.schedule import to_eps, to_x0

SUPPORTED_SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                        "DPMSolverMultistepScheduler")


def check_scheduler(scheduler) -> str:
    """Raise ValueError unless this scheduler can take a separate renoise prediction."""
    name = type(scheduler).__name__
    cfg = scheduler.config
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(f"CFG++-style guides support {', '.join(SUPPORTED_SCHEDULERS)}; got {name}")
    if name == "DDIMScheduler" and (cfg.get("clip_sample", False) or cfg.get("thresholding", False)):
        raise ValueError("CFG++ on DDIMScheduler needs clip_sample=False and thresholding=False")
    if name == "DPMSolverMultistepScheduler" and (
            cfg.get("algorithm_type") != "dpmsolver++" or cfg.get("solver_order") != 2 or cfg.get("thresholding")):
        raise ValueError("CFG++ on DPMSolverMultistepScheduler needs algorithm_type='dpmsolver++', solver_order=2, "
                         "thresholding=False")
    return name


def _pack(prev: Tensor, x0: Tensor | None, return_dict: bool, out: Any):
    if not return_dict:
        return (prev, x0) if x0 is not None else (prev,)
    out.prev_sample = prev
    return out


def _step_index(scheduler, timestep) -> int:
    if scheduler.step_index is None:
        scheduler._init_step_index(timestep)
    return int(scheduler.step_index)


def renoise_step(scheduler, orig_step, pred_denoise: Tensor, pred_renoise: Tensor, timestep, sample: Tensor,
                 prediction_type: str, state: dict, *args, return_dict: bool = True, **kwargs):
    """One scheduler step that uses ``pred_denoise`` for the data term and ``pred_renoise`` for the noise term."""
    name = check_scheduler(scheduler)
    if name == "DDIMScheduler":
        t = int(timestep)
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        abar = scheduler.alphas_cumprod[t]
        abar_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        eta = float(kwargs.get("eta", args[0] if args else 0.0))
        std = eta * scheduler._get_variance(t, prev_t) ** 0.5
        out = orig_step(pred_denoise, timestep, sample, *args, return_dict=True, **kwargs)
        eps_d = to_eps(pred_denoise, sample, alpha, sigma, prediction_type)
        eps_r = to_eps(pred_renoise, sample, alpha, sigma, prediction_type)
        prev = out.prev_sample + (1 - abar_prev - std**2) ** 0.5 * (eps_r - eps_d)
        return _pack(prev.to(sample.dtype), out.pred_original_sample, return_dict, out)

    idx = _step_index(scheduler, timestep)
    s, s_next = float(scheduler.sigmas[idx]), float(scheduler.sigmas[idx + 1])
    if name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        if float(kwargs.get("s_churn", 0.0)) != 0.0:
            raise ValueError("CFG++ on EulerDiscreteScheduler needs s_churn=0")
        x_vp = sample / math.sqrt(1 + s**2)  # the state is VE: x / alpha
        alpha, sigma = 1 / math.sqrt(1 + s**2), s / math.sqrt(1 + s**2)
        eps_d = to_eps(pred_denoise, x_vp, alpha, sigma, prediction_type)
        eps_r = to_eps(pred_renoise, x_vp, alpha, sigma, prediction_type)
        out = orig_step(pred_denoise, timestep, sample, *args, return_dict=True, **kwargs)
        if name == "EulerDiscreteScheduler":
            coef = s_next
        else:
            up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2) if s_next > 0 else 0.0
            coef = math.sqrt(max(s_next**2 - up**2, 0.0))
        prev = out.prev_sample + coef * (eps_r - eps_d)
        return _pack(prev.to(sample.dtype), out.pred_original_sample, return_dict, out)

    # DPMSolverMultistepScheduler, dpmsolver++ order 2, VP state
    alpha, sigma = 1 / math.sqrt(1 + s**2), s / math.sqrt(1 + s**2)
    x = sample.to(torch.float64) / alpha
    x0_d = to_x0(pred_denoise.to(torch.float64), sample.to(torch.float64), alpha, sigma, prediction_type)
    x0_r = to_x0(pred_renoise.to(torch.float64), sample.to(torch.float64), alpha, sigma, prediction_type)
    if idx == 0:
        state.clear()
    h = math.log(s / s_next) if s_next > 0 else math.inf
    if s_next == 0:
        x_next = x0_d
    else:
        x_next = x0_d + math.exp(-h) * (x - x0_r)
        if "x0_r_prev" in state and math.isfinite(state["h"]):
            r = state["h"] / h
            x_next = x_next + (-math.expm1(-h)) / (2 * r) * (x0_d - state["x0_r_prev"])
    state["x0_r_prev"], state["h"] = x0_r, h
    orig_step(pred_denoise, timestep, sample, *args, return_dict=True, **kwargs)  # advance the scheduler's state
    prev = (x_next / math.sqrt(1 + s_next**2)).to(sample.dtype)
    if not return_dict:
        return (prev,)
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
    return SchedulerOutput(prev_sample=prev)
