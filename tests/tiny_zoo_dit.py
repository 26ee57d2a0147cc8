"""Tiny random-weight builds of the batched-CFG transformer pipelines (SD3 / Sana / PixArt / HunyuanDiT
derivatives, video and audio transformers), offline, recipes after diffusers' own fast tests, sizes shrunk.

Text encoders are left out: every call passes its prompt embeddings (and pooled embeddings / masks) directly.
"""

from __future__ import annotations

import inspect

import torch

import tiny_pipes
from tiny_pipes import _randn, embeds

IMAGE = 16  # pixels


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unzeroed(module: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """``module`` with its zero-initialised weights (ControlNet output blocks, adaLN-zero, final layers) drawn at
    random, so that every path reaches the output: with them zero, a residual or a whole network output is 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.numel() and not param.any() and not name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return module


def _parts(pipe, cls) -> dict:
    """The components of ``pipe`` that ``cls.__init__`` takes."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in pipe.components.items() if k in params}


def _image(seed: int = 7, size: int = IMAGE) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _t2i(name: str, s: float, **extra) -> dict:
    """Prompt embeddings of ``tiny_pipes.embeds(name)`` for batch 1, 2 steps, latents out, CFG at ``s``."""
    return dict(embeds(name, 1), guidance_scale=s, num_inference_steps=2, output_type="latent", **extra)


# -- SD3 derivatives ---------------------------------------------------------------------------------------------

def _sd3_controlnet(extra_conditioning_channels: int = 0):
    from diffusers import SD3ControlNetModel

    torch.manual_seed(1)
    controlnet = SD3ControlNetModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                    num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                    pooled_projection_dim=16, out_channels=4,
                                    extra_conditioning_channels=extra_conditioning_channels)
    return _unzeroed(controlnet.eval())



def sd3_controlnet():
    from diffusers import StableDiffusion3ControlNetPipeline

    return _quiet(StableDiffusion3ControlNetPipeline(**tiny_pipes.tiny_sd3().components, controlnet=_sd3_controlnet()))


def sd3_controlnet_inpaint():
    from diffusers import StableDiffusion3ControlNetInpaintingPipeline

    return _quiet(StableDiffusion3ControlNetInpaintingPipeline(**tiny_pipes.tiny_sd3().components,
                                                               controlnet=_sd3_controlnet(1)))


def sd3_pag(img2img: bool = False):
    from diffusers import StableDiffusion3PAGImg2ImgPipeline, StableDiffusion3PAGPipeline

    cls = StableDiffusion3PAGImg2ImgPipeline if img2img else StableDiffusion3PAGPipeline
    return _quiet(cls(**_parts(tiny_pipes.tiny_sd3(), cls), pag_applied_layers=["blocks.0"]))


def _control_mask() -> torch.Tensor:
    m = torch.zeros(1, 1, IMAGE, IMAGE)
    m[..., IMAGE // 4: 3 * IMAGE // 4, IMAGE // 4: 3 * IMAGE // 4] = 1.0
    return m


# -- Sana / PixArt / HunyuanDiT derivatives ----------------------------------------------------------------------

def sana_pag():
    from diffusers import SanaPAGPipeline

    return _quiet(SanaPAGPipeline(**tiny_pipes.tiny_sana().components, pag_applied_layers="transformer_blocks.0"))


def sana_controlnet():
    from diffusers import SanaControlNetModel, SanaControlNetPipeline

    torch.manual_seed(1)
    controlnet = SanaControlNetModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                                     attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                     cross_attention_dim=8, caption_channels=8, sample_size=32)
    controlnet = _unzeroed(controlnet.eval())
    return _quiet(SanaControlNetPipeline(**tiny_pipes.tiny_sana().components, controlnet=controlnet))


def pixart_alpha():
    from diffusers import PixArtAlphaPipeline

    return _quiet(PixArtAlphaPipeline(**tiny_pipes.tiny_pixart().components))


def pixart_sigma_pag():
    from diffusers import PixArtSigmaPAGPipeline

    return _quiet(PixArtSigmaPAGPipeline(**tiny_pipes.tiny_pixart().components, pag_applied_layers="blocks.0"))


def hunyuan_pag():
    from diffusers import HunyuanDiTPAGPipeline

    parts = {k: v for k, v in tiny_pipes.tiny_hunyuan().components.items() if k != "requires_safety_checker"}
    return _quiet(HunyuanDiTPAGPipeline(**parts, pag_applied_layers="blocks.0", requires_safety_checker=False))


