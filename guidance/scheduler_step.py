"""Scheduler steps for guides whose renoise prediction differs from the denoise one (CFG++).

First-order diffusers steps are affine in the prediction, so the CFG++ step is the scheduler's own step
on the guided prediction plus a correction along ``eps_renoise - eps_denoise`` (CFG++ Alg. 2):

* DDIM: ``+ sqrt(1 - abar_prev - std^2) (eps_r - eps_d)``
* Euler: ``+ sigma_next (eps_r - eps_d)`` and Euler-ancestral ``+ sigma_down (eps_r - eps_d)`` (VE state)
* FlowMatchEuler (flow state ``(1 - s) x0 + s eps``): ``+ s_next (eps_r - eps_d)``, i.e. the DDIM analogue
  ``x' = (1 - s') x0(v_lam) + s' eps(v_u)``; with ``stochastic_sampling`` the scheduler draws all of the new noise
  and the step is its own step on ``v_lam`` (no deterministic noise direction to renoise).

DPM-Solver++ (1S/2M, also with ``use_flow_sigmas``) keeps guided x0 in its history, so its step is computed
here in the scheduler's own ``(alpha_t, sigma_t)`` (CFG++'s SD1.5 convention:
``x' = alpha' D_l + (sigma'/sigma) (x - alpha D_u) + c(h, r) (D_l - D_u_prev) / r`` with diffusers' midpoint or
Heun coefficient ``c``), first order exactly where diffusers takes first order (first step, ``euler_at_final``,
``lower_order_final`` below 15 steps, ``final_sigmas_type="zero"``); the scheduler's own step only advances its
state. ``algorithm_type="sde-dpmsolver++"`` (DPM++ 2M SDE, eta = 1) is the same with ``e^(-h)`` on the noise term,
``2h`` in ``c`` and the scheduler's noise ``sigma' sqrt(1 - e^(-2h)) z`` (``samplers.sample_dpmpp_2m_sde``'s CFG++).

DPMSolverSDEScheduler (k-diffusion's DPM++ SDE, two calls per step): each call is the scheduler's step on the guided
prediction plus ``(sigma_down / sigma) (D_l - D_u)`` of the step's first call (VE state: the state rebuilt from the
guided x0 and the unconditional noise, ``samplers.sample_dpmpp_sde``'s CFG++).

Refused, by name: Heun, KDPM2, KDPM2-ancestral, LMS and UniPC, whose steps combine derivatives ``(x - D) / s`` of
several states (or correct with a re-evaluation) and so have no separate noise term (``REFUSED``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffguide.samplers.schedule import to_eps, to_x0

SUPPORTED_SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                        "FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler")
_DERIVATIVES = "its step combines derivatives (x - D) / sigma taken at several states, which have no separate noise term"
REFUSED = {  # scheduler -> why CFG++ is not defined on its step
    "HeunDiscreteScheduler": _DERIVATIVES + " (Heun's trapezoid)",
    "KDPM2DiscreteScheduler": _DERIVATIVES + " (DPM-2's midpoint derivative)",
    "KDPM2AncestralDiscreteScheduler": _DERIVATIVES + " (DPM-2's midpoint derivative)",
    "LMSDiscreteScheduler": _DERIVATIVES + " (a linear multistep history of derivatives)",
    "UniPCMultistepScheduler": "its corrector re-evaluates the step with the denoiser at the predicted state",
}


def check_scheduler(scheduler) -> str:
    """Raise ValueError unless this scheduler can take a separate renoise prediction (with every option followed)."""
    name = type(scheduler).__name__
    cfg = scheduler.config
    if name in REFUSED:
        raise ValueError(f"CFG++ is not defined on {name}: {REFUSED[name]}; CFG++-style guides support "
                         f"{', '.join(SUPPORTED_SCHEDULERS)}")
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(f"CFG++-style guides support {', '.join(SUPPORTED_SCHEDULERS)}; got {name}")
    if name == "DDIMScheduler" and (cfg.get("clip_sample", False) or cfg.get("thresholding", False)):
        raise ValueError("CFG++ on DDIMScheduler needs clip_sample=False and thresholding=False")
    if name == "FlowMatchEulerDiscreteScheduler" and cfg.get("invert_sigmas", False):
        raise ValueError("CFG++ on FlowMatchEulerDiscreteScheduler needs invert_sigmas=False (with inverted sigmas "
                         "the scheduler's sigma is not the noise level)")
    if name == "DPMSolverMultistepScheduler":
        problems = []
        if cfg.get("algorithm_type") not in ("dpmsolver++", "sde-dpmsolver++"):
            problems.append(f"algorithm_type={cfg.get('algorithm_type')!r} (supported: 'dpmsolver++', "
                            "'sde-dpmsolver++')")
        if cfg.get("solver_order") not in (1, 2):
            problems.append(f"solver_order={cfg.get('solver_order')!r} (supported: 1, 2)")
        if cfg.get("solver_type") not in ("midpoint", "heun"):
            problems.append(f"solver_type={cfg.get('solver_type')!r} (supported: 'midpoint', 'heun')")
        if cfg.get("thresholding"):
            problems.append("thresholding=True (supported: False)")
        if cfg.get("variance_type") in ("learned", "learned_range"):
            problems.append(f"variance_type={cfg.get('variance_type')!r} (supported: None)")
        if problems:
            raise ValueError("CFG++ on DPMSolverMultistepScheduler does not follow " + "; ".join(problems))
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

    if name == "DPMSolverSDEScheduler":
        return _dpmpp_sde_step(scheduler, orig_step, idx, pred_denoise, pred_renoise, timestep, sample,
                               prediction_type, state, *args, return_dict=return_dict, **kwargs)

    if name == "FlowMatchEulerDiscreteScheduler":
        if kwargs.get("per_token_timesteps") is not None:
            raise ValueError("CFG++ on FlowMatchEulerDiscreteScheduler does not support per_token_timesteps")
        if prediction_type != "flow_prediction":
            raise ValueError(f"FlowMatchEulerDiscreteScheduler steps flow velocities; got prediction_type "
                             f"{prediction_type!r}")
        # the state is the flow state (1 - s) x0 + s eps: alpha = 1 - s, sigma = s
        eps_d = to_eps(pred_denoise.to(torch.float32), sample.to(torch.float32), 1 - s, s, prediction_type)
        eps_r = to_eps(pred_renoise.to(torch.float32), sample.to(torch.float32), 1 - s, s, prediction_type)
        out = orig_step(pred_denoise, timestep, sample, *args, return_dict=True, **kwargs)
        coef = 0.0 if scheduler.config.get("stochastic_sampling", False) else s_next
        prev = out.prev_sample + coef * (eps_r - eps_d)
        return _pack(prev.to(out.prev_sample.dtype), None, return_dict, out)

    return _dpmpp_step(scheduler, orig_step, idx, pred_denoise, pred_renoise, timestep, sample, prediction_type,
                       state, *args, return_dict=return_dict, **kwargs)


def _dpmpp_first_order_final(scheduler, idx: int) -> bool:
    """diffusers' ``lower_order_final`` test of ``DPMSolverMultistepScheduler.step`` (0.42.1)."""
    cfg = scheduler.config
    return idx == len(scheduler.timesteps) - 1 and (
        cfg.euler_at_final or (cfg.lower_order_final and len(scheduler.timesteps) < 15)
        or cfg.final_sigmas_type == "zero")


