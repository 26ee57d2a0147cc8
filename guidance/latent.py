"""Latent-space helpers for latent-diffusion solvers: the VAE encoder as a map images -> latents."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .feedback import vae_decoder

Encode = Callable[[Tensor], Tensor]


def vae_encoder(vae: torch.nn.Module) -> Encode:
    """``images in [-1, 1] -> latents`` for a diffusers ``AutoencoderKL``: the posterior mean, scaled as the UNet
    sees latents (``(mean - shift_factor) * scaling_factor``), so ``vae_encoder`` inverts :func:`vae_decoder`."""
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def encode(images: Tensor) -> Tensor:
        param = next(vae.parameters())
        mean = vae.encode(images.to(param.dtype)).latent_dist.mean
        return ((mean - shift) * scale).to(images.dtype)

    return encode


__all__ = ["vae_decoder", "vae_encoder"]
