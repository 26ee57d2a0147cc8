"""diffguide: inference-time guidance for diffusion models on top of Hugging Face diffusers.

The installed package is one namespace::

    import diffguide as dg
    pipe = dg.zoo.load("digits-class")
    with dg.apply(pipe, dg.APG(scale=4.0)):
        images = pipe(class_labels=[7], num_inference_steps=25).images

Subpackages: ``diffguide.guidance`` (what to do at a step), ``diffguide.samplers`` (how to move between noise
levels), ``diffguide.tasks`` (models, data, operators, metrics), ``diffguide.scripts`` (command lines).
"""

from diffguide import guidance, samplers, tasks
from diffguide.guidance import (APG, CFG, GFCG, AdaptiveGuidance, Autoguidance, CFGPlusPlus, CFGRescale,
                                CFGZeroStar, DynamicCFG, Guidance, GuidanceInterval, GuidedDenoiser, HookStats,
                                LinearAG, apply, build_guide)
from diffguide.guidance import as_diffusers_guider
from diffguide.tasks import zoo

__version__ = "0.1.0"

__all__ = [
    "APG", "CFG", "GFCG", "AdaptiveGuidance", "Autoguidance", "CFGPlusPlus", "CFGRescale", "CFGZeroStar",
    "DynamicCFG", "Guidance", "GuidanceInterval", "GuidedDenoiser", "HookStats", "LinearAG", "apply",
    "build_guide", "guidance", "samplers", "tasks", "zoo",
    "as_diffusers_guider",
]
