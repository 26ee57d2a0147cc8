"""A class-conditional pixel-space diffusion pipeline with classifier-free guidance.

Called like diffusers' ``DiTPipeline``; the CFG step is laid out exactly as in
``StableDiffusionPipeline`` (one batched UNet call on ``[uncond; cond]``, then ``chunk(2)``), so UNet
forward hooks that rewrite the two halves work the same way on both pipelines.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor


def denoising_network(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The pipeline's denoising network: its ``unet``, or its ``transformer`` (DiT, SD3, Flux, ...)."""
    for name in ("unet", "transformer"):
        network = getattr(pipe, name, None)
        if isinstance(network, torch.nn.Module):
            return network
    raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer")


def latent_shape(pipe: DiffusionPipeline) -> tuple[int, ...]:
    """``(channels, height, width)`` of one starting latent, from the denoising network's config."""
    config = denoising_network(pipe).config
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (config.in_channels, *size)


def sampling_scheduler(train_scheduler: SchedulerMixin) -> DDIMScheduler:
    """The DDIM scheduler to ship with a model trained under ``train_scheduler`` (same betas and prediction type).

    "leading" spacing with ``steps_offset=1`` (SD's convention) starts at t = 961 for 25 steps; "trailing" would
    start at t = 999, where the cosine schedule has alpha_bar = 2e-9 and DDIM amplifies eps errors ~1000x.
    """
    return DDIMScheduler.from_config(train_scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                     steps_offset=1, timestep_spacing="leading")


class ClassConditionalPipeline(DiffusionPipeline):
    """Pipeline over a class-conditional ``UNet2DModel`` (``num_class_embeds = classes + 1``).

    The last class embedding is the null label used for the unconditional branch of CFG; it can also be
    requested directly (``pipe.null_class_label``) to draw unconditional samples.

    Components:
        unet: ``UNet2DModel`` predicting the scheduler's ``prediction_type`` from ``(x_t, t, class_labels)``.
        scheduler: any diffusers scheduler (the zoo ships a ``DDIMScheduler``).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DModel, scheduler: KarrasDiffusionSchedulers):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def null_class_label(self) -> int:
        """Index of the null (unconditional) class embedding."""
        return int(self.unet.config.num_class_embeds) - 1

    @property
    def num_classes(self) -> int:
        """Number of real classes (the null label excluded)."""
        return self.null_class_label

    def _check_labels(self, class_labels: int | Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, int):
            class_labels = [class_labels]
        labels = list(class_labels)
        if not labels:
            raise ValueError("class_labels is empty: pass at least one label")
        checked = []
        for label in labels:
            try:
                index = operator.index(label)           # ints and numpy integers, not floats or bools
            except TypeError:
                index = None
            if isinstance(label, bool) or index is None or not 0 <= index <= self.null_class_label:
                raise ValueError(f"class label {label!r} is not an int in 0..{self.null_class_label} "
                                 f"({self.null_class_label} = unconditional)")
            checked.append(index)
        return checked

    def _step_kwargs(self, generator: torch.Generator | None, eta: float) -> dict[str, Any]:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        guidance_scale: float = 2.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 25,
        eta: float = 0.0,
        num_images_per_label: int = 1,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per class label (times ``num_images_per_label``).

        Args:
            class_labels: class indices (0..9 for digits; the null label gives unconditional samples).
            guidance_scale: CFG weight ``w`` in ``eps_u + w (eps_c - eps_u)``; CFG (a batched
                ``[uncond; cond]`` UNet call) is used only when ``w > 1``.
            generator: torch generator(s) for the initial noise and stochastic schedulers.
            num_inference_steps: number of scheduler steps.
            eta: DDIM eta (ignored by schedulers without it).
            num_images_per_label: images drawn per label, in label-major order.
            latents: initial noise ``(B, C, H, W)`` instead of drawing it.
            output_type: ``"pil"`` (grayscale PIL images), ``"np"`` (``(B, H, W, C)`` in [0, 1]) or
                ``"pt"`` (``(B, C, H, W)`` in [0, 1]); ink is bright on a dark background.
            return_dict: return an ``ImagePipelineOutput`` instead of a tuple.
            callback_on_step_end: ``fn(pipe, i, t, tensors) -> dict`` after every scheduler step, as in
                ``StableDiffusionPipeline``; it may return a new ``"latents"``.
            callback_on_step_end_tensor_inputs: tensors passed to the callback (only ``"latents"``).
        """
        labels = self._check_labels(class_labels)
        for name, value in (("guidance_scale", guidance_scale), ("eta", eta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite real number, got {value!r}")
        if int(num_inference_steps) <= 0:
            raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}")
        if num_images_per_label < 1:
            raise ValueError(f"num_images_per_label must be >= 1, got {num_images_per_label}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        bad = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}, "
                             f"got {sorted(bad)}")

        device = self._execution_device
        dtype = self.unet.dtype
        labels = [label for label in labels for _ in range(num_images_per_label)]
        batch_size = len(labels)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"You have passed a list of generators of length {len(generator)}, but {batch_size} "
                             "images are requested; pass one generator per image or a single one")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)

        do_cfg = guidance_scale > 1.0
        cond = torch.tensor(labels, device=device)
        if do_cfg:
            uncond = torch.full_like(cond, self.null_class_label)
            class_input = torch.cat([uncond, cond])       # null labels first, as the negative prompt in SD
        else:
            class_input = cond

        self.scheduler.set_timesteps(int(num_inference_steps), device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, class_labels=class_input).sample
            if do_cfg:
                eps_uncond, eps_cond = noise_pred.chunk(2)
                noise_pred = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                available = {"latents": latents}
                tensors = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                outputs = callback_on_step_end(self, i, t, tensors) or {}
                latents = outputs.pop("latents", latents)

        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
