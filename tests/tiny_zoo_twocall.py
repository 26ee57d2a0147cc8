"""Tiny random-weight builds of the two-call and list-layout derived pipelines (Flux Kontext / ControlNet, Chroma,
Qwen-Image Edit / ControlNet, Z-Image img2img / inpaint / ControlNet, HunyuanVideo, Wan derivatives, ...),
offline, after diffusers' own fast tests (``get_dummy_components``), sizes shrunk."""

from __future__ import annotations

import torch

import tiny_pipes
from tiny_pipes import _randn, embeds
from tiny_zoo import IMAGE, image, mask

STEPS = dict(num_inference_steps=2, output_type="latent")
IMG2IMG = dict(num_inference_steps=4, output_type="latent", strength=0.6)


def picture(size: int, seed: int = 8) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hole(size: int) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    return m


def unzeroed(net: torch.nn.Module, seed: int = 2) -> torch.nn.Module:
    """``net`` with its zero-initialised layers (ControlNet output projections) given small random weights, so its
    residuals are not zero and a wrong row of them would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            if not param.any():
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return net.eval()


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- Flux ----------------------------------------------------------------------------------------------------------
def _flux_parts() -> dict:
    parts = tiny_pipes.tiny_flux().components
    return {k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")}


def flux_kontext_inpaint():
    from diffusers import FluxKontextInpaintPipeline

    return _quiet(FluxKontextInpaintPipeline(**_flux_parts()))


def flux_controlnet():
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    torch.manual_seed(1)
    controlnet = FluxControlNetModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                     pooled_projection_dim=16, axes_dims_rope=[4, 4, 8])
    return _quiet(FluxControlNetPipeline(**_flux_parts(), controlnet=unzeroed(controlnet)))


def _flux_call(s: float, **kw) -> dict:
    return dict(embeds("flux", 1), true_cfg_scale=s, **kw)


# -- Chroma --------------------------------------------------------------------------------------------------------
def chroma(kind: str = ""):
    import diffusers
    from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                           axes_dims_rope=[4, 4, 8], approximator_hidden_dim=16,
                                           approximator_layers=1, approximator_num_channels=16).eval()
    # ChromaInpaintPipeline reads transformer.config.guidance_embeds (a Flux field the Chroma transformer lacks) to
    # build a guidance tensor it never passes on: declare the field so the pipeline runs at all
    transformer.register_to_config(guidance_embeds=False)
    cls = getattr(diffusers, f"Chroma{kind}Pipeline")
    return _quiet(cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_pipes._tiny_vae(1), text_encoder=None,
                      tokenizer=None, transformer=transformer))


def _chroma_call(s: float, **kw) -> dict:
    return dict(prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2),
                prompt_attention_mask=torch.ones(1, 5), negative_prompt_attention_mask=torch.ones(1, 5),
                height=IMAGE, width=IMAGE, guidance_scale=s, **kw)


# -- Qwen-Image ----------------------------------------------------------------------------------------------------
def qwen_controlnet(inpaint: bool = False):
    from diffusers import QwenImageControlNetInpaintPipeline, QwenImageControlNetModel, QwenImageControlNetPipeline

    parts = tiny_pipes.tiny_qwen().components
    torch.manual_seed(1)
    controlnet = QwenImageControlNetModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                          axes_dims_rope=(8, 4, 4), extra_condition_channels=4 if inpaint else 0)
    cls = QwenImageControlNetInpaintPipeline if inpaint else QwenImageControlNetPipeline
    return _quiet(cls(**parts, controlnet=unzeroed(controlnet)))


EDIT_POOL = 16  # the Edit pipelines resize their input to ~1024^2 pixels: encoded 16x pooled, 64^2 pixels


def qwen_edit(name: str):
    """Qwen-Image Edit / Edit Inpaint / Edit Plus. They resize the input image to ``calculate_dimensions(1024 * 1024,
    ratio)`` (pipeline_qwenimage_edit.py:623-624) whatever its size, so the VAE here average-pools by ``EDIT_POOL``
    before the tiny 4x Qwen VAE and declares itself a ``4 * EDIT_POOL``x VAE (``temperal_downsample``'s length, from
    which the pipelines read their scale factor): 64 image tokens instead of 16384."""
    import diffusers
    import torch.nn.functional as F
    from diffusers import AutoencoderKLQwenImage

    class PooledQwenVAE(AutoencoderKLQwenImage):
        def encode(self, x, return_dict: bool = True):
            return super().encode(F.avg_pool3d(x, (1, EDIT_POOL, EDIT_POOL)), return_dict)

    parts = tiny_pipes.tiny_qwen().components
    torch.manual_seed(0)
    vae = PooledQwenVAE(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
                        latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    vae.temperal_downsample = vae.temperal_downsample + [False] * (EDIT_POOL.bit_length() - 1)
    return _quiet(getattr(diffusers, name)(**dict(parts, vae=vae), processor=None))


EDIT_SIZE = 256  # the generated image: a multiple of 2 * 64 pixels, 4 latent tokens


def _edit_call(s: float, **kw) -> dict:
    from PIL import Image

    pixels = (picture(32).permute(0, 2, 3, 1)[0].numpy() * 255).astype("uint8")
    return _qwen_call(s, image=Image.fromarray(pixels), **dict(dict(height=EDIT_SIZE, width=EDIT_SIZE), **kw))


def _global_seed(kw: dict) -> dict:
    """``kw``, after seeding torch's global generator: QwenImageControlNetInpaintPipeline
    (``prepare_image_with_mask``) and CogView4ControlPipeline sample their control latents with
    ``latent_dist.sample()`` and no generator, so the native call is reproducible only from a fixed global seed."""
    torch.manual_seed(0)
    return kw


def _qwen_call(s: float, **kw) -> dict:
    return dict(embeds("qwen", 1), **dict(dict(true_cfg_scale=s), **kw))


# -- Z-Image -------------------------------------------------------------------------------------------------------
def zimage(kind: str):
    import diffusers

    parts = tiny_pipes.tiny_zimage().components
    if "ControlNet" in kind:
        torch.manual_seed(1)
        parts["controlnet"] = diffusers.ZImageControlNetModel(
            control_layers_places=[0], control_refiner_layers_places=[0],
            control_in_dim=9 if "Inpaint" in kind else 4, all_patch_size=(2,),
            all_f_patch_size=(1,), dim=32, n_refiner_layers=1, n_heads=2, n_kv_heads=2)
        parts["controlnet"] = unzeroed(parts["controlnet"])
    return _quiet(getattr(diffusers, f"ZImage{kind}Pipeline")(**parts))


def _zimage_call(s: float, **kw) -> dict:
    return dict(embeds("zimage", 1), guidance_scale=s, **kw)


# -- Wan derivatives (SkyReels-V2, ChronoEdit, VACE, Lucy Edit) ------------------------------------------------------
FRAMES = 5


def _wan_net(cls_name: str, in_channels: int = 16, **kw):
    import diffusers

    torch.manual_seed(0)
    return getattr(diffusers, cls_name)(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=in_channels, out_channels=16, text_dim=16, freq_dim=32,
                                        ffn_dim=16, num_layers=1, cross_attn_norm=True,
                                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **kw).eval()


def _clip_vision() -> dict:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=1,
                                                             num_attention_heads=2, image_size=16,
                                                             intermediate_size=8, patch_size=4)).eval()
    return dict(image_encoder=encoder, image_processor=CLIPImageProcessor(crop_size=16, size=16))


def wan_derived(name: str):
    import diffusers
    from diffusers import UniPCMultistepScheduler

    vae = tiny_pipes.tiny_wan().vae
    flow = tiny_pipes.tiny_wan().scheduler
    if name == "SkyReelsV2Pipeline":
        parts = dict(transformer=_wan_net("SkyReelsV2Transformer3DModel"),
                     scheduler=UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction"))
    elif name == "SkyReelsV2ImageToVideoPipeline":
        parts = dict(transformer=_wan_net("SkyReelsV2Transformer3DModel", 36, image_dim=4),
                     scheduler=UniPCMultistepScheduler(flow_shift=5.0, use_flow_sigmas=True, prediction_type="flow_prediction"),
                     **_clip_vision())
    elif name == "ChronoEditPipeline":
        parts = dict(transformer=_wan_net("ChronoEditTransformer3DModel", 36, image_dim=4), scheduler=flow,
                     **_clip_vision())
    elif name == "WanVACEPipeline":
        parts = dict(transformer=_wan_net("WanVACETransformer3DModel", vace_layers=[0], vace_in_channels=96),
                     scheduler=flow, transformer_2=None)
    else:  # LucyEditPipeline: the video's latents concatenated on the channels
        parts = dict(transformer=_wan_net("WanTransformer3DModel", 32), scheduler=flow, transformer_2=None)
    return _quiet(getattr(diffusers, name)(tokenizer=None, text_encoder=None, vae=vae, **parts))


def _video(frames: int = FRAMES, mode: str = "RGB") -> list:
    from PIL import Image

    pixels = (image().permute(0, 2, 3, 1)[0].numpy() * 255).astype("uint8")
    picture = Image.fromarray(pixels)
    return [picture.convert(mode)] * frames


def _wan_call(s: float, **kw) -> dict:
    return dict(embeds("wan", 1), guidance_scale=s, **STEPS, **kw)


WAN_CALLS = {
    "SkyReelsV2Pipeline": lambda s: _wan_call(s),
    "SkyReelsV2ImageToVideoPipeline": lambda s: _wan_call(s, image=_video(1)[0]),
    "ChronoEditPipeline": lambda s: _wan_call(s, image=_video(1)[0]),
    "WanVACEPipeline": lambda s: _wan_call(s, video=_video(), mask=[m.point(lambda v: 255 * (v > 128))
                                                                     for m in _video(mode="L")]),
    "LucyEditPipeline": lambda s: _wan_call(s, video=_video()),
}


# -- HunyuanVideo ---------------------------------------------------------------------------------------------------
def hunyuan_video(i2v: bool = False):
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler,
                           HunyuanSkyreelsImageToVideoPipeline, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel)

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=8 if i2v else 4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        act_fn="silu", norm_num_groups=2, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True).eval()
    cls = HunyuanSkyreelsImageToVideoPipeline if i2v else HunyuanVideoPipeline
    return _quiet(cls(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                      scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None))


def _hunyuan_call(s: float, **kw) -> dict:
    return dict(prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2),
                pooled_prompt_embeds=_randn(1, 8, seed=3), negative_pooled_prompt_embeds=_randn(1, 8, seed=4),
                prompt_attention_mask=torch.ones(1, 5), negative_prompt_attention_mask=torch.ones(1, 5),
                height=IMAGE, width=IMAGE, num_frames=FRAMES, true_cfg_scale=s, **STEPS, **kw)


# -- CogView4 Control, Ovis-Image, NucleusMoE-Image, Krea 2 ------------------------------------------------------------
def cogview4_control():
    from diffusers import CogView4ControlPipeline, CogView4Transformer2DModel

    parts = tiny_pipes.tiny_cogview4().components
    torch.manual_seed(0)
    parts["transformer"] = CogView4Transformer2DModel(patch_size=2, in_channels=8, num_layers=1, attention_head_dim=4,
                                                      num_attention_heads=4, out_channels=4, text_embed_dim=16,
                                                      time_embed_dim=8, condition_dim=4).eval()
    return _quiet(CogView4ControlPipeline(**parts))


def flux_like():
    """Ovis-Image: Flux-style packed latents, two calls."""
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel

    torch.manual_seed(0)
    transformer = OvisImageTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 4, 8)).eval()
    return _quiet(OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_pipes._tiny_vae(1),
                                    text_encoder=None, tokenizer=None, transformer=transformer))


def longcat(edit: bool = False):
    """LongCat-Image (Edit) encode their prompt even when prompt embeddings are passed (``len(prompt)`` in
    encode_prompt, pipeline_longcat_image.py:342, and check_inputs refuses both): a tiny Qwen2 (Qwen2.5-VL for Edit,
    which reads the image too) text model over the offline byte tokenizer, 8 prompt tokens instead of 512. Edit
    generates at ``calculate_dimensions(1024 * 1024, ratio)`` whatever is asked: a 64x VAE (7 blocks of 4 channels)
    keeps that at 64 latent tokens."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, LongCatImageEditPipeline,
                           LongCatImagePipeline, LongCatImageTransformer2DModel)

    tokenizer = tiny_pipes.byte_tokenizer()
    torch.manual_seed(0)
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8]).eval()
    if not edit:
        from transformers import Qwen2Config, Qwen2Model

        text_encoder = Qwen2Model(Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                              max_position_embeddings=512)).eval()
        pipe = LongCatImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_pipes._tiny_vae(16),
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_processor=None,
                                    transformer=transformer)
    else:
        from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor,
                                  Qwen2VLProcessor, Qwen2VLVideoProcessor)

        vision = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
        tokenizer.add_special_tokens({"additional_special_tokens": vision})
        tokenizer.image_token = "<|image_pad|>"
        start, pad, end = tokenizer.convert_tokens_to_ids(vision)
        config = Qwen2_5_VLConfig(
            text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1,
                             rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                               fullatt_block_indexes=[0]),
            vocab_size=len(tokenizer), hidden_size=16, bos_token_id=0, eos_token_id=1, image_token_id=pad,
            vision_start_token_id=start, vision_end_token_id=end)
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
        processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56),
                                     tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,) * 7, layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 7, up_block_types=("UpDecoderBlock2D",) * 7,
                            latent_channels=16, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.0609, scaling_factor=1.5035).eval()
        pipe = LongCatImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                        text_encoder=text_encoder, tokenizer=tokenizer, text_processor=processor,
                                        transformer=transformer)
    pipe.tokenizer_max_length = 8
    return _quiet(pipe)