def hunyuan_controlnet():
    from diffusers import HunyuanDiT2DControlNetModel, HunyuanDiTControlNetPipeline

    torch.manual_seed(1)
    controlnet = _unzeroed(HunyuanDiT2DControlNetModel(sample_size=16, transformer_num_layers=1, patch_size=2,
                                                       attention_head_dim=8, num_attention_heads=2, in_channels=4,
                                                       cross_attention_dim=16, cross_attention_dim_t5=16,
                                                       pooled_projection_dim=8, hidden_size=16, text_len=5,
                                                       text_len_t5=5,
                                                       activation_fn="gelu-approximate").eval())
    return _quiet(HunyuanDiTControlNetPipeline(**tiny_pipes.tiny_hunyuan().components, controlnet=controlnet,
                                               requires_safety_checker=False))


BUILDS = {
    "StableDiffusion3ControlNetPipeline": (
        sd3_controlnet, lambda s: _t2i("sd3", s, control_image=_image(), controlnet_conditioning_scale=0.5)),
    "StableDiffusion3ControlNetInpaintingPipeline": (
        sd3_controlnet_inpaint,
        lambda s: _t2i("sd3", s, control_image=_image(), control_mask=_control_mask(),
                       controlnet_conditioning_scale=0.95)),
    "StableDiffusion3PAGPipeline": (sd3_pag, lambda s: _t2i("sd3", s, pag_scale=0.0)),
    "StableDiffusion3PAGImg2ImgPipeline": (
        lambda: sd3_pag(img2img=True),
        lambda s: dict(_t2i("sd3", s, pag_scale=0.0, image=_image(), strength=0.6), num_inference_steps=4)),
    "SanaPAGPipeline": (sana_pag, lambda s: _t2i("sana", s, pag_scale=0.0)),
    "SanaControlNetPipeline": (
        sana_controlnet, lambda s: _t2i("sana", s, control_image=_image(size=32), controlnet_conditioning_scale=1.0)),
    "PixArtAlphaPipeline": (pixart_alpha, lambda s: _t2i("pixart", s)),
    "PixArtSigmaPAGPipeline": (pixart_sigma_pag, lambda s: _t2i("pixart", s, pag_scale=0.0)),
    "HunyuanDiTPAGPipeline": (hunyuan_pag, lambda s: _t2i("hunyuan", s, pag_scale=0.0)),
    "HunyuanDiTControlNetPipeline": (
        hunyuan_controlnet, lambda s: _t2i("hunyuan", s, control_image=_image(), controlnet_conditioning_scale=0.5)),
}


# -- video transformers with one batched call --------------------------------------------------------------------

def _text(dim: int, masks: bool = True, length: int = 5) -> dict:
    """Prompt and negative prompt embeddings (``masks``: with all-ones attention masks), fixed seeds."""
    kw = dict(prompt_embeds=_randn(1, length, dim, seed=1), negative_prompt_embeds=_randn(1, length, dim, seed=2))
    if masks:
        kw.update(prompt_attention_mask=torch.ones(1, length), negative_prompt_attention_mask=torch.ones(1, length))
    return kw


def _run(s: float, **kw) -> dict:
    return dict(kw, guidance_scale=s, num_inference_steps=2, output_type="latent")


def latte():
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    torch.manual_seed(0)
    transformer = LatteTransformer3DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                          num_attention_heads=2, caption_channels=16, in_channels=4,
                                          cross_attention_dim=16, out_channels=8, attention_bias=True,
                                          activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                          norm_type="ada_norm_single", norm_elementwise_affine=False,
                                          norm_eps=1e-6, video_length=2).eval()
    return _quiet(LattePipeline(tokenizer=None, text_encoder=None, vae=tiny_pipes._tiny_vae(), transformer=transformer,
                                scheduler=DDIMScheduler(clip_sample=False)))


def allegro():
    from diffusers import AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro, DDIMScheduler

    torch.manual_seed(0)
    transformer = AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                            num_layers=1, cross_attention_dim=24, sample_width=8, sample_height=8,
                                            sample_frames=8, caption_channels=16).eval()
    vae = AutoencoderKLAllegro(in_channels=3, out_channels=3, down_block_types=("AllegroDownBlock3D",) * 4,
                               up_block_types=("AllegroUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                               latent_channels=4, layers_per_block=1, norm_num_groups=2,
                               temporal_compression_ratio=4).eval()
    return _quiet(AllegroPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                  scheduler=DDIMScheduler(clip_sample=False)))


