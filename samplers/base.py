"""What a sampler hands a denoiser, and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Union

from torch import Tensor


@dataclass(frozen=True)
class Level:
    """One noise level of a sampling run: ``x_t = alpha * x0 + sigma * eps`` at network time ``t``."""

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    index: int
    num_steps: int


class Denoised(NamedTuple):
    """Two x0 estimates: ``x0`` for the data term, ``x0_renoise`` for the noise direction.

    They coincide for every guide but CFG++-style ones, which renoise with the unconditional branch.
    """

    x0: Tensor
    x0_renoise: Tensor


# A sampler's model: VP state x_t at a level -> x0 estimate (or both estimates).
DenoiseFn = Callable[[Tensor, Level], Union[Tensor, Denoised]]


def as_denoised(out: Tensor | Denoised) -> Denoised:
    if isinstance(out, Denoised):
        return out
    return Denoised(out, out)


BLOWUP_RATIO = 100.0  # a guided prediction this many times the norm of the unguided one has left the data


def norm_ratio(guided: Tensor, reference: Tensor) -> float:
    """``||guided|| / ||reference||`` over the whole batch: two reductions, cheap enough to watch every step for
    a guide that blows the prediction up. One exploding sample dominates the batch's norm; a single sample
    that happens to sit near the origin (a small reference) does not trip it."""
    return float(guided.detach().float().norm() / reference.detach().float().norm().clamp_min(1e-12))
