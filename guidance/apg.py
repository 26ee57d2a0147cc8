"""Adaptive Projected Guidance (Sadat, Hilliges & Weber, ICLR 2025), in the paper's x0 space."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Guidance, Guided, Step, batch_view, check_scale, require_uncond


class APG(Guidance):
    """APG, Alg. 1 of the paper, applied to the denoised estimates ``D = x0_hat``.

    ``delta = D_c - D_u``; momentum ``delta_bar = delta + momentum * delta_bar_prev``; norm clamp to
    ``norm_threshold`` (over all non-batch dims, 0 disables); split into the part parallel to ``D_c`` and the
    orthogonal rest; ``D = D_c + (scale - 1) (delta_perp + eta * delta_par)``.

    ``scale`` is the diffusers-style ``w`` (1 = no guidance): ``eta=1, norm_threshold=0, momentum=0`` is
    exactly CFG on x0. Defaults are the paper's SDXL values (eta 0, r 15, momentum -0.5); ``r`` scales with
    the square root of the number of elements, so retune it for other resolutions.

    diffusers equivalent on x0 predictions: ``AdaptiveProjectedGuidance(guidance_scale=scale - 1,
    adaptive_projected_guidance_momentum=momentum, adaptive_projected_guidance_rescale=norm_threshold,
    eta=eta, use_original_formulation=True)`` (diffusers applies it to raw eps unless converted).
    """

    def __init__(self, scale: float = 7.5, eta: float = 0.0, norm_threshold: float = 15.0,
                 momentum: float = -0.5) -> None:
        self.scale = check_scale("scale", scale)
        self.eta = check_scale("eta", eta)
        if self.eta > 1:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        self.norm_threshold = check_scale("norm_threshold", norm_threshold)
        momentum = check_scale("momentum", momentum, minimum=-1.0)
        if not -1.0 < momentum < 1.0:
            raise ValueError(f"momentum must lie in (-1, 1), got {momentum}")
        self.momentum = momentum
        self._running: Tensor | None = None

    def reset(self) -> None:
        self._running = None

    def update(self, x0_cond: Tensor, x0_uncond: Tensor) -> Tensor:
        """The guided x0 (paper Eq. 8-11 with momentum, Alg. 1)."""
        delta = x0_cond - x0_uncond
        if self.momentum != 0.0:
            if self._running is not None and self._running.shape == delta.shape:
                delta = delta + self.momentum * self._running
            self._running = delta
        if self.norm_threshold > 0:
            norm = delta.flatten(1).norm(dim=1)
            delta = delta * batch_view(torch.clamp(self.norm_threshold / norm, max=1.0), delta)
        v = x0_cond.double().flatten(1)
        v = torch.nn.functional.normalize(v, dim=1)
        par = ((delta.double().flatten(1) * v).sum(1, keepdim=True) * v).view_as(delta).to(delta.dtype)
        perp = delta - par
        return x0_cond + (self.scale - 1) * (perp + self.eta * par)

    def combine(self, step: Step) -> Guided:
        uncond = require_uncond(step, "APG")
        x0_hat = self.update(step.x0(step.pred_cond), step.x0(uncond))
        pred = step.from_x0(x0_hat)
        return Guided(pred, pred)

    def __repr__(self) -> str:
        return (f"APG(scale={self.scale}, eta={self.eta}, norm_threshold={self.norm_threshold}, "
                f"momentum={self.momentum})")