def auraflow():
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                             num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                             caption_projection_dim=16, joint_attention_dim=16, out_channels=4,
                                             pos_embed_max_size=64).eval()
    return _quiet(AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=tiny_pipes._tiny_vae(),
                                   transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler()))


def ltx():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=1, caption_channels=16).eval()
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False, False, False, False, False),
                                upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
                                timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
                                decoder_causal=False).eval()
    return _quiet(LTXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                              scheduler=FlowMatchEulerDiscreteScheduler()))


BUILDS.update({
    "LattePipeline": (latte, lambda s: _run(s, **_text(16, masks=False), negative_prompt=None, video_length=2,
                                            height=8, width=8,
                                            clean_caption=False)),
    "AllegroPipeline": (allegro, lambda s: _run(s, **_text(16), negative_prompt=None, num_frames=8, height=32,
                                                width=32)),
    "AuraFlowPipeline": (auraflow, lambda s: _run(s, **_text(16), negative_prompt=None, height=16, width=16)),
    "LTXPipeline": (ltx, lambda s: _run(s, **_text(16), num_frames=9, height=32, width=32)),
})


# -- CogVideoX ([B, F, C, H, W] latents) and CogView3-Plus ----------------------------------------------------------

def _cogvideox(cls_name: str, in_channels: int = 4):
    import diffusers
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=16, num_layers=1,
                                              sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=5,
                                              use_rotary_positional_embeddings=in_channels == 8).eval()
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4).eval()
    cls = getattr(diffusers, cls_name)
    return _quiet(cls(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                      scheduler=CogVideoXDDIMScheduler()))


def _frames(n: int = 8, size: int = IMAGE) -> list:
    from PIL import Image

    pixels = (_image(size=size).permute(0, 2, 3, 1)[0].numpy() * 255).astype("uint8")
    return [Image.fromarray(pixels)] * n


def cogview3plus():
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline, CogView3PlusTransformer2DModel

    torch.manual_seed(0)
    transformer = CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4,
                                                 num_attention_heads=2, out_channels=4, text_embed_dim=16,
                                                 time_embed_dim=8, condition_dim=2, pos_embed_max_size=8,
                                                 sample_size=8).eval()
    return _quiet(CogView3PlusPipeline(tokenizer=None, text_encoder=None, vae=tiny_pipes._tiny_vae(),
                                       transformer=transformer, scheduler=CogVideoXDDIMScheduler()))


_COG = dict(height=IMAGE, width=IMAGE, negative_prompt=None)
BUILDS.update({
    "CogVideoXPipeline": (lambda: _cogvideox("CogVideoXPipeline"),
                          lambda s: _run(s, **_text(16, masks=False), num_frames=8, **_COG)),
    "CogVideoXVideoToVideoPipeline": (
        lambda: _cogvideox("CogVideoXVideoToVideoPipeline"),
        lambda s: dict(_run(s, **_text(16, masks=False), video=_frames(), strength=0.6, **_COG),
                       num_inference_steps=4)),
    "CogVideoXImageToVideoPipeline": (
        lambda: _cogvideox("CogVideoXImageToVideoPipeline", in_channels=8),
        lambda s: _run(s, **_text(16, masks=False), image=_frames(1)[0], num_frames=8, **_COG)),
    "CogVideoXFunControlPipeline": (
        lambda: _cogvideox("CogVideoXFunControlPipeline", in_channels=8),
        lambda s: _run(s, **_text(16, masks=False), control_video=_frames(), **_COG)),
    "CogView3PlusPipeline": (cogview3plus, lambda s: _run(s, **_text(16, masks=False), **_COG)),
})


# -- EasyAnimate (control / inpaint latents passed to the transformer, which concatenates them) -------------------

def easyanimate(cls_name: str, in_channels: int = 4):
    """``in_channels``: 4, plus the control and reference image latents' 4 + 4 (Control) or the mask's and masked
    video's 4 + 4 (Inpaint, its mask encoded by the VAE: the ``resize_inpaint_mask_directly`` path reads a VAE
    config key diffusers 0.42.1's AutoencoderKLMagvit does not have)."""
    import diffusers
    from diffusers import AutoencoderKLMagvit, EasyAnimateTransformer3DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = EasyAnimateTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
                                                out_channels=4, time_embed_dim=2, text_embed_dim=16, num_layers=1,
                                                sample_width=16, sample_height=16, patch_size=2,
                                                resize_inpaint_mask_directly=False).eval()
    vae = AutoencoderKLMagvit(in_channels=3, out_channels=3,
                              down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
                              up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3,
                              block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                              norm_num_groups=2, spatial_group_norm=False).eval()
    cls = getattr(diffusers, cls_name)
    pipe = cls(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
               scheduler=FlowMatchEulerDiscreteScheduler())
    if "text_encoder_index" not in inspect.signature(pipe.encode_prompt).parameters:
        # diffusers 0.42.1's EasyAnimateControlPipeline.__call__ passes text_encoder_index=0 to an encode_prompt that
        # does not take it (pipeline_easyanimate_control.py:818): drop it, leaving the denoising loop as it is
        encode_prompt = pipe.encode_prompt
        pipe.encode_prompt = lambda *a, text_encoder_index=0, **kw: encode_prompt(*a, **kw)
    return _quiet(pipe)


