"""Tiny random-weight builds of the Stable Diffusion UNet derivatives (image variation, model editing, text-to-video,
depth-to-image, upscale, GLIGEN, Paint-by-Example, ...), offline (recipes after diffusers' own fast tests, shrunk).

Prompt embeddings are passed directly where the pipeline takes them; the pipelines that tokenize by themselves get
``tiny_pipes.byte_tokenizer()`` and a tiny CLIP text encoder."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

import tiny_pipes
from tiny_pipes import _randn
from tiny_zoo import IMAGE, _quiet, _sd_unet, image

TEXT = 16  # width of the text embeddings / cross-attention


def _sd_parts() -> dict:
    return tiny_pipes.tiny_sd().components


def _embeds(dim: int = TEXT) -> dict:
    return dict(prompt_embeds=_randn(1, 5, dim, seed=1), negative_prompt_embeds=_randn(1, 5, dim, seed=2))


def _frames(n: int = 2) -> list:
    from PIL import Image

    frame = (image().permute(0, 2, 3, 1)[0].numpy() * 255).astype("uint8")
    return [Image.fromarray(frame)] * n


def _pil(seed: int = 7, size: int = IMAGE):
    from PIL import Image

    pixels = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray((pixels.numpy() * 255).astype("uint8"))


# -- builders ---------------------------------------------------------------------------------------------------

def model_editing():
    from diffusers import StableDiffusionModelEditingPipeline

    parts = _sd_parts()
    return _quiet(StableDiffusionModelEditingPipeline(**{k: parts[k] for k in (
        "vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")},
        requires_safety_checker=False))


def alt_diffusion(kind: str = "text2img"):
    from diffusers import AltDiffusionImg2ImgPipeline, AltDiffusionPipeline

    parts = _sd_parts()
    cls = AltDiffusionImg2ImgPipeline if kind == "img2img" else AltDiffusionPipeline
    return _quiet(cls(**{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler",
                                                  "safety_checker", "feature_extractor", "image_encoder")},
                      requires_safety_checker=False))


def gligen(inpaint: bool = False):
    """GLIGEN text-box generation, or (``inpaint``) its inpainting mode, whose UNet takes the latent with the masked
    image latents and the mask concatenated (4 + 5 channels)."""
    from diffusers import StableDiffusionGLIGENPipeline

    parts = _sd_parts()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=9 if inpaint else 4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT, norm_num_groups=4, attention_head_dim=4, attention_type="gated").eval()
    pipe = StableDiffusionGLIGENPipeline(**{k: parts[k] for k in (
        "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor")}, unet=unet,
        requires_safety_checker=False)
    # inpainting samples its image latents and each step's noise from the global RNG (no generator): reseed at the
    # encode, so that every call draws the same
    pipe.vae.encoder.register_forward_pre_hook(lambda module, args: torch.manual_seed(0) and None)
    return _quiet(pipe)


def gligen_call(s: float, inpaint: bool = False) -> dict:
    kw = _sd_call(s, gligen_phrases=["a cat"], gligen_boxes=[[0.1, 0.1, 0.6, 0.6]], gligen_scheduled_sampling_beta=1.0)
    return dict(kw, gligen_inpaint_image=_pil()) if inpaint else kw


def upscale():
    from diffusers import DDPMScheduler, StableDiffusionUpscalePipeline

    parts = _sd_parts()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT, norm_num_groups=4, attention_head_dim=4, num_class_embeds=100).eval()
    return _quiet(StableDiffusionUpscalePipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=unet,
        low_res_scheduler=DDPMScheduler(), scheduler=DDIMScheduler(prediction_type="v_prediction", clip_sample=False),
        max_noise_level=350))


def depth2img():
    from diffusers import StableDiffusionDepth2ImgPipeline

    parts = _sd_parts()
    return _quiet(StableDiffusionDepth2ImgPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=_sd_unet(5),
        scheduler=parts["scheduler"], depth_estimator=None, feature_extractor=None))


def _clip_vision(hidden: int = 16, projection: int = TEXT):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=hidden, projection_dim=projection, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=1, image_size=IMAGE, patch_size=4)).eval()
    return encoder, CLIPImageProcessor(crop_size=IMAGE, size=IMAGE)


def image_variation():
    from diffusers import StableDiffusionImageVariationPipeline

    parts = _sd_parts()
    encoder, processor = _clip_vision()
    return _quiet(StableDiffusionImageVariationPipeline(
        vae=parts["vae"], image_encoder=encoder, unet=parts["unet"], scheduler=parts["scheduler"],
        safety_checker=None, feature_extractor=processor, requires_safety_checker=False))


def paint_by_example():
    from diffusers import PaintByExamplePipeline
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder
    from transformers import CLIPVisionConfig

    parts = _sd_parts()
    _, processor = _clip_vision()
    torch.manual_seed(0)
    encoder = PaintByExampleImageEncoder(CLIPVisionConfig(
        hidden_size=TEXT, projection_dim=TEXT, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        image_size=IMAGE, patch_size=4), proj_size=TEXT).eval()
    return _quiet(PaintByExamplePipeline(vae=parts["vae"], image_encoder=encoder, unet=_sd_unet(9),
                                         scheduler=parts["scheduler"], safety_checker=None,
                                         feature_extractor=processor, requires_safety_checker=False))


def _unet3d():
    from diffusers import UNet3DConditionModel

    torch.manual_seed(0)
    return UNet3DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=TEXT, attention_head_dim=4, norm_num_groups=4).eval()


def text_to_video(kind: str = "t2v"):
    from diffusers import TextToVideoSDPipeline, VideoToVideoSDPipeline

    parts = _sd_parts()
    cls = VideoToVideoSDPipeline if kind == "v2v" else TextToVideoSDPipeline
    return _quiet(cls(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                      unet=_unet3d(), scheduler=parts["scheduler"]))


def ldm_text2img():
    from diffusers import LDMTextToImagePipeline
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    parts = _sd_parts()
    torch.manual_seed(0)
    bert = LDMBertModel(LDMBertConfig(vocab_size=len(parts["tokenizer"]), max_position_embeddings=77,
                                      encoder_layers=1, encoder_ffn_dim=32, encoder_attention_heads=2, head_dim=8,
                                      d_model=TEXT)).eval()
    return _quiet(LDMTextToImagePipeline(vqvae=parts["vae"], bert=bert, tokenizer=parts["tokenizer"],
                                         unet=parts["unet"], scheduler=parts["scheduler"]))


def i2vgen_xl():
    from diffusers import I2VGenXLPipeline, I2VGenXLUNet

    parts = _sd_parts()
    encoder, processor = _clip_vision()
    torch.manual_seed(0)
    unet = I2VGenXLUNet(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=TEXT,
                        attention_head_dim=4, num_attention_heads=None, norm_num_groups=4).eval()
    pipe = I2VGenXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                            image_encoder=encoder, feature_extractor=processor, unet=unet, scheduler=parts["scheduler"])
    # it samples its image latents from the global RNG (vae.encode(...).latent_dist.sample(), no generator): reseed
    # before every encode so that two calls see the same image latents
    pipe.vae.encoder.register_forward_pre_hook(lambda module, args: torch.manual_seed(0) and None)
    return _quiet(pipe)


def stable_unclip_img2img():
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    parts = _sd_parts()
    encoder, processor = _clip_vision(hidden=TEXT)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT, norm_num_groups=4, attention_head_dim=4, class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * TEXT).eval()
    torch.manual_seed(0)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=TEXT).eval()
    return _quiet(StableUnCLIPImg2ImgPipeline(
        feature_extractor=processor, image_encoder=encoder, image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), tokenizer=parts["tokenizer"],
        text_encoder=parts["text_encoder"], unet=unet, scheduler=parts["scheduler"], vae=parts["vae"]))


def ldm3d():
    """LDM3D: an RGB-D VAE (6 channels out); its outputs are ``rgb`` and ``depth`` (it has no latent output)."""
    from diffusers import StableDiffusionLDM3DPipeline

    parts = _sd_parts()
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 8], in_channels=6, out_channels=6,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=IMAGE).eval()
    return _quiet(StableDiffusionLDM3DPipeline(**dict(parts, vae=vae), requires_safety_checker=False))


# LDM3D returns ``rgb`` / ``depth`` (no latent output): zoo_harness.output_latents compares both
LDM3D = (ldm3d, lambda s: _sd_call(s, output_type="np"))


# -- native CFG calls at scale s: batch 1, 2 steps (4 at strength 0.6), latents out -------------------------------

def _base(s: float, **kw) -> dict:
    return dict(dict(num_inference_steps=2, output_type="latent", guidance_scale=s), **kw)


def _sd_call(s: float, **kw) -> dict:
    return _base(s, **_embeds(), height=IMAGE, width=IMAGE, **kw)


def _img2img_call(s: float, **kw) -> dict:
    return _base(s, **_embeds(), image=image(), strength=0.6, num_inference_steps=4, **kw)


BUILDS = {
    "StableDiffusionModelEditingPipeline": (model_editing, _sd_call),
    "AltDiffusionPipeline": (alt_diffusion, _sd_call),
    "AltDiffusionImg2ImgPipeline": (lambda: alt_diffusion("img2img"), _img2img_call),
    "StableDiffusionGLIGENPipeline": (gligen, gligen_call),
    "StableDiffusionUpscalePipeline": (upscale, lambda s: _base(s, **_embeds(), image=image()[..., :8, :8],
                                                                 noise_level=20)),
    "StableDiffusionDepth2ImgPipeline": (depth2img, lambda s: _img2img_call(
        s, depth_map=torch.rand(1, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3)))),
    "StableDiffusionImageVariationPipeline": (image_variation, lambda s: _base(s, image=_pil(), height=IMAGE,
                                                                                 width=IMAGE)),
    "PaintByExamplePipeline": (paint_by_example, lambda s: _base(
        s, image=_pil(), mask_image=_pil(8).convert("L"), example_image=_pil(9), height=IMAGE, width=IMAGE)),
    "TextToVideoSDPipeline": (text_to_video, lambda s: _sd_call(s, num_frames=3)),
    "VideoToVideoSDPipeline": (lambda: text_to_video("v2v"), lambda s: _base(
        s, **_embeds(), video=_frames(3), strength=0.6, num_inference_steps=4)),
    "LDMTextToImagePipeline": (ldm_text2img, lambda s: dict(prompt="a cat", guidance_scale=s, num_inference_steps=2,
                                                            height=IMAGE, width=IMAGE, output_type="pt")),
    "I2VGenXLPipeline": (i2vgen_xl, lambda s: _sd_call(s, image=image(), num_frames=3)),
    "StableUnCLIPImg2ImgPipeline": (stable_unclip_img2img, lambda s: _sd_call(s, image=image())),
    "StableDiffusionLDM3DPipeline": LDM3D,
}
