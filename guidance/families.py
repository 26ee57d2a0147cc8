"""Pipeline families as data: how each diffusers pipeline runs classifier-free guidance.

``apply`` reads one :class:`Family` per pipeline class; its control flow is written once per CFG layout, one class
each in :mod:`.layouts` (``Family.layout`` names it). Adding a pipeline is adding an entry here and a test; the
facts come from the pipeline's ``__call__`` in diffusers 0.42.1 (see ``docs``/README "Supported pipelines").
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .layouts import LAYOUTS


@dataclass(frozen=True)
class Family:
    """One family of pipelines that run CFG the same way.

    ``layout``: the name of its CFG layout object in :mod:`.layouts` (``"uc"``, ``"cu"``, ``"list_cu"``,
    ``"two_calls"``; ``LAYOUTS``).
    ``networks``: pipeline attributes holding the denoising network(s) (Wan 2.2 has two).
    ``latent`` / ``timestep``: names of the network ``forward`` parameters that take the latent and the time
    (positional or keyword alike: calls are bound to the forward's signature).
    ``scale_arg``: the ``__call__`` argument that switches CFG on (``> cfg_threshold``), forced on under apply.
    ``negative``: call arguments of which one must be given for the pipeline to run CFG at all (Flux, Qwen);
    when none is, apply passes ``negative_prompt=""`` (the empty prompt, as those pipelines document).
    ``neutral``: call arguments that must keep their neutral value under apply, with the guide that does the
    same job (``guidance_rescale`` -> CFGRescale).
    ``output_sign``: -1 where the pipeline steps on ``-network_output`` (Lumina 2, Z-Image): guides see the
    flow velocity ``eps - x0`` either way.
    ``float32``: the pipeline combines ``.float()`` copies of the network outputs (Sana, Z-Image).
    ``unbatched``: network arguments that are not per-row even if their first dimension matches the batch.
    ``scheduler``: "flow" (rectified flow, velocity output) or "diffusion" (epsilon / v / x0 schedules).
    ``condition``: the network argument holding the text embeddings (``step.cond`` under apply).
    ``flow_time``: how a flow network's time argument follows the flow level ``s``, for extra passes at another
    level (Rectified-CFG++): "proportional" (``1000 s``, ``s``, ``1000 s * timestep_scale``), "one_minus" (``1 - s``:
    Lumina 2, Z-Image), or None where it is no function of ``s`` apply knows (CogView4 feeds unshifted timesteps).
    ``zero_init_steps``: CFG-Zero*'s default number of zero-initialised first steps on this family, the official
    demo's ``zero_steps + 1`` (WeichenFan/CFG-Zero-star: SD3 1, Wan 2.1 T2V and CogView4 2); 1 where there is none.
    ``native``: the guide expression that reproduces the pipeline's own CFG at scale ``s`` (docs and tests);
    ``native_exact`` False where it does so only to rounding: Z-Image computes ``c + s (c - u)``, which is
    ``CFG(s + 1)`` but not CFG's floating-point expression ``u + w (c - u)``.

    What a derived pipeline adds to its parent's CFG block (zoo rows):

    ``start``: where the level of a run's first step comes from. "begin_index": the scheduler's ``begin_index``
    (img2img / inpaint / video-to-video call ``set_begin_index`` after cutting the schedule; 0 when unset);
    "timestep": the position of the first step's timestep in the scheduler's schedule (pipelines that cut the
    timesteps without telling the scheduler).
    ``conditioning``: what the network's latent input carries beyond the latent the scheduler steps, concatenated
    along ``conditioning_dim``: "channels" (inpainting's mask and masked latents, I2V's image latents: the output
    has the latent's width) or "tokens" (Kontext / Edit image tokens: the output carries them too and is cut to the
    latent's tokens, as the pipeline does). A guide's ``x`` is the stepped latent; extra passes re-append the
    step's conditioning.
    ``repeated``: network arguments repeated ``k`` times per row, ``k`` the latent's size along ``repeat_dim``
    (AnimateDiff repeats the prompt embeddings per frame): their rows follow the latent's row selection.
    ``residuals``: network arguments holding ControlNet / adapter residuals. Per row, they follow row selection; they
    were computed for the step's own latent, level and condition, so extra passes (``step.evaluate``: GFCG's
    reference class, Rectified-CFG++'s sub-step) are refused where a call carries them.
    ``variance``: the network also predicts a variance per latent channel (learned sigma: twice the latent's
    channels out), so with conditioning channels the stepped latent is half the prediction's width.
    ``batch_dims``: network arguments whose rows lie along another dimension than the first, by name (HiDream's
    Llama embeddings ``[layers, B, L, D]``: 1); their rows are selected along it.
    ``also_on``: further call arguments the pipeline needs ``>= 1`` to batch all its branches (InstructPix2Pix's
    ``image_guidance_scale``): raised to 1 under apply when lower (the guide's own scales rule).
    ``frames_in_batch``: the pipeline steps its 5-D latent ``[B, C, F, H, W]`` with the frames folded into the batch
    (``x.permute(0, 2, 1, 3, 4).reshape(B * F, C, H, W)``: text-to-video SD, I2VGen-XL), so the scheduler's batch is
    ``B * F`` and a prediction is folded the same way before it is stepped.
    ``distilled_flag``: a pipeline config entry that, when true, marks a guidance-distilled checkpoint of the class
    (Flux 2 Klein's ``is_distilled``: the pipeline then never runs the unconditional branch): refused up front.
    ``pipelines`` lists every class served by its exact name; a class whose ``__call__`` is inherited from a listed
    one is served as it.
    """

    pipelines: tuple[str, ...]
    layout: str
    scheduler: str
    networks: tuple[str, ...] = ("transformer",)
    latent: str = "hidden_states"
    timestep: str = "timestep"
    scale_arg: str = "guidance_scale"
    cfg_threshold: float = 1.0
    negative: tuple[str, ...] = ()
    neutral: dict[str, tuple[Any, str]] = field(default_factory=dict)
    output_sign: int = 1
    float32: bool = False
    unbatched: tuple[str, ...] = ()
    condition: str = "encoder_hidden_states"
    flow_time: str | None = "proportional"
    zero_init_steps: int = 1
    native: str = "CFG(s)"
    native_exact: bool = True
    start: str = "begin_index"
    conditioning: str | None = None
    conditioning_dim: int = 1
    repeated: tuple[str, ...] = ()
    repeat_dim: int = 2
    residuals: tuple[str, ...] = ()
    variance: bool = False
    also_on: tuple[str, ...] = ()
    frames_in_batch: bool = False
    distilled_flag: str | None = None
    batch_dims: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.start not in ("begin_index", "timestep"):
            raise ValueError(f"start must be 'begin_index' or 'timestep', got {self.start!r}")
        if self.conditioning not in (None, "channels", "tokens"):
            raise ValueError(f"conditioning must be None, 'channels' or 'tokens', got {self.conditioning!r}")
        if self.conditioning == "tokens" and LAYOUTS[self.layout].wraps_step is False:
            raise ValueError("conditioning tokens are cut at scheduler.step: they need a layout that wraps it")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {self.layout!r}")
        if self.scheduler not in ("flow", "diffusion"):
            raise ValueError(f"scheduler must be 'flow' or 'diffusion', got {self.scheduler!r}")
        if self.flow_time not in ("proportional", "one_minus", None):
            raise ValueError(f"flow_time must be 'proportional', 'one_minus' or None, got {self.flow_time!r}")
        steps = self.zero_init_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"zero_init_steps must be an int >= 0, got {self.zero_init_steps!r}")

    def time_at(self, t: Tensor, s: float | Tensor, s_new: float | Tensor) -> Tensor:
        """The network time at flow level ``s_new`` of the network time ``t`` at level ``s`` (``flow_time``:
        scaled where the time is proportional to ``s``, shifted where it is ``1 - s``)."""
        return t * (s_new / s) if self.flow_time == "proportional" else t + (s - s_new)

    def level_of_time(self, t: Tensor) -> Tensor:
        """The flow level of network time ``t``, up to the network's own factor (``flow_time``)."""
        return t if self.flow_time == "proportional" else 1 - t


_RESCALE = {"guidance_rescale": (0.0, "use guidance.CFGRescale")}
_PAG = {"pag_scale": (0.0, "perturbed-attention guidance is a third branch apply() does not combine; run "
                           "diffusers.guiders.PerturbedAttentionGuidance through guidance.apply instead"),
        "guidance_rescale": (0.0, "use guidance.CFGRescale")}
_UNET = dict(networks=("unet",), latent="sample")
# the UNet arguments that carry ControlNet / T2I-adapter residuals: ControlNet's are computed for the step's own
# latent; the adapter's come from the image alone, but the UNet pops them from their list as it runs, so an extra
# pass would run without them
_UNET_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual",
                   "down_intrablock_additional_residuals")
_BLOCK_SAMPLES = ("controlnet_block_samples", "controlnet_single_block_samples")
# Wan 2.2's second (low-noise) transformer takes its own scale; under apply the guide rules both stages
_STAGE_2 = {"guidance_scale_2": (None, "the guide's scale rules both stages; for another guide at low noise use "
                                       "guidance.GuidanceInterval")}
_TRUE_CFG = dict(scale_arg="true_cfg_scale", negative=("negative_prompt", "negative_prompt_embeds"))

FAMILIES: tuple[Family, ...] = (
    # -- Stable Diffusion 1.x / 2.x and SDXL: [uncond; cond] through the UNet -----------------------------------
    Family(("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline",
            "StableDiffusionXLImg2ImgPipeline", "StableDiffusionLDM3DPipeline",
            "StableDiffusionImageVariationPipeline", "StableDiffusionModelEditingPipeline",
            "AudioLDMPipeline", "MusicLDMPipeline",
            "AudioLDM2Pipeline", "LDMTextToImagePipeline", "AltDiffusionPipeline", "StableUnCLIPImg2ImgPipeline"),
           "uc", "diffusion", neutral=_RESCALE, **_UNET),
    # 3-D UNets whose pipelines step the video with its frames folded into the batch
    Family(("TextToVideoSDPipeline", "VideoToVideoSDPipeline", "I2VGenXLPipeline"), "uc", "diffusion",
           frames_in_batch=True, **_UNET),
    # img2img that cut the schedule without telling the scheduler (no set_begin_index)
    Family(("AltDiffusionImg2ImgPipeline",), "uc", "diffusion", start="timestep", neutral=_RESCALE, **_UNET),
    # (GLIGEN concatenates the masked image latents and the mask in its inpainting mode only: none otherwise)
    Family(("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline", "StableDiffusionDepth2ImgPipeline",
            "StableDiffusionUpscalePipeline", "PaintByExamplePipeline", "StableDiffusionGLIGENPipeline"),
           "uc", "diffusion", neutral=_RESCALE, conditioning="channels", **_UNET),
    Family(("StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline",
            "StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
            "StableDiffusionXLControlNetUnionPipeline", "StableDiffusionXLControlNetUnionImg2ImgPipeline",
            "StableDiffusionAdapterPipeline", "StableDiffusionXLAdapterPipeline",
            # Union inpainting takes a 4-channel UNet only and blends the mask outside it (l. 1647)
            "StableDiffusionXLControlNetUnionInpaintPipeline"),
           "uc", "diffusion", neutral=_RESCALE, residuals=_UNET_RESIDUALS, **_UNET),
    Family(("StableDiffusionControlNetInpaintPipeline", "StableDiffusionXLControlNetInpaintPipeline"),
           "uc", "diffusion", neutral=_RESCALE, conditioning="channels", residuals=_UNET_RESIDUALS, **_UNET),
    # ControlNet-XS runs its control net inside the UNet call: extra passes recompute it, nothing to refuse
    Family(("StableDiffusionControlNetXSPipeline", "StableDiffusionXLControlNetXSPipeline"),
           "uc", "diffusion", neutral=_RESCALE, **_UNET),
    Family(("StableDiffusionPAGPipeline", "StableDiffusionXLPAGPipeline", "StableDiffusionPAGImg2ImgPipeline",
            "StableDiffusionXLPAGImg2ImgPipeline"),
           "uc", "diffusion", neutral=_PAG, **_UNET),
    Family(("StableDiffusionPAGInpaintPipeline", "StableDiffusionXLPAGInpaintPipeline"),
           "uc", "diffusion", neutral=_PAG, conditioning="channels", **_UNET),
    Family(("StableDiffusionControlNetPAGPipeline", "StableDiffusionXLControlNetPAGPipeline",
            "StableDiffusionXLControlNetPAGImg2ImgPipeline"),
           "uc", "diffusion", neutral=_PAG, residuals=_UNET_RESIDUALS, **_UNET),
    Family(("StableDiffusionControlNetPAGInpaintPipeline",),
           "uc", "diffusion", neutral=_PAG, conditioning="channels", residuals=_UNET_RESIDUALS, **_UNET),
    # AnimateDiff: 5-D latents, the prompt embeddings (and ControlNet residuals) repeated per frame
    Family(("AnimateDiffPipeline", "AnimateDiffSDXLPipeline"),
           "uc", "diffusion", neutral=_RESCALE, repeated=("encoder_hidden_states",), **_UNET),
    Family(("AnimateDiffControlNetPipeline",),
           "uc", "diffusion", repeated=("encoder_hidden_states",) + _UNET_RESIDUALS, residuals=_UNET_RESIDUALS,
           **_UNET),
    # video-to-video: get_timesteps cuts the schedule without set_begin_index
    # (animatediff/pipeline_animatediff_video2video.py:626-633, ..._video2video_controlnet.py:757-764)
    Family(("AnimateDiffVideoToVideoPipeline",), "uc", "diffusion", start="timestep",
           repeated=("encoder_hidden_states",), **_UNET),
    Family(("AnimateDiffVideoToVideoControlNetPipeline",), "uc", "diffusion", start="timestep",
           repeated=("encoder_hidden_states",) + _UNET_RESIDUALS, residuals=_UNET_RESIDUALS, **_UNET),
    Family(("AnimateDiffPAGPipeline",), "uc", "diffusion", neutral=_PAG, repeated=("encoder_hidden_states",),
           **_UNET),
    # Kandinsky 2.2 and DeepFloyd IF: learned variance channels (the conditional rows' are kept)
    Family(("KandinskyV22Pipeline", "KandinskyV22ControlnetPipeline", "KandinskyPipeline"), "uc", "diffusion",
           variance=True, **_UNET),
    Family(("KandinskyInpaintPipeline",), "uc", "diffusion", conditioning="channels", variance=True, **_UNET),
    # img2img that cut the schedule without set_begin_index (kandinsky2_2/pipeline_kandinsky2_2_img2img.py:120-127)
    Family(("KandinskyV22Img2ImgPipeline", "KandinskyV22ControlnetImg2ImgPipeline", "KandinskyImg2ImgPipeline"),
           "uc", "diffusion", start="timestep", variance=True, **_UNET),
    Family(("KandinskyV22InpaintPipeline",), "uc", "diffusion", conditioning="channels", variance=True, **_UNET),
    Family(("Kandinsky3Pipeline",), "uc", "diffusion", native="CFG(s + 1)", native_exact=False, **_UNET),
    Family(("Kandinsky3Img2ImgPipeline",), "uc", "diffusion", native="CFG(s + 1)", native_exact=False,
           start="timestep", **_UNET),
    Family(("IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline"), "uc", "diffusion", variance=True, **_UNET),
    Family(("IFSuperResolutionPipeline", "IFImg2ImgSuperResolutionPipeline", "IFInpaintingSuperResolutionPipeline"),
           "uc", "diffusion", conditioning="channels", variance=True, **_UNET),
    # InstructPix2Pix: [text; image; uncond] on the latent with the image latents concatenated
    Family(("StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline"),
           "text_image_uncond", "diffusion", neutral=_RESCALE, conditioning="channels",
           also_on=("image_guidance_scale",), native="ImageCFG(s, 1.5)", **_UNET),
    Family(("ClassConditionalPipeline",), "uc", "diffusion", networks=("unet",), latent="sample"),
    Family(("DiTPipeline",), "cu", "diffusion"),
    # -- SD3: [uncond; cond] through the MMDiT ----------------------------------------------------------------
    Family(("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"), "uc", "flow",
           neutral={"skip_guidance_layers": (None, "skip-layer guidance is a third network call apply does not "
                                                   "replace")}),
    Family(("StableDiffusion3InpaintPipeline",), "uc", "flow", conditioning="channels"),
    Family(("StableDiffusion3ControlNetPipeline", "StableDiffusion3ControlNetInpaintingPipeline"), "uc", "flow",
           residuals=("block_controlnet_hidden_states",)),
    Family(("StableDiffusion3PAGPipeline", "StableDiffusion3PAGImg2ImgPipeline"), "uc", "flow",
           neutral={"pag_scale": _PAG["pag_scale"]}),
    Family(("SanaPipeline", "SanaPAGPipeline"), "uc", "flow", float32=True, neutral={"pag_scale": _PAG["pag_scale"]}),
    Family(("SanaControlNetPipeline",), "uc", "flow", float32=True, residuals=("controlnet_block_samples",)),
    Family(("PixArtSigmaPipeline", "PixArtAlphaPipeline", "PixArtSigmaPAGPipeline"), "uc", "diffusion",
           neutral={"pag_scale": _PAG["pag_scale"]}),
    Family(("HunyuanDiTPipeline", "HunyuanDiTPAGPipeline"), "uc", "diffusion", neutral=_PAG,
           unbatched=("image_rotary_emb",)),
    Family(("HunyuanDiTControlNetPipeline",), "uc", "diffusion", neutral=_RESCALE, unbatched=("image_rotary_emb",),
           residuals=("controlnet_block_samples",)),
    # -- video transformers with one batched call ----------------------------------------------------------------
    Family(("LattePipeline",), "uc", "diffusion"),
    Family(("AllegroPipeline",), "uc", "diffusion", unbatched=("image_rotary_emb",)),
    Family(("AuraFlowPipeline",), "uc", "flow"),
    Family(("LTXPipeline",), "uc", "flow", neutral=_RESCALE, unbatched=("video_coords",)),
    # CogVideoX ([B, F, C, H, W] latents; image / control latents concatenated on the channel axis, dim 2)
    Family(("CogVideoXPipeline", "CogView3PlusPipeline"), "uc", "diffusion", unbatched=("image_rotary_emb",),
           neutral={"use_dynamic_cfg": (False, "use guidance.DynamicCFG")}),
    Family(("CogVideoXVideoToVideoPipeline",), "uc", "diffusion", unbatched=("image_rotary_emb",), start="timestep",
           neutral={"use_dynamic_cfg": (False, "use guidance.DynamicCFG")}),
    Family(("CogVideoXImageToVideoPipeline", "CogVideoXFunControlPipeline"), "uc", "diffusion",
           unbatched=("image_rotary_emb",), conditioning="channels", conditioning_dim=2,
           neutral={"use_dynamic_cfg": (False, "use guidance.DynamicCFG")}),
    # batched flow transformers, network time 1000 s (EasyAnimate, HiDream, Ernie-Image, Bria-FIBO; Sana-Video: the
    # scheduler's integer timesteps) or s (PRX, Stable Audio 3), measured on tiny builds
    Family(("EasyAnimatePipeline", "EasyAnimateControlPipeline", "EasyAnimateInpaintPipeline"), "uc", "flow",
           neutral=_RESCALE),
    # HiDream steps on the negated output (pipeline_hidream_image.py:942); its Llama embeddings batch on dim 1 (l.885)
    Family(("HiDreamImagePipeline",), "uc", "flow", timestep="timesteps", output_sign=-1,
           condition="encoder_hidden_states_t5", batch_dims={"encoder_hidden_states_llama3": 1}),
    Family(("PRXPipeline", "StableAudio3Pipeline"), "uc", "flow"),
    Family(("ErnieImagePipeline",), "uc", "flow", condition="text_bth"),
    Family(("SanaVideoPipeline",), "uc", "flow", float32=True),
    # Bria-FIBO's position ids are [tokens, 3] for every row (its network takes the first row of 3-D ones)
    Family(("BriaFiboPipeline",), "uc", "flow", unbatched=("txt_ids", "img_ids")),
    # -- two calls per step (cond, then uncond) ---------------------------------------------------------------
    Family(("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"), "two_calls", "flow", **_TRUE_CFG),
    Family(("FluxKontextPipeline", "FluxKontextInpaintPipeline"), "two_calls", "flow", conditioning="tokens",
           **_TRUE_CFG),
    Family(("FluxControlNetPipeline",),
           "two_calls", "flow", residuals=_BLOCK_SAMPLES, **_TRUE_CFG),
    Family(("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"), "two_calls", "flow",
           native="NormRescale(CFG(s))", **_TRUE_CFG),
    Family(("QwenImageEditPipeline", "QwenImageEditInpaintPipeline", "QwenImageEditPlusPipeline"), "two_calls",
           "flow", native="NormRescale(CFG(s))", conditioning="tokens", **_TRUE_CFG),
    Family(("QwenImageControlNetPipeline", "QwenImageControlNetInpaintPipeline"), "two_calls", "flow",
           native="NormRescale(CFG(s))", residuals=("controlnet_block_samples",), **_TRUE_CFG),
    Family(("HunyuanVideoPipeline",), "two_calls", "flow", **_TRUE_CFG),
    Family(("HunyuanSkyreelsImageToVideoPipeline",), "two_calls", "flow", conditioning="channels", **_TRUE_CFG),
    Family(("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline", "OvisImagePipeline"), "two_calls",
           "flow"),
    # UniPC with flow sigmas feeds integer timesteps (999 at s = 1): no function of s apply knows
    Family(("SkyReelsV2Pipeline",), "two_calls", "flow", flow_time=None),
    Family(("LongCatImagePipeline",), "two_calls", "flow",
           neutral={"enable_cfg_renorm": (False, "its clamped norm rescale (cfg_renorm_min, 1e-8) is not a guide; "
                                                 "guidance.NormRescale is the unclamped one")}),
    Family(("NucleusMoEImagePipeline",), "two_calls", "flow", output_sign=-1, native="NormRescale(CFG(s))"),
    # Krea 2 computes c + s (c - u), CFG on at s > 0
    Family(("Krea2Pipeline",), "two_calls", "flow", cfg_threshold=0.0, native="CFG(s + 1)", native_exact=False),
    Family(("LongCatImageEditPipeline",), "two_calls", "flow", conditioning="tokens"),
    Family(("SkyReelsV2ImageToVideoPipeline",), "two_calls", "flow", flow_time=None, conditioning="channels"),
    Family(("ChronoEditPipeline",), "two_calls", "flow", conditioning="channels",
           neutral={"enable_temporal_reasoning": (False, "it drops latent frames and scheduler history mid-run "
                                                         "(pipeline_chronoedit.py:669-678)")}),
    Family(("WanVACEPipeline",), "two_calls", "flow", networks=("transformer", "transformer_2"), neutral=_STAGE_2),
    Family(("LucyEditPipeline",), "two_calls", "flow", networks=("transformer", "transformer_2"), neutral=_STAGE_2,
           conditioning="channels"),
    Family(("WanPipeline",), "two_calls", "flow", networks=("transformer", "transformer_2"), neutral=_STAGE_2,
           zero_init_steps=2),
    Family(("WanVideoToVideoPipeline",), "two_calls", "flow", start="timestep"),
    Family(("WanImageToVideoPipeline",), "two_calls", "flow", networks=("transformer", "transformer_2"),
           neutral=_STAGE_2, conditioning="channels"),
    Family(("CogView4Pipeline",), "two_calls", "flow", flow_time=None, zero_init_steps=2),
    Family(("CogView4ControlPipeline",), "two_calls", "flow", flow_time=None, conditioning="channels"),
    Family(("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"), "list_cu", "flow", latent="x",
           timestep="t", scale_arg="guidance_scale", cfg_threshold=0.0, output_sign=-1, float32=True,
           condition="cap_feats", flow_time="one_minus", native="CFG(s + 1)", native_exact=False,
           neutral={"cfg_normalization": (False, "its norm clamp is not a guide yet"),
                    "cfg_truncation": (1.0, "use a guide that skips the unconditional branch, e.g. "
                                            "guidance.GuidanceInterval")}),
    Family(("ZImageControlNetPipeline", "ZImageControlNetInpaintPipeline"), "list_cu", "flow", latent="x",
           timestep="t", scale_arg="guidance_scale", cfg_threshold=0.0, output_sign=-1, float32=True,
           condition="cap_feats", flow_time="one_minus", native="CFG(s + 1)", native_exact=False,
           neutral={"cfg_normalization": (False, "its norm clamp is not a guide yet"),
                    "cfg_truncation": (1.0, "use a guide that skips the unconditional branch, e.g. "
                                            "guidance.GuidanceInterval")},
           residuals=("controlnet_block_samples",)),
    # deprecated Stable Diffusion variants: the parent's [uncond; cond] block
    Family(("StableDiffusionPipelineSafe",), "uc", "diffusion",
           neutral={"sld_guidance_scale": (0.0, "safe latent diffusion batches a third, safety-concept branch "
                                                "apply() does not combine")}, **_UNET),
    # cuts the schedule without set_begin_index; add_predicted_noise re-noises with the pipeline's uncond chunk
    Family(("StableDiffusionInpaintPipelineLegacy",), "uc", "diffusion", start="timestep",
           neutral={"add_predicted_noise": (False, "it re-noises the kept region with the unconditional "
                                                   "prediction, which apply() replaces")}, **_UNET),
    # AnimateDiff SparseCtrl: AnimateDiff ControlNet's block; guess mode computes residuals for the conditional rows
    # only and adds them to the whole batch
    Family(("AnimateDiffSparseControlNetPipeline",), "uc", "diffusion",
           repeated=("encoder_hidden_states",) + _UNET_RESIDUALS, residuals=_UNET_RESIDUALS,
           neutral={"guess_mode": (False, "its residuals then cover the conditional rows only")}, **_UNET),
    # PIA: AnimateDiff's block on the latent with the frame mask and masked image latents concatenated; it calls
    # set_begin_index only on schedulers that have it (DDIM, PNDM, DDPM do not): the start is its first timestep's
    Family(("PIAPipeline",), "uc", "diffusion", conditioning="channels", repeated=("encoder_hidden_states",),
           start="timestep", **_UNET),
    # Flux 2 Klein (undistilled): two calls on the latent's tokens with the reference images' tokens appended
    Family(("Flux2KleinPipeline", "Flux2KleinInpaintPipeline"), "two_calls", "flow", conditioning="tokens",
           distilled_flag="is_distilled"),
    # Qwen-Image Layered: Qwen-Image Edit's two calls, the input image's tokens appended to the layers' tokens
    Family(("QwenImageLayeredPipeline",), "two_calls", "flow", conditioning="tokens",
           neutral={"cfg_normalize": (False, "use guidance.NormRescale")}, **_TRUE_CFG),
    # Bria Fibo 2: two calls combining float32 copies; its conditional embeddings switch with the level (text images
    # shown only at levels <= 0.9), so no passes at another level
    Family(("BriaFibo2Pipeline",), "two_calls", "flow", float32=True, flow_time=None),
    Family(("Lumina2Pipeline",), "two_calls", "flow", output_sign=-1, flow_time="one_minus",
           native="NormRescale(CFG(s))",
           neutral={"cfg_trunc_ratio": (1.0, "use a guide that skips the unconditional branch, e.g. "
                                             "guidance.GuidanceInterval")}),
)

def _reasons(reason: str, *names: str) -> dict[str, str]:
    return dict.fromkeys(names, reason)


# Classes refused up front, each with its reason (read in its diffusers 0.42.1 __call__).
REFUSED: dict[str, str] = {
    **_reasons("is deprecated in diffusers 0.42.1 and does not run with transformers 5, which this package needs: its "
               "Q-Former calls invert_attention_mask and get_head_mask, which transformers 5 removed "
               "(deprecated/blip_diffusion/modeling_blip2.py:594, 608)", "BlipDiffusionPipeline",
               "BlipDiffusionControlNetPipeline"),
    **_reasons("is guidance-distilled: it never evaluates an unconditional branch", "Flux2Pipeline",
               "FluxFillPipeline", "FluxControlPipeline", "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline",
               "SanaSprintPipeline", "SanaSprintImg2ImgPipeline", "LatentConsistencyModelPipeline",
               "FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline",
               "LatentConsistencyModelImg2ImgPipeline", "ConsistencyModelPipeline"),
    **_reasons("runs network calls per step that are not CFG branches (self-attention guidance, attention "
               "optimisation, GLIGEN grounding, prior steps, spatio-temporal guidance), which apply() cannot "
               "attribute", "StableDiffusionSAGPipeline", "StableDiffusionAttendAndExcitePipeline",
               "StableDiffusionPix2PixZeroPipeline", "StableDiffusionGLIGENTextImagePipeline", "StableUnCLIPPipeline",
               "SemanticStableDiffusionPipeline", "LTX2Pipeline", "LTX2ConditionPipeline", "LTX2ImageToVideoPipeline"),
    **_reasons("runs a custom denoising loop (windows, parallel or inverted steps) rather than one network call "
               "pattern per scheduler step", "StableDiffusionPanoramaPipeline", "StableDiffusionParadigmsPipeline",
               "StableDiffusionDiffEditPipeline", "CycleDiffusionPipeline", "TextToVideoZeroPipeline",
               "TextToVideoZeroSDXLPipeline", "UniDiffuserPipeline"),
    **_reasons("runs sub-pipelines (prior and decoder): apply guidance to the sub-pipeline itself",
               "KandinskyCombinedPipeline", "KandinskyImg2ImgCombinedPipeline", "KandinskyInpaintCombinedPipeline",
               "KandinskyV22CombinedPipeline", "KandinskyV22Img2ImgCombinedPipeline",
               "KandinskyV22InpaintCombinedPipeline", "WuerstchenCombinedPipeline", "StableCascadeCombinedPipeline",
               "VisualClozePipeline", "VersatileDiffusionPipeline"),
    **_reasons("batches three branches with image_guidance_scale over a mobile UNet whose CFG block has not been "
               "checked against the three-branch layout", "DreamLitePipeline"),
    **_reasons("steps on reversed flow sigmas (invert_sigmas), which apply() does not read", "MochiPipeline"),
    **_reasons("applies EDM preconditioning (c_skip, c_out) or frame conditioning to the network outputs before "
               "combining them, so the combined outputs are not the network's", "CosmosTextToWorldPipeline",
               "CosmosVideoToWorldPipeline", "Cosmos2TextToImagePipeline", "Cosmos2VideoToWorldPipeline",
               "Cosmos2_5_PredictBasePipeline", "Cosmos2_5_TransferPipeline"),
    **_reasons("rescales the combined prediction by its standard deviation after CFG", "BriaPipeline"),
    **_reasons("predicts a flow map (the mean velocity from t to r: its network takes r_timestep, and steps where "
               "t == r are skipped, pipeline_anyflow.py:578-603) stepped by FlowMapEulerDiscreteScheduler, whose "
               "levels apply() does not read", "AnyFlowPipeline"),
    **_reasons("runs an extra network call per step to fill a key-value cache", "GlmImagePipeline"),
    **_reasons("steps only part of its latent (conditioning frames or channels kept), which no layout describes",
               "Kandinsky5T2VPipeline", "Kandinsky5I2VPipeline", "Kandinsky5I2IPipeline", "Kandinsky5T2IPipeline",
               "HunyuanVideoImageToVideoPipeline", "SanaImageToVideoPipeline"),
    **_reasons("combines the halves of its epsilon channels with a custom split (Lumina-Next)", "LuminaPipeline"),
    **_reasons("runs Karras-preconditioned network calls (c_in, c_out) inside its loop",
               "StableDiffusionLatentUpscalePipeline"),
    **_reasons("runs diffusion forcing (per-frame noise levels and its own frame loop)",
               "SkyReelsV2DiffusionForcingPipeline", "SkyReelsV2DiffusionForcingImageToVideoPipeline",
               "SkyReelsV2DiffusionForcingVideoToVideoPipeline", "HunyuanVideoFramepackPipeline"),
    **_reasons("uses an EDM-preconditioned scheduler (CosineDPMSolverMultistep), which apply() does not read",
               "StableAudioPipeline"),
    **_reasons("conditions frames through a per-token timestep and steps part of the latent, which no layout "
               "describes", "LTXImageToVideoPipeline", "LTXConditionPipeline", "LTXI2VLongMultiPromptPipeline"),
    **_reasons("denoises with a network apply() does not hook (a prior / decoder / text_unet, no unet or "
               "transformer)", "WuerstchenPriorPipeline", "WuerstchenDecoderPipeline", "StableCascadePriorPipeline",
               "StableCascadeDecoderPipeline", "KandinskyPriorPipeline", "KandinskyV22PriorPipeline",
               "KandinskyV22PriorEmb2EmbPipeline", "ShapEPipeline", "ShapEImg2ImgPipeline",
               "VersatileDiffusionDualGuidedPipeline", "VersatileDiffusionImageVariationPipeline",
               "VersatileDiffusionTextToImagePipeline"),
    **_reasons("predicts discrete tokens (masked generative transformer), not a diffusion output",
               "AmusedPipeline", "AmusedImg2ImgPipeline", "AmusedInpaintPipeline", "VQDiffusionPipeline"),
    **_reasons("combines its branches with its own momentum APG (normalized_guidance, norm threshold 2.5) inside a "
               "CFG interval and may blend a third cover pass, not CFG (pipeline_ace_step.py:1180-1231)",
               "AceStepPipeline"),
    **_reasons("generates frame chunks autoregressively with a key-value cache, skipping steps whose level equals "
               "the next one (pipeline_anyflow_far.py:734-765)", "AnyFlowFARPipeline"),
    **_reasons("appends the edited image's tokens to a batched [uncond; cond] call and cuts them only at "
               "scheduler.step (pipeline_bria_fibo_edit.py:907, 936), which no batched layout describes",
               "BriaFiboEditPipeline"),
    **_reasons("predicts vision, sound and action velocities per call and masks their conditioning positions before "
               "combining (pipeline_cosmos3_omni.py:1756-1795)", "Cosmos3OmniPipeline"),
    **_reasons("is guidance-distilled: guidance_scale and image_guidance_scale are accepted and ignored "
               "(pipeline_dreamlite_mobile.py:442), one network call per step", "DreamLiteMobilePipeline"),
    **_reasons("is guidance-distilled: guidance_scale feeds the transformer's guidance embedding, one network call "
               "per step (pipeline_visualcloze_generation.py:856-866)", "VisualClozeGenerationPipeline"),
    **_reasons("denoises the video chunk by chunk (or stage by stage of a pyramid), a full denoising loop per chunk "
               "conditioned on history latents (pipeline_helios.py:800-890, pipeline_helios_pyramid.py:860-929)",
               "HeliosPipeline", "HeliosPyramidPipeline"),
    **_reasons("runs its unconditional branch through a second network (unconditional_transformer) on another "
               "sequence, with a per-step guidance schedule (pipeline_ideogram4.py:683-712)", "Ideogram4Pipeline"),
    **_reasons("overwrites the reference items of its latent before every step and rescales the combination to the "
               "conditional norm: the scheduler steps a latent part of which is conditioning, which no layout "
               "describes (pipeline_joyimage_edit.py:815, 835-839; pipeline_joyimage_edit_plus.py:677, 704-707)",
               "JoyImageEditPipeline", "JoyImageEditPlusPipeline"),
    **_reasons("predicts video and audio in every call and steps both with two schedulers, overwriting the "
               "conditioning frame of its latent (pipeline_kandinsky6_ti2va.py:885, 914-921)",
               "Kandinsky6TI2VAPipeline"),
    **_reasons("predicts video and audio in one call and combines its guidance in x0 (convert_velocity_to_x0), with "
               "spatio-temporal and modality-isolation passes (pipeline_ltx2_hdr_lora.py:1407-1482, "
               "pipeline_ltx2_ic_lora.py:2261-2341)", "LTX2HDRPipeline", "LTX2InContextPipeline"),
    **_reasons("its network predicts x0, turned into a velocity with a clamped level after combining "
               "(pipeline_prx_pixel.py:631-633), so guides would be handed x0 as a velocity", "PRXPixelPipeline"),
    **_reasons("prepends input-image tokens and keeps them in a per-branch key-value cache filled on the first step "
               "(pipeline_qwenimage21.py:776-812), which extra passes would corrupt", "QwenImage21Pipeline"),
    **_reasons("conditions frames through a per-frame timestep and keeps the clean frames of its latent "
               "(pipeline_sana_wm.py:602-630), which no layout describes", "SanaWMPipeline"),
    **_reasons("denoises the video segment by segment, a full loop per segment conditioned on the previous one "
               "(pipeline_wan_animate.py:1038-1146)", "WanAnimatePipeline"),
    **_reasons("steps on reversed flow sigmas (its default scheduler sets invert_sigmas, "
               "pipeline_longcat_audio_dit.py:113), which apply() does not read", "LongCatAudioDiTPipeline"),
    **_reasons("steps on reversed flow sigmas (its scheduler sets invert_sigmas; time runs from noise 0 to data 1) "
               "and batches [cond; uncond] (plus an image branch with input images) stepping one copy "
               "(pipeline_omnigen.py:440-465), which apply() does not read", "OmniGenPipeline"),
    **_reasons("passes each sample as a list of clean condition images plus its target with a noise mask "
               "(pipeline_z_image_omni.py:669-685), which the list layout does not describe", "ZImageOmniPipeline"),
}


def supported_pipelines() -> list[str]:
    return [name for family in FAMILIES for name in family.pipelines]


def _refusal(pipe: Any, name: str) -> str:
    """Why ``pipe``'s class is not served: its listed reason, or what its ``__call__`` shows."""
    if name in REFUSED:
        return REFUSED[name]
    listed = [cls.__name__ for cls in type(pipe).__mro__[1:] if cls.__name__ in supported_pipelines()]
    if listed:
        return f"overrides the __call__ of {listed[0]}, so its CFG is not the one that row describes"
    call = getattr(type(pipe), "__call__", None)
    params = inspect.signature(call).parameters if callable(call) else {}
    if "guider" in inspect.signature(type(pipe).__init__).parameters:
        return ("runs CFG through its guider component (a diffusers guider: pipe.guider), not through __call__ "
                "arguments apply() could take over; its CFG is whatever that guider computes. Put the guide in that "
                "slot instead: pipe.guider = guidance.modular.as_diffusers_guider(guide, pipe.scheduler)")
    if not any(p in params for p in ("guidance_scale", "true_cfg_scale")):
        return "does not run classifier-free guidance (its __call__ takes no guidance_scale or true_cfg_scale)"
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is None:
        return "has no unet or transformer for apply() to hook"
    return ("has no family row yet: its CFG block (which rows, which arguments, which combination) has not been "
            "checked against diffusers' source, and apply() does not guess one")


def other_level_pipelines() -> list[str]:
    """Pipelines on which apply runs extra passes at another noise level (flow, with a known ``flow_time``)."""
    return [name for family in FAMILIES if family.scheduler == "flow" and family.flow_time is not None
            for name in family.pipelines]


def family_of(pipe: Any) -> Family:
    """The family of the class whose ``__call__`` ``pipe`` runs (listed by name); TypeError otherwise."""
    name = type(pipe).__name__
    unet = getattr(pipe, "unet", None)
    if getattr(getattr(unet, "config", None), "time_cond_proj_dim", None) is not None:
        raise TypeError(f"{name} has a guidance-distilled unet (time_cond_proj_dim set): it never runs CFG batches")
    # the class whose __call__ the pipeline runs: a subclass that keeps its parent's __call__ (e.g. diffusers'
    # Lumina2Text2ImgPipeline alias) is served as that parent; one that overrides it is not
    owner = next((cls for cls in type(pipe).__mro__ if "__call__" in vars(cls)), type(pipe))
    for family in FAMILIES:
        if owner.__name__ in family.pipelines:
            if family.distilled_flag and (getattr(pipe, "config", None) or {}).get(family.distilled_flag):
                raise TypeError(f"{name} is guidance-distilled ({family.distilled_flag} set in its config): it "
                                "never evaluates an unconditional branch")
            _check_networks(pipe, family, name)
            return family
    raise TypeError(f"{name} {_refusal(pipe, name)}. apply() serves {len(supported_pipelines())} classes: "
                    f"{', '.join(supported_pipelines())}")


def _check_networks(pipe: Any, family: Family, name: str) -> None:
    primary = getattr(pipe, family.networks[0], None)
    if primary is None or not hasattr(pipe, "scheduler"):
        raise TypeError(f"{name} has no {family.networks[0]} or scheduler for apply() to hook")
    params = inspect.signature(getattr(primary, "_orig_mod", primary).forward).parameters
    missing = [arg for arg in (family.latent, family.timestep) if arg not in params]
    if missing and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise TypeError(f"{name}'s {family.networks[0]} ({type(primary).__name__}) takes no {missing}: its family "
                        "row does not describe this network")


def native_guide(family: Family, scale: float):
    """The guide that reproduces ``family``'s own CFG at scale ``scale`` (``Family.native``)."""
    from .cfg import CFG
    from .image_cfg import ImageCFG
    from .norm_rescale import NormRescale

    guides = {"ImageCFG(s, 1.5)": lambda: ImageCFG(scale, 1.5), "CFG(s)": lambda: CFG(scale),
              "NormRescale(CFG(s))": lambda: NormRescale(CFG(scale)), "CFG(s + 1)": lambda: CFG(scale + 1)}
    return guides[family.native]()
