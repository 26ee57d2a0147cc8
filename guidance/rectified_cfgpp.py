"""Rectified-CFG++ (Saini, Gupta & Bovik, NeurIPS 2025, arXiv 2510.07631): predictor-corrector guidance for flows.

One sampling step from flow level ``s`` to ``s'`` (``dt = s' - s < 0``; flow state ``x = (1 - s) x0 + s eps``):

    v_c      = v(x, s | c)                                        conditional velocity at the current point
    x_hat    = x + f dt v_c,   s_hat = s + f dt                   predictor: a conditional flow step (Alg. 1)
    v_guided = v_c + scale (v(x_hat, s_hat | c) - v(x_hat, s_hat | u))      corrector at the predicted point

and the sampler moves with ``v_guided`` (Euler: ``x' = x + dt v_guided``). The paper's Alg. 1 takes the predictor
to the midpoint (``f = 1/2``), the default; the official SD3 pipeline takes the whole step (``f = 1``) and evaluates
the corrector at ``t + dt`` with ``t`` in timestep units and ``dt`` in sigma units (in effect the current
timestep), which its author reports gives nearly identical images (Rectified-CFGpp issue 1). Here the corrector is
evaluated at the predicted level ``s_hat``, so ``f`` lies in (0, 1). The paper describes a time-scheduled weight
whose exact form could not be checked here; the official pipelines use a constant ``scale`` (``true_cfg``), as here.

Cost: 3 network passes per step (``v_c`` at ``x``, both branches at ``x_hat``) against CFG's 2; the unconditional
branch at ``x`` is never evaluated (the official pipeline computes it in its batch and discards it). As the step
shrinks ``x_hat -> x`` and the guide tends to CFG with ``w = 1 + scale``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from diffguide.samplers.base import Level
from diffguide.samplers.schedule import Plan

from .base import Guidance, Guided, Step, check_scale


class RectifiedCFGPlusPlus(Guidance):
    """Rectified-CFG++ on a flow-matching network (``prediction_type="flow_prediction"``).

    Args:
        scale: the corrector's weight ``lambda`` (0 = the conditional flow, no extra passes); comparable to CFG's
            ``w - 1`` (the small-step limit is CFG at ``w = 1 + scale``).
        plan: the ``samplers.Plan`` the sampler runs (the guide needs the level each step moves to); may be set
            later as ``guide.plan``. Not needed under ``guidance.apply``, which hands each step its next level.
        predictor_fraction: ``f``, the fraction of the step the conditional predictor takes (1/2 in the paper).

    Needs ``step.evaluate(x, cond, level)`` and ``step.uncond`` (``GuidedDenoiser`` and ``guidance.apply`` provide
    both). With ``step.next_level`` (apply) the predicted level's network time is interpolated like its level,
    ``t + f (t_next - t)`` (exact for network times affine in ``s``: ``1000 s``, ``s``, ``1 - s``); from a ``plan`` it
    assumes diffusers' flow timesteps ``t = s * num_train_timesteps`` (``t * s_hat / s``).
    """

    evaluates_other_levels = True

    def __init__(self, scale: float = 2.0, plan: Plan | None = None, predictor_fraction: float = 0.5) -> None:
        self.scale = check_scale("scale", scale)
        self.predictor_fraction = check_scale("predictor_fraction", predictor_fraction)
        if not 0.0 < self.predictor_fraction < 1.0:
            raise ValueError(f"predictor_fraction must lie in (0, 1), got {predictor_fraction}")
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan must be a samplers.Plan, got {type(plan).__name__}")
        self.plan = plan

    def needs_uncond(self, level: Level, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, dtype=torch.bool, device=level.alpha.device)

    def _check(self, step: Step) -> Plan | None:
        if step.prediction_type != "flow_prediction":
            raise ValueError(f"RectifiedCFGPlusPlus guides flow-matching velocities (prediction_type="
                             f"'flow_prediction'); got {step.prediction_type!r}")
        if step.evaluate is None or step.uncond is None or not _takes_level(step.evaluate):
            raise ValueError("RectifiedCFGPlusPlus needs extra network passes at another level: run it through "
                             "GuidedDenoiser or guidance.apply (step.evaluate(x, cond, level) and step.uncond)")
        if step.next_level is not None:
            return None
        if not isinstance(self.plan, Plan):
            raise ValueError("RectifiedCFGPlusPlus needs the run's noise levels: pass plan= (the samplers.Plan the "
                             "sampler runs)")
        if self.plan.num_steps != step.num_steps:
            raise ValueError(f"RectifiedCFGPlusPlus: the plan has {self.plan.num_steps} steps, the run "
                             f"{step.num_steps}")
        return self.plan

    def predicted_point(self, step: Step, v_cond: Tensor) -> tuple[Tensor, Level]:
        """``x_hat = x + f dt v_c`` as a VP state, and its level (``alpha, sigma`` VP; its network time as the class
        docstring says)."""
        plan = self._check(step)
        s = float(step.sigma / (step.alpha + step.sigma))  # flow level of the step (1 at pure noise)
        f = self.predictor_fraction
        if plan is None:  # the caller's next level (apply): its time interpolated like its level
            nxt = step.next_level
            s_next = float(nxt.sigma / (nxt.alpha + nxt.sigma))
            t_hat = step.t + f * (torch.as_tensor(nxt.t).to(step.t) - step.t)
        else:
            ve_next = float(plan.sigmas[step.index + 1])
            s_next = ve_next / (1 + ve_next)
            ve_here = float(plan.sigmas[step.index])
            s_plan = 1.0 if ve_here == float("inf") else ve_here / (1 + ve_here)
            if abs(s_plan - s) > 1e-6:
                raise ValueError(f"RectifiedCFGPlusPlus: step {step.index} is at flow level {s:.6g}, the plan's "
                                 f"level is {s_plan:.6g}; pass the plan the sampler runs")
            t_hat = step.t * ((s + f * (s_next - s)) / s)
        s_hat = s + f * (s_next - s)
        x_flow = step.x / (step.alpha + step.sigma)
        x_hat_flow = x_flow + (s_hat - s) * v_cond
        norm = (s_hat**2 + (1 - s_hat) ** 2) ** 0.5  # flow (1 - s, s) -> VP (alpha, sigma) of the same level
        alpha_hat, sigma_hat = (1 - s_hat) / norm, s_hat / norm
        like = step.alpha
        level = Level(t=t_hat, alpha=torch.as_tensor(alpha_hat, dtype=like.dtype, device=like.device),
                      sigma=torch.as_tensor(sigma_hat, dtype=like.dtype, device=like.device), index=step.index,
                      num_steps=step.num_steps)
        return x_hat_flow / norm, level

    def combine(self, step: Step) -> Guided:
        v_cond = step.pred_cond
        if self.scale == 0.0:
            return Guided(v_cond, v_cond)
        x_hat, level = self.predicted_point(step, v_cond)
        v_cond_hat = step.evaluate(x_hat, step.cond, level).to(v_cond.dtype)
        v_uncond_hat = step.evaluate(x_hat, step.uncond, level).to(v_cond.dtype)
        pred = v_cond + self.scale * (v_cond_hat - v_uncond_hat)
        return Guided(pred, pred)

    def __repr__(self) -> str:
        return (f"RectifiedCFGPlusPlus(scale={self.scale}, predictor_fraction={self.predictor_fraction}, "
                f"plan={'set' if self.plan is not None else None})")


def _takes_level(fn) -> bool:
    """Whether ``fn`` accepts a third positional argument (``evaluate(x, cond, level)``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = [p.kind for p in params]
    return inspect.Parameter.VAR_POSITIONAL in kinds or sum(
        k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds) >= 3