def qwen_vae_pipe(name: str):
    """NucleusMoE-Image and Krea 2: Qwen-Image VAE, packed latents."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    vae = tiny_pipes.tiny_qwen().vae
    torch.manual_seed(0)
    if name == "NucleusMoEImagePipeline":
        transformer = diffusers.NucleusMoEImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(8, 4, 4), moe_enabled=False, capacity_factors=[8.0])
        return _quiet(diffusers.NucleusMoEImagePipeline(transformer=transformer.eval(),
                                                        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                                        text_encoder=None, processor=None))
    transformer = diffusers.Krea2Transformer2DModel(
        in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=16, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3,
        text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2), rope_theta=1000.0)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=6400)
    return _quiet(diffusers.Krea2Pipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                          transformer=transformer.eval(), text_encoder_select_layers=(0, 1, 2)))


def _text(s: float, scale: str = "guidance_scale", size: int = IMAGE, mask: torch.dtype | None = None, **kw) -> dict:
    text = dict(prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2))
    if mask is not None:
        text.update(prompt_embeds_mask=torch.ones(1, 5, dtype=mask),
                    negative_prompt_embeds_mask=torch.ones(1, 5, dtype=mask))
    return dict(text, height=size, width=size, **{scale: s}, **STEPS, **kw)


BUILDS = {
    "FluxKontextInpaintPipeline": (flux_kontext_inpaint, lambda s: _flux_call(
        s, image=image(), mask_image=mask(), height=IMAGE, width=IMAGE, _auto_resize=False, max_area=IMAGE * IMAGE,
        **IMG2IMG)),
    "FluxControlNetPipeline": (flux_controlnet, lambda s: _flux_call(s, control_image=image(8), **STEPS)),
    "ChromaPipeline": (chroma, lambda s: _chroma_call(s, **STEPS)),
    "ChromaImg2ImgPipeline": (lambda: chroma("Img2Img"), lambda s: _chroma_call(s, image=image(), **IMG2IMG)),
    "ChromaInpaintPipeline": (lambda: chroma("Inpaint"), lambda s: _chroma_call(s, image=image(), mask_image=mask(),
                                                                                 **IMG2IMG)),
    "QwenImageControlNetPipeline": (qwen_controlnet, lambda s: _qwen_call(s, control_image=picture(32), **STEPS)),
    "QwenImageControlNetInpaintPipeline": (lambda: qwen_controlnet(True), lambda s: _global_seed(_qwen_call(
        s, control_image=picture(32), control_mask=hole(32), **STEPS))),
    "ZImageImg2ImgPipeline": (lambda: zimage("Img2Img"), lambda s: _zimage_call(s, image=image(), **IMG2IMG)),
    "ZImageInpaintPipeline": (lambda: zimage("Inpaint"), lambda s: _zimage_call(s, image=image(), mask_image=mask(),
                                                                                **IMG2IMG)),
    "ZImageControlNetPipeline": (lambda: zimage("ControlNet"), lambda s: _zimage_call(s, control_image=image(8),
                                                                                      **STEPS)),
    "ZImageControlNetInpaintPipeline": (lambda: zimage("ControlNetInpaint"), lambda s: _zimage_call(
        s, image=image(), mask_image=mask(), control_image=image(8), **STEPS)),
    **{name: (lambda n=name: wan_derived(n), call) for name, call in WAN_CALLS.items()},
    "HunyuanVideoPipeline": (hunyuan_video, lambda s: _hunyuan_call(s)),
    "HunyuanSkyreelsImageToVideoPipeline": (lambda: hunyuan_video(True), lambda s: _hunyuan_call(s, image=image())),
    "CogView4ControlPipeline": (cogview4_control, lambda s: _global_seed(_text(s, control_image=image(8)))),
    "OvisImagePipeline": (flux_like, lambda s: _text(s, negative_prompt=None)),
    "NucleusMoEImagePipeline": (lambda: qwen_vae_pipe("NucleusMoEImagePipeline"), lambda s: _text(
        s, size=32, mask=torch.long)),
    "Krea2Pipeline": (lambda: qwen_vae_pipe("Krea2Pipeline"), lambda s: dict(
        _text(s, size=32, mask=torch.bool), prompt_embeds=_randn(1, 5, 3, 16, seed=1),
        negative_prompt_embeds=_randn(1, 5, 3, 16, seed=2))),
    "QwenImageEditPipeline": (lambda: qwen_edit("QwenImageEditPipeline"), lambda s: _edit_call(s, **STEPS)),
    "QwenImageEditInpaintPipeline": (lambda: qwen_edit("QwenImageEditInpaintPipeline"), lambda s: _edit_call(
        s, mask_image=hole(EDIT_SIZE), **IMG2IMG)),
    "QwenImageEditPlusPipeline": (lambda: qwen_edit("QwenImageEditPlusPipeline"), lambda s: _edit_call(s, **STEPS)),
    "LongCatImagePipeline": (longcat, lambda s: dict(prompt="a cat", negative_prompt="blurry", height=IMAGE,
                                                      width=IMAGE, guidance_scale=s, enable_prompt_rewrite=False,
                                                      enable_cfg_renorm=False, **STEPS)),
    "LongCatImageEditPipeline": (lambda: longcat(edit=True), lambda s: dict(
        image=_video(1)[0], prompt="a cat", negative_prompt="blurry", guidance_scale=s, **STEPS)),
}
