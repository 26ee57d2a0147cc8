"""The network side of ``apply``: one hooked denoising network, its calls bound to its signature, and rows of any
(nested) per-row argument selected, joined or replaced.

Knows nothing of CFG layouts or guides: :mod:`.layouts` says which rows are which branch, :mod:`.session` counts.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable

import torch
from torch import Tensor


class Network:
    """One hooked network: its original forward, the signature calls are bound to, and counted calls.

    ``forward`` replaces the module's own on the instance and hands every call to ``on_call(network, arguments)``;
    ``run`` calls the original forward and tells ``count(rows)``.
    """

    def __init__(self, module: torch.nn.Module, on_call: Callable[["Network", dict], Any],
                 count: Callable[[int], None]) -> None:
        self.module, self.on_call, self.count = module, on_call, count
        self.orig_forward = module.forward
        # a torch.compile'd module's forward takes (*args, **kwargs): bind to the wrapped module's own signature
        self.signature = inspect.signature(getattr(module, "_orig_mod", module).forward)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return dict(self.signature.bind(*args, **kwargs).arguments)

    def run(self, arguments: dict[str, Any], rows: int) -> Any:
        call = inspect.BoundArguments(self.signature, arguments)
        self.count(rows)
        return self.orig_forward(*call.args, **call.kwargs)

    def forward(self, *args, **kwargs):
        return self.on_call(self, self.bind(args, kwargs))


def select_rows(value: Any, rows: Tensor, full: int, lists: bool = False) -> Any:
    """Select batch rows of every tensor (in nested dicts/lists) whose first dim is the CFG batch ``full``; with
    ``lists``, also the items of lists of ``full`` per-sample entries (Z-Image's list batches)."""
    if isinstance(value, Tensor):
        return value[rows] if value.ndim > 0 and value.shape[0] == full else value
    if isinstance(value, dict):
        return {k: select_rows(v, rows, full, lists) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if lists and len(value) == full:
            return type(value)(value[i] for i in rows.tolist())
        return type(value)(select_rows(v, rows, full, lists) for v in value)
    return value


def prediction_of(out: Any) -> Any:
    """The prediction in a network output (a tuple's first item or the output object's ``sample``)."""
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def with_prediction(out: Any, prediction: Any) -> Any:
    """The network output ``out`` with its prediction replaced (tuple or output object alike)."""
    if isinstance(out, tuple):
        return (prediction,) + tuple(out[1:])
    out = copy.copy(out)
    out.sample = prediction
    return out


def flatten(value: Any, prefix: str, out: dict[str, Any], whole: int | None = None) -> None:
    """``value`` into ``out`` by dotted path: nested dicts by key, lists and tuples by index (IP-adapter embeddings
    are a list inside ``added_cond_kwargs``), except the per-sample lists of ``whole`` items (Z-Image's batches)."""
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(item, f"{prefix}.{key}", out, whole)
    elif isinstance(value, (list, tuple)) and len(value) != whole:
        for i, item in enumerate(value):
            flatten(item, f"{prefix}.{i}", out, whole)
    else:
        out[prefix] = value


def _replace(node: Any, keys: list[str], value: Any) -> Any:
    """A copy of ``node`` with the item at the dotted path ``keys`` replaced by ``value``."""
    if not keys:
        return value
    if isinstance(node, dict):
        return {**node, keys[0]: _replace(node[keys[0]], keys[1:], value)}
    items = list(node)
    items[int(keys[0])] = _replace(items[int(keys[0])], keys[1:], value)
    return type(node)(items)


def assemble(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``template`` (a call's bound arguments) with the inputs at the dotted paths of ``values`` replaced."""
    arguments = dict(template)
    for path, value in values.items():
        name, *keys = path.split(".")
        arguments[name] = _replace(arguments[name], keys, value)
    return arguments


def join_batches(parts: list) -> Any:
    """Batches of one network input joined along the batch: tensors concatenated, per-sample lists chained."""
    return [item for part in parts for item in part] if isinstance(parts[0], list) else torch.cat(parts)


class Branch:
    """The network arguments of one CFG branch's rows (``step.uncond`` under apply): ``step.evaluate(x, branch)``
    runs the network on all of them (the latent and, at another level, the time replaced). Selected from the
    call's batch only when first read, so steps whose guide takes no extra pass copy nothing."""

    def __init__(self, select: Callable[[], dict]) -> None:
        self._select, self._arguments = select, None

    @property
    def arguments(self) -> dict:
        if self._arguments is None:
            self._arguments = self._select()
        return self._arguments

    def __repr__(self) -> str:
        return "Branch(...)"