def _dpmpp_step(scheduler, orig_step, idx: int, pred_denoise: Tensor, pred_renoise: Tensor, timestep, sample: Tensor,
                prediction_type: str, state: dict, *args, return_dict: bool = True, **kwargs):
    """DPM-Solver++ 1S/2M (SDE) CFG++ step in the scheduler's own ``(alpha_t, sigma_t)`` (flow sigmas included)."""
    sde = scheduler.config.algorithm_type == "sde-dpmsolver++"
    if kwargs.get("variance_noise") is not None and not sde:
        raise ValueError("CFG++ on DPMSolverMultistepScheduler takes no variance_noise (deterministic dpmsolver++)")
    if sde:  # the scheduler's own draw (float32, its generator), handed back to it so that both use the same noise
        from diffusers.utils.torch_utils import randn_tensor

        if kwargs.get("variance_noise") is None:
            kwargs["variance_noise"] = randn_tensor(pred_denoise.shape, generator=kwargs.get("generator"),
                                                    device=pred_denoise.device, dtype=torch.float32)
    levels = torch.stack([scheduler.sigmas[idx], scheduler.sigmas[idx + 1]]).to(torch.float64)
    (alpha, alpha_next), (sigma, sigma_next) = (v.tolist() for v in scheduler._sigma_to_alpha_sigma_t(levels))
    x = sample.to(torch.float64)
    x0_d = to_x0(pred_denoise.to(torch.float64), x, alpha, sigma, prediction_type)
    x0_r = to_x0(pred_renoise.to(torch.float64), x, alpha, sigma, prediction_type)
    first_order = (scheduler.config.solver_order == 1 or scheduler.lower_order_nums < 1
                   or _dpmpp_first_order_final(scheduler, idx))
    if scheduler.lower_order_nums < 1:
        state.clear()
    lam = math.log(alpha) - math.log(sigma) if alpha > 0 else -math.inf
    lam_next = math.log(alpha_next) - math.log(sigma_next) if sigma_next > 0 else math.inf
    h = lam_next - lam
    h_c = 2 * h if sde else h  # the exponent of the data coefficient 1 - e^(-h_c)
    # first order: alpha' D_l + sigma' e^(-h) eps_u (DDIM: without e^(-h)), eps_u = (x - alpha D_u) / sigma
    decay = math.exp(-h) if sde else 1.0
    x_next = alpha_next * x0_d + decay * (sigma_next / sigma) * (x - alpha * x0_r)
    if sde:
        noise = kwargs["variance_noise"].to(device=x.device, dtype=torch.float64)
        x_next = x_next + sigma_next * math.sqrt(-math.expm1(-2 * h)) * noise
    if not first_order and "x0_r_prev" in state and math.isfinite(state["h"]) and math.isfinite(h):
        d1 = (x0_d - state["x0_r_prev"]) / (state["h"] / h)
        if scheduler.config.solver_type == "midpoint":
            x_next = x_next - 0.5 * alpha_next * math.expm1(-h_c) * d1
        else:  # heun
            x_next = x_next + alpha_next * (math.expm1(-h_c) / h_c + 1.0) * d1
    state["x0_r_prev"], state["h"] = x0_r, h
    orig_step(pred_denoise, timestep, sample, *args, return_dict=True, **kwargs)  # advance the scheduler's state
    prev = x_next.to(pred_denoise.dtype)
    if not return_dict:
        return (prev,)
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
    return SchedulerOutput(prev_sample=prev)


