"""Classifier-free guidance (Ho & Salimans 2022), in diffusers' convention and order of operations."""

from __future__ import annotations

import torch
from torch import Tensor

from diffguide.samplers.base import Level

from .base import Guidance, Guided, Step, check_scale, require_uncond


class CFG(Guidance):
    """``pred = pred_uncond + scale * (pred_cond - pred_uncond)`` (diffusers/Imagen ``w``; 1 = no guidance).

    The expression order is diffusers' own, so results are bit-identical to a pipeline's native CFG.
    At ``scale == 1`` the unconditional branch is not evaluated.
    """

    def __init__(self, scale: float = 7.5) -> None:
        self.scale = check_scale("scale", scale)

    def needs_uncond(self, level: Level, batch_size: int) -> Tensor:
        return torch.full((batch_size,), self.scale != 1.0, dtype=torch.bool, device=level.alpha.device)

    def combine(self, step: Step) -> Guided:
        if self.scale == 1.0:
            return Guided(step.pred_cond, step.pred_cond)
        uncond = require_uncond(step, "CFG")
        pred = uncond + self.scale * (step.pred_cond - uncond)
        return Guided(pred, pred)

    def __repr__(self) -> str:
        return f"CFG(scale={self.scale})"
