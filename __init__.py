"""diffguide: inference-time guidance for diffusion models on top of Hugging Face diffusers.

The installed package is one namespace::

    import diffguide as dg
    pipe = dg.zoo.load("digits-class")
    with dg.apply(pipe, dg.APG(scale=4.0)):
        images = pipe(class_labels=[7], num_inference_steps=25).images

Subpackages: ``diffguide.guidance`` (what to do at a step), ``diffguide.samplers`` (how to move between noise
levels), ``diffguide.tasks`` (models, data, operators, metrics), ``diffguide.scripts`` (command lines).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported on first use (PEP 562), so ``import diffguide`` costs nothing until a name is touched:
# name -> the public module that defines it (``None``: the name is that subpackage itself).
_LAZY: dict[str, str | None] = {
    **dict.fromkeys(("APG", "CFG", "GFCG", "AdaptiveGuidance", "Autoguidance", "CFGPlusPlus", "CFGRescale",
                     "CFGZeroStar", "DynamicCFG", "Guidance", "GuidanceInterval", "GuidedDenoiser", "HookStats",
                     "LinearAG", "apply", "build_guide", "as_diffusers_guider"), "diffguide.guidance"),
    "zoo": "diffguide.tasks.zoo",
    "guidance": None, "samplers": None, "tasks": None, "scripts": None,
}

__all__ = [
    "APG", "CFG", "GFCG", "AdaptiveGuidance", "Autoguidance", "CFGPlusPlus", "CFGRescale", "CFGZeroStar",
    "DynamicCFG", "Guidance", "GuidanceInterval", "GuidedDenoiser", "HookStats", "LinearAG", "apply",
    "build_guide", "guidance", "samplers", "tasks", "zoo",
    "as_diffusers_guider",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffguide' has no attribute {name!r}")
    module = _LAZY[name]
    value = (importlib.import_module(f"diffguide.{name}") if module is None
             else importlib.import_module(module) if name == module.rpartition(".")[2]
             else getattr(importlib.import_module(module), name))
    globals()[name] = value          # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:                    # what static tools and IDEs see
    from diffguide import guidance, samplers, scripts, tasks
    from diffguide.guidance import (APG, CFG, GFCG, AdaptiveGuidance, Autoguidance, CFGPlusPlus, CFGRescale,
                                    CFGZeroStar, DynamicCFG, Guidance, GuidanceInterval, GuidedDenoiser, HookStats,
                                    LinearAG, apply, as_diffusers_guider, build_guide)
    from diffguide.tasks import zoo
