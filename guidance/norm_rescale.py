"""Rescale a guided prediction to the conditional prediction's norm (Qwen-Image, Lumina 2 / Lumina-Image 2.0).

Those pipelines follow CFG with ``g * ||c|| / ||g||``, norms along the last dimension (the channels of Qwen's
packed tokens; the width of Lumina's latents). As a guide it composes with any other: ``NormRescale(CFG(s))``
reproduces the native pipelines, ``NormRescale(APG(s))`` is new.
"""

from __future__ import annotations

from torch import Tensor

from diffguide.samplers.base import Level

from .base import Guidance, Guided, Step


class NormRescale(Guidance):
    """``g' = g * (||pred_cond|| / ||g||)`` along ``dim`` for the inner guide's denoise prediction ``g``.

    The renoise prediction is rescaled only where it is the denoise one (every guide but CFG++-style ones).
    """

    def __init__(self, guide: Guidance, dim: int = -1) -> None:
        if not isinstance(guide, Guidance):
            raise TypeError(f"guide must be a guidance.Guidance, got {type(guide).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        self.guide, self.dim = guide, dim
        self.changes_renoise = guide.changes_renoise
        self.evaluates_other_levels = guide.evaluates_other_levels

    def needs_uncond(self, level: Level, batch_size: int) -> Tensor:
        return self.guide.needs_uncond(level, batch_size)

    def reset(self) -> None:
        self.guide.reset()

    def combine(self, step: Step) -> Guided:
        guided = self.guide.combine(step)
        cond_norm = step.pred_cond.norm(dim=self.dim, keepdim=True)  # the pipelines' own torch.norm expression
        guided_norm = guided.denoise.norm(dim=self.dim, keepdim=True)
        denoise = guided.denoise * (cond_norm / guided_norm)
        return Guided(denoise, denoise if guided.renoise is guided.denoise else guided.renoise)

    def __repr__(self) -> str:
        return f"NormRescale({self.guide!r}, dim={self.dim})"
