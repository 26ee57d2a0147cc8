"""Turn a network + a guide into the denoiser callable the samplers run."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from diffguide.samplers.base import Denoised, Level
from diffguide.samplers.models import call_network
from diffguide.samplers.schedule import check_prediction_type

from .base import Guidance, Step, guided_checked

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]  # (x_t, t, cond) -> model output


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditions along the batch (tensors, dicts of tensors, or None)."""
    if a is None and b is None:
        return None
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    raise TypeError(f"conditions must be tensors or dicts of tensors, got {type(a).__name__}")


def take_rows(c: Any, rows: Tensor) -> Any:
    """Select batch rows of a condition (tensors, dicts of tensors, or None)."""
    if c is None:
        return None
    if isinstance(c, Tensor):
        return c[rows]
    if isinstance(c, dict):
        return {k: take_rows(v, rows) for k, v in c.items()}
    raise TypeError(f"conditions must be tensors or dicts of tensors, got {type(c).__name__}")


def cond_rows(c: Any) -> set[int]:
    """The batch sizes of a condition's tensors (tensors, dicts of tensors, or None)."""
    if isinstance(c, Tensor):
        return {c.shape[0] if c.ndim else -1}
    if isinstance(c, dict):
        return set().union(*(cond_rows(v) for v in c.values()))
    return set()


def check_cond_rows(name: str, c: Any, batch: int) -> None:
    """Every tensor of condition ``c`` has one row per sample: ``ValueError`` naming the counts otherwise."""
    rows = cond_rows(c)
    if rows and rows != {batch}:
        counts = ", ".join("a 0-d tensor" if r < 0 else str(r) for r in sorted(rows))
        raise ValueError(f"{name} has {counts} rows (labels / embeddings) but x has {batch} samples; "
                         "give one row per sample")


class GuidedDenoiser:
    """A sampler denoiser (``(x_t, Level) -> Denoised``) that evaluates cond/uncond in one batch and guides.

    Unconditional rows are evaluated only where ``guide.needs_uncond`` asks; ``rows`` counts network rows.
    With ``guide=None`` it is the plain conditional model. The guide is reset at the first evaluation of every run
    (once, also for samplers that evaluate twice within step 0).
    """

    def __init__(self, model_fn: ModelFn, guide: Guidance | None, cond: Any, uncond: Any = None,
                 prediction_type: str = "epsilon") -> None:
        if guide is not None and not isinstance(guide, Guidance):
            raise TypeError(f"guide must be a guidance.Guidance, got {type(guide).__name__}")
        if guide is not None and uncond is None:
            raise ValueError("a guide needs an unconditional condition (uncond); pass e.g. the null class")
        self.model_fn, self.guide, self.cond, self.uncond = model_fn, guide, cond, uncond
        self.prediction_type = check_prediction_type(prediction_type)
        self.rows = 0
        self.calls = 0
        self._last: tuple[int, float] | None = None   # (index, noise) of the previous guided call

    def _starts_run(self, level: Level) -> bool:
        """Step 0 of a new run: index 0 after another index, or at a noise level no lower than the previous call's
        (a two-stage sampler's second evaluation within step 0 is at a lower level and keeps the guide's state)."""
        noise = float(level.sigma.max()) if torch.is_tensor(level.sigma) else float(level.sigma)
        last, self._last = self._last, (level.index, noise)
        return level.index == 0 and (last is None or last[0] != 0 or noise >= last[1])

    def _eval(self, x: Tensor, level: Level, cond: Any) -> Tensor:
        """The network at VP state ``x`` (a flow network reads ``x / (alpha + sigma)``, ``samplers.call_network``)."""
        self.rows += x.shape[0]
        self.calls += 1
        return call_network(self.model_fn, x, level, cond, self.prediction_type)

    def __call__(self, x: Tensor, level: Level) -> Denoised:
        batch = x.shape[0]
        check_cond_rows("cond", self.cond, batch)
        check_cond_rows("uncond", self.uncond, batch)
        if self.guide is None:
            out = self._eval(x, level, self.cond)
            step = Step.at(level, x, out, None, self.prediction_type)
            x0 = step.x0(out)
            return Denoised(x0, x0)
        if self._starts_run(level):
            self.guide.reset()
        mask = self.guide.needs_uncond(level, batch).to(x.device)
        rows = mask.nonzero().squeeze(1)
        n_u = len(rows)
        out = self._eval(torch.cat([x[rows], x]), level, cat_cond(take_rows(self.uncond, rows), self.cond))
        pred_cond = out[n_u:]
        if n_u == batch:
            pred_uncond = out[:n_u]
        else:
            pred_uncond = pred_cond.clone()
            pred_uncond[rows] = out[:n_u]
        step = Step.at(level, x, pred_cond, pred_uncond, self.prediction_type, uncond_mask=mask, cond=self.cond,
                       uncond=self.uncond,
                       evaluate=lambda x_, c_, level_=None: self._eval(x_, level if level_ is None else level_, c_))
        guided = guided_checked(self.guide, step)
        return Denoised(step.x0(guided.denoise), step.x0(guided.renoise))
