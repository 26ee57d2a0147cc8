"""Tiny random-weight diffusers pipelines built offline, for hook and overhead tests."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def byte_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single characters (no merges), built without files."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,!?'-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16, bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def tiny_sd(seed: int = 0, scheduler=None) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    tok = byte_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16,
                                      intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                                      vocab_size=len(tok), max_position_embeddings=16))
    scheduler = scheduler or DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(seed: int = 0):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 16, cross_attention_dim=32, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    tok = byte_tokenizer()
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32,
                         num_attention_heads=2, num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=16,
                         projection_dim=16)
    te, te2 = CLIPTextModel(cfg), CLIPTextModelWithProjection(cfg)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit(seed: int = 0):
    from diffusers import DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=2, in_channels=4, out_channels=8,
                                        num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    sched = DDIMScheduler(clip_sample=False)
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=sched, id2label={0: "zero", 1: "one"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_modular_sdxl(classic, guider=None):
    """A Modular SDXL pipeline (``StableDiffusionXLAutoBlocks``) on the components of a classic SDXL pipeline."""
    from diffusers import StableDiffusionXLAutoBlocks

    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    components = {k: v for k, v in classic.components.items() if k in pipe._component_specs and v is not None}
    pipe.update_components(**components, **({} if guider is None else {"guider": guider}))
    pipe.update_components(force_zeros_for_empty_prompt=classic.config.force_zeros_for_empty_prompt)
    blocks = [pipe._blocks]
    while blocks:  # the denoising loop sits a few levels down; set_progress_bar_config reaches only the top
        block = blocks.pop()
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        blocks += list(getattr(block, "sub_blocks", {}).values())
    return pipe
