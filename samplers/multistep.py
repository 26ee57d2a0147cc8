"""Linear multistep samplers: k-diffusion's LMS and UniPC (Zhao et al. 2023) with data prediction.

One denoiser evaluation per step; earlier estimates make the step higher order. A step from pure noise (``s = inf``,
flow plans) is first order and its estimate is left out of the history (no polynomial passes through ``inf``).
CFG++ is not defined here (the history extrapolates derivatives or a corrector re-evaluates at the new state), so a
CFG++ guide is refused.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from numpy.polynomial import Polynomial
from torch import Tensor
from tqdm.auto import trange

from .base import DenoiseFn
from .schedule import Plan
from .stepping import (Callback, check_plan, check_renoise_estimate, evaluate, refuse_renoise, report, to_vp,
                       vp_coefs)


def lms_coefficients(levels: Sequence[float], s_next: float) -> list[float]:
    """``int_s^s' l_j(tau) dtau`` for the Lagrange basis ``l_j`` through ``levels`` (oldest first, ``s = levels[-1]``)."""
    coefs = []
    for j, s_j in enumerate(levels):
        others = [s_k for k, s_k in enumerate(levels) if k != j]
        basis = Polynomial.fromroots(others) / float(np.prod([s_j - s_k for s_k in others])) if others \
            else Polynomial([1.0])
        antiderivative = basis.integ()
        coefs.append(float(antiderivative(s_next) - antiderivative(levels[-1])))
    return coefs


def sample_lms(model: DenoiseFn, x: Tensor, plan: Plan, order: int = 4, callback: Callback | None = None,
               disable: bool = False) -> Tensor:
    """Linear multistep on the probability-flow ODE ``dx/ds = e`` (k-diffusion ``sample_lms``): ``x' = x + sum_j c_j
    e_j`` over the last ``order`` derivatives, ``c_j`` the integral of their Lagrange polynomial from ``s`` to ``s'``."""
    check_plan(x, plan)
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive int, got {order!r}")
    why = "its history extrapolates derivatives (x - D) / s, which mix data and noise"
    refuse_renoise(model, "sample_lms", why)
    history: list[tuple[Tensor, float]] = []  # (e, s), oldest first
    with torch.no_grad():
        for i in trange(plan.num_steps, disable=disable, desc="sampling"):
            s, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
            est = evaluate(model, x, plan, i, s)
            check_renoise_estimate(est, "sample_lms", why)
            if math.isinf(s):
                y, history = est.x0 + s_next * est.eps, []
            else:
                history = (history + [(est.eps, s)])[-order:]
                coefs = lms_coefficients([level for _, level in history], s_next)
                y = est.x0 + s * est.eps + sum(c * e for c, (e, _) in zip(coefs, history))
            x = to_vp(y, s_next)
            report(callback, x, i, plan, est)
    return x


def _unipc_step(x: Tensor, s: float, s_next: float, history: list[tuple[Tensor, float]], order: int, variant: str,
                x0_next: Tensor | None = None) -> Tensor:
    """UniP (``x0_next is None``) or UniC step from VP state ``x`` at ``s`` to ``s'`` (Zhao et al. 2023, Alg. 1-2,
    B(h) = h or e^h - 1): ``x'/alpha' = D_0 + s' e_0 - B(h) sum_k rho_k D1_k``, ``D1_k = (D_k - D_0) / r_k``."""
    x0, lam = history[0]
    alpha, sigma = vp_coefs(s)
    eps = (x - alpha * x0) / sigma
    if s_next == 0:  # h = inf: first order, x' = D_0
        return x0
    h = math.log(s / s_next)
    ratios = [(lam_k - lam) / h for _, lam_k in history[1:order]]
    diffs = [(x0_k - x0) / r_k for (x0_k, _), r_k in zip(history[1:order], ratios)]
    hh, factorial = -h, 1
    h_phi = math.expm1(hh) / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    R = np.array([[r ** (k - 1) for r in ratios + [1.0]] for k in range(1, order + 1)])
    b = []
    for k in range(1, order + 1):
        b.append(h_phi * factorial / b_h)
        factorial *= k + 1
        h_phi = h_phi / hh - 1 / factorial
    if x0_next is None:
        rhos = [] if order == 1 else [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        residual = sum((rho * d for rho, d in zip(rhos, diffs)), torch.zeros_like(x0))
    else:
        rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
        residual = sum((rho * d for rho, d in zip(rhos[:-1], diffs)), rhos[-1] * (x0_next - x0))
    return to_vp(x0 + s_next * eps - b_h * residual, s_next)


def sample_unipc(model: DenoiseFn, x: Tensor, plan: Plan, order: int = 2, variant: str = "bh2",
                 lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
                 callback: Callback | None = None, disable: bool = False) -> Tensor:
    """UniPC (Zhao et al. 2023; diffusers ``UniPCMultistepScheduler`` with ``predict_x0``): the UniP-``order``
    predictor, and the UniC corrector of each step with the next step's evaluation (no extra evaluation). Order warms
    up from 1; ``lower_order_final`` lowers it on the last steps; steps in ``disable_corrector`` are not corrected."""
    check_plan(x, plan)
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    why = "its corrector re-evaluates the denoiser at the predicted state"
    refuse_renoise(model, "sample_unipc", why)
    history: list[tuple[Tensor, float]] = []  # (D, lambda = -log s), newest first
    last = None  # (x, s, order) of the previous predictor, for its corrector
    with torch.no_grad():
        for i in trange(plan.num_steps, disable=disable, desc="sampling"):
            s, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
            est = evaluate(model, x, plan, i, s)
            check_renoise_estimate(est, "sample_unipc", why)
            if last is not None and i - 1 not in disable_corrector:
                x = _unipc_step(last[0], last[1], s, history, last[2], variant, x0_next=est.x0)
            if math.isinf(s):
                history, last = [], None
                x = to_vp(est.x0 + s_next * est.eps, s_next)
            else:
                history = [(est.x0, -math.log(s))] + history[: order - 1]
                this_order = min(order, plan.num_steps - i if lower_order_final else order, len(history))
                last = (x, s, this_order)
                x = _unipc_step(x, s, s_next, history, this_order, variant)
            report(callback, x, i, plan, est)
    return x
