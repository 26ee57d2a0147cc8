"""Dynamic CFG via online feedback (Papalampidi et al., arXiv 2509.16131): a greedy per-step choice of the scale."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from .base import Guidance, Guided, Step, batch_view, check_flag, check_scale, require_uncond
from .feedback import Decode, Evaluator, check_scores, predicted_images

NORMALIZE = ("zscore", "none")


class DynamicCFG(Guidance):
    """At every step, score candidate CFG scales with evaluators on the predicted x0 and keep the best.

    For each candidate ``s`` in ``candidates`` the guided prediction ``u + s (c - u)`` gives an x0 estimate
    (linear in ``s``, so candidates cost evaluator calls only, never network passes); it is decoded with
    ``decode`` (the VAE for latent models), clamped to [-1, 1] (``clip``) and scored by each evaluator.
    Scores are normalised over the candidates (``"zscore"``, per sample; scores equal up to rounding count
    as a tie) and summed with ``weights``; the argmax is the scale of that step (per sample, or one for the
    batch with ``per_sample=False``; ties go to the earlier candidate). This is the paper's greedy search;
    its candidate set, evaluator weights and warm-up are not public and are parameters here.

    Args:
        evaluators: one evaluator or a sequence; each ``(images (B, C, H, W), step) -> scores (B,)``, higher
            better (see :mod:`guidance.feedback`: ``ClipAlignment``, ``ClassifierConfidence``, or any callable).
        candidates: the scales searched at every step (diffusers ``w``, 1 = no guidance).
        weights: one weight per evaluator, or ``fn(step_index, num_steps) -> weights`` (time-varying).
        normalize: ``"zscore"`` (scores standardised over the candidates before weighting) or ``"none"``.
        decode: ``latents -> images`` for latent models (e.g. ``feedback.vae_decoder(pipe.vae)``).
        clip: clamp the (decoded) x0 to [-1, 1] before scoring (off for non-image data).
        per_sample: choose a scale per sample (default) or one scale for the whole batch (mean score).
        warmup_steps: the first steps use ``warmup_scale`` without evaluator calls (x0 is still noise there).
        warmup_scale: scale of the warm-up steps (default: the largest candidate).

    Cost per guided step: ``len(evaluators) * len(candidates)`` evaluator calls (counted in
    ``evaluator_calls``, cumulative), zero extra network passes. ``schedule`` is the ``(num_steps, B)``
    tensor of chosen scales of the last run.
    """

    def __init__(self, evaluators: Evaluator | Sequence[Evaluator],
                 candidates: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 5.0),
                 weights: Sequence[float] | Callable[[int, int], Sequence[float]] | None = None,
                 normalize: str = "zscore", decode: Decode | None = None, clip: bool = True, per_sample: bool = True,
                 warmup_steps: int = 0, warmup_scale: float | None = None) -> None:
        self.evaluators = [evaluators] if callable(evaluators) else list(evaluators)
        if not self.evaluators:
            raise ValueError("DynamicCFG needs at least one evaluator")
        for ev in self.evaluators:
            if not callable(ev):
                raise TypeError(f"evaluators must be callables (images, step) -> scores, got {type(ev).__name__}")
        if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__iter__"):
            raise TypeError(f"candidates must be a sequence of scales, got {candidates!r}")
        candidates = [check_scale(f"candidates[{i}]", c) for i, c in enumerate(candidates)]
        if not candidates:
            raise ValueError("candidates must contain at least one scale")
        if len(set(candidates)) != len(candidates):
            raise ValueError(f"candidates must be distinct, got {candidates}")
        self.candidates = candidates
        if weights is not None and not callable(weights):
            weights = self._check_weights(weights)
        self.weights = weights
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        self.normalize = normalize
        if decode is not None and not callable(decode):
            raise TypeError(f"decode must be a callable latents -> images, got {type(decode).__name__}")
        self.decode, self.clip = decode, check_flag("clip", clip)
        self.per_sample = check_flag("per_sample", per_sample)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.warmup_scale = max(candidates) if warmup_scale is None else check_scale("warmup_scale", warmup_scale)
        self.evaluator_calls = 0
        self.reset()

    def _check_weights(self, weights: Sequence[float]) -> list[float]:
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
            raise TypeError(f"weights must be a sequence of numbers (one per evaluator) or a callable, got {weights!r}")
        weights = [check_scale(f"weights[{i}]", w, minimum=-math.inf) for i, w in enumerate(weights)]
        if len(weights) != len(self.evaluators):
            raise ValueError(f"weights must be {len(self.evaluators)} finite numbers (one per evaluator), got {weights}")
        return weights

    def reset(self) -> None:
        self._schedule: list[Tensor] = []

    @property
    def schedule(self) -> Tensor | None:
        """``(num_steps, B)`` scales chosen in the last run (``None`` before any run)."""
        return torch.stack(self._schedule) if self._schedule else None

    def scores(self, step: Step, uncond: Tensor) -> Tensor:
        """Combined evaluator scores ``(len(candidates), B)`` of the candidate scales at this step."""
        batch = step.pred_cond.shape[0]
        weights = self.weights(step.index, step.num_steps) if callable(self.weights) else self.weights
        weights = [1.0] * len(self.evaluators) if weights is None else self._check_weights(weights)
        images = [predicted_images(step.x0(uncond + s * (step.pred_cond - uncond)), self.decode, self.clip)
                  for s in self.candidates]
        total = torch.zeros(len(self.candidates), batch, dtype=torch.float64, device=step.pred_cond.device)
        for k, (evaluator, weight) in enumerate(zip(self.evaluators, weights)):
            name = f"evaluator {k} ({getattr(evaluator, '__name__', type(evaluator).__name__)})"
            with torch.no_grad():
                per = torch.stack([check_scores(evaluator(img, step), batch, name).double().to(total.device)
                                   for img in images])
            self.evaluator_calls += len(images)
            if self.normalize == "zscore" and len(self.candidates) > 1:
                std = per.std(0, unbiased=False)
                tied = std <= 1e-9 * per.abs().amax(0)   # candidates indistinguishable up to rounding
                per = torch.where(tied, 0.0, (per - per.mean(0)) / std.clamp_min(torch.finfo(per.dtype).tiny))
            total += weight * per
        return total

    def combine(self, step: Step) -> Guided:
        uncond = require_uncond(step, "DynamicCFG")
        batch = step.pred_cond.shape[0]
        if step.index < self.warmup_steps:
            scale = torch.full((batch,), self.warmup_scale, dtype=torch.float64)
        else:
            total = self.scores(step, uncond)
            if not self.per_sample:
                total = total.mean(1, keepdim=True).expand(-1, batch)
            choice = total.argmax(0).cpu()
            scale = torch.tensor(self.candidates, dtype=torch.float64)[choice]
        if step.index == 0:
            self.reset()
        self._schedule.append(scale)
        w = batch_view(scale.to(step.pred_cond.device, step.pred_cond.dtype), step.pred_cond)
        pred = uncond + w * (step.pred_cond - uncond)
        return Guided(pred, pred)

    def __repr__(self) -> str:
        return (f"DynamicCFG(evaluators={len(self.evaluators)}, candidates={self.candidates}, "
                f"normalize={self.normalize!r}, per_sample={self.per_sample}, warmup_steps={self.warmup_steps})")