def _video(n: int = 5) -> torch.Tensor:
    """A [1, C, F, H, W] video in [0, 1]."""
    return torch.rand(1, 3, n, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))


def _mask_video(n: int = 5) -> torch.Tensor:
    return _control_mask()[:, :, None].expand(1, 1, n, IMAGE, IMAGE).clone()


def _easyanimate_inpaint_call(s: float) -> dict:
    # at its default strength 1: below it, the pipeline samples the video's latent distribution without the generator
    # (prepare_latents: ``video_bs.sample()``), and no two runs start alike
    return _run(s, **_text(16), video=_video(), mask_video=_mask_video(), strength=1.0, **_EA)


_EA = dict(height=IMAGE, width=IMAGE, num_frames=5, negative_prompt=None)
BUILDS.update({
    "EasyAnimatePipeline": (lambda: easyanimate("EasyAnimatePipeline"), lambda s: _run(s, **_text(16), **_EA)),
    "EasyAnimateControlPipeline": (
        lambda: easyanimate("EasyAnimateControlPipeline", in_channels=12),
        lambda s: _run(s, **_text(16), control_video=_video(), **_EA)),
    "EasyAnimateInpaintPipeline": (
        lambda: easyanimate("EasyAnimateInpaintPipeline", in_channels=12),
        _easyanimate_inpaint_call),
})


# -- batched flow transformers ------------------------------------------------------------------------------------

def hidream():
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    transformer = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                                 num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                                 caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=4,
                                                 num_activated_experts=2, axes_dims_rope=(4, 2, 2),
                                                 max_resolution=(16, 16), llama_layers=(0, 1)).eval()
    pipe = HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_pipes._tiny_vae(),
                                text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                text_encoder_3=None, tokenizer_3=None, text_encoder_4=None, tokenizer_4=None,
                                transformer=transformer)
    pipe.default_sample_size = IMAGE  # the pipeline rescales every request to this area (128 x 128 latents)
    return _quiet(pipe)


def _hidream_call(s: float) -> dict:
    """T5 embeddings [B, L, D], Llama embeddings [layers, B, L, D] (batch on dim 1), pooled CLIP embeddings."""
    return _run(s, prompt_embeds_t5=_randn(1, 5, 16, seed=1), negative_prompt_embeds_t5=_randn(1, 5, 16, seed=2),
                prompt_embeds_llama3=_randn(2, 1, 5, 16, seed=3),
                negative_prompt_embeds_llama3=_randn(2, 1, 5, 16, seed=4),
                pooled_prompt_embeds=_randn(1, 16, seed=5), negative_pooled_prompt_embeds=_randn(1, 16, seed=6),
                height=IMAGE, width=IMAGE)


def prx():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXTransformer2DModel

    torch.manual_seed(0)
    transformer = PRXTransformer2DModel(patch_size=1, in_channels=4, context_in_dim=8, hidden_size=8, mlp_ratio=2.0,
                                        num_heads=2, depth=1, axes_dim=[2, 2])
    transformer = _unzeroed(transformer.eval())
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0, scaling_factor=1.0).eval()
    return _quiet(PRXPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None,
                              tokenizer=None, vae=vae))


def sana_video():
    from diffusers import DPMSolverMultistepScheduler, SanaVideoPipeline, SanaVideoTransformer3DModel

    torch.manual_seed(0)
    transformer = SanaVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=2,
                                              attention_head_dim=12, num_layers=1, num_cross_attention_heads=2,
                                              cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=8,
                                              mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8,
                                              patch_size=(1, 2, 2), norm_elementwise_affine=False, norm_eps=1e-6,
                                              qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    # Sana-Video's own scheduler: DPM-Solver++ on flow sigmas
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=8.0)
    return _quiet(SanaVideoPipeline(tokenizer=None, text_encoder=None, vae=tiny_pipes.tiny_wan().vae,
                                    transformer=transformer, scheduler=scheduler))


