"""DPM-Solver++ ancestral and SDE samplers (Lu et al. 2022, "DPM-Solver++"; k-diffusion's forms), with CFG++.

In VE form every step is a data term plus a noise term: ``x' = D_mix + c s' e (+ noise)`` with ``x = D + s e``, so
under a CFG++ guide (Chung et al. 2025, Sec. 3) the data terms take the guided x0 ``D`` and the noise term the
unconditional direction ``e_u`` (``Estimate.eps``); multistep history holds the unconditional x0 ``D_r`` (the
convention of DPM++ 2M CFG++, ComfyUI's ``sample_dpmpp_2m_cfg_pp``). DPM++ 2S-a follows ComfyUI's
``sample_dpmpp_2s_ancestral_cfg_pp``: the unconditional 2S step plus the first stage's guidance ``D - D_r``.
Without CFG++ (``D = D_r``) each loop is k-diffusion's sampler of the same name.

A step to sigma 0 returns ``D``; a step from pure noise (``s = inf``, flow plans) takes the limit ``h = inf`` of the
step (first order: the midpoint of 2S / SDE is pure noise again) and is left out of the multistep history.
The SDE loops draw their noise from a Brownian tree by default (:class:`noise.BrownianTreeNoise`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import trange

from .base import DenoiseFn
from .noise import NoiseSampler, default_noise
from .sampling import ancestral_sigmas
from .schedule import Plan
from .stepping import Callback, check_plan, check_unit, evaluate, report, to_vp

Generator = torch.Generator | Sequence[torch.Generator] | None


def sample_dpmpp_2s_ancestral(model: DenoiseFn, x: Tensor, plan: Plan, eta: float = 1.0, s_noise: float = 1.0,
                              generator: Generator = None, noise_sampler: NoiseSampler | None = None,
                              callback: Callback | None = None, disable: bool = False) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1, ``r = 1/2``) down to ``sigma_down``, then noise ``sigma_up``:
    ``x_2 = D_r + s_mid e``, ``x' = D + s_down e + (1 - s_down / s) (D_r(x_2) - D_r) + s_up z``."""
    check_plan(x, plan)
    eta, s_noise = check_unit("eta", eta), check_unit("s_noise", s_noise, high=math.inf)
    noise = default_noise(x, plan.sigmas, noise_sampler, generator, brownian=False)
    with torch.no_grad():
        for i in trange(plan.num_steps, disable=disable, desc="sampling"):
            s, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
            est = evaluate(model, x, plan, i, s)
            down, up = ancestral_sigmas(s, s_next, eta)
            y = est.x0 + down * est.eps  # Euler (to sigma 0, or from pure noise)
            if down > 0 and not math.isinf(s):
                s_mid = math.exp(math.log(s) + 0.5 * (math.log(down) - math.log(s)))
                est_2 = evaluate(model, to_vp(est.x0_r + s_mid * est.eps, s_mid), plan, i, s_mid)
                y = y - math.expm1(math.log(down / s)) * (est_2.x0_r - est.x0_r)
            if s_next > 0 and up > 0:
                y = y + up * s_noise * noise(s, s_next)
            x = to_vp(y, s_next)
            report(callback, x, i, plan, est)
    return x


def sample_dpmpp_sde(model: DenoiseFn, x: Tensor, plan: Plan, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
                     generator: Generator = None, noise_sampler: NoiseSampler | None = None,
                     callback: Callback | None = None, disable: bool = False) -> Tensor:
    """Stochastic DPM-Solver++ (k-diffusion ``sample_dpmpp_sde``): an ancestral exponential-integrator step to the
    log-level ``s^(1-r) s'^r``, then the step to ``s'`` with ``D_d = (1 - 1/(2r)) D + 1/(2r) D(x_2)``:
    ``x' = (s_d/s) D + s_d e + (1 - s_d/s) D_d + s_u z`` (``s_d, s_u``: the ancestral split of ``s -> s'``)."""
    check_plan(x, plan)
    eta, s_noise = check_unit("eta", eta), check_unit("s_noise", s_noise, high=math.inf)
    r = check_unit("r", r)
    if r == 0:
        raise ValueError("r must lie in (0, 1], got 0")
    noise = default_noise(x, plan.sigmas, noise_sampler, generator, brownian=True)
    with torch.no_grad():
        for i in trange(plan.num_steps, disable=disable, desc="sampling"):
            s, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
            est = evaluate(model, x, plan, i, s)
            down, up = ancestral_sigmas(s, s_next, eta)
            if s_next == 0 or math.isinf(s):
                y = est.x0 + down * est.eps
            else:
                s_mid = math.exp(math.log(s) + r * (math.log(s_next) - math.log(s)))
                down_1, up_1 = ancestral_sigmas(s, s_mid, eta)
                x_2 = est.x0 + down_1 * est.eps + up_1 * s_noise * noise(s, s_mid)
                est_2 = evaluate(model, to_vp(x_2, s_mid), plan, i, s_mid)
                x0_d = (1 - 1 / (2 * r)) * est.x0 + 1 / (2 * r) * est_2.x0
                y = (down / s) * est.x0 + down * est.eps - math.expm1(math.log(down / s)) * x0_d
            if s_next > 0 and up > 0:
                y = y + up * s_noise * noise(s, s_next)
            x = to_vp(y, s_next)
            report(callback, x, i, plan, est)
    return x


