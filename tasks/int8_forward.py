"""Inference through frozen int8 quanto layers with one reused dequantization buffer.

optimum-quanto runs a frozen int8 ``QLinear`` / ``QConv2d`` by dequantizing its weight on every call,
``W = s * W_int8``: the int8 data is first cast to a fresh float copy, then multiplied into another fresh
tensor, so every forward pass has the kernel hand out and zero new pages for two float copies of every weight
(on CPU a ZOODiP step of an SD-1.5-shaped pipeline runs 1.9x faster without them: BENCHMARKS.md, personalize).

:class:`SharedDequantBuffer` computes the same ``W`` into one buffer sized for the largest weight
(``buffer.copy_(W_int8).mul_(s)``: the cast is exact and the product is the same float32 rounding, so every
output is bit-identical to quanto's) and then makes the same call quanto makes (``matmul(x, W.t()) + b`` for
Linear, the module's own ``_conv_forward`` for Conv2d). Inside its ``with`` block the layers of the given
modules use it; outside, they are quanto's again::

    scratch = SharedDequantBuffer(pipe.unet, pipe.text_encoder)
    with torch.no_grad(), scratch:
        noise_pred = pipe.unet(latents, t, states).sample

Each layer overwrites the buffer, so a weight must not outlive its call: with autograd on (a graph would keep
the weight for the backward pass) the layers fall back to their own forward.

bfloat16 on CPU: for a bfloat16 input whose width is a multiple of 4, quanto hands a Linear layer to torch's fused
``torch._weight_int8pack_mm``, which crashes the process (segmentation fault) in torch 2.14.1 on AMD EPYC CPUs
with AVX-512 BF16 for narrow layers (8 input features). Every int8 Linear layer that diffguide makes or loads
(:func:`avoid_fused_int8_kernel`, called by ``tasks.quantize``) computes those calls as quanto computes all
others: ``W = s * W_int8`` in the scale's dtype, then ``matmul(x, W.t()) + b``. The results are the same on
every CPU (the fused kernel's rounding differs from this by a few bfloat16 ulps).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


def _is_frozen_int8(layer: nn.Module) -> bool:
    """A frozen quanto QLinear / QConv2d with contiguous int8 weights, one float scale per output channel and
    float inputs (the layout in which ``s * W_int8`` and the buffer hold the same tensor)."""
    from optimum.quanto.nn import QConv2d, QLinear
    from optimum.quanto.tensor.weights.qbytes import WeightQBytesTensor

    weight = getattr(layer, "weight", None)
    return (isinstance(layer, (QLinear, QConv2d)) and getattr(layer, "activation_qtype", None) is None
            and type(weight) is WeightQBytesTensor and type(weight._data) is Tensor
            and weight._data.dtype == torch.int8 and weight._data.is_contiguous() and weight._scale.is_floating_point()
            and weight._scale.shape == (weight.shape[0],) + (1,) * (weight.ndim - 1)
            and "forward" not in layer.__dict__)               # a forward already replaced (e.g. offloading) stays


def _dequantized_linear(weight: Tensor, bias: Tensor | None, input: Tensor) -> Tensor:
    """quanto's unfused int8 Linear: ``matmul(x, W.t()) + b`` with ``W = s * W_int8`` given dequantized."""
    flat = input.reshape(-1, input.shape[-1]).to(weight.dtype)            # as quanto's qbytes_mm
    output = torch.matmul(flat, weight.t()).reshape(*input.shape[:-1], weight.shape[0])
    return output + bias if bias is not None else output


@functools.cache
def _unfused_qlinear() -> type:
    """The subclass of quanto's ``QLinear`` that never calls the fused int8 kernel on CPU."""
    from optimum.quanto.nn import QLinear

    class UnfusedQLinear(QLinear):
        """quanto ``QLinear`` whose bfloat16 CPU calls dequantize instead of calling ``_weight_int8pack_mm``."""

        def forward(self, input: Tensor) -> Tensor:
            weight = self.weight
            if (input.dtype == torch.bfloat16 and input.device.type == "cpu"
                    and getattr(weight, "_data", None) is not None and weight._data.dtype == torch.int8):
                return _dequantized_linear(weight.dequantize(), self.bias, input)
            return super().forward(input)

    return UnfusedQLinear


def avoid_fused_int8_kernel(module: nn.Module) -> nn.Module:
    """Make every quanto int8 ``QLinear`` of ``module`` compute its bfloat16 CPU calls without the fused
    ``torch._weight_int8pack_mm`` kernel (see the module docstring); other calls are unchanged. In place;
    returns ``module``. A no-op without optimum-quanto."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    try:
        from optimum.quanto.nn import QLinear
    except ImportError:
        return module
    unfused = _unfused_qlinear()
    for layer in module.modules():
        if type(layer) is QLinear:
            layer.__class__ = unfused
    return module


class SharedDequantBuffer:
    """Context manager: the frozen int8 Linear / Conv2d layers of ``modules`` dequantize into one shared
    buffer (bit-identical outputs, no per-call allocation); see the module docstring."""

    def __init__(self, *modules: nn.Module) -> None:
        for module in modules:
            if not isinstance(module, nn.Module):
                raise TypeError(f"modules must be torch.nn.Module, got {type(module).__name__}")
        try:
            import optimum.quanto  # noqa: F401
        except ImportError:                                   # without optimum-quanto no layer is int8
            self.layers = []
        else:
            self.layers = [layer for module in modules for layer in module.modules() if _is_frozen_int8(layer)]
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._active = False

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold (made at the first int8 call, kept until the object is dropped)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def _weight(self, weight) -> Tensor:
        """``s * W_int8`` of a quanto weight, written into the buffer of its device and scale dtype."""
        data, scale = weight._data, weight._scale
        key = (data.device, scale.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < data.numel():
            size = max(w._data.numel() for w in (layer.weight for layer in self.layers)
                       if w._data.device == data.device)
            buffer = self._buffers[key] = torch.empty(size, device=data.device, dtype=scale.dtype)
        return buffer[:data.numel()].view(data.shape).copy_(data).mul_(scale)

    def _linear(self, layer: nn.Module, input: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return type(layer).forward(layer, input)
        return _dequantized_linear(self._weight(layer.weight), layer.bias, input)

    def _conv(self, layer: nn.Module, input: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return type(layer).forward(layer, input)
        return layer._conv_forward(input, self._weight(layer.weight), layer.bias)

    def __enter__(self) -> "SharedDequantBuffer":
        from optimum.quanto.nn import QLinear

        if self._active:
            raise RuntimeError("SharedDequantBuffer is already active")
        for layer in self.layers:
            run = self._linear if isinstance(layer, QLinear) else self._conv
            layer.forward = lambda input, layer=layer, run=run: run(layer, input)
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self._active = False
