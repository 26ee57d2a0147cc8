"""Tiny random-weight builds of the media pipelines (AnimateDiff, audio, Kandinsky, DeepFloyd IF), offline, fixed
seeds: recipes after diffusers' own fast tests (``get_dummy_components`` / ``get_dummy_inputs``), sizes shrunk.
Text encoders that are not offline are left out: prompt (or image) embeddings are passed directly."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel
from PIL import Image

import tiny_pipes
from tiny_pipes import _randn

PIXELS = 16


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pil_image(seed: int = 7, size: int = PIXELS) -> Image.Image:
    pixels = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray((pixels.numpy() * 255).astype("uint8"))


def np_mask(size: int = PIXELS) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.float32)
    mask[: size // 2, : size // 2] = 1.0
    return mask


# -- Kandinsky 2.1 / 2.2: image-embedding UNets with learned variance (8 channels out), a VQ decoder -------------

def _ddim() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def _kandinsky_unet(in_channels: int, embed: str) -> UNet2DConditionModel:
    """``embed``: "text_image" (2.1), "image" (2.2) or "image_hint" (2.2 ControlNet)."""
    torch.manual_seed(0)
    proj = {"text_image": "text_image_proj"}.get(embed, "image_proj")
    return UNet2DConditionModel(
        in_channels=in_channels, out_channels=8, addition_embed_type=embed,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(8, 16), layers_per_block=1,
        encoder_hid_dim=16, encoder_hid_dim_type=proj, cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=4, resnet_time_scale_shift="scale_shift", class_embed_type=None).eval()


def _movq() -> VQModel:  # spatial norms have 32 groups: 32 channels
    torch.manual_seed(0)
    return VQModel(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                   vq_embed_dim=4).eval()


def _mclip():
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    torch.manual_seed(0)
    tok = tiny_pipes.byte_tokenizer()
    config = MCLIPConfig(transformerDimSize=16, imageDimSize=16, hidden_size=16, intermediate_size=32,
                         num_attention_heads=2, num_hidden_layers=1, vocab_size=len(tok), max_position_embeddings=80,
                         pad_token_id=1, bos_token_id=0, eos_token_id=1)
    return MultilingualCLIP(config).eval(), tok


def kandinsky(cls_name: str):
    import diffusers

    cls = getattr(diffusers, cls_name)
    in_channels = 9 if "Inpaint" in cls_name else 8 if "Controlnet" in cls_name else 4
    if cls_name.startswith("KandinskyV22"):
        embed = "image_hint" if "Controlnet" in cls_name else "image"
        return _quiet(cls(unet=_kandinsky_unet(in_channels, embed), scheduler=_ddim(), movq=_movq()))
    text_encoder, tokenizer = _mclip()
    return _quiet(cls(text_encoder=text_encoder, tokenizer=tokenizer, unet=_kandinsky_unet(in_channels, "text_image"),
                      scheduler=_ddim(), movq=_movq()))


def kandinsky_call(cls_name: str, s: float) -> dict:
    kw = dict(image_embeds=_randn(1, 16, seed=1), negative_image_embeds=_randn(1, 16, seed=2), height=PIXELS,
              width=PIXELS, num_inference_steps=2, guidance_scale=s)
    # 2.1 and the 2.2 ControlNet pipelines decode always: their smallest output is a tensor
    kw["output_type"] = "latent" if cls_name in ("KandinskyV22Pipeline", "KandinskyV22Img2ImgPipeline",
                                                 "KandinskyV22InpaintPipeline") else "pt"
    if not cls_name.startswith("KandinskyV22"):
        kw["prompt"] = "a cat"
    if "Img2Img" in cls_name:
        kw.update(image=pil_image(), strength=0.6, num_inference_steps=4)
    if "Inpaint" in cls_name:
        kw.update(image=pil_image(), mask_image=np_mask())
    if "Controlnet" in cls_name:
        # the UNet's hint block downsamples 8 times: a hint of 8x the latent's size (the latent is PIXELS / 2)
        kw["hint"] = torch.rand(1, 3, 4 * PIXELS, 4 * PIXELS, generator=torch.Generator().manual_seed(3))
    return kw


KANDINSKY = ("KandinskyPipeline", "KandinskyImg2ImgPipeline", "KandinskyInpaintPipeline", "KandinskyV22Pipeline",
             "KandinskyV22ControlnetPipeline", "KandinskyV22Img2ImgPipeline", "KandinskyV22ControlnetImg2ImgPipeline",
             "KandinskyV22InpaintPipeline")


# -- DeepFloyd IF: pixel-space UNets with learned variance (6 channels out); SR stages take the upscaled image as 3
# more input channels; T5 is not offline, so prompt embeddings are passed directly -------------------------------

def _if_unet(superresolution: bool) -> UNet2DConditionModel:
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    torch.manual_seed(0)
    extra = dict(class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
                 time_embedding_dim=32) if superresolution else {}
    unet = UNet2DConditionModel(
        sample_size=PIXELS, layers_per_block=1, block_out_channels=[8, 16],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=["SimpleCrossAttnUpBlock2D",
                                                                        "ResnetUpsampleBlock2D"],
        in_channels=6 if superresolution else 3, out_channels=6, cross_attention_dim=32, encoder_hid_dim=16,
        attention_head_dim=4, addition_embed_type="text", addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=4,
        **extra)
    unet.set_attn_processor(AttnAddedKVProcessor())
    return unet.eval()


def _if_scheduler(learned: bool = True):
    from diffusers import DDPMScheduler

    kw = dict(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0, prediction_type="epsilon",
              variance_type="learned_range") if learned else {}
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                         beta_end=0.02, **kw)


def deepfloyd_if(cls_name: str):
    import diffusers

    superresolution = "SuperResolution" in cls_name
    parts = dict(tokenizer=None, text_encoder=None, unet=_if_unet(superresolution), scheduler=_if_scheduler(),
                 safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    if superresolution:
        parts["image_noising_scheduler"] = _if_scheduler(learned=False)
    return _quiet(getattr(diffusers, cls_name)(**parts))


def _pixels(size: int, seed: int) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def deepfloyd_if_call(cls_name: str, s: float) -> dict:
    kw = dict(prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2),
              num_inference_steps=2, guidance_scale=s, output_type="pt", clean_caption=False)
    superresolution = "SuperResolution" in cls_name
    from_image = "Img2Img" in cls_name or "Inpainting" in cls_name  # sized by their (original) image
    if superresolution:  # the low-resolution stage's image, upscaled to the output's size
        kw["image"] = _pixels(PIXELS // 2, seed=3)
    if not from_image:
        kw.update(height=PIXELS, width=PIXELS)
    if from_image:
        original = _pixels(PIXELS, seed=4)
        kw.update({"original_image" if superresolution else "image": original}, strength=0.6, num_inference_steps=4)
    if "Inpainting" in cls_name:
        mask = torch.zeros(1, 1, PIXELS, PIXELS)
        mask[..., : PIXELS // 2, : PIXELS // 2] = 1.0
        kw["mask_image"] = mask
    return kw


IF = ("IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline", "IFSuperResolutionPipeline",
      "IFImg2ImgSuperResolutionPipeline", "IFInpaintingSuperResolutionPipeline")


# -- AnimateDiff: the tiny SD / SDXL UNet with a motion adapter (5-D latents, embeddings repeated per frame) --------

FRAMES = 3


def _motion_adapter(sdxl: bool = False):
    from diffusers import MotionAdapter

    torch.manual_seed(1)
    return MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=4,
                         motion_num_attention_heads=2, motion_max_seq_length=8, use_motion_mid_block=not sdxl)


def _controlnet():
    from diffusers import ControlNetModel

    torch.manual_seed(1)
    return ControlNetModel(block_out_channels=(8, 16), layers_per_block=1, in_channels=4,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=16,
                           conditioning_embedding_out_channels=(4, 8), norm_num_groups=4, attention_head_dim=4).eval()


def animatediff(cls_name: str):
    import diffusers

    cls = getattr(diffusers, cls_name)
    if cls_name == "AnimateDiffSDXLPipeline":
        parts = tiny_pipes.tiny_sdxl().components
        parts = {k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")}
        return _quiet(cls(**parts, motion_adapter=_motion_adapter(sdxl=True)))
    parts = tiny_pipes.tiny_sd().components
    parts = dict(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                 unet=parts["unet"], scheduler=parts["scheduler"], motion_adapter=_motion_adapter())
    if "ControlNet" in cls_name:
        parts["controlnet"] = _controlnet()
    if cls_name == "AnimateDiffPAGPipeline":
        parts["pag_applied_layers"] = ["mid"]
    return _quiet(cls(**parts))


def _frames(seed: int) -> list:
    return [pil_image(seed + i) for i in range(FRAMES)]


def animatediff_call(cls_name: str, s: float) -> dict:
    sdxl = cls_name == "AnimateDiffSDXLPipeline"
    dim = 32 if sdxl else 16
    kw = dict(prompt_embeds=_randn(1, 5, dim, seed=1), negative_prompt_embeds=_randn(1, 5, dim, seed=2),
              num_inference_steps=2, guidance_scale=s, output_type="latent", height=PIXELS, width=PIXELS)
    if sdxl:
        kw.update(pooled_prompt_embeds=_randn(1, 16, seed=3), negative_pooled_prompt_embeds=_randn(1, 16, seed=4))
    if "VideoToVideo" in cls_name:  # the frames come from the video
        kw.update(video=_frames(10), strength=0.6, num_inference_steps=4)
    else:
        kw["num_frames"] = FRAMES
    if "ControlNet" in cls_name:
        kw["conditioning_frames"] = _frames(20)
    if cls_name == "AnimateDiffPAGPipeline":
        kw["pag_scale"] = 0.0
    return kw


ANIMATEDIFF = ("AnimateDiffSDXLPipeline", "AnimateDiffVideoToVideoPipeline", "AnimateDiffControlNetPipeline",
               "AnimateDiffVideoToVideoControlNetPipeline", "AnimateDiffPAGPipeline")


# -- Kandinsky 3: its own UNet and (c + s (c - u)); T5 is not offline, so prompt embeddings and masks are passed ---

def kandinsky3(cls_name: str):
    import diffusers
    from diffusers import DDPMScheduler, Kandinsky3UNet

    torch.manual_seed(0)  # layers_per_block=1 builds mismatched widths
    unet = Kandinsky3UNet(in_channels=4, time_embedding_dim=4, groups=2, attention_head_dim=4, layers_per_block=2,
                          block_out_channels=(8, 16), cross_attention_dim=4, encoder_hid_dim=16).eval()
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True, thresholding=False)
    return _quiet(getattr(diffusers, cls_name)(tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler,
                                               movq=_movq()))


def kandinsky3_call(cls_name: str, s: float) -> dict:
    kw = dict(prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2),
              attention_mask=torch.ones(1, 5), negative_attention_mask=torch.ones(1, 5), num_inference_steps=2,
              guidance_scale=s, output_type="latent")
    if cls_name == "Kandinsky3Img2ImgPipeline":
        kw.update(image=pil_image(), strength=0.6, num_inference_steps=4)
    else:
        kw.update(height=PIXELS, width=PIXELS)
    return kw


# -- AudioLDM, MusicLDM, AudioLDM 2: mel-spectrogram latent UNets; a tiny HiFi-GAN vocoder; text embeddings passed
# directly (the text encoders they keep only lend their dtype) --------------------------------------------------

def _audio_parts(unet_cls=UNet2DConditionModel, cross_attention_dim=(8, 16), **unet_kw) -> dict:
    from diffusers import AutoencoderKL
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    torch.manual_seed(0)
    unet = unet_cls(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=8, in_channels=4,
                    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
                    **unet_kw).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=1, out_channels=1, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4).eval()
    torch.manual_seed(0)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=8, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        normalize_before=False)).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    return dict(unet=unet, vae=vae, vocoder=vocoder, scheduler=scheduler)


_CLAP_TEXT = dict(bos_token_id=0, eos_token_id=2, hidden_size=8, intermediate_size=16, num_attention_heads=1,
                  num_hidden_layers=1, pad_token_id=1, vocab_size=100, projection_dim=8)


def audio(cls_name: str):
    import diffusers
    from transformers import ClapConfig, ClapModel, ClapTextConfig, ClapTextModelWithProjection

    cls = getattr(diffusers, cls_name)
    if cls_name == "AudioLDM2Pipeline":
        from diffusers import AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel
        from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5EncoderModel

        torch.manual_seed(0)
        t5 = T5EncoderModel(T5Config(vocab_size=100, d_model=16, d_ff=16, d_kv=8, num_heads=1, num_layers=1)).eval()
        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=8, n_head=1, n_layer=1, vocab_size=100, n_ctx=16,
                                          n_positions=16)).eval()
        projection = AudioLDM2ProjectionModel(text_encoder_dim=8, text_encoder_1_dim=16, langauge_model_dim=8)
        # as the released model: each attention block has self-attention, attention to the generated embeddings
        # (width 8), then to the T5 ones (width 16)
        parts = _audio_parts(AudioLDM2UNet2DConditionModel, cross_attention_dim=((None, 8, 16), (None, 8, 16)))
        return _quiet(cls(**parts, text_encoder=None, text_encoder_2=t5,
                          projection_model=projection.eval(), language_model=gpt2, tokenizer=None, tokenizer_2=None,
                          feature_extractor=None))
    # the text embedding is projected into the time embedding (class_labels), not attended to
    parts = _audio_parts(class_embed_type="simple_projection", projection_class_embeddings_input_dim=8,
                         class_embeddings_concat=True)
    torch.manual_seed(0)
    if cls_name == "AudioLDMPipeline":
        return _quiet(cls(**parts, text_encoder=ClapTextModelWithProjection(ClapTextConfig(**_CLAP_TEXT)).eval(),
                          tokenizer=None))
    audio_config = dict(spec_size=8, window_size=4, num_mel_bins=8, intermediate_size=16, depths=[1, 1],
                        num_attention_heads=[1, 1], num_hidden_layers=1, hidden_size=16, projection_dim=8,
                        patch_size=2, patch_stride=2, patch_embed_input_channels=4)
    clap = ClapModel(ClapConfig(text_config=_CLAP_TEXT, audio_config=audio_config, projection_dim=8)).eval()
    return _quiet(cls(**parts, text_encoder=clap, tokenizer=None, feature_extractor=None))


def audio_call(cls_name: str, s: float) -> dict:
    # 16 mel frames: 16 x the vocoder's 4 samples at 16 kHz
    kw = dict(num_inference_steps=2, guidance_scale=s, audio_length_in_s=16 * 4 / 16000)
    if cls_name == "AudioLDM2Pipeline":
        kw.update(prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2),
                  generated_prompt_embeds=_randn(1, 4, 8, seed=3),
                  negative_generated_prompt_embeds=_randn(1, 4, 8, seed=4), output_type="latent")
    else:
        kw.update(prompt_embeds=_randn(1, 8, seed=1), negative_prompt_embeds=_randn(1, 8, seed=2),
                  output_type="latent" if cls_name == "MusicLDMPipeline" else "pt")  # AudioLDM decodes always
    return kw

BUILDS = {}
BUILDS.update({name: (lambda n=name: kandinsky(n), lambda s, n=name: kandinsky_call(n, s)) for name in KANDINSKY})
BUILDS.update({name: (lambda n=name: deepfloyd_if(n), lambda s, n=name: deepfloyd_if_call(n, s)) for name in IF})
BUILDS.update({name: (lambda n=name: animatediff(n), lambda s, n=name: animatediff_call(n, s))
               for name in ANIMATEDIFF})
BUILDS.update({name: (lambda n=name: kandinsky3(n), lambda s, n=name: kandinsky3_call(n, s))
               for name in ("Kandinsky3Pipeline", "Kandinsky3Img2ImgPipeline")})
BUILDS.update({name: (lambda n=name: audio(n), lambda s, n=name: audio_call(n, s))
               for name in ("AudioLDMPipeline", "MusicLDMPipeline", "AudioLDM2Pipeline")})

# builds whose network predicts a variance per channel and whose pipeline passes it on to a scheduler that learns it
LEARNED_VARIANCE = ("KandinskyPipeline", "KandinskyInpaintPipeline", "KandinskyV22Pipeline",
                    "KandinskyV22InpaintPipeline", "KandinskyV22ControlnetImg2ImgPipeline")
# (IF's own scheduler is a learned_range DDPM already: its builds check the variance channels as they stand)

# builds that start part-way down the schedule (strength < 1) and run on a scheduler keeping one sigma per step
# (Euler), where the start index decides the level; not IF (it hands learned-variance channels to its scheduler) nor
# Kandinsky 2.1 (its own add_noise indexes by integer timesteps), whose DDPM / DDIM levels come from the timestep
STRENGTH = ("AnimateDiffVideoToVideoPipeline", "AnimateDiffVideoToVideoControlNetPipeline",
            "KandinskyV22Img2ImgPipeline", "KandinskyV22ControlnetImg2ImgPipeline", "Kandinsky3Img2ImgPipeline")
