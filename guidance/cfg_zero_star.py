"""CFG-Zero* (Fan et al. 2025): optimised unconditional scale and zero-init of the first steps."""

from __future__ import annotations

import torch

from .base import Guidance, Guided, Step, batch_view, check_scale, require_uncond


class CFGZeroStar(Guidance):
    """``s* = <c, u> / (||u||^2 + 1e-8)`` per sample; ``pred = s* u + scale (c - s* u)`` (paper Eq. 9-10).

    ``zero_init_steps`` steps (index < zero_init_steps, diffusers' meaning) return a zero prediction, the
    paper's zero-init for flow-matching velocities; it defaults to 0 because a zero epsilon is not "stay
    put" for epsilon models. Set it to 1 for a velocity model to match diffusers' guider.
    """

    def __init__(self, scale: float = 4.0, zero_init_steps: int = 0) -> None:
        self.scale = check_scale("scale", scale)
        if not isinstance(zero_init_steps, int) or zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be an int >= 0, got {zero_init_steps!r}")
        self.zero_init_steps = zero_init_steps

    def combine(self, step: Step) -> Guided:
        if step.index < self.zero_init_steps:
            zero = torch.zeros_like(step.pred_cond)
            return Guided(zero, zero)
        uncond = require_uncond(step, "CFGZeroStar")
        c, u = step.pred_cond.flatten(1), uncond.flatten(1)
        s_star = batch_view((c * u).sum(1) / (u.pow(2).sum(1) + 1e-8), uncond)
        pred = s_star * uncond + self.scale * (step.pred_cond - s_star * uncond)
        return Guided(pred, pred)

    def __repr__(self) -> str:
        return f"CFGZeroStar(scale={self.scale}, zero_init_steps={self.zero_init_steps})"
