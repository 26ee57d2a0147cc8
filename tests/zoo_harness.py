"""What every tiny zoo build is checked for: ``apply(pipe, native_guide)`` reproduces the native call bit for bit,
with the same network rows per call (counted inside the network, whichever it is).

A build module (``tests/tiny_zoo*.py``) exports ``BUILDS: dict[str, (builder, call)]``: ``builder()`` returns a
tiny random-weight pipeline (progress bar off), ``call(s)`` the ``__call__`` arguments of a native CFG run at scale
``s`` (batch 1, a few steps, latents out, prompt embeddings passed directly where a tokenizer is not offline).
``benchmarks/support_matrix.py`` reads every such module.
"""

from __future__ import annotations

import glob
import importlib
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from diffguide import guidance
from diffguide.guidance.families import family_of, native_guide

Builds = dict[str, tuple[Callable[[], object], Callable[[float], dict]]]


def build_modules() -> list[str]:
    """Names of the build modules, ``tiny_zoo`` first."""
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted((os.path.basename(p)[:-3] for p in glob.glob(os.path.join(here, "tiny_zoo*.py"))),
                  key=lambda n: (n != "tiny_zoo", n))


def all_builds() -> Builds:
    builds: Builds = {}
    for name in build_modules():
        builds.update(importlib.import_module(name).BUILDS)
    return builds


def output_latents(out) -> torch.Tensor:
    """The latents of a pipeline output (``output_type="latent"``): tuple, ``images``, ``frames`` or ``audios``;
    LDM3D's ``rgb`` and ``depth`` (it has no latent output) flattened side by side."""
    if isinstance(out, tuple):
        return torch.as_tensor(out[0])
    if getattr(out, "rgb", None) is not None:
        return torch.cat([torch.as_tensor(out.rgb).flatten(1), torch.as_tensor(out.depth).flatten(1)], 1)
    for attr in ("images", "frames", "audios", "videos"):
        if getattr(out, attr, None) is not None:
            return torch.as_tensor(getattr(out, attr))
    raise TypeError(f"no latents in {type(out).__name__}")


@contextmanager
def counting_rows(pipe) -> Iterator[list[int]]:
    """The batch of every pass through the pipeline's denoising network(s) (``Family.networks``), in order,
    counted inside the network: at the first of its layers a pass calls (with a batched tensor or a list first),
    so rows that apply skips or adds show (a hook on the network itself sees only the pipeline's call)."""
    family = family_of(pipe)
    layers = {id(child): name for name in family.networks if getattr(pipe, name, None) is not None
              for child in getattr(pipe, name).children()}
    first: dict[str, int] = {}  # network -> id of the first layer its passes call
    rows: list[int] = []

    def count(module, args):
        network = layers.get(id(module))
        if network is None or not args:
            return
        value = args[0]
        if isinstance(value, (list, tuple)):
            size = len(value)
        elif isinstance(value, torch.Tensor) and value.ndim >= 1:
            size = int(value.shape[0])
        else:
            return
        if first.setdefault(network, id(module)) == id(module):
            rows.append(size)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        yield rows
    finally:
        handle.remove()


def run(pipe, kwargs: dict, guide=None) -> tuple[torch.Tensor, list[int]]:
    """Latents and network rows of one call, natively (``guide`` None) or under ``apply(pipe, guide)``."""
    kwargs = dict(kwargs, generator=torch.Generator().manual_seed(0))
    with counting_rows(pipe) as rows:
        if guide is None:
            return output_latents(pipe(**kwargs)), rows
        with guidance.apply(pipe, guide):
            return output_latents(pipe(**kwargs)), rows


def assert_native_reproduced(pipe, call: Callable[[float], dict], scale: float = 3.0) -> None:
    """``apply(pipe, native_guide)`` equals the native call bit for bit (to float32 rounding where the family's
    native expression is not CFG's, ``Family.native_exact``), with the same rows in every network call."""
    family = family_of(pipe)
    native, native_rows = run(pipe, call(scale))
    guided, rows = run(pipe, call(scale), native_guide(family, scale))
    assert sum(native_rows) > 0 and rows == native_rows, (rows, native_rows)
    assert guided.shape == native.shape and torch.isfinite(native).all()
    if family.native_exact:
        assert torch.equal(guided, native), float((guided - native).abs().max())
    else:
        torch.testing.assert_close(guided, native, rtol=1e-5, atol=1e-5)


def assert_build_reproduces_native(builds: Builds, name: str, scale: float = 3.0) -> None:
    """Build ``builds[name]`` (keyed by its class name) and check it with :func:`assert_native_reproduced`."""
    make, call = builds[name]
    pipe = make()
    assert type(pipe).__name__ == name
    assert_native_reproduced(pipe, call, scale)
