"""Real-image editing with a text-to-image pipeline: DDIM inversion under one prompt, regeneration under another.

    from diffguide.tasks import editing, zoo
    pipe = zoo.load("digits-t2i")
    noise = editing.invert(pipe, image, "a handwritten digit seven", guidance.CFGPlusPlus(0.4), steps=50)
    edited = editing.generate(pipe, noise, "a handwritten digit one", guidance.CFGPlusPlus(0.4), steps=50)

With CFG++ one inversion step is the exact inverse of one sampling step when the network's outputs agree
(CFG++ Sec. 4.3; epsilons, or velocities for a flow scheduler: the plan carries the parametrisation), so the round trip ``generate(invert(x, p), p)`` reconstructs ``x`` better than with CFG.
Images are ``(B, C, H, W)`` in [-1, 1].
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from diffguide.guidance import Guidance, GuidedDenoiser
from diffguide.guidance.latent import vae_decoder, vae_encoder
from diffguide.samplers import (diffusers_model_fn, invert_ddim, plan_from_scheduler, sample_ddim,
                               scheduler_prediction_type)


def _prompts(prompt: str | Sequence[str], batch: int) -> list[str]:
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch or any(not isinstance(p, str) for p in prompts):
        raise ValueError(f"give one prompt or one per image ({batch}), got {prompt!r}")
    return prompts


def text_conditions(pipe: Any, prompts: list[str], negative: str = "") -> tuple[Tensor, Tensor]:
    """``(cond, uncond)`` text-encoder states for the prompts and the negative (null) prompt."""
    cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, True, negative_prompt=[negative] * len(prompts))
    return cond, uncond


def _denoiser(pipe: Any, prompt, guide: Guidance, batch: int) -> GuidedDenoiser:
    cond, uncond = text_conditions(pipe, _prompts(prompt, batch))
    return GuidedDenoiser(diffusers_model_fn(pipe.unet), guide, cond, uncond, scheduler_prediction_type(pipe.scheduler))


@torch.no_grad()
def invert(pipe: Any, images: Tensor, prompt: str | Sequence[str], guide: Guidance, steps: int = 50,
           progress: bool = False) -> Tensor:
    """Latent noise that regenerates ``images`` under ``prompt`` with ``guide`` (DDIM inversion)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    latents = vae_encoder(pipe.vae)(images.to(pipe.device))
    plan = plan_from_scheduler(pipe.scheduler, steps)
    return invert_ddim(_denoiser(pipe, prompt, guide, len(images)), latents, plan, disable=not progress)


@torch.no_grad()
def generate(pipe: Any, noise: Tensor, prompt: str | Sequence[str], guide: Guidance, steps: int = 50,
             progress: bool = False) -> Tensor:
    """Deterministic DDIM sampling from ``noise`` under ``prompt``; decoded images in [-1, 1]."""
    plan = plan_from_scheduler(pipe.scheduler, steps)
    latents = sample_ddim(_denoiser(pipe, prompt, guide, len(noise)), noise, plan, disable=not progress)
    latents = latents / plan.alpha(plan.num_steps).to(latents)
    return vae_decoder(pipe.vae)(latents).clamp(-1, 1)
