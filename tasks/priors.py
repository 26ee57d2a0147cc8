"""Diffusion priors for inverse problems: a diffusers pipeline or network as the denoiser the solvers run.

    prior = priors.load_prior("google/ddpm-celebahq-256")     # zoo name, folder or hub id (pixel or latent)
    prior = priors.PixelPrior.from_pipeline(pipe)              # DDPMPipeline, DDIMPipeline, ClassConditionalPipeline
    prior = priors.LatentPrior.from_pipeline(sdxl, prompt="")  # SD, SDXL, SD3, Flux (text) or DiT (class)
    denoise, plan = prior.denoiser(), prior.plan(100)          # (x_t, level) -> x0_hat, and the noise levels

A prior reads its parametrisation from its scheduler (``alphas_cumprod`` or flow sigmas, and
``prediction_type``: epsilon, v, sample or flow velocity), so a solver sees only ``x0_hat(x_t)`` at a VP level
``x_t = alpha x0 + sigma eps`` and needs nothing prior-specific. Latent priors add ``decode`` / ``encode`` (images
in [-1, 1] <-> the latents the network steps) and the conditioning ``cond`` (text embeddings P2L may tune).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from diffguide.guidance.latent import vae_decoder, vae_encoder
from diffguide.samplers.base import DenoiseFn, Level
from diffguide.samplers.models import ModelFn, call_network, diffusers_model_fn
from diffguide.samplers.schedule import Plan, plan_from_scheduler, scheduler_prediction_type, to_x0

TEXT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
LATENT_PIPELINES = (*TEXT_PIPELINES, "DiTPipeline")
FLUX_GUIDANCE = 3.5   # FluxPipeline's default guidance_scale, the distilled guidance embedding of FLUX.1-dev


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Parameters of ``modules`` without gradients inside the block (gradients flow to x_t only), each
    parameter's ``requires_grad`` restored after it."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


def _pair(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def text_states(pipe: Any, prompt: str = "") -> Tensor:
    """The last hidden states ``(1, L, D)`` of a Stable Diffusion pipeline's text encoder for ``prompt``."""
    tokens = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    with torch.no_grad():
        return pipe.text_encoder(tokens)[0]


class NetworkPlacement:
    """``device`` and ``dtype`` of a prior: its denoising ``network``'s."""

    network: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return self.network.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype


