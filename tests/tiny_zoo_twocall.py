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


def _global_seed(kw: dict) -> dict:
    """``kw``, after seeding torch's global generator: QwenImageControlNetInpaintPipeline samples its control
    latents with ``latent_dist.sample()`` and no generator (``prepare_image_with_mask``), so the native call is
    reproducible only from a fixed global seed."""
    torch.manual_seed(0)
    return kw


def _qwen_call(s: float, **kw) -> dict:
    return dict(embeds("qwen", 1), true_cfg_scale=s, **kw)


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
}