def _dpmpp_sde_step(scheduler, orig_step, idx: int, pred_denoise: Tensor, pred_renoise: Tensor, timestep,
                    sample: Tensor, prediction_type: str, state: dict, *args, return_dict: bool = True, **kwargs):
    """DPMSolverSDEScheduler (VE state): its step on the guided prediction plus ``(sigma_down / sigma) (D_l - D_u)``,
    the guidance ``D_l - D_u`` read at the step's first call (the rebuilt state ``x + D_l - D_u`` of k-diffusion's
    ``sample_dpmpp_sde``)."""
    first = scheduler.state_in_first_order
    s, s_next = (float(scheduler.sigmas[k]) for k in ((idx, idx + 1) if first else (idx - 1, idx)))
    if first:
        x_vp = sample.to(torch.float64) / math.sqrt(1 + s**2)
        alpha, sigma = 1 / math.sqrt(1 + s**2), s / math.sqrt(1 + s**2)
        state["guidance"] = (to_x0(pred_denoise.to(torch.float64), x_vp, alpha, sigma, prediction_type)
                             - to_x0(pred_renoise.to(torch.float64), x_vp, alpha, sigma, prediction_type))
    target = math.sqrt(s * s_next) if first else s_next  # the midpoint, then the step's end
    out = orig_step(pred_denoise, timestep, sample, *args, return_dict=True, **kwargs)
    if s_next > 0:
        up = min(target, math.sqrt(target**2 * (s**2 - target**2) / s**2))
        down = math.sqrt(target**2 - up**2)
        prev = out.prev_sample.to(torch.float64) + (down / s) * state["guidance"]
        out.prev_sample = prev.to(out.prev_sample.dtype)
    return out if return_dict else (out.prev_sample, out.pred_original_sample)