def sample_dpmpp_2m_sde(model: DenoiseFn, x: Tensor, plan: Plan, eta: float = 1.0, s_noise: float = 1.0,
                        solver_type: str = "midpoint", generator: Generator = None,
                        noise_sampler: NoiseSampler | None = None, callback: Callback | None = None,
                        disable: bool = False) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, App.; k-diffusion ``sample_dpmpp_2m_sde``), ``h = log(s / s')``:
    ``x' = D + s' e^(-eta h) e + c (D - D_r_prev) / r + s' sqrt(1 - e^(-2 eta h)) z`` with ``r = h_prev / h`` and
    ``c = phi_1 / 2`` (midpoint) or ``c = 1 - phi_1 / ((1 + eta) h)`` (heun), ``phi_1 = 1 - e^(-(1+eta) h)``.
    ``eta = 0`` is DPM-Solver++(2M)."""
    return _multistep_sde(model, x, plan, eta, s_noise, 2, solver_type, generator, noise_sampler, callback, disable)


def sample_dpmpp_3m_sde(model: DenoiseFn, x: Tensor, plan: Plan, eta: float = 1.0, s_noise: float = 1.0,
                        generator: Generator = None, noise_sampler: NoiseSampler | None = None,
                        callback: Callback | None = None, disable: bool = False) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``): the 2M SDE step plus the second divided
    difference, ``x' = D + s' e^(-eta h) e + phi_2 d1 - phi_3 d2 + noise`` (second order on the second step)."""
    return _multistep_sde(model, x, plan, eta, s_noise, 3, "heun", generator, noise_sampler, callback, disable)


def _multistep_sde(model, x, plan, eta, s_noise, order, solver_type, generator, noise_sampler, callback, disable):
    check_plan(x, plan)
    eta, s_noise = check_unit("eta", eta), check_unit("s_noise", s_noise, high=math.inf)
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    noise = default_noise(x, plan.sigmas, noise_sampler, generator, brownian=True)
    history: list[tuple[Tensor, float]] = []  # (D_r, h) of earlier steps, newest first; finite h only
    with torch.no_grad():
        for i in trange(plan.num_steps, disable=disable, desc="sampling"):
            s, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
            est = evaluate(model, x, plan, i, s)
            if s_next == 0:
                x = est.x0
                report(callback, x, i, plan, est)
                continue
            h = math.log(s / s_next)  # inf from pure noise
            decay = math.exp(-eta * h) if math.isfinite(h) else float(eta == 0)
            y = est.x0 + s_next * decay * est.eps
            if math.isfinite(h) and history:
                h_eta = (1 + eta) * h
                phi_1 = -math.expm1(-h_eta)
                phi_2 = 1 - phi_1 / h_eta
                d1_0 = (est.x0 - history[0][0]) / (history[0][1] / h)
                if order == 3 and len(history) > 1:
                    r0, r1 = history[0][1] / h, history[1][1] / h
                    d1_1 = (history[0][0] - history[1][0]) / r1
                    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    y = y + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
                elif solver_type == "heun":
                    y = y + phi_2 * d1_0
                else:
                    y = y + 0.5 * phi_1 * d1_0
            if eta > 0 and s_noise > 0:
                y = y + s_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise * noise(s, s_next)
            history = ([(est.x0_r, h)] + history)[: order - 1] if math.isfinite(h) else []
            x = to_vp(y, s_next)
            report(callback, x, i, plan, est)
    return x
