"""Adapters from diffusers networks to the ``(x_t, t, cond) -> output`` model callable."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def diffusers_model_fn(model: torch.nn.Module) -> Callable[[Tensor, Tensor, Any], Tensor]:
    """Wrap a UNet2DModel (cond = class labels or None), UNet2DConditionModel (cond = text embeddings or a
    dict with ``encoder_hidden_states`` and ``added_cond_kwargs``) or DiT transformer (cond = class labels).

    Outputs with learned-variance channels are cut to the input's channels.
    """
    name = type(model).__name__

    def fn(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        t_batch = t.expand(x.shape[0]) if isinstance(t, Tensor) and t.ndim == 0 else t
        if name == "UNet2DConditionModel":
            kwargs = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
            out = model(x, t_batch, **kwargs).sample
        elif name == "UNet2DModel":
            out = model(x, t_batch, class_labels=cond).sample
        elif "Transformer" in name:
            out = model(x, timestep=t_batch, class_labels=cond).sample
        else:
            raise TypeError(f"no adapter for {name}; pass your own (x_t, t, cond) -> output callable")
        return out[:, : x.shape[1]]

    return fn
