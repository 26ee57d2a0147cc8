"""Small exact and random models for the adaptive / feedback guide tests."""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffguide.samplers import plan_from_scheduler
from diffguide.tasks.gmm import ClassConditionalGMM, GaussianMixture
from diffguide.tasks.pipelines import ClassConditionalPipeline

F64 = torch.float64
SHAPE = (1, 4, 4)
NUM_CLASSES = 3


def gmm_model(seed: int = 1, spread: float = 1.0) -> tuple[ClassConditionalGMM, DDIMScheduler]:
    """Three classes of two isotropic components each on 4x4 images; null label 3."""
    dim = math.prod(SHAPE)
    g = torch.Generator().manual_seed(seed)
    mixtures = [GaussianMixture.isotropic(torch.tensor([0.5, 0.5], dtype=F64),
                                          spread * torch.randn(2, dim, generator=g, dtype=F64), 0.1)
                for _ in range(NUM_CLASSES)]
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    return ClassConditionalGMM(mixtures, scheduler.alphas_cumprod, sample_shape=SHAPE), scheduler


def gmm_problem(batch: int = 6, steps: int = 10, seed: int = 0):
    """(gmm, plan, labels, null labels, initial noise) for GuidedDenoiser runs."""
    gmm, scheduler = gmm_model()
    labels = torch.arange(batch) % NUM_CLASSES
    null = torch.full((batch,), gmm.null_class_label)
    x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return gmm, plan_from_scheduler(scheduler, steps), labels, null, x


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11).eval()


def class_pipe(seed: int = 0) -> ClassConditionalPipeline:
    """A random class-conditional pixel pipeline (10 classes + null), DDIM."""
    pipe = ClassConditionalPipeline(unet=tiny_unet(seed), scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_rows(net: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Rows entering the network's first convolution, one entry per real forward pass (independent of the
    hook's own counter and of how ``forward`` is reached)."""
    rows: list[int] = []
    handle = net.conv_in.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows, handle
