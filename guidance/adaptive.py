"""Adaptive Guidance (Castillo et al., AAAI 2025, arXiv 2312.12487): stop CFG once it agrees with cond."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffguide.samplers.base import Level

from .base import Guidance, Guided, Step, batch_view, check_scale, require_uncond

SPACES = ("eps", "x0")


def guidance_cosine(pred_cond: Tensor, pred_uncond: Tensor) -> Tensor:
    """Per-sample cosine similarity ``<c, u> / (||c|| ||u||)`` over all non-batch dims, float64 ``(B,)`` in [-1, 1]
    (clamped: rounding can otherwise give ``1 + 2e-16`` for parallel inputs, which would pass a threshold of 1)."""
    c, u = pred_cond.flatten(1).double(), pred_uncond.flatten(1).double()
    cosine = (c * u).sum(1) / (c.norm(dim=1) * u.norm(dim=1)).clamp_min(torch.finfo(torch.float64).tiny)
    return cosine.clamp(-1.0, 1.0)


def check_threshold(threshold: float) -> float:
    """A cosine threshold in (0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a real number in (0, 1], got {type(threshold).__name__}")
    if not (math.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    return float(threshold)


class AdaptiveGuidance(Guidance):
    """AG: CFG while ``gamma_t = cos(cond, uncond) <= threshold``, conditional-only steps afterwards.

    The decision is per sample and one-way (the paper's truncation): once a sample's ``gamma_t`` passes
    ``threshold``, every later step of that sample returns ``pred_cond`` and its unconditional row is no longer
    evaluated (:meth:`needs_uncond`), which is where the ~25% saving of the paper comes from. The step that
    measures ``gamma_t > threshold`` already paid for both branches and still uses CFG.

    Args:
        scale: CFG weight ``w`` (diffusers convention, ``u + w (c - u)``).
        threshold: the paper's ``gamma_bar`` in (0, 1]; 1 never truncates. The paper tunes it near 0.99 (the
            ComfyUI port defaults to 0.99); on the digits models with 20 DDIM steps, 0.99-0.999 in x0 space skip
            20-35% of the network rows (``benchmarks/bench_adaptive.py``).
        space: ``"x0"`` compares the x0 estimates (as the ComfyUI port does), ``"eps"`` the epsilon predictions
            (the paper's notation). On epsilon models ``eps_hat ~ x_t`` at high noise, so the epsilon cosine
            starts near 1 and has no trend (measured on ``digits-class``: ``1 - cos ~ 1e-3`` at every step of
            20, and the trigger fires at step 0); the x0 cosine rises monotonically (``1 - cos`` from ~8e-2 to
            ~1e-6), which is the "increasingly aligned" behaviour the criterion relies on. Hence the default.

    After a run, ``truncated_at`` holds each sample's first conditional-only step (``num_steps`` if none) and
    ``cosines`` the per-step ``gamma_t`` (NaN where not measured).
    """

    def __init__(self, scale: float = 7.5, threshold: float = 0.99, space: str = "x0") -> None:
        self.scale = check_scale("scale", scale)
        self.threshold = check_threshold(threshold)
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.space = space
        self.reset()

    def reset(self) -> None:
        self._truncated: Tensor | None = None
        self._truncated_at: Tensor | None = None
        self._cosines: list[Tensor] = []

    def _state(self, batch_size: int, device: torch.device, num_steps: int) -> Tensor:
        if self._truncated is None or len(self._truncated) != batch_size:
            self._truncated = torch.zeros(batch_size, dtype=torch.bool, device=device)
            self._truncated_at = torch.full((batch_size,), num_steps, dtype=torch.long, device=device)
            self._cosines = []
        return self._truncated

    def needs_uncond(self, level: Level, batch_size: int) -> Tensor:
        if level.index == 0:
            self.reset()
        truncated = self._state(batch_size, level.alpha.device, level.num_steps)
        return ~truncated.to(level.alpha.device)

    def combine(self, step: Step) -> Guided:
        uncond = require_uncond(step, "AdaptiveGuidance")
        if step.index == 0 and self._cosines:  # a new run in a loop that does not call needs_uncond
            self.reset()
        batch = step.pred_cond.shape[0]
        truncated = self._state(batch, step.pred_cond.device, step.num_steps).to(step.pred_cond.device)
        evaluated = ~truncated if step.uncond_mask is None else step.uncond_mask.to(step.pred_cond.device)
        if self.space == "eps":
            cond_v, uncond_v = step.eps(step.pred_cond), step.eps(uncond)
        else:
            cond_v, uncond_v = step.x0(step.pred_cond), step.x0(uncond)
        cosine = guidance_cosine(cond_v, uncond_v)
        cosine = torch.where(evaluated, cosine, torch.full_like(cosine, math.nan))
        if torch.isnan(cosine[evaluated]).any():
            raise ValueError("AdaptiveGuidance: the cosine similarity is NaN (non-finite predictions)")
        self._cosines.append(cosine)
        guided = uncond + self.scale * (step.pred_cond - uncond)
        pred = torch.where(batch_view(truncated, guided), step.pred_cond, guided)
        newly = evaluated & ~truncated & (cosine > self.threshold)
        self._truncated_at = torch.where(newly, torch.full_like(self._truncated_at, step.index + 1),
                                         self._truncated_at.to(newly.device))
        self._truncated = truncated | newly
        return Guided(pred, pred)

    def skip(self, step: Step) -> None:
        """Record a step decided elsewhere (LinearAG's regression): an unmeasured (NaN) cosine row, so that row
        ``i`` of :attr:`cosines` stays step ``i``; the truncation state is unchanged."""
        batch = step.pred_cond.shape[0]
        self._state(batch, step.pred_cond.device, step.num_steps)
        self._cosines.append(torch.full((batch,), math.nan, dtype=torch.float64, device=step.pred_cond.device))

    @property
    def truncated(self) -> Tensor | None:
        """Which samples of the current run are already conditional-only (``None`` before the first step)."""
        return self._truncated

    @property
    def truncated_at(self) -> Tensor | None:
        """First conditional-only step of each sample of the last run (``num_steps`` if never truncated)."""
        return self._truncated_at

    @property
    def cosines(self) -> Tensor | None:
        """``(num_steps, B)`` cosine ``gamma_t`` of the last run, NaN where the uncond branch was skipped."""
        return torch.stack(self._cosines) if self._cosines else None

    def __repr__(self) -> str:
        return f"AdaptiveGuidance(scale={self.scale}, threshold={self.threshold}, space={self.space!r})"
