"""Tiny random-weight builds of the ControlNet, T2I-Adapter, ControlNet-XS and PAG Stable Diffusion / SDXL pipelines,
offline, on the components of ``tiny_pipes`` (recipes after diffusers' own fast tests, sizes shrunk: 16x16 pixels,
8x8 latents). PAG pipelines are called with ``pag_scale=0`` (two branches, the CFG block of their parent)."""

from __future__ import annotations

import inspect

import diffusers
import torch
from diffusers import ControlNetModel, ControlNetUnionModel, ControlNetXSAdapter, T2IAdapter, UNet2DConditionModel

import tiny_pipes
from tiny_zoo import IMAGE, _sd_embeds, _sd_unet, image, mask

# the SDXL UNet's extra conditioning (tiny_pipes.tiny_sdxl): text_time embeddings of 6 * 4 + 16 features
_SDXL = dict(use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
             projection_class_embeddings_input_dim=6 * 4 + 16, cross_attention_dim=32)
_BLOCKS = dict(block_out_channels=(8, 16), layers_per_block=1, in_channels=4,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), conditioning_embedding_out_channels=(4, 8),
               norm_num_groups=4, attention_head_dim=4)


def _unzeroed(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights (fixed seed) in the parameters a control network starts at zero (its zero convolutions and
    projections): otherwise its residuals are exactly zero and a misplaced row could not show."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in module.parameters():
            if not param.any():
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return module.eval()


def _controlnet(sdxl: bool, union: bool = False):
    """A ControlNet matching the tiny SD / SDXL UNet (a union ControlNet: its task transformer 8 wide)."""
    torch.manual_seed(1)
    extra = dict(_SDXL) if sdxl else dict(cross_attention_dim=16)
    if union:
        return _unzeroed(ControlNetUnionModel(**_BLOCKS, **extra, num_control_type=2, num_trans_channel=8,
                                              num_trans_head=2, num_proj_channel=8))
    return _unzeroed(ControlNetModel(**_BLOCKS, **extra))


def _unet(sdxl: bool, cross_first: bool = False, layers_per_block: int = 1) -> UNet2DConditionModel:
    """The tiny SD / SDXL UNet; ``cross_first``: its cross-attention block first (the SD T2I-Adapter recipe, features
    added at 8x8 then 4x4); ControlNet-XS pairs every block with two resnets (``layers_per_block=2``)."""
    torch.manual_seed(0)
    extra = dict(_SDXL) if sdxl else dict(cross_attention_dim=16)
    down, up = ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
    if cross_first:
        down, up = down[::-1], up[::-1]
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=layers_per_block, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=down, up_block_types=up, norm_num_groups=4, attention_head_dim=4, **extra).eval()


def _adapter(sdxl: bool) -> T2IAdapter:
    """Features at the UNet's down-block resolutions: SD's full adapter halves its second block, SDXL's keeps it (so
    it unshuffles by 4 onto the SDXL UNet's 4x4 blocks)."""
    torch.manual_seed(1)
    return T2IAdapter(in_channels=3, channels=[8, 16], num_res_blocks=1, downscale_factor=4 if sdxl else 2,
                      adapter_type="full_adapter_xl" if sdxl else "full_adapter").eval()


def _make(name: str, parts: dict, **extra):
    """``diffusers.<name>`` on the components it takes (progress bar off)."""
    cls = getattr(diffusers, name)
    params = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in dict(parts, **extra).items() if k in params})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _parts(sdxl: bool) -> dict:
    return (tiny_pipes.tiny_sdxl() if sdxl else tiny_pipes.tiny_sd()).components