class PixelPrior(NetworkPlacement):
    """A pixel-space prior: a diffusers ``UNet2DModel`` and the scheduler it was trained with.

    Args:
        network: ``UNet2DModel``, unconditional or class-conditional (``num_class_embeds``), any size and channels.
        scheduler: its diffusers scheduler; the noise levels and ``prediction_type`` (epsilon, v, sample) are
            read from it.
        label: class of a class-conditional network (``None``: ``null_label``, the unconditional prior).
        null_label: the class index that means "no class" (``ClassConditionalPipeline``'s last embedding);
            ``None`` if the network has none, which makes ``label`` required.
    """

    def __init__(self, network: torch.nn.Module, scheduler: Any, label: int | None = None,
                 null_label: int | None = None) -> None:
        name = type(network).__name__
        if name != "UNet2DModel":
            hint = (" (a latent model: use LatentPrior with its pipeline)" if "Transformer" in name
                    or name == "UNet2DConditionModel" else "")
            raise TypeError(f"a pixel prior needs a diffusers UNet2DModel, got {name}{hint}")
        config = network.config
        if config.get("class_embed_type") is not None:
            raise ValueError(f"UNet2DModel with class_embed_type={config.class_embed_type!r} takes embeddings, not "
                             "class indices; supported: unconditional networks and num_class_embeds")
        self.prediction_type = scheduler_prediction_type(scheduler)
        self.network, self.scheduler = network, scheduler
        classes = config.get("num_class_embeds")
        if classes is None:
            if label is not None:
                raise ValueError(f"label={label!r} given, but the network is unconditional (no num_class_embeds)")
        else:
            label = null_label if label is None else label
            if label is None:
                raise ValueError(f"the network is class-conditional ({classes} class embeddings) with no known null "
                                 f"class: pass label, 0..{classes - 1}")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
                raise ValueError(f"label must be an int in 0..{classes - 1}, got {label!r}")
        self.label = label
        self.image_shape: tuple[int, int, int] = (int(config.in_channels), *_pair(config.sample_size))
        self.model_fn: ModelFn = diffusers_model_fn(network)

    @classmethod
    def from_pipeline(cls, pipe: Any, label: int | None = None) -> "PixelPrior":
        """The prior of a pixel pipeline with ``unet`` and ``scheduler`` (``DDPMPipeline``, ``DDIMPipeline``,
        ``ClassConditionalPipeline`` whose null class is the default label)."""
        if getattr(pipe, "vae", None) is not None or getattr(pipe, "vqvae", None) is not None:
            raise ValueError(f"{type(pipe).__name__} is a latent pipeline: use a latent solver "
                             "(latent_dps, psld, p2l) or LatentPrior")
        if getattr(pipe, "unet", None) is None or getattr(pipe, "scheduler", None) is None:
            raise TypeError(f"a pixel prior needs a pipeline with unet and scheduler, got {type(pipe).__name__}")
        return cls(pipe.unet, pipe.scheduler, label, getattr(pipe, "null_class_label", None))

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.network,)

    def denoiser(self) -> DenoiseFn:
        """``(x_t, level) -> x0_hat`` of the network at the VP state ``x_t``, for any batch size."""
        model_fn, prediction_type, label = self.model_fn, self.prediction_type, self.label

        def denoise(x: Tensor, level: Level) -> Tensor:
            labels = None if label is None else torch.full((x.shape[0],), label, device=x.device, dtype=torch.long)
            return to_x0(call_network(model_fn, x, level, labels, prediction_type), x, level.alpha, level.sigma,
                         prediction_type)

        return denoise

    def plan(self, steps: int) -> Plan:
        return plan_from_scheduler(self.scheduler, steps)

    def noise(self, batch: int, generator: torch.Generator) -> Tensor:
        """Starting noise ``(batch, *image_shape)`` drawn on the CPU from ``generator``, on the network's device."""
        return torch.randn(batch, *self.image_shape, generator=generator).to(self.device, self.dtype)

    def __repr__(self) -> str:
        return (f"PixelPrior({type(self.network).__name__}, image_shape={self.image_shape}, "
                f"prediction_type={self.prediction_type!r}, label={self.label})")