BUILDS.update({
    "HiDreamImagePipeline": (hidream, _hidream_call),
    "PRXPipeline": (prx, lambda s: _run(s, **_text(8), negative_prompt=None, height=IMAGE, width=IMAGE,
                                        use_resolution_binning=False)),
    "SanaVideoPipeline": (sana_video, lambda s: _run(s, **_text(8), negative_prompt=None, height=32, width=32,
                                                     frames=5, use_resolution_binning=False,
                                                     complex_human_instruction=[])),
})


def ernie_image():
    from diffusers import ErnieImagePipeline, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = _unzeroed(ErnieImageTransformer2DModel(hidden_size=32, num_attention_heads=2, num_layers=1,
                                                         ffn_hidden_size=32, in_channels=16, out_channels=16,
                                                         text_in_dim=16,
                                                         rope_axes_dim=(4, 6, 6)).eval())
    # no VAE: latents out, the pipeline's latent size is then height / 16
    return _quiet(ErnieImagePipeline(transformer=transformer, vae=None, text_encoder=None, tokenizer=None,
                                     scheduler=FlowMatchEulerDiscreteScheduler(), pe=None, pe_tokenizer=None))


def bria_fibo():
    """Its ``__call__`` takes prompts only: a tiny SmolLM3 text encoder over the offline byte tokenizer."""
    from diffusers import BriaFiboPipeline, BriaFiboTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(0)
    transformer = BriaFiboTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                             text_encoder_dim=16, pooled_projection_dim=None,
                                             axes_dims_rope=[0, 4, 4]).eval()
    text_encoder = SmolLM3ForCausalLM(SmolLM3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, num_key_value_heads=1,
                                                    vocab_size=128, pad_token_id=1, bos_token_id=0,
                                                    eos_token_id=1)).eval()
    return _quiet(BriaFiboPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                   vae=tiny_pipes.tiny_wan().vae, text_encoder=text_encoder,
                                   tokenizer=tiny_pipes.byte_tokenizer()))


def stable_audio3():
    from diffusers import AutoencoderSAME, FlowMatchEulerDiscreteScheduler, StableAudio3DiTModel, StableAudio3Pipeline
    from diffusers.pipelines.stable_audio_3.modeling_stable_audio_3 import StableAudio3DurationEmbedder

    torch.manual_seed(0)
    transformer = _unzeroed(StableAudio3DiTModel(io_channels=8, patch_size=1, embed_dim=32, depth=1, num_heads=2,
                                                 cond_token_dim=16, global_cond_dim=16, local_add_cond_dim=5,
                                                 timestep_features_dim=16, ff_mult=2, num_memory_tokens=3,
                                                 use_differential_attention=False).eval())
    vae = AutoencoderSAME(audio_channels=2, patch_size=2, encoder_channels=8, encoder_c_mults=(2,),
                          encoder_strides=(2,), encoder_transformer_depths=(1,), latent_dim=8,
                          use_differential_attention=False, dim_heads=4, ff_mult=2, sampling_rate=16).eval()
    duration_embedder = StableAudio3DurationEmbedder(output_dim=16, fourier_dim=16).eval()
    # the distilled model's ping-pong sampler: x0 from the velocity, then fresh noise (num_train_timesteps=1: t = s)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0, stochastic_sampling=True)
    return _quiet(StableAudio3Pipeline(vae=vae, text_encoder=None, tokenizer=None,
                                       duration_embedder=duration_embedder, transformer=transformer,
                                       scheduler=scheduler))


BUILDS.update({
    "ErnieImagePipeline": (ernie_image, lambda s: _run(s, prompt_embeds=[_randn(5, 16, seed=1)],
                                                       negative_prompt_embeds=[_randn(3, 16, seed=2)],
                                                       height=32, width=32)),
    # prompts of different lengths: padded, with a per-row attention mask in joint_attention_kwargs
    "BriaFiboPipeline": (bria_fibo, lambda s: _run(s, prompt="a red cat", negative_prompt="blur", height=32,
                                                   width=32)),
    "StableAudio3Pipeline": (stable_audio3, lambda s: _run(s, prompt_embeds=_randn(1, 5, 16, seed=1),
                                                           encoder_attention_mask=torch.ones(1, 5, dtype=torch.long),
                                                           negative_prompt_embeds=_randn(1, 5, 16, seed=2),
                                                           negative_encoder_attention_mask=torch.ones(
                                                               1, 5, dtype=torch.long), duration=1.0)),
})
