"""Guidance objects and the hook that runs them inside diffusers pipelines."""

from .apg import APG
from .base import Guidance, Guided, Step
from .cfg import CFG
from .cfg_zero_star import CFGZeroStar
from .cfgpp import CFGPlusPlus, equivalent_cfg_scale
from .denoiser import GuidedDenoiser
from .hook import HookStats, apply
from .interval import GuidanceInterval
from .registry import GUIDES, build_guide, parse_guide_spec
from .rescale import CFGRescale

__all__ = [
    "APG", "CFG", "CFGPlusPlus", "CFGRescale", "CFGZeroStar", "Guidance", "GuidanceInterval", "Guided",
    "GUIDES", "GuidedDenoiser", "HookStats", "Step", "apply", "build_guide", "equivalent_cfg_scale",
    "parse_guide_spec",
]
