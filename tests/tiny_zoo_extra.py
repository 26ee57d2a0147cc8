"""Tiny random-weight builds of the diffusers pipelines served beyond the main families (deprecated Stable
Diffusion variants, AnimateDiff SparseCtrl and PIA, Flux 2 Klein, Bria Fibo 2, LongCat audio), offline, after
diffusers' own fast tests with sizes shrunk."""

from __future__ import annotations

import torch

import tiny_pipes
import tiny_zoo
from tiny_pipes import _randn


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDS = {}


def _sd_parts() -> dict:
    parts = tiny_pipes.tiny_sd().components
    return {k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}


def sd_safe():
    from diffusers.pipelines.deprecated import StableDiffusionPipelineSafe

    return _quiet(StableDiffusionPipelineSafe(**_sd_parts(), safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False))


def sd_safe_call(s: float) -> dict:
    # sld_guidance_scale < 1 turns the safety-concept branch off: the batch is [uncond; cond]
    return dict(prompt="a cat", negative_prompt="", guidance_scale=s, sld_guidance_scale=0.0,
                num_inference_steps=2, height=16, width=16, output_type="np")


def sd_inpaint_legacy():
    from diffusers.pipelines.deprecated import StableDiffusionInpaintPipelineLegacy

    return _quiet(StableDiffusionInpaintPipelineLegacy(**_sd_parts(), safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False))


def sd_inpaint_legacy_call(s: float) -> dict:
    return dict(prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2),
                image=tiny_zoo.image(), mask_image=tiny_zoo.mask(), strength=0.6, guidance_scale=s,
                num_inference_steps=4, output_type="latent")


BUILDS.update({
    "StableDiffusionPipelineSafe": (sd_safe, sd_safe_call),
    "StableDiffusionInpaintPipelineLegacy": (sd_inpaint_legacy, sd_inpaint_legacy_call),
})
