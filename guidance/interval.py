"""Guidance limited to a noise interval (Kynkaanniemi et al., NeurIPS 2024, Eq. 6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffguide.samplers.base import Level

from .base import Guidance, Guided, Step, check_scale


class GuidanceInterval(Guidance):
    """Run ``guide`` only while the VE noise level ``sigma/alpha`` lies in ``(sigma_lo, sigma_hi]``.

    Outside the interval the step is purely conditional and the unconditional branch is not evaluated.
    Wraps any guide (e.g. ``GuidanceInterval(APG(...), 0.28, 5.42)``, the paper's SDXL interval).
    """

    def __init__(self, guide: Guidance, sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> None:
        if not isinstance(guide, Guidance):
            raise TypeError(f"guide must be a guidance.Guidance, got {type(guide).__name__}")
        self.guide = guide
        self.sigma_lo = check_scale("sigma_lo", sigma_lo)
        if isinstance(sigma_hi, bool) or not isinstance(sigma_hi, (int, float)) or math.isnan(sigma_hi) \
                or sigma_hi <= self.sigma_lo:
            raise ValueError(f"sigma_hi must be a number > sigma_lo={self.sigma_lo}, got {sigma_hi}")
        self.sigma_hi = float(sigma_hi)
        self.changes_renoise = guide.changes_renoise
        self.evaluates_other_levels = guide.evaluates_other_levels

    def active(self, ve_sigma: float) -> bool:
        return self.sigma_lo < ve_sigma <= self.sigma_hi

    def needs_uncond(self, level: Level, batch_size: int) -> Tensor:
        if self.active(float(level.sigma / level.alpha)):
            return self.guide.needs_uncond(level, batch_size)
        return torch.zeros(batch_size, dtype=torch.bool, device=level.alpha.device)

    def combine(self, step: Step) -> Guided:
        if self.active(step.ve_sigma):
            return self.guide.combine(step)
        return Guided(step.pred_cond, step.pred_cond)

    def reset(self) -> None:
        self.guide.reset()

    def __repr__(self) -> str:
        return f"GuidanceInterval({self.guide!r}, sigma_lo={self.sigma_lo}, sigma_hi={self.sigma_hi})"
