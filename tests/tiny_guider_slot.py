"""Tiny random-weight classic pipelines that run CFG through a ``guider`` component, built offline.

Sizes follow diffusers' fast tests (``tests/pipelines/hunyuan_video1_5``, ``tests/pipelines/hunyuan_image_21``),
shrunk. The text encoders and tokenizers are left out: calls pass prompt embeddings (:func:`prompt_embeddings`).
"""

from __future__ import annotations

import torch
import numpy as np
import PIL.Image
from diffusers import (AutoencoderKLHunyuanImage, AutoencoderKLHunyuanImageRefiner, AutoencoderKLHunyuanVideo15,
                       FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline, HunyuanImageRefinerPipeline,
                       HunyuanImageTransformer2DModel, HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline,
                       HunyuanVideo15Transformer3DModel)
from diffusers.guiders import ClassifierFreeGuidance
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

TEXT_DIM, TEXT_2_DIM = 16, 32  # widths of the two prompt embeddings (MLLM, ByT5) of the video build
IMAGE_TEXT_DIM = 32  # both widths of the image build


IMAGE_EMBED_DIM = 12  # width of the SigLIP image embedding (image-to-video)


def _video15_parts(seed: int, task_type: str) -> dict:
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=TEXT_DIM,
        text_embed_2_dim=TEXT_2_DIM, image_embed_dim=IMAGE_EMBED_DIM, rope_axes_dim=(2, 2, 4), target_size=16,
        task_type=task_type)
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
        upsample_match_channel=False)
    return dict(text_encoder=None, tokenizer=None, transformer=transformer.eval(), vae=vae.eval(),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None)


def tiny_video15(seed: int = 0, guider=None) -> HunyuanVideo15Pipeline:
    """A text-to-video HunyuanVideo 1.5 pipeline: 1 block, 4 latent channels, VAE compression 4x (space) 2x (time)."""
    pipe = HunyuanVideo15Pipeline(**_video15_parts(seed, "t2v"),
                                  guider=guider if guider is not None else ClassifierFreeGuidance(guidance_scale=1.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_video15_i2v(seed: int = 0, guider=None) -> HunyuanVideo15ImageToVideoPipeline:
    """The image-to-video HunyuanVideo 1.5 pipeline of the same sizes, with a 1-layer SigLIP on 16x16 images (4
    tokens); its output size is the image's (:func:`video15_image`, 16x16)."""
    parts = _video15_parts(seed, "i2v")
    image_encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=IMAGE_EMBED_DIM, intermediate_size=16,
                                                         num_hidden_layers=1, num_attention_heads=2, image_size=16,
                                                         patch_size=8))
    pipe = HunyuanVideo15ImageToVideoPipeline(
        **parts, guider=guider if guider is not None else ClassifierFreeGuidance(guidance_scale=1.0),
        image_encoder=image_encoder.eval(), feature_extractor=SiglipImageProcessor(size={"height": 16, "width": 16}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def video15_image(seed: int = 0) -> PIL.Image.Image:
    """A 16x16 random RGB image, the first frame for :func:`tiny_video15_i2v`."""
    return PIL.Image.fromarray((np.random.default_rng(seed).random((16, 16, 3)) * 255).astype(np.uint8))


def tiny_image(seed: int = 0, guider=None) -> HunyuanImagePipeline:
    """A HunyuanImage 2.1 pipeline: 1 double- and 1 single-stream block, 4 latent channels, VAE compression 8x.

    No ``ocr_guider``: the pipeline runs ``guider`` whatever the prompt (with one set, it runs ``ocr_guider``
    whenever ``prompt_embeds_2`` is not all zero)."""
    torch.manual_seed(seed)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), guidance_embeds=False,
        text_embed_dim=IMAGE_TEXT_DIM, text_embed_2_dim=IMAGE_TEXT_DIM, rope_axes_dim=(4, 4))
    vae = AutoencoderKLHunyuanImage(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
        scaling_factor=0.476986, spatial_compression_ratio=8, sample_size=128)
    pipe = HunyuanImagePipeline(
        text_encoder=None, tokenizer=None, transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
        guider=guider if guider is not None else ClassifierFreeGuidance(guidance_scale=1.0), ocr_guider=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_image_refiner(seed: int = 0, guider=None) -> HunyuanImageRefinerPipeline:
    """A HunyuanImage 2.1 refiner: the image build's transformer on (latents, conditioning latents) with 3-D
    patches and a distilled-guidance embedding, a 2-block refiner VAE (4x space); its ``image`` may be given as
    latents (:func:`refiner_image_latents`)."""
    torch.manual_seed(seed)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=8, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1, 1), guidance_embeds=True,
        text_embed_dim=IMAGE_TEXT_DIM, rope_axes_dim=(2, 2, 4))
    vae = AutoencoderKLHunyuanImageRefiner(
        latent_channels=4, block_out_channels=(16, 16), layers_per_block=1, spatial_compression_ratio=4,
        temporal_compression_ratio=2, downsample_match_channel=False, upsample_match_channel=False)
    pipe = HunyuanImageRefinerPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=4.0), vae=vae.eval(), text_encoder=None, tokenizer=None,
        transformer=transformer.eval(), guider=guider)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def refiner_image_latents(seed: int = 2) -> torch.Tensor:
    """Random latents of a 16x16 image for :func:`tiny_image_refiner`: (1, 4, 1, 4, 4)."""
    return torch.randn(1, 4, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def prompt_embeddings(batch: int = 1, seed: int = 1, tokens: int = 6, tokens_2: int = 5,
                      dims: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Random prompt and negative-prompt embeddings with masks (last token of each negative masked out);
    ``dims``: the widths of the two embeddings (default HunyuanVideo 1.5's)."""
    dim, dim_2 = dims or (TEXT_DIM, TEXT_2_DIM)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for prefix in ("", "negative_"):
        out[f"{prefix}prompt_embeds"] = torch.randn(batch, tokens, dim, generator=gen)
        out[f"{prefix}prompt_embeds_2"] = torch.randn(batch, tokens_2, dim_2, generator=gen)
        mask, mask_2 = torch.ones(batch, tokens), torch.ones(batch, tokens_2)
        if prefix:
            mask[:, -1] = 0
            mask_2[:, -1] = 0
        out[f"{prefix}prompt_embeds_mask"], out[f"{prefix}prompt_embeds_mask_2"] = mask, mask_2
    return out
