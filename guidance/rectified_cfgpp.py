"""Rectified-CFG++ (Saini, Gupta & Bovik, NeurIPS 2025, arXiv 2510.07631): predictor-corrector guidance for flows.

One sampling step from flow level ``s`` to ``s'`` (``dt = s' - s < 0``; flow state ``x = (1 - s) x0 + s eps``):

    v_c      = v(x, s | c)                                        conditional velocity at the current point
    x_hat    = x + f dt v_c (+ noise),   s_hat = s + f dt         predictor: a conditional flow step (Alg. 1, l. 4-5)
    v_guided = v_c + lambda(s) (v(x_hat, s_hat | c) - v(x_hat, s_hat | u))     corrector at the predicted point

and the sampler moves with ``v_guided`` (Euler: ``x' = x + dt v_guided``). Alg. 1 takes the predictor to the midpoint
(``f = 1/2``, the default) and weights the corrector with ``lambda(t) = lambda_max (1 - t)^gamma`` (``t`` the flow
level, 1 at noise); ``gamma = 0`` (the default) is the constant weight of the official pipelines.

The official SD3 pipeline (repository shreshthsaini/Rectified-CFGpp, ``rect-cfg-SD3-pipeline/pipeline.py``; the same
update in diffusers community PR 14726) differs from Alg. 1 in three ways, all available here and combined in
:meth:`RectifiedCFGPlusPlus.official`: the predictor takes the whole step (``f = 1``); the corrector is evaluated at
network time ``t + dt``, a timestep (``1000 s``) plus a sigma difference, i.e. at level ``s + dt / 1000`` -- in
effect the current level -- rounded like the code's ``(t + dt).to(latents.dtype)``; and ``sigma_noise = 0.005`` of
Gaussian noise is added at the predicted point while ``t > 0.1`` (Alg. 1's optional line 5; drawn here from a
passed ``generator``, there from the global RNG).

Cost: 3 network passes per step (``v_c`` at ``x``, both branches at ``x_hat``) against CFG's 2; the unconditional
branch at ``x`` is never evaluated (the official pipeline computes it in its batch and discards it). As the step
shrinks ``x_hat -> x`` and the guide tends to CFG with ``w = 1 + lambda``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from diffguide.samplers.base import Level
from diffguide.samplers.schedule import Plan

from .base import Guidance, Guided, Step, check_scale

CORRECTOR_TIMES = ("predicted", "official")
OFFICIAL_TIMESTEPS = 1000  # the SD3 scheduler's timesteps per unit flow level: the official `t + dt` is s + dt / 1000
OFFICIAL_NOISE_UNTIL = 0.1 / OFFICIAL_TIMESTEPS  # the official noise is added while t > 0.1, i.e. s > 1e-4


class RectifiedCFGPlusPlus(Guidance):
    """Rectified-CFG++ on a flow-matching network (``prediction_type="flow_prediction"``).

    Args:
        scale: the corrector's weight ``lambda_max`` (0 = the conditional flow, no extra passes): the official code's
            ``true_cfg`` (its demos pass 4.5, SD3's usual CFG value, unchanged). In the small-step limit the guide
            is CFG at ``w = 1 + scale``, so ``scale = w - 1`` gives CFG's guidance term at ``w``.
        plan: the ``samplers.Plan`` the sampler runs (the guide needs the level each step moves to); may be set
            later as ``guide.plan``. Not needed under ``guidance.apply``, which hands each step its next level.
        predictor_fraction: ``f`` in (0, 1], the fraction of the step the conditional predictor takes (1/2 in
            Alg. 1, 1 in the official code).
        gamma: the schedule's exponent, ``lambda(s) = scale (1 - s)^gamma`` at the step's flow level ``s``
            (Alg. 1); 0 = constant, as both official codes.
        corrector_time: ``"predicted"`` evaluates the corrector at the predicted level ``s_hat`` (Alg. 1, l. 6-7);
            ``"official"`` at the official code's time ``t + dt`` (level ``s + dt / 1000``) while ``x_hat`` is
            still the predicted point, the time rounded to float32 and then to the latents' dtype as that code does.
        predictor_noise: ``sigma`` of the Gaussian noise added to ``x_hat`` in the flow state's scale (Alg. 1,
            l. 5; the official ``sigma_noise``), while the step's level exceeds ``1e-4`` (the official ``t > 0.1``).
        generator: the ``torch.Generator`` the noise is drawn from (``None``: the global RNG, as the official code's
            ``torch.randn_like``).

    Needs ``step.evaluate(x, cond, level)`` and ``step.uncond`` (``GuidedDenoiser`` and ``guidance.apply`` provide
    both). With ``step.next_level`` (apply) the corrector's network time is interpolated like its level,
    ``t + f (t_next - t)`` (exact for network times affine in ``s``: ``1000 s``, ``s``, ``1 - s``); from a ``plan`` it
    assumes diffusers' flow timesteps ``t = s * num_train_timesteps`` (``t_next = t s' / s``).
    """

    evaluates_other_levels = True

    def __init__(self, scale: float = 2.0, plan: Plan | None = None, predictor_fraction: float = 0.5, *,
                 gamma: float = 0.0, corrector_time: str = "predicted", predictor_noise: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        self.scale = check_scale("scale", scale)
        self.predictor_fraction = check_scale("predictor_fraction", predictor_fraction)
        if not 0.0 < self.predictor_fraction <= 1.0:
            raise ValueError(f"predictor_fraction must lie in (0, 1], got {predictor_fraction}")
        self.gamma = check_scale("gamma", gamma)
        if not isinstance(corrector_time, str):
            raise TypeError(f"corrector_time must be a str, got {type(corrector_time).__name__}")
        if corrector_time not in CORRECTOR_TIMES:
            raise ValueError(f"corrector_time must be one of {CORRECTOR_TIMES}, got {corrector_time!r}")
        self.corrector_time = corrector_time
        self.predictor_noise = check_scale("predictor_noise", predictor_noise)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan must be a samplers.Plan, got {type(plan).__name__}")
        self.plan = plan

    @classmethod
    def official(cls, true_cfg: float = 4.5, sigma_noise: float = 0.005, generator: torch.Generator | None = None,
                 plan: Plan | None = None) -> "RectifiedCFGPlusPlus":
        """The official SD3 pipeline's update (``true_cfg``, ``sigma_noise`` as its ``__call__`` takes them): full
        predictor step, corrector at its time ``t + dt``, ``sigma_noise`` at the predicted point, constant weight.
        Equal to that loop on the same noise draws (``tests/test_official_code.py``)."""
        return cls(true_cfg, plan, predictor_fraction=1.0, corrector_time="official", predictor_noise=sigma_noise,
                   generator=generator)

    def needs_uncond(self, level: Level, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, dtype=torch.bool, device=level.alpha.device)

    def weight(self, s: float) -> float:
        """``lambda(s) = scale (1 - s)^gamma`` at flow level ``s`` (Alg. 1's schedule; ``scale`` when gamma = 0)."""
        return self.scale if self.gamma == 0.0 else self.scale * (1.0 - s) ** self.gamma

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

    def _next(self, step: Step) -> tuple[float, float, Tensor]:
        """The step's flow level ``s``, the next one ``s'`` and its network time (float64)."""
        plan = self._check(step)
        s = float(step.sigma / (step.alpha + step.sigma))  # flow level of the step (1 at pure noise)
        t = torch.as_tensor(step.t).to(torch.float64)
        if plan is None:  # the caller's next level (apply)
            nxt = step.next_level
            return s, float(nxt.sigma / (nxt.alpha + nxt.sigma)), torch.as_tensor(nxt.t).to(t)
        ve_next, ve_here = float(plan.sigmas[step.index + 1]), float(plan.sigmas[step.index])
        s_plan = 1.0 if ve_here == float("inf") else ve_here / (1 + ve_here)
        if abs(s_plan - s) > 1e-6:
            raise ValueError(f"RectifiedCFGPlusPlus: step {step.index} is at flow level {s:.6g}, the plan's "
                             f"level is {s_plan:.6g}; pass the plan the sampler runs")
        s_next = ve_next / (1 + ve_next)
        return s, s_next, t * (s_next / s)

    def predicted_point(self, step: Step, v_cond: Tensor) -> tuple[Tensor, Level]:
        """``x_hat = x + f dt v_c`` (plus the predictor noise) in the step's state scale, and the level the
        corrector runs at (``alpha, sigma`` of ``s_hat`` in that scale; its network time as ``corrector_time``)."""
        s, s_next, t_next = self._next(step)
        f = self.predictor_fraction
        t = torch.as_tensor(step.t).to(torch.float64)
        s_hat = s + f * (s_next - s)
        if self.corrector_time == "predicted":
            t_hat = t + f * (t_next - t)
        else:  # the official `(t + dt).to(latents.dtype)`: level s + dt / 1000, rounded as its float32 sum then cast
            t_hat = (t + (t_next - t) / OFFICIAL_TIMESTEPS).to(torch.float32).to(step.x.dtype).to(torch.float64)
        scale = step.alpha + step.sigma  # the state's scale: x = scale * ((1 - s) x0 + s eps)
        x_hat = step.x + ((s_hat - s) * scale) * v_cond
        if self.predictor_noise > 0.0 and s > OFFICIAL_NOISE_UNTIL:
            noise = torch.randn(step.x.shape, generator=self.generator, dtype=step.x.dtype, device=step.x.device)
            x_hat = x_hat + (self.predictor_noise * scale) * noise
        level = Level(t=t_hat.to(torch.as_tensor(step.t).dtype), alpha=scale * (1 - s_hat), sigma=scale * s_hat,
                      index=step.index, num_steps=step.num_steps)
        return x_hat, level

    def combine(self, step: Step) -> Guided:
        v_cond = step.pred_cond
        if self.scale == 0.0:
            return Guided(v_cond, v_cond)
        s = float(step.sigma / (step.alpha + step.sigma))
        weight = self.weight(s)
        if weight == 0.0:  # lambda(1) = 0 for gamma > 0: the conditional flow, no extra passes
            return Guided(v_cond, v_cond)
        x_hat, level = self.predicted_point(step, v_cond)
        v_cond_hat = step.evaluate(x_hat, step.cond, level).to(v_cond.dtype)
        v_uncond_hat = step.evaluate(x_hat, step.uncond, level).to(v_cond.dtype)
        pred = v_cond + weight * (v_cond_hat - v_uncond_hat)
        return Guided(pred, pred)

    def __repr__(self) -> str:
        return (f"RectifiedCFGPlusPlus(scale={self.scale}, predictor_fraction={self.predictor_fraction}, "
                f"gamma={self.gamma}, corrector_time={self.corrector_time!r}, "
                f"predictor_noise={self.predictor_noise}, plan={'set' if self.plan is not None else None})")


def _takes_level(fn) -> bool:
    """Whether ``fn`` accepts a third positional argument (``evaluate(x, cond, level)``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = [p.kind for p in params]
    return inspect.Parameter.VAR_POSITIONAL in kinds or sum(
        k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds) >= 3
