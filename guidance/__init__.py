"""Guidance objects and the hook that runs them inside diffusers pipelines."""

from .apg import APG
from .base import Guidance, Guided, Step
from .cfg import CFG
from .cfg_zero_star import CFGZeroStar
from .cfgpp import CFGPlusPlus, equivalent_cfg_scale
from .denoiser import GuidedDenoiser
from .hook import HookStats, apply
from .interval import GuidanceInterval
from .rescale import CFGRescale

__all__ = [
    "APG", "CFG", "CFGPlusPlus", "CFGRescale", "CFGZeroStar", "Guidance", "GuidanceInterval", "Guided",
    "GuidedDenoiser", "HookStats", "Step", "apply", "equivalent_cfg_scale",
]
