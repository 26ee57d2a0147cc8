"""Adapters from diffusers networks to the ``(x_t, t, cond) -> output`` model callable, and the one place a
sampler's VP state becomes a network's own input (k-diffusion's ``c_in``)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .base import Level
from .schedule import network_input_scale

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]

# Transformers whose pipelines pass ``timestep / 1000`` (Flux, Flux 2, Qwen-Image); the others take ``t`` as is.
TIMESTEP_SCALES = {"FluxTransformer2DModel": 1e-3, "Flux2Transformer2DModel": 1e-3, "QwenImageTransformer2DModel": 1e-3}


def diffusers_model_fn(model: torch.nn.Module, timestep_scale: float | None = None, **fixed_kwargs: Any) -> ModelFn:
    """Wrap a diffusers network as ``(x_t, t, cond) -> output``.

    * UNet2DModel: cond = class labels or None; UNet2DConditionModel: cond = text embeddings or a dict with
      ``encoder_hidden_states`` and ``added_cond_kwargs``; DiT-style transformers: cond = class labels.
    * Flow transformers (SD3Transformer2DModel, FluxTransformer2DModel, ... and any model called with
      ``hidden_states=``): cond = a dict of per-row keyword arguments (``encoder_hidden_states``,
      ``pooled_projections``, ...), called as ``model(hidden_states=x, timestep=t * timestep_scale, **cond,
      **fixed_kwargs)``. ``timestep_scale`` defaults to 1/1000 for Flux / Flux 2 / Qwen-Image (as their pipelines
      pass it) and 1 otherwise; ``fixed_kwargs`` are passed unchanged on every call and never batched (e.g.
      Flux's ``img_ids`` / ``txt_ids``).

    ``x_t`` is whatever the network reads: the flow state for a flow network (:func:`call_network` scales a
    sampler's VP state). Outputs with learned-variance channels are cut to the input's channels.
    """
    name = type(model).__name__
    scale = TIMESTEP_SCALES.get(name, 1.0) if timestep_scale is None else float(timestep_scale)

    def fn(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        t_batch = t.expand(x.shape[0]) if isinstance(t, Tensor) and t.ndim == 0 else t
        if name == "UNet2DConditionModel":
            kwargs = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
            out = model(x, t_batch, **kwargs, **fixed_kwargs).sample
        elif name == "UNet2DModel":
            out = model(x, t_batch, class_labels=cond, **fixed_kwargs).sample
        elif isinstance(cond, dict):
            out = model(hidden_states=x, timestep=t_batch * scale, **cond, **fixed_kwargs).sample
        elif "Transformer" in name:
            out = model(x, timestep=t_batch * scale, class_labels=cond, **fixed_kwargs).sample
        else:
            raise TypeError(f"no adapter for {name}; pass your own (x_t, t, cond) -> output callable, or cond as a "
                            "dict of keyword arguments for a hidden_states= network")
        return out[:, : x.shape[1]]

    return fn


def call_network(model_fn: ModelFn, x: Tensor, level: Level, cond: Any, prediction_type: str) -> Tensor:
    """The network's output at the sampler's VP state ``x``: it reads ``x * c_in`` at the level's timestep.

    ``c_in = network_input_scale(alpha, sigma, prediction_type)``: ``1 / (alpha + sigma)`` for a flow network
    (its state ``(1 - s) x0 + s eps``), 1 for the VP networks. The output needs no rescaling: the converters
    (``schedule.to_x0`` ...) hold in any state scale.
    """
    c_in = network_input_scale(level.alpha, level.sigma, prediction_type)
    return model_fn(x * c_in if isinstance(c_in, Tensor) or c_in != 1.0 else x, level.t, cond)
