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
