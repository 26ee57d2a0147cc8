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


def _flux2_klein_parts() -> dict:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=False).eval()
    vae = AutoencoderKLFlux2(sample_size=16, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                             latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                             use_post_quant_conv=False).eval()
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
                transformer=transformer, vae=vae)


def flux2_klein():
    from diffusers import Flux2KleinPipeline

    return _quiet(Flux2KleinPipeline(**_flux2_klein_parts()))


def flux2_klein_inpaint():
    from diffusers import Flux2KleinInpaintPipeline

    return _quiet(Flux2KleinInpaintPipeline(**_flux2_klein_parts()))


def _pil(seed: int = 7, size: int = 16):
    from PIL import Image

    pixels = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray((pixels.numpy() * 255).astype("uint8"))


def flux2_klein_call(s: float) -> dict:
    # with an image to edit (its processor takes >= 64 px): its tokens are appended to the latent's and cut from
    # the output
    return dict(image=_pil(size=64), prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2),
                guidance_scale=s, height=16, width=16, num_inference_steps=2, output_type="latent")


def flux2_klein_inpaint_call(s: float) -> dict:
    return dict(image=tiny_zoo.image(), mask_image=tiny_zoo.mask(), prompt_embeds=_randn(1, 5, 16, seed=1),
                negative_prompt_embeds=_randn(1, 5, 16, seed=2), guidance_scale=s, height=16, width=16,
                strength=0.6, num_inference_steps=4, output_type="latent")


BUILDS.update({
    "Flux2KleinPipeline": (flux2_klein, flux2_klein_call),
    "Flux2KleinInpaintPipeline": (flux2_klein_inpaint, flux2_klein_inpaint_call),
})


def bria_fibo2():
    from diffusers import BriaFibo2Pipeline, BriaFibo2Transformer2DModel, FlowMatchEulerDiscreteScheduler

    vae = _flux2_klein_parts()["vae"]
    torch.manual_seed(0)
    transformer = BriaFibo2Transformer2DModel(
        in_channels=4, patch_size=2, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
        injection_layer_ids=(0,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
        gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(64, 32, 32)).eval()
    return _quiet(BriaFibo2Pipeline(transformer=transformer, vae=vae, text_encoder=None, processor=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)))


def bria_fibo2_call(s: float) -> dict:
    # embeddings of the text encoder's last layer and of each injection layer: (batch, 1 + 1, tokens, dim)
    mask = torch.ones(1, 5, dtype=torch.long)
    return dict(prompt_embeds=_randn(1, 2, 5, 16, seed=1), prompt_embeds_mask=mask,
                negative_prompt_embeds=_randn(1, 2, 5, 16, seed=2), negative_prompt_embeds_mask=mask,
                guidance_scale=s, height=16, width=16, num_inference_steps=2, output_type="latent")


BUILDS["BriaFibo2Pipeline"] = (bria_fibo2, bria_fibo2_call)


def _motion_adapter():
    from diffusers import MotionAdapter

    torch.manual_seed(1)
    return MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=4,
                         motion_num_attention_heads=2, motion_max_seq_length=8)


def animatediff_sparsectrl():
    from diffusers import AnimateDiffSparseControlNetPipeline, SparseControlNetModel

    torch.manual_seed(2)
    controlnet = SparseControlNetModel(
        block_out_channels=(8, 16), layers_per_block=1, in_channels=4, conditioning_channels=3,
        down_block_types=("DownBlockMotion", "CrossAttnDownBlockMotion"), cross_attention_dim=16,
        conditioning_embedding_out_channels=(4, 8), norm_num_groups=4, attention_head_dim=4,
        motion_num_attention_heads=2, motion_max_seq_length=8, use_simplified_condition_embedding=False).eval()
    return _quiet(AnimateDiffSparseControlNetPipeline(**_sd_parts(), motion_adapter=_motion_adapter(),
                                                      controlnet=controlnet, feature_extractor=None,
                                                      image_encoder=None))


def animatediff_sparsectrl_call(s: float) -> dict:
    # one conditioning frame (the first of 3): the residuals are repeated per frame like the prompt embeddings
    return dict(prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2),
                conditioning_frames=[_pil()], controlnet_frame_indices=[0], num_frames=3, height=16, width=16,
                guidance_scale=s, num_inference_steps=2, output_type="latent")


BUILDS["AnimateDiffSparseControlNetPipeline"] = (animatediff_sparsectrl, animatediff_sparsectrl_call)


def pia():
    from diffusers.pipelines.deprecated import PIAPipeline

    # PIA's UNet takes the latent, the frame mask and the masked image latents: 4 + 1 + 4 channels
    parts = dict(_sd_parts(), unet=tiny_zoo._sd_unet(9))
    return _quiet(PIAPipeline(**parts, motion_adapter=_motion_adapter(), feature_extractor=None, image_encoder=None))


def pia_call(s: float) -> dict:
    return dict(image=_pil(), prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2),
                num_frames=3, height=16, width=16, strength=0.6, guidance_scale=s, num_inference_steps=4,
                output_type="latent")


BUILDS["PIAPipeline"] = (pia, pia_call)


def qwen_layered():
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4),
                                              use_additional_t_cond=True, use_layer3d_rope=True).eval()
    # the pipeline works at 640 px or more: a VAE that downsamples 16 times keeps the sequence short
    vae = AutoencoderKLQwenImage(base_dim=2, z_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, False, True, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    # the pipeline reads the text encoder's dtype even when given prompt embeddings
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=32, vocab_size=64, bos_token_id=0, eos_token_id=1),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=16))).eval()
    return _quiet(QwenImageLayeredPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                           text_encoder=text_encoder, tokenizer=None, processor=None,
                                           transformer=transformer))


def qwen_layered_call(s: float) -> dict:
    # a prompt is given so that the pipeline does not caption the image; output_type="latent" is broken in 0.42.1
    mask = torch.ones(1, 5, dtype=torch.long)
    return dict(image=_pil(size=64), prompt="x", prompt_embeds=_randn(1, 5, 16, seed=1), prompt_embeds_mask=mask,
                negative_prompt_embeds=_randn(1, 5, 16, seed=2), negative_prompt_embeds_mask=mask, true_cfg_scale=s,
                layers=1, num_inference_steps=2, output_type="np")


BUILDS["QwenImageLayeredPipeline"] = (qwen_layered, qwen_layered_call)