class LatentPrior(NetworkPlacement):
    """A latent prior: a pipeline's denoising network, scheduler and VAE, with fixed conditioning.

    ``cond`` is a dict of per-row tensors with batch 1: the text embeddings ``prompt_embeds`` (and
    ``pooled_prompt_embeds`` for SDXL, SD3 and Flux), which P2L may tune (``text`` is True), or DiT's
    ``class_labels``. ``model_fn(z, t, cond)`` runs the network on it. Build one with :meth:`from_pipeline`.
    """

    def __init__(self, pipe: Any, network: torch.nn.Module, model_fn: ModelFn, cond: dict[str, Tensor],
                 latent_shape: tuple[int, ...], image_shape: tuple[int, int, int], text: bool,
                 pack: Callable[[Tensor], Tensor] | None = None, unpack: Callable[[Tensor], Tensor] | None = None,
                 plan_kwargs: Callable[[int], dict] | None = None) -> None:
        self.pipe, self.network, self.model_fn, self.cond, self.text = pipe, network, model_fn, cond, text
        self.scheduler, self.vae = pipe.scheduler, pipe.vae
        self.prediction_type = scheduler_prediction_type(self.scheduler)
        self.latent_shape, self.image_shape = tuple(latent_shape), tuple(image_shape)
        self._pack, self._unpack = pack or (lambda z: z), unpack or (lambda z: z)
        self._plan_kwargs = plan_kwargs or (lambda steps: {})
        self._decode, self._encode = vae_decoder(self.vae), vae_encoder(self.vae)

    # -- building one per pipeline family -----------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe: Any, prompt: str = "", prompt_embeds: Tensor | None = None,
                      pooled_prompt_embeds: Tensor | None = None, label: int | None = None,
                      size: int | tuple[int, int] | None = None) -> "LatentPrior":
        """The prior of a latent pipeline conditioned on ``prompt`` (``""``: the null prompt).

        SD, SDXL, SD3 and Flux encode ``prompt`` with their own text encoders (SDXL: two, concatenated, plus the
        second's pooled output; SD3: two CLIP and T5; Flux: CLIP pooled and T5); ``prompt_embeds`` /
        ``pooled_prompt_embeds`` (batch 1, as the pipelines take them) replace the encoders, e.g. where a pipeline
        has none. DiT is class-conditional: ``label`` (default: its null class). ``size``: image ``H`` or
        ``(H, W)`` in pixels (default: the pipeline's).
        """
        name = type(pipe).__name__
        if name not in LATENT_PIPELINES:
            raise ValueError(f"no latent prior for {name}; supported: {', '.join(LATENT_PIPELINES)}")
        if getattr(pipe, "vae", None) is None or type(pipe.vae).__name__ != "AutoencoderKL":
            raise ValueError(f"{name}: latent solvers decode through an AutoencoderKL, got "
                             f"{type(getattr(pipe, 'vae', None)).__name__}")
        if name == "DiTPipeline":
            if prompt or prompt_embeds is not None or pooled_prompt_embeds is not None:
                raise ValueError("DiT is class-conditional: pass label, not a prompt or prompt embeddings")
            return cls._dit(pipe, label, size)
        if label is not None:
            raise ValueError(f"label is for class-conditional DiT; {name} takes a prompt")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        builder = {"StableDiffusionPipeline": cls._sd, "StableDiffusionXLPipeline": cls._sdxl,
                   "StableDiffusion3Pipeline": cls._sd3, "FluxPipeline": cls._flux}[name]
        return builder(pipe, prompt, prompt_embeds, pooled_prompt_embeds, size)

    @staticmethod
    def _vae_factor(pipe: Any) -> int:
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    @classmethod
    def _size(cls, pipe: Any, size: Any, default_latent: Any, multiple: int) -> tuple[int, int]:
        """Image ``(H, W)``: ``size`` or ``default_latent`` latents times the VAE factor; both multiples of
        ``multiple`` pixels."""
        factor = cls._vae_factor(pipe)
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool) or isinstance(
                size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and not isinstance(s, bool)
                                                              for s in size)):
            raise TypeError(f"size must be an int or a pair of ints (height, width), got {size!r}")
        height, width = _pair(size) if size is not None else tuple(s * factor for s in _pair(default_latent))
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"{type(pipe).__name__} makes images whose sides are positive multiples of {multiple} "
                             f"pixels, got {height}x{width}")
        return height, width

    @staticmethod
    def _check_embeds(name: str, value: Tensor | None, ndim: int) -> None:
        if value is not None and (not isinstance(value, Tensor) or not value.is_floating_point()
                                  or value.ndim != ndim or value.shape[0] != 1):
            shape = "(1, L, D)" if ndim == 3 else "(1, D)"
            raise ValueError(f"{name} must be a floating-point tensor of shape {shape}, got "
                             f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}")

    @classmethod
    def _text(cls, pipe: Any, prompt_embeds: Tensor | None, pooled: Tensor | None, needs_pooled: bool) -> bool:
        """Whether to run the pipeline's encoders (no embeddings given); checks what was given."""
        cls._check_embeds("prompt_embeds", prompt_embeds, 3)
        cls._check_embeds("pooled_prompt_embeds", pooled, 2)
        name = type(pipe).__name__
        if not needs_pooled and pooled is not None:
            raise ValueError(f"{name} takes no pooled_prompt_embeds")
        if prompt_embeds is None and pooled is None:
            if getattr(pipe, "tokenizer", None) is None or getattr(pipe, "text_encoder", None) is None:
                raise ValueError(f"{name} has no tokenizer or text encoder to encode the prompt: pass "
                                 "prompt_embeds" + (" and pooled_prompt_embeds" if needs_pooled else ""))
            return True
        if prompt_embeds is None or (needs_pooled and pooled is None):
            raise ValueError(f"{name} needs prompt_embeds" + (" and pooled_prompt_embeds" if needs_pooled else "")
                             + " together")
        return False

    @classmethod
    def _sd(cls, pipe, prompt, prompt_embeds, pooled, size) -> "LatentPrior":
        unet = pipe.unet
        if cls._text(pipe, prompt_embeds, pooled, needs_pooled=False):
            prompt_embeds = text_states(pipe, prompt)
        factor = cls._vae_factor(pipe)
        height, width = cls._size(pipe, size, unet.config.sample_size, factor)
        unet_fn = diffusers_model_fn(unet)
        return cls(pipe, unet, lambda z, t, c: unet_fn(z, t, c["prompt_embeds"]),
                   {"prompt_embeds": prompt_embeds.to(unet.device, unet.dtype)},
                   (unet.config.in_channels, height // factor, width // factor),
                   (pipe.vae.config.in_channels, height, width), text=True)

    @classmethod
    def _sdxl(cls, pipe, prompt, prompt_embeds, pooled, size) -> "LatentPrior":
        unet = pipe.unet
        if cls._text(pipe, prompt_embeds, pooled, needs_pooled=True):
            with torch.no_grad():
                prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=unet.device,
                                                                 do_classifier_free_guidance=False)
        factor = cls._vae_factor(pipe)
        height, width = cls._size(pipe, size, unet.config.sample_size, factor)
        # SDXL's micro-conditioning: original size, crop (0, 0) and target size, as the pipeline's defaults
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=unet.dtype,
                                          text_encoder_projection_dim=int(pooled.shape[-1])).to(unet.device)
        unet_fn = diffusers_model_fn(unet)

        def model_fn(z: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
            added = {"text_embeds": c["pooled_prompt_embeds"], "time_ids": time_ids.expand(z.shape[0], -1)}
            return unet_fn(z, t, {"encoder_hidden_states": c["prompt_embeds"], "added_cond_kwargs": added})

        cond = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
        return cls(pipe, unet, model_fn, {k: v.to(unet.device, unet.dtype) for k, v in cond.items()},
                   (unet.config.in_channels, height // factor, width // factor),
                   (pipe.vae.config.in_channels, height, width), text=True)

    @staticmethod
    def _shift(pipe: Any, sequence_length: int) -> dict:
        """``mu`` of a dynamically shifted flow schedule, as SD3 / Flux compute it from the image's token count."""
        config = pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        return {"mu": calculate_shift(sequence_length, config.get("base_image_seq_len", 256),
                                      config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                      config.get("max_shift", 1.15))}

    @classmethod
    def _sd3(cls, pipe, prompt, prompt_embeds, pooled, size) -> "LatentPrior":
        net = pipe.transformer
        if cls._text(pipe, prompt_embeds, pooled, needs_pooled=True):
            with torch.no_grad():
                prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device=net.device,
                                                                 do_classifier_free_guidance=False)
        factor, patch = cls._vae_factor(pipe), int(net.config.patch_size)
        height, width = cls._size(pipe, size, net.config.sample_size, factor * patch)
        net_fn = diffusers_model_fn(net)
        tokens = (height // factor // patch) * (width // factor // patch)
        cond = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
        return cls(pipe, net, lambda z, t, c: net_fn(z, t, {"encoder_hidden_states": c["prompt_embeds"],
                                                            "pooled_projections": c["pooled_prompt_embeds"]}),
                   {k: v.to(net.device, net.dtype) for k, v in cond.items()},
                   (net.config.in_channels, height // factor, width // factor),
                   (pipe.vae.config.in_channels, height, width), text=True,
                   plan_kwargs=lambda steps: cls._shift(pipe, tokens))

    @classmethod
    def _flux(cls, pipe, prompt, prompt_embeds, pooled, size) -> "LatentPrior":
        net = pipe.transformer
        if cls._text(pipe, prompt_embeds, pooled, needs_pooled=True):
            with torch.no_grad():
                prompt_embeds, pooled, _ = pipe.encode_prompt(prompt, prompt, device=net.device)
        factor = cls._vae_factor(pipe)
        height, width = cls._size(pipe, size, getattr(pipe, "default_sample_size", 128), 2 * factor)
        h, w, channels = height // factor, width // factor, net.config.in_channels // 4
        image_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, net.device, net.dtype)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=net.device, dtype=net.dtype)
        net_fn = diffusers_model_fn(net, img_ids=image_ids, txt_ids=text_ids)

        def model_fn(z: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
            cond = {"encoder_hidden_states": c["prompt_embeds"], "pooled_projections": c["pooled_prompt_embeds"]}
            if net.config.guidance_embeds:   # guidance-distilled (FLUX.1-dev): the pipeline's default 3.5
                cond["guidance"] = torch.full((z.shape[0],), FLUX_GUIDANCE, device=z.device, dtype=torch.float32)
            return net_fn(z, t, cond)

        def pack(z: Tensor) -> Tensor:      # (B, C, h, w) -> (B, h w / 4, 4 C): FluxPipeline._pack_latents
            return pipe._pack_latents(z, z.shape[0], channels, h, w)

        def unpack(z: Tensor) -> Tensor:
            return pipe._unpack_latents(z, height, width, factor)

        cond = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
        return cls(pipe, net, model_fn, {k: v.to(net.device, net.dtype) for k, v in cond.items()},
                   ((h // 2) * (w // 2), 4 * channels), (pipe.vae.config.in_channels, height, width), text=True,
                   pack=pack, unpack=unpack,
                   plan_kwargs=lambda steps: {"sigmas": np.linspace(1.0, 1 / steps, steps),   # FluxPipeline's
                                              **cls._shift(pipe, (h // 2) * (w // 2))})

    @classmethod
    def _dit(cls, pipe, label, size) -> "LatentPrior":
        net = pipe.transformer
        null = int(net.config.num_embeds_ada_norm)            # DiT's class-dropout embedding: the null class
        label = null if label is None else label
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= null:
            raise ValueError(f"label must be an int in 0..{null} ({null}: unconditional), got {label!r}")
        factor = cls._vae_factor(pipe)
        height, width = cls._size(pipe, size, net.config.sample_size, factor * int(net.config.patch_size))
        net_fn = diffusers_model_fn(net)
        return cls(pipe, net, lambda z, t, c: net_fn(z, t, c["class_labels"].expand(z.shape[0])),
                   {"class_labels": torch.tensor([label], device=net.device)},
                   (net.config.in_channels, height // factor, width // factor),
                   (pipe.vae.config.in_channels, height, width), text=False)

    # -- what the solvers use ---------------------------------------------------------------------------------
    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        encoders = [getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        return (self.network, self.vae, *[e for e in encoders if e is not None])

    def decode(self, z: Tensor) -> Tensor:
        """Latents the network steps -> images in [-1, 1]."""
        return self._decode(self._unpack(z))

    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> latents the network steps (the VAE posterior mean, scaled)."""
        return self._pack(self._encode(images))

    def denoiser(self, cond: dict[str, Tensor] | None = None) -> DenoiseFn:
        """``(z_t, level) -> z0_hat`` under ``cond`` (default: the prior's), for any batch size."""
        cond = self.cond if cond is None else cond
        model_fn, prediction_type = self.model_fn, self.prediction_type

        def denoise(z: Tensor, level: Level) -> Tensor:
            rows = {k: v.expand(z.shape[0], *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}
            return to_x0(call_network(model_fn, z, level, rows, prediction_type), z, level.alpha, level.sigma,
                         prediction_type)

        return denoise

    def plan(self, steps: int) -> Plan:
        return plan_from_scheduler(self.scheduler, steps, **self._plan_kwargs(steps))

    def noise(self, batch: int, generator: torch.Generator) -> Tensor:
        return torch.randn(batch, *self.latent_shape, generator=generator).to(self.device, self.dtype)

    def __repr__(self) -> str:
        return (f"LatentPrior({type(self.pipe).__name__}, image_shape={self.image_shape}, "
                f"latent_shape={self.latent_shape}, prediction_type={self.prediction_type!r})")


Prior = PixelPrior | LatentPrior


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _bare_unet(folder: Path, device: Any, dtype: torch.dtype | None) -> Any:
    """A ``DDPMPipeline`` over a folder holding a saved ``UNet2DModel`` and its scheduler config (next to it or in
    ``scheduler/``)."""
    import diffusers

    where = next((f for f in (folder, folder / "scheduler") if (f / "scheduler_config.json").is_file()), None)
    if where is None:
        raise ValueError(f"{folder} holds a UNet2DModel but no scheduler_config.json (next to it or in scheduler/): "
                         "the noise schedule and prediction type cannot be read; save the training scheduler there")
    config = json.loads((where / "scheduler_config.json").read_text())
    scheduler_class = getattr(diffusers, str(config.get("_class_name")), None)
    if scheduler_class is None:
        raise ValueError(f"{where / 'scheduler_config.json'}: unknown scheduler {config.get('_class_name')!r}")
    unet = diffusers.UNet2DModel.from_pretrained(folder, use_safetensors=True, torch_dtype=dtype).eval()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler_class.from_config(config))
    return pipe.to(device) if device is not None else pipe


def load_pipeline(source: str | Path, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> Any:
    """The pipeline of a zoo name, a folder or a hub id; a bare ``UNet2DModel`` folder (with its
    ``scheduler_config.json``) becomes a ``DDPMPipeline``."""
    from diffguide.tasks import zoo

    folder = zoo._resolve(source)
    if (folder / "model_index.json").is_file():
        return zoo.load(folder, device=device, dtype=dtype)
    if _read_config(folder).get("_class_name") == "UNet2DModel":
        return _bare_unet(folder, device, dtype)
    raise ValueError(f"{source}: neither a diffusers pipeline (model_index.json) nor a UNet2DModel folder "
                     "(config.json)")


def load_prior(source: Any, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               label: int | None = None, prompt: str = "", **latent_options: Any) -> Prior:
    """A prior from a pipeline object, a zoo name, a folder or a hub id (:func:`load_pipeline`).

    Pixel: a pipeline with a ``UNet2DModel`` (``DDPMPipeline``, ``DDIMPipeline``, ``ClassConditionalPipeline``)
    or a bare ``UNet2DModel`` folder. Latent: SD, SDXL, SD3, Flux (conditioned on ``prompt``; ``latent_options``
    such as ``prompt_embeds`` go to :meth:`LatentPrior.from_pipeline`) and DiT (``label``).
    """
    if isinstance(source, (PixelPrior, LatentPrior)):
        return source
    pipe = load_pipeline(source, device, dtype) if isinstance(source, (str, Path)) else source
    if getattr(pipe, "vae", None) is not None or type(pipe).__name__ in LATENT_PIPELINES:
        return LatentPrior.from_pipeline(pipe, prompt=prompt, label=label, **latent_options)
    if prompt or latent_options:
        raise ValueError(f"{type(pipe).__name__} is a pixel prior: it takes no prompt or prompt embeddings")
    return PixelPrior.from_pipeline(pipe, label=label)


__all__ = ["LatentPrior", "PixelPrior", "Prior", "frozen", "load_pipeline", "load_prior", "text_states"]
