"""The guidance protocol: one canonical record per step in, a guided prediction out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from diffguide.samplers.base import Level
from diffguide.samplers.schedule import check_prediction_type, from_x0, to_eps, to_x0

BRANCHES = ("cond", "uncond")


@dataclass(init=False)
class Step:
    """Everything a guide may look at in one sampling step.

    ``x = alpha * x0 + sigma * eps`` at network time ``t``: the step's :class:`~diffguide.samplers.Level`
    (``step.level``; ``step.t``, ``alpha``, ``sigma``, ``index``, ``num_steps`` read it). ``pred_cond`` /
    ``pred_uncond`` are the network's outputs in ``prediction_type`` space. Rows whose unconditional branch was not
    evaluated (``uncond_mask`` False) carry ``pred_uncond == pred_cond`` there, so any CFG-type combination reduces
    to the conditional prediction on those rows.

    ``cond`` / ``uncond`` are the network conditions of the two branches (when the caller has them) and
    ``evaluate(x, cond, level=None)`` one more network pass at VP state ``x`` (the step's shape) with condition
    ``cond``, at this step's level or at another ``samplers.Level`` (guides that take a sub-step, e.g.
    Rectified-CFG++); ``None`` where the caller cannot run extra passes. ``next_level`` is the level the run moves
    to after this step, where the caller knows it (``guidance.apply`` reads it from the scheduler). ``family`` is the
    pipeline's :class:`~diffguide.guidance.families.Family` under ``guidance.apply`` (per-family defaults), else None.
    ``pred_image`` is the image-only branch of three-branch pipelines (InstructPix2Pix: image condition, empty
    prompt), else None.

    Built field by field (``Step(x, t, alpha, sigma, index, num_steps, pred_cond, pred_uncond, ...)``) or from a
    level (:meth:`at`).
    """

    x: Tensor
    level: Level
    pred_cond: Tensor
    pred_uncond: Tensor | None
    prediction_type: str = "epsilon"
    uncond_mask: Tensor | None = None
    cond: Any = None
    evaluate: Callable[..., Tensor] | None = field(default=None, repr=False)
    uncond: Any = None
    next_level: Level | None = None
    family: Any = None
    pred_image: Tensor | None = None

    def __init__(self, x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor, index: int, num_steps: int,
                 pred_cond: Tensor, pred_uncond: Tensor | None, prediction_type: str = "epsilon",
                 uncond_mask: Tensor | None = None, cond: Any = None, evaluate: Callable[..., Tensor] | None = None,
                 uncond: Any = None, next_level: Level | None = None, family: Any = None,
                 pred_image: Tensor | None = None) -> None:
        self.x, self.pred_cond, self.pred_uncond = x, pred_cond, pred_uncond
        self.level = Level(t=t, alpha=alpha, sigma=sigma, index=index, num_steps=num_steps)
        self.prediction_type = check_prediction_type(prediction_type)
        self.uncond_mask, self.cond, self.evaluate, self.uncond = uncond_mask, cond, evaluate, uncond
        self.next_level, self.family = next_level, family
        self.pred_image = pred_image

    @classmethod
    def at(cls, level: Level, x: Tensor, pred_cond: Tensor, pred_uncond: Tensor | None,
           prediction_type: str = "epsilon", **fields: Any) -> "Step":
        """The step at ``level`` (``fields``: ``uncond_mask``, ``cond``, ``evaluate``, ``uncond``, ``next_level``,
        ``family``)."""
        return cls(x, level.t, level.alpha, level.sigma, level.index, level.num_steps, pred_cond, pred_uncond,
                   prediction_type, **fields)

    @property
    def t(self) -> Tensor:
        return self.level.t

    @property
    def alpha(self) -> Tensor:
        return self.level.alpha

    @property
    def sigma(self) -> Tensor:
        return self.level.sigma

    @property
    def index(self) -> int:
        return self.level.index

    @property
    def num_steps(self) -> int:
        return self.level.num_steps

    def x0(self, pred: Tensor) -> Tensor:
        """Model output -> x0 estimate at this step."""
        return to_x0(pred, self.x, self.alpha, self.sigma, self.prediction_type)

    def eps(self, pred: Tensor) -> Tensor:
        """Model output -> epsilon estimate at this step."""
        return to_eps(pred, self.x, self.alpha, self.sigma, self.prediction_type)

    def from_x0(self, x0: Tensor) -> Tensor:
        """x0 estimate -> model output in this step's prediction type."""
        return from_x0(x0, self.x, self.alpha, self.sigma, self.prediction_type)

    @property
    def ve_sigma(self) -> float:
        """Scale-free noise level ``sigma / alpha`` (k-diffusion's sigma)."""
        return float(self.sigma / self.alpha)


class Guided(NamedTuple):
    """A guide's answer, in the model's prediction type: ``denoise`` for the data term, ``renoise`` for noise."""

    denoise: Tensor
    renoise: Tensor


class Guidance:
    """Base class of every guide.

    Subclasses implement :meth:`combine`. ``changes_renoise`` is True for guides whose ``renoise``
    differs from ``denoise`` (CFG++): the sampler or scheduler hook then uses both. ``evaluates_other_levels`` is
    True for guides that call ``step.evaluate`` at another noise level than the step's (Rectified-CFG++).
    """

    changes_renoise: bool = False
    evaluates_other_levels: bool = False

    def needs_uncond(self, level: Level, batch_size: int) -> Tensor:
        """Which rows need the unconditional branch at this level (bool, shape ``(batch_size,)``)."""
        return torch.ones(batch_size, dtype=torch.bool, device=level.alpha.device)

    def combine(self, step: Step) -> Guided:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:
        """Forget per-run state; called at the start of every sampling call."""

    def __call__(self, step: Step) -> Guided:
        return self.combine(step)


def guided_checked(guide: "Guidance", step: Step) -> Guided:
    """``guide.combine(step)``, refusing a non-finite prediction (``FloatingPointError`` naming the step)."""
    guided = guide.combine(step)
    values = (guided.denoise,) if guided.renoise is guided.denoise else guided
    if not all(bool(torch.isfinite(v).all()) for v in values):
        t = float(torch.as_tensor(step.t).flatten()[0])
        raise FloatingPointError(f"{type(guide).__name__} produced a non-finite prediction at step {step.index} of "
                                 f"{step.num_steps} (t={t:g}); check the model's outputs and the guide's scale")
    return guided


def check_scale(name: str, value: float, minimum: float = 0.0) -> float:
    """Validate a real scale: finite and >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value}")
    return float(value)


def check_flag(name: str, value: bool) -> bool:
    """Validate an on/off option: ``True`` or ``False`` (not a truthy string or number)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def require_uncond(step: Step, who: str) -> Tensor:
    if step.pred_uncond is None:
        raise ValueError(f"{who} needs the unconditional prediction; got pred_uncond=None")
    if step.pred_uncond.shape != step.pred_cond.shape:
        raise ValueError(
            f"{who}: pred_cond and pred_uncond must have the same shape, got {tuple(step.pred_cond.shape)} "
            f"and {tuple(step.pred_uncond.shape)}")
    return step.pred_uncond


def batch_view(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector ``(B,)`` to broadcast against ``like`` ``(B, ...)``."""
    return v.view(-1, *[1] * (like.ndim - 1))
