"""CFG++ (Chung et al., ICLR 2025): interpolate for the data term, renoise with the unconditional branch."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import Guidance, Guided, Step, check_scale, require_uncond


class CFGPlusPlus(Guidance):
    """CFG++ with interpolation weight ``lam`` (paper's lambda, usually in [0, 1]).

    ``eps_lam = eps_u + lam (eps_c - eps_u)`` gives the Tweedie estimate; the sampler renoises with
    ``eps_u`` (Alg. 2 of the paper). On a DDIM step this equals CFG with the time-varying scale
    ``omega_t = lam * s_t / (s_t - s_prev)`` (VE sigmas, see :func:`equivalent_cfg_scales`), so ``lam`` is
    not comparable across step counts: at 50 DDIM steps of SD1.5, lam in [0, 1] is like omega in [1, 12.5].
    Needs both branches at every step, also at ``lam == 1``.

    Flow models (``prediction_type="flow_prediction"``): the same combination on the velocities, ``v_lam =
    v_u + lam (v_c - v_u)`` for the data term and ``v_u`` for the noise term, i.e. the flow-Euler step
    ``x' = (1 - s') x0(v_lam) + s' eps(v_u)`` (the DDIM analogue; in diffusers' flow state
    ``x' = x - (1 - s') s v_lam + s' (1 - s) v_u``). From pure noise (``s = 1``) ``omega = lam``.
    """

    changes_renoise = True

    def __init__(self, lam: float = 0.6) -> None:
        self.lam = check_scale("lam", lam)

    def combine(self, step: Step) -> Guided:
        uncond = require_uncond(step, "CFGPlusPlus")
        pred = uncond + self.lam * (step.pred_cond - uncond)
        return Guided(pred, uncond)

    def __repr__(self) -> str:
        return f"CFGPlusPlus(lam={self.lam})"


def equivalent_cfg_scale(lam: float, alpha_bar: float | Tensor, alpha_bar_prev: float | Tensor):
    """CFG scale whose DDIM step equals the CFG++ step: ``lam * s_t / (s_t - s_prev)`` with ``s = sqrt((1-ab)/ab)``."""
    s_t = ((1 - alpha_bar) / alpha_bar) ** 0.5
    s_p = ((1 - alpha_bar_prev) / alpha_bar_prev) ** 0.5
    return lam * s_t / (s_t - s_p)


def equivalent_cfg_scales(lam: float, sigmas: Sequence[float] | Tensor) -> Tensor:
    """Per-step CFG scales ``omega_t = lam * s_t / (s_t - s_next)`` whose DDIM/Euler steps equal CFG++ at ``lam``.

    ``sigmas``: the ``N + 1`` VE sigmas of a plan (``samplers.Plan.sigmas``; a flow level ``s`` is ``s / (1 - s)``),
    ``inf`` allowed at pure noise, where ``omega = lam``; a step to sigma 0 also has ``omega = lam``. float64 ``(N,)``.
    """
    ve = torch.as_tensor(sigmas, dtype=torch.float64)
    if ve.ndim != 1 or len(ve) < 2 or bool((ve[:-1] <= ve[1:]).any()) or bool((ve < 0).any()):
        raise ValueError(f"sigmas must be N + 1 >= 2 decreasing VE sigmas >= 0, got {ve.tolist()}")
    s, s_next = ve[:-1], ve[1:]
    ratio = torch.where(torch.isinf(s), torch.zeros_like(s), s_next / torch.where(torch.isinf(s), 1.0, s))
    return lam / (1 - ratio)
