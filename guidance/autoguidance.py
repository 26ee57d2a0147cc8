"""Autoguidance (Karras et al., NeurIPS 2024; NVlabs/edm2 `generate_images.py`): guide a model with a weaker self."""

from __future__ import annotations

import torch
from torch import Tensor

from diffguide.samplers.base import Level

from .base import Guidance, Guided, Step, check_scale
from .denoiser import ModelFn


class Autoguidance(Guidance):
    """``pred = D0(x; c) + scale (D1(x; c) - D0(x; c))`` with ``D0`` a smaller or less-trained model, same ``c``.

    ``guide_model`` is a model callable ``(x_t, t, cond) -> output`` in the main model's prediction type
    (``samplers.diffusers_model_fn(weak_unet)`` for a diffusers network); it receives the step's ``x``, ``t``
    and conditional ``cond``. The main network's unconditional branch is never evaluated. Rows run by the
    guiding model are counted in ``guide_rows`` (cumulative). This is the paper's autoguidance (edm2
    ``ref_Dx.lerp(Dx, guidance)``), not diffusers' ``AutoGuidance`` (layer-skipped same network).
    """

    def __init__(self, guide_model: ModelFn, scale: float = 2.0) -> None:
        if not callable(guide_model):
            raise TypeError(f"guide_model must be a callable (x_t, t, cond) -> output, got {type(guide_model).__name__}")
        self.guide_model = guide_model
        self.scale = check_scale("scale", scale)
        self.guide_rows = 0

    def needs_uncond(self, level: Level, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, dtype=torch.bool, device=level.alpha.device)

    def weak_prediction(self, step: Step) -> Tensor:
        """The guiding model's prediction ``D0(x; c)`` at this step."""
        if step.cond is None:
            raise ValueError("Autoguidance needs the step's condition (step.cond); run it through GuidedDenoiser "
                             "or guidance.apply")
        with torch.no_grad():
            out = self.guide_model(step.x, step.t, step.cond)
        if out.shape != step.pred_cond.shape:
            raise ValueError(f"guide_model returned shape {tuple(out.shape)}, expected {tuple(step.pred_cond.shape)}")
        self.guide_rows += step.x.shape[0]
        return out.to(step.pred_cond.dtype)

    def combine(self, step: Step) -> Guided:
        weak = self.weak_prediction(step)
        pred = weak + self.scale * (step.pred_cond - weak)
        return Guided(pred, pred)

    def __repr__(self) -> str:
        return f"Autoguidance(scale={self.scale})"
