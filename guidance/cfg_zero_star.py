"""CFG-Zero* (Fan et al. 2025, arXiv 2503.18886): optimised unconditional scale and zero-init of the first steps."""

from __future__ import annotations

import torch

from .base import Guidance, Guided, Step, batch_view, check_scale, require_uncond


class CFGZeroStar(Guidance):
    """``s* = <c, u> / (||u||^2 + 1e-8)`` per sample; ``pred = s* u + scale (c - s* u)`` (paper Eq. 9-10).

    Applied to the network's own output: for a flow-matching model (``prediction_type="flow_prediction"``)
    that is the velocity, the paper's space. ``s*`` and the combination are computed in float32 (float64 for
    float64 inputs) whatever the input dtype, as the official code does (``autocast(float32)``): on an
    SDXL-size fp16 latent ``||u||^2`` exceeds the fp16 range. The result is returned in the input dtype.

    Zero-init: steps with index ``< zero_init_steps`` (diffusers' meaning) return a zero prediction. The
    default ``None`` zeroes the first step of a flow-matching model (a zero velocity: the state stays put),
    as the official pipelines do (``use_zero_init=True, zero_steps=0``, i.e. step ``i <= 0``), and no step
    of other models, where a zero epsilon or x0 is not "stay put".
    """

    def __init__(self, scale: float = 4.0, zero_init_steps: int | None = None) -> None:
        self.scale = check_scale("scale", scale)
        if zero_init_steps is not None and (isinstance(zero_init_steps, bool) or not isinstance(zero_init_steps, int)
                                            or zero_init_steps < 0):
            raise ValueError(f"zero_init_steps must be None or an int >= 0, got {zero_init_steps!r}")
        self.zero_init_steps = zero_init_steps

    def zero_steps(self, prediction_type: str) -> int:
        """Number of zero-initialised first steps for a model of this prediction type."""
        if self.zero_init_steps is not None:
            return self.zero_init_steps
        return 1 if prediction_type == "flow_prediction" else 0

    def combine(self, step: Step) -> Guided:
        if step.index < self.zero_steps(step.prediction_type):
            zero = torch.zeros_like(step.pred_cond)
            return Guided(zero, zero)
        uncond = require_uncond(step, "CFGZeroStar")
        work = torch.promote_types(step.pred_cond.dtype, torch.float32)
        c, u = step.pred_cond.to(work), uncond.to(work)
        c_flat, u_flat = c.flatten(1), u.flatten(1)
        s_star = batch_view((c_flat * u_flat).sum(1) / (u_flat.pow(2).sum(1) + 1e-8), u)
        pred = (s_star * u + self.scale * (c - s_star * u)).to(step.pred_cond.dtype)
        return Guided(pred, pred)

    def __repr__(self) -> str:
        return f"CFGZeroStar(scale={self.scale}, zero_init_steps={self.zero_init_steps})"
