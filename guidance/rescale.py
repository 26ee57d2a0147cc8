"""CFG with rescaled output std (Lin et al. 2024, "Common diffusion noise schedules ...", Sec. 3.4)."""

from __future__ import annotations

from .base import Guidance, Guided, Step, check_scale, require_uncond


class CFGRescale(Guidance):
    """CFG, then ``phi * cfg * std(cond)/std(cfg) + (1 - phi) * cfg`` (std per sample, Eq. 15-16).

    Applied to the raw model output, like diffusers' ``guidance_rescale`` (the paper used v-prediction).
    """

    def __init__(self, scale: float = 7.5, phi: float = 0.7) -> None:
        self.scale = check_scale("scale", scale)
        self.phi = check_scale("phi", phi)
        if self.phi > 1:
            raise ValueError(f"phi must lie in [0, 1], got {phi}")

    def combine(self, step: Step) -> Guided:
        uncond = require_uncond(step, "CFGRescale")
        cfg = uncond + self.scale * (step.pred_cond - uncond)
        dims = list(range(1, cfg.ndim))
        std_cond = step.pred_cond.std(dim=dims, keepdim=True)
        std_cfg = cfg.std(dim=dims, keepdim=True)
        rescaled = cfg * (std_cond / std_cfg)
        pred = self.phi * rescaled + (1 - self.phi) * cfg
        return Guided(pred, pred)

    def __repr__(self) -> str:
        return f"CFGRescale(scale={self.scale}, phi={self.phi})"
