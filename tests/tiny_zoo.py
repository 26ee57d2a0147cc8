"""Tiny random-weight builds of the derived diffusers pipelines (img2img, inpaint, ControlNet, Kontext, Edit, I2V),
offline, from the components of ``tiny_pipes`` (recipes after diffusers' own fast tests, sizes shrunk)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

import tiny_pipes
from tiny_pipes import _randn, embeds

IMAGE = 16  # pixels


def image(seed: int = 7) -> torch.Tensor:
    shape = (1, 3, IMAGE, IMAGE)
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def mask() -> torch.Tensor:
    m = torch.zeros(1, 1, IMAGE, IMAGE)
    m[..., IMAGE // 4: 3 * IMAGE // 4, IMAGE // 4: 3 * IMAGE // 4] = 1.0
    return m


def _sd_unet(in_channels: int, sdxl: bool = False, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    extra = dict(use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=6 * 4 + 16, cross_attention_dim=32) if sdxl else \
        dict(cross_attention_dim=16)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, **extra).eval()


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd(kind: str):
    """Stable Diffusion ``kind``: "img2img", "inpaint" (9-channel UNet), "controlnet", "pix2pix" (8 channels) or
    "pag"."""
    from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline,
                           StableDiffusionInpaintPipeline, StableDiffusionInstructPix2PixPipeline,
                           StableDiffusionPAGPipeline)

    parts = tiny_pipes.tiny_sd().components
    if kind == "img2img":
        return _quiet(StableDiffusionImg2ImgPipeline(**parts))
    if kind == "pix2pix":
        return _quiet(StableDiffusionInstructPix2PixPipeline(**dict(parts, unet=_sd_unet(8))))
    if kind == "pag":
        return _quiet(StableDiffusionPAGPipeline(**parts, pag_applied_layers=["down"]))
    if kind == "animatediff":
        from diffusers import AnimateDiffPipeline, MotionAdapter

        torch.manual_seed(1)
        adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=4,
                                motion_num_attention_heads=2, motion_max_seq_length=8)
        return _quiet(AnimateDiffPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                          tokenizer=parts["tokenizer"], unet=parts["unet"], motion_adapter=adapter,
                                          scheduler=parts["scheduler"]))
    if kind == "inpaint":
        return _quiet(StableDiffusionInpaintPipeline(**dict(parts, unet=_sd_unet(9))))
    torch.manual_seed(1)
    controlnet = ControlNetModel(block_out_channels=(8, 16), layers_per_block=1, in_channels=4,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=16,
                                 conditioning_embedding_out_channels=(4, 8), norm_num_groups=4,
                                 attention_head_dim=4).eval()
    return _quiet(StableDiffusionControlNetPipeline(**parts, controlnet=controlnet))


def sdxl(kind: str):
    from diffusers import (StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                           StableDiffusionXLInstructPix2PixPipeline)

    parts = tiny_pipes.tiny_sdxl().components
    if kind == "img2img":
        return _quiet(StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=False))
    if kind == "pix2pix":
        parts = {k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")}
        return _quiet(StableDiffusionXLInstructPix2PixPipeline(**dict(parts, unet=_sd_unet(8, sdxl=True)),
                                                               add_watermarker=False))
    return _quiet(StableDiffusionXLInpaintPipeline(**dict(parts, unet=_sd_unet(9, sdxl=True)),
                                                   requires_aesthetics_score=False))


def sd3(kind: str):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

    parts = tiny_pipes.tiny_sd3().components
    if kind == "img2img":
        return _quiet(StableDiffusion3Img2ImgPipeline(**parts))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=33, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=16, pooled_projection_dim=16, out_channels=16).eval()
    # the pipeline knows the 33-channel layout only: a 16-channel VAE, mask and masked latents concatenated
    return _quiet(StableDiffusion3InpaintPipeline(**dict(parts, transformer=transformer,
                                                         vae=tiny_pipes._tiny_vae(16))))


def flux(kind: str):
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxKontextPipeline

    parts = tiny_pipes.tiny_flux().components
    parts = {k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")}
    cls = {"img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline, "kontext": FluxKontextPipeline}[kind]
    return _quiet(cls(**parts))


def qwen(kind: str):
    from diffusers import QwenImageImg2ImgPipeline, QwenImageInpaintPipeline

    parts = tiny_pipes.tiny_qwen().components
    cls = {"img2img": QwenImageImg2ImgPipeline, "inpaint": QwenImageInpaintPipeline}[kind]
    return _quiet(cls(**parts))


def wan(kind: str):
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel, WanVideoToVideoPipeline

    parts = tiny_pipes.tiny_wan().components
    if kind == "v2v":
        return _quiet(WanVideoToVideoPipeline(tokenizer=None, text_encoder=None, vae=parts["vae"],
                                              scheduler=parts["scheduler"], transformer=parts["transformer"]))
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=36, out_channels=16, text_dim=16, freq_dim=32, ffn_dim=16,
                                        num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32).eval()
    return _quiet(WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=parts["vae"],
                                          scheduler=parts["scheduler"], transformer=transformer,
                                          image_encoder=None, image_processor=None))


def _sd_embeds(pipe, sdxl: bool = False) -> dict:
    dim = 32 if sdxl else 16
    kw = dict(prompt_embeds=_randn(1, 5, dim, seed=1), negative_prompt_embeds=_randn(1, 5, dim, seed=2))
    if sdxl:
        kw.update(pooled_prompt_embeds=_randn(1, 16, seed=3), negative_pooled_prompt_embeds=_randn(1, 16, seed=4))
    return kw


# name -> (builder, call arguments for native CFG at scale s); batch 1, latents out
def _call(family: str, kind: str, s: float) -> dict:
    common = dict(num_inference_steps=4, output_type="latent")
    scale = {"flux": "true_cfg_scale", "qwen": "true_cfg_scale"}.get(family, "guidance_scale")
    if family in ("sd", "sdxl"):
        kw = _sd_embeds(None, family == "sdxl")
    else:
        kw = embeds(family, 1)
        kw.pop("num_frames", None)
    kw.update(common, **{scale: s})
    if kind in ("img2img", "inpaint"):
        kw.update(image=image(), strength=0.6)
    if kind == "inpaint":
        kw.update(mask_image=mask(), height=IMAGE, width=IMAGE)
    if kind == "controlnet":
        kw.update(image=image(), height=IMAGE, width=IMAGE)
    if kind == "pix2pix":
        kw.update(image=image(), image_guidance_scale=1.5)
    if kind == "pag":
        kw.update(pag_scale=0.0, height=IMAGE, width=IMAGE)
    if kind == "animatediff":
        kw.update(num_frames=3, height=IMAGE, width=IMAGE)
    if kind == "kontext":
        kw.update(image=image(), height=IMAGE, width=IMAGE, _auto_resize=False, max_area=IMAGE * IMAGE)
    if kind == "v2v":
        from PIL import Image

        frames = (image().permute(0, 2, 3, 1)[0].numpy() * 255).astype("uint8")
        kw.update(video=[Image.fromarray(frames)] * 5, height=IMAGE, width=IMAGE, strength=0.6)
    if kind == "i2v":
        kw.update(image=image(), height=IMAGE, width=IMAGE, num_frames=5)
    return kw


BUILDS = {f"{family}-{kind}": (builder, lambda s, f=family, k=kind: _call(f, k, s))
          for family, builder, kinds in (("sd", sd, ("img2img", "inpaint", "controlnet", "pix2pix", "pag", "animatediff")),
                                         ("sdxl", sdxl, ("img2img", "inpaint", "pix2pix")),
                                         ("sd3", sd3, ("img2img", "inpaint")),
                                         ("flux", flux, ("img2img", "inpaint", "kontext")),
                                         ("qwen", qwen, ("img2img", "inpaint")),  # Edit resizes its image to 1024^2
                                         ("wan", wan, ("i2v", "v2v")))
          for kind in kinds}
BUILDS = {name: (lambda b=builder, k=name.split("-")[1]: b(k), call) for name, (builder, call) in BUILDS.items()}
