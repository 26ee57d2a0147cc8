"""Guidance objects and the hook that runs them inside diffusers pipelines."""

from .adaptive import AdaptiveGuidance
from .apg import APG
from .autoguidance import Autoguidance
from .base import Guidance, Guided, Step
from .cfg import CFG
from .cfg_zero_star import CFGZeroStar
from .cfgpp import CFGPlusPlus, equivalent_cfg_scale, equivalent_cfg_scales
from .denoiser import GuidedDenoiser
from .modular import DiffguideGuider, as_diffusers_guider
from .daps import DAPS
from .ddrm import DDNM, DDRM
from .diffpir import DiffPIR
from .dps import DPS
from .dynamic import DynamicCFG
from .enkg import EnKG
from .fkc import FKCAnneal, FKCCFG, FKCDenoiser, FKCGuidance, FKCProduct
from .feedback import ClassifierConfidence, ClipAlignment, vae_decoder
from .gfcg import GFCG
from .image_cfg import ImageCFG
from .hook import HookStats, apply
from .interval import GuidanceInterval
from .linear_ag import LinearAG
from .mcg import MCG
from .norm_rescale import NormRescale
from .p2l import P2L
from .pigdm import PiGDM
from .psld import PSLD
from .rectified_cfgpp import RectifiedCFGPlusPlus
from .reddiff import REDDiff
from .registry import GUIDES, build_guide, parse_guide_spec
from .rescale import CFGRescale
from .zo_personalize import PartialUniformTimesteps, SubspaceGradient, random_gradient_estimate, zo_adam

__all__ = [
    "AdaptiveGuidance", "Autoguidance", "ClassifierConfidence", "ClipAlignment", "DynamicCFG", "GFCG", "LinearAG",
    "vae_decoder",
    "APG", "CFG", "CFGPlusPlus", "CFGRescale", "CFGZeroStar", "Guidance", "GuidanceInterval", "Guided", "ImageCFG",
    "RectifiedCFGPlusPlus",
    "GUIDES", "GuidedDenoiser", "HookStats", "Step", "apply", "build_guide", "equivalent_cfg_scale",
    "equivalent_cfg_scales", "parse_guide_spec",
    "DPS", "EnKG", "MCG", "NormRescale", "P2L", "PSLD",
    "DAPS", "DDNM", "DDRM", "DiffPIR", "PiGDM", "REDDiff",
    "PartialUniformTimesteps", "SubspaceGradient", "random_gradient_estimate", "zo_adam",
    "DiffguideGuider", "as_diffusers_guider",
]