# class -> (SDXL, what it adds: controlnet / union / adapter / xs / pag, inpainting, img2img)
CLASSES = {
    "StableDiffusionXLControlNetPipeline": (True, "controlnet", False, False),
    "StableDiffusionControlNetImg2ImgPipeline": (False, "controlnet", False, True),
    "StableDiffusionXLControlNetImg2ImgPipeline": (True, "controlnet", False, True),
    "StableDiffusionXLControlNetUnionPipeline": (True, "union", False, False),
    "StableDiffusionXLControlNetUnionImg2ImgPipeline": (True, "union", False, True),
    "StableDiffusionAdapterPipeline": (False, "adapter", False, False),
    "StableDiffusionXLAdapterPipeline": (True, "adapter", False, False),
    "StableDiffusionControlNetInpaintPipeline": (False, "controlnet", True, True),
    "StableDiffusionXLControlNetInpaintPipeline": (True, "controlnet", True, True),
    "StableDiffusionXLControlNetUnionInpaintPipeline": (True, "union", True, True),
    "StableDiffusionControlNetXSPipeline": (False, "xs", False, False),
    "StableDiffusionXLControlNetXSPipeline": (True, "xs", False, False),
    "StableDiffusionXLPAGPipeline": (True, "pag", False, False),
    "StableDiffusionPAGImg2ImgPipeline": (False, "pag", False, True),
    "StableDiffusionXLPAGImg2ImgPipeline": (True, "pag", False, True),
    "StableDiffusionPAGInpaintPipeline": (False, "pag", True, True),
    "StableDiffusionXLPAGInpaintPipeline": (True, "pag", True, True),
    "StableDiffusionControlNetPAGPipeline": (False, "controlnet-pag", False, False),
    "StableDiffusionXLControlNetPAGPipeline": (True, "controlnet-pag", False, False),
    "StableDiffusionXLControlNetPAGImg2ImgPipeline": (True, "controlnet-pag", False, True),
    "StableDiffusionControlNetPAGInpaintPipeline": (False, "controlnet-pag", True, True),
}


def build(name: str):
    sdxl, kind, inpaint, _ = CLASSES[name]
    parts = _parts(sdxl)
    if inpaint and kind != "union":  # latent, mask and masked-image latents (Union inpaint takes 4 channels only)
        parts["unet"] = _sd_unet(9, sdxl=sdxl)
    extra = dict(requires_aesthetics_score=False, safety_checker=None, requires_safety_checker=False)
    if kind in ("controlnet", "controlnet-pag", "union"):
        extra["controlnet"] = _controlnet(sdxl, union=kind == "union")
    if kind == "adapter":
        parts["unet"], extra["adapter"] = _unet(sdxl, cross_first=not sdxl), _adapter(sdxl)
    if kind == "xs":  # the pipeline joins UNet and adapter into one UNetControlNetXSModel
        parts["unet"] = _unet(sdxl, layers_per_block=2)
        torch.manual_seed(1)
        extra["controlnet"] = _unzeroed(ControlNetXSAdapter.from_unet(
            parts["unet"], size_ratio=0.5, learn_time_embedding=True, conditioning_embedding_out_channels=(2, 2)))
    if kind.endswith("pag"):
        extra["pag_applied_layers"] = ["down"]
    return _make(name, parts, **extra)


def call(name: str, s: float) -> dict:
    """A native CFG run at scale ``s``: batch 1, 2 steps (4 at strength 0.6 from an image), latents out."""
    sdxl, kind, inpaint, img2img = CLASSES[name]
    kw = dict(_sd_embeds(None, sdxl), guidance_scale=s, output_type="latent", height=IMAGE, width=IMAGE,
              num_inference_steps=4 if img2img else 2)
    control = image(seed=11)
    if img2img:
        kw.update(image=image(), strength=0.6)
    if inpaint:
        kw.update(mask_image=mask())
    if kind in ("controlnet", "controlnet-pag", "union", "adapter", "xs"):
        kw["control_image" if img2img or kind == "union" else "image"] = control
    if kind == "union":
        kw.update(control_image=[control], control_mode=[1])
    if kind.endswith("pag"):
        kw["pag_scale"] = 0.0
    accepted = inspect.signature(getattr(diffusers, name).__call__).parameters
    return {k: v for k, v in kw.items() if k in accepted}  # PAG img2img takes no height / width


BUILDS = {name: (lambda n=name: build(n), lambda s, n=name: call(n, s)) for name in CLASSES}
