"""Noise samplers for the ancestral and SDE loops: ``noise(s, s_next) -> z ~ N(0, I)`` for the step between VE levels.

A loop asks for the noise of the step from ``s`` to ``s_next`` (k-diffusion's ``noise_sampler(sigma, sigma_next)``).
:class:`GaussianNoise` draws fresh normals; :class:`BrownianTreeNoise` returns the normalised increment of a
Brownian motion over ``[s_next, s]`` (torchsde's ``BrownianTree``, as k-diffusion's ``BrownianTreeNoiseSampler``), so
a coarse and a fine plan see the same Brownian path and an SDE sampler converges as its steps grow. Both take one
seed (or generator) per image, so an image's noise does not depend on the batch it is sampled in.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

NoiseSampler = Callable[[float, float], Tensor]


def flow_time(s: Tensor | float) -> Tensor:
    """``s / (1 + s)``: the flow level of VE sigma ``s`` (1 at pure noise), a finite Brownian time for every plan."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s))


class GaussianNoise:
    """Fresh ``N(0, I)`` draws shaped like ``x``: from one generator, or row ``b`` from ``generators[b]``."""

    def __init__(self, x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> None:
        if isinstance(generator, (list, tuple)):
            if len(generator) != x.shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        self.shape, self.dtype, self.device, self.generator = x.shape, x.dtype, x.device, generator

    def _draw(self, shape, generator) -> Tensor:
        device = self.device if generator is None else generator.device
        return torch.randn(shape, generator=generator, device=device, dtype=self.dtype).to(self.device)

    def __call__(self, s: float, s_next: float) -> Tensor:
        if isinstance(self.generator, (list, tuple)):
            return torch.stack([self._draw(self.shape[1:], g) for g in self.generator])
        return self._draw(self.shape, self.generator)


class BrownianTreeNoise:
    """``(W(t(s)) - W(t(s_next))) / sqrt(|t(s) - t(s_next)|)`` of a Brownian motion over ``[t(sigma_min), t(sigma_max)]``.

    ``seed``: one int (one tree for the batch) or one int per image (one tree per row: batch-independent).
    ``transform``: the Brownian time of a VE sigma, the identity by default (k-diffusion's); :func:`flow_time` when
    ``sigma_max`` is ``inf`` (a flow plan's pure-noise level). The increments of disjoint steps are independent
    N(0, I) and a step split in two sees the same path (Brownian bridge), whatever the plan.
    """

    def __init__(self, x: Tensor, sigma_min: float, sigma_max: float, seed: int | Sequence[int],
                 transform: Callable[[Tensor], Tensor] | None = None) -> None:
        import torchsde

        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        if not 0 < sigma_min < sigma_max or math.isnan(sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if transform is None:
            transform = flow_time if math.isinf(sigma_max) else (lambda s: torch.as_tensor(s, dtype=torch.float64))
        self.transform = transform
        t0, t1 = (torch.as_tensor(transform(torch.as_tensor(v, dtype=torch.float64)), dtype=x.dtype, device=x.device)
                  for v in (sigma_min, sigma_max))
        if not bool(torch.isfinite(t1)) or not t0 < t1:
            raise ValueError("transform must map [sigma_min, sigma_max] to a finite increasing interval")
        self.batched = isinstance(seed, (list, tuple))
        seeds = list(seed) if self.batched else [seed]
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {x.shape[0]}")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise TypeError("seed must be an int or a list of ints")
        w0 = torch.zeros_like(x[0] if self.batched else x)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]
        self.t0, self.t1 = t0, t1

    def __call__(self, s: float, s_next: float) -> Tensor:
        a, b = (torch.as_tensor(self.transform(torch.as_tensor(v, dtype=torch.float64)),
                                dtype=self.t0.dtype, device=self.t0.device).clamp(self.t0, self.t1) for v in (s, s_next))
        lo, hi = (a, b) if a < b else (b, a)
        sign = 1.0 if a < b else -1.0
        with warnings.catch_warnings():     # torchsde rounds the tree's ends and clamps a query 1 ulp outside them
            warnings.filterwarnings("ignore", message="Should have t[ab]", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return (w if self.batched else w[0]) / (hi - lo).sqrt()


def default_noise(x: Tensor, plan_sigmas: Tensor, noise_sampler: NoiseSampler | None,
                  generator: torch.Generator | Sequence[torch.Generator] | None, brownian: bool) -> NoiseSampler:
    """The loops' noise: ``noise_sampler`` if given, else a Brownian tree (SDE loops; seeded from ``generator``, one
    tree per image for a list of generators) or Gaussian draws from ``generator`` (ancestral loops)."""
    if noise_sampler is not None:
        if not callable(noise_sampler):
            raise TypeError(f"noise_sampler must be callable (s, s_next) -> Tensor, got {type(noise_sampler).__name__}")
        return noise_sampler
    positive = plan_sigmas[plan_sigmas > 0]
    if not brownian or float(positive.min()) == float(positive.max()):   # one positive level: no SDE noise is drawn
        return GaussianNoise(x, generator)

    def draw_seed(g):
        return int(torch.randint(0, 2**63 - 1, (), generator=g, device="cpu" if g is None else g.device))

    seed = [draw_seed(g) for g in generator] if isinstance(generator, (list, tuple)) else draw_seed(generator)
    return BrownianTreeNoise(x, float(positive.min()), float(positive.max()), seed)
