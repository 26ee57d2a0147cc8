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


def tiny_sd(seed: int = 0, scheduler=None, text_dim: int = 16) -> StableDiffusionPipeline:
    """``text_dim``: width of the text encoder and of the UNet's cross-attention."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim, norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    tok = byte_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=text_dim,
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


def tiny_class_pipe():
    from diffusers import UNet2DModel

    from diffguide.tasks.pipelines import ClassConditionalPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11).eval()
    pipe = ClassConditionalPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe

# -- transformer pipelines (text encoders left out: tests pass prompt embeddings directly) ---------------------

def _tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def tiny_sd3(seed: int = 0, num_layers: int = 1):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=num_layers,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=16, pooled_projection_dim=16, out_channels=4).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=[4, 4, 8]).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(1), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sana(seed: int = 0):
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                         sample_size=32).eval()
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407).eval()
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart(seed: int = 0):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, caption_channels=16, in_channels=4,
                                           cross_attention_dim=16, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False,
                                           norm_eps=1e-6).eval()
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_tiny_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_hunyuan(seed: int = 0):
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    torch.manual_seed(seed)
    transformer = HunyuanDiT2DModel(sample_size=16, num_layers=1, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=2, in_channels=4, cross_attention_dim=16,
                                    cross_attention_dim_t5=16, pooled_projection_dim=8, hidden_size=16,
                                    text_len=5, text_len_t5=5, activation_fn="gelu-approximate").eval()
    pipe = HunyuanDiTPipeline(vae=_tiny_vae(), text_encoder=None, tokenizer=None, transformer=transformer,
                              scheduler=DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                                      beta_start=0.00085, beta_end=0.03, clip_sample=False),
                              safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                              text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_qwen(seed: int = 0):
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan(seed: int = 0, two_stage: bool = False):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)

    def net():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                     in_channels=16, out_channels=16, text_dim=16, freq_dim=32, ffn_dim=16,
                                     num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     rope_max_seq_len=32).eval()

    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                       transformer=net(), transformer_2=net() if two_stage else None,
                       boundary_ratio=0.5 if two_stage else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cogview4(seed: int = 0):
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4,
                                             num_attention_heads=4, out_channels=4, text_embed_dim=16,
                                             time_embed_dim=8, condition_dim=4).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=_tiny_vae(), transformer=transformer,
                            scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_lumina2(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, hidden_size=8, num_layers=1,
                                            num_attention_heads=1, num_kv_heads=1, multiple_of=16,
                                            ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
                                            axes_dim_rope=[4, 2, 2], cap_feat_dim=16).eval()
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(),
                           text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_zimage(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]).eval()
    with torch.no_grad():  # the pad tokens start as torch.empty
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(4), text_encoder=None,
                          tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe

def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def embeds(name: str, batch: int = 2) -> dict:
    """Prompt (and negative prompt) embeddings for the tiny transformer pipelines, fixed seeds."""
    dim = {"sana": 8}.get(name, 16)
    cond, uncond = _randn(batch, 5, dim, seed=1), _randn(batch, 5, dim, seed=2)
    kw = dict(prompt_embeds=cond, negative_prompt_embeds=uncond)
    if name in ("sd3", "flux"):
        kw.update(pooled_prompt_embeds=_randn(batch, 16, seed=3), negative_pooled_prompt_embeds=_randn(batch, 16, seed=4))
    if name == "hunyuan":
        kw.update(prompt_attention_mask=torch.ones(batch, 5), negative_prompt_attention_mask=torch.ones(batch, 5),
                  prompt_embeds_2=_randn(batch, 5, 16, seed=5), negative_prompt_embeds_2=_randn(batch, 5, 16, seed=6),
                  prompt_attention_mask_2=torch.ones(batch, 5), negative_prompt_attention_mask_2=torch.ones(batch, 5),
                  use_resolution_binning=False)
    if name == "qwen":
        kw.update(prompt_embeds_mask=torch.ones(batch, 5, dtype=torch.long),
                  negative_prompt_embeds_mask=torch.ones(batch, 5, dtype=torch.long))
    if name == "lumina2":
        kw.update(prompt_attention_mask=torch.ones(batch, 5, dtype=torch.long),
                  negative_prompt_attention_mask=torch.ones(batch, 5, dtype=torch.long))
    if name == "zimage":  # a list of (length, dim) embeddings per prompt
        kw = dict(prompt_embeds=list(cond.unbind(0)), negative_prompt_embeds=list(uncond.unbind(0)))
    if name in ("sana", "pixart"):
        kw.update(prompt_attention_mask=torch.ones(batch, 5), negative_prompt_attention_mask=torch.ones(batch, 5),
                  negative_prompt=None, use_resolution_binning=False)
    kw.update(SIZES[name])
    return kw


SIZES = {"sd3": dict(height=16, width=16), "flux": dict(height=16, width=16), "sana": dict(height=32, width=32),
         "pixart": dict(height=16, width=16),
         "hunyuan": dict(height=16, width=16), "qwen": dict(height=32, width=32),
         "wan": dict(height=16, width=16, num_frames=5), "cogview4": dict(height=16, width=16),
         "lumina2": dict(height=16, width=16), "zimage": dict(height=16, width=16)}

# name -> (builder, first layer every forward passes (rows are counted there), call arguments for native CFG at s)
PIPELINES = {
    "sd3": (tiny_sd3, "pos_embed", lambda s: dict(guidance_scale=s)),
    "flux": (tiny_flux, "x_embedder", lambda s: dict(true_cfg_scale=s)),
    "sana": (tiny_sana, "patch_embed", lambda s: dict(guidance_scale=s)),
    "pixart": (tiny_pixart, "pos_embed", lambda s: dict(guidance_scale=s)),
    "hunyuan": (tiny_hunyuan, "pos_embed", lambda s: dict(guidance_scale=s)),
    "qwen": (tiny_qwen, "img_in", lambda s: dict(true_cfg_scale=s)),
    "wan": (tiny_wan, "patch_embedding", lambda s: dict(guidance_scale=s)),
    "cogview4": (tiny_cogview4, "patch_embed", lambda s: dict(guidance_scale=s)),
    "lumina2": (tiny_lumina2, "x_embedder", lambda s: dict(guidance_scale=s)),
    "zimage": (tiny_zimage, "t_embedder", lambda s: dict(guidance_scale=s)),  # pos + s (pos - neg): CFG(s + 1)
}


def first_layer(net, name: str):
    return getattr(getattr(net, "_orig_mod", net), PIPELINES[name][1])


def tiny_flux_with_text_encoders(seed: int = 0):
    """tiny_flux with a CLIP and a T5 text encoder over the byte tokenizer, so prompts (and "") can be encoded."""
    from diffusers import FluxPipeline
    from transformers import T5Config, T5EncoderModel

    parts = tiny_flux(seed).components
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16,
                                                     intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                                     vocab_size=len(tok), max_position_embeddings=16)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2)).eval()
    pipe = FluxPipeline(**dict(parts, text_encoder=clip, text_encoder_2=t5, tokenizer=tok, tokenizer_2=tok))
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
