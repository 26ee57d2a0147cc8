"""Reference densities of Gaussian mixtures to judge samples against: sliced Wasserstein distances to a mixture
(exact projected quantiles) and densities tabulated on a grid (annealed ``p^beta`` and CFG's geometric
``p_c^w p_u^(1-w)`` targets, which have no closed form)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .mixture import GaussianMixture


def _projected_quantiles(mixture: GaussianMixture, dirs: Tensor, levels: Tensor, iters: int = 200) -> Tensor:
    """Quantiles (L, n) of the 1-D mixtures ``u^T x0`` for unit directions ``dirs`` (L, d), by bisection."""
    means = mixture.means @ dirs.T  # (K, L)
    stds = torch.einsum("ld,kde,le->kl", dirs, mixture.covs, dirs).sqrt()
    lo = (means - 40 * stds).min(0).values[:, None].expand(-1, len(levels)).clone()
    hi = (means + 40 * stds).max(0).values[:, None].expand(-1, len(levels)).clone()
    root2 = math.sqrt(2)
    for _ in range(iters):
        mid = (lo + hi) / 2
        z = (mid[..., None] - means.T[:, None, :]) / stds.T[:, None, :]  # (L, n, K)
        below = (mixture.weights * 0.5 * torch.erfc(-z / root2)).sum(-1) < levels
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        if bool(((hi - lo) <= 4 * torch.finfo(mixture.dtype).eps * (1 + mid.abs())).all()):
            break
    return (lo + hi) / 2


class SlicedWasserstein:
    """Sliced 2-Wasserstein distance from samples to a fixed mixture, over fixed random directions.

    ``SW2 = sqrt(mean_u W2^2(u^T samples, u^T x0))`` over ``num_directions`` unit directions; each 1-D W2 pairs
    the sorted projections with the mixture's exact quantiles at ``(i + 1/2) / n`` (cached per sample size).
    Exact draws give ``O(n^{-1/2})``: compare against that floor.
    """

    def __init__(self, mixture: GaussianMixture, num_directions: int = 128,
                 generator: torch.Generator | None = None) -> None:
        if not isinstance(num_directions, int) or num_directions < 1:
            raise ValueError(f"num_directions must be a positive int, got {num_directions!r}")
        self.mixture = mixture
        device = generator.device if generator is not None else mixture.device
        dirs = torch.randn(num_directions, mixture.dim, generator=generator, device=device, dtype=mixture.dtype)
        self.directions = (dirs / dirs.norm(dim=1, keepdim=True)).to(mixture.device)
        self._quantiles: dict[int, Tensor] = {}

    def __call__(self, samples: Tensor) -> Tensor:
        if samples.ndim != 2 or samples.shape[1] != self.mixture.dim:
            raise ValueError(f"samples must have shape (n, {self.mixture.dim}), got {tuple(samples.shape)}")
        n = samples.shape[0]
        if n not in self._quantiles:
            levels = (torch.arange(n, dtype=self.mixture.dtype, device=self.mixture.device) + 0.5) / n
            self._quantiles[n] = _projected_quantiles(self.mixture, self.directions, levels)
        proj = torch.sort(samples.to(self.mixture.dtype) @ self.directions.T, dim=0).values.T  # (L, n)
        return ((proj - self._quantiles[n]) ** 2).mean().sqrt()


def sliced_wasserstein(samples: Tensor, mixture: GaussianMixture, num_directions: int = 128,
                       generator: torch.Generator | None = None) -> Tensor:
    """One-off :class:`SlicedWasserstein` distance between ``samples`` (n, d) and ``mixture``."""
    return SlicedWasserstein(mixture, num_directions, generator)(samples)


# --------------------------------------------------------------------------------------------------------
# grid quadrature references for targets without a closed form (d <= 2)
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridDensity:
    """A density discretised on a uniform grid: cell centres ``points`` (P, d) and cell masses ``probs`` (P,)."""

    points: Tensor
    probs: Tensor
    spacing: Tensor  # (d,)

    def expect(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``E[fn(x)]`` by the midpoint rule; ``fn`` maps (P, d) to (P, ...)."""
        values = fn(self.points)
        return torch.tensordot(self.probs, values, dims=1)

    def mean(self) -> Tensor:
        return self.probs @ self.points

    def cov(self) -> Tensor:
        centred = self.points - self.mean()
        return (self.probs[:, None] * centred).T @ centred

    def mode_masses(self, mixture: GaussianMixture) -> Tensor:
        """``E[r_k(x)]`` under this density, with ``r_k`` the clean responsibilities of ``mixture`` (K,).

        The matching sample estimate is ``mixture.responsibilities(samples).mean(0)``.
        """
        return self.probs @ mixture.responsibilities(self.points)

    def cdf(self, x: Tensor) -> Tensor:
        """CDF of a 1-D grid density (piecewise linear within cells)."""
        if self.points.shape[1] != 1:
            raise ValueError("cdf is defined for 1-D grids")
        x = torch.as_tensor(x, dtype=self.points.dtype, device=self.points.device)
        h = self.spacing[0]
        edges = torch.cat([self.points[:, 0] - h / 2, self.points[-1:, 0] + h / 2])
        cum = torch.cat([self.probs.new_zeros(1), self.probs.cumsum(0)])
        pos = ((x - edges[0]) / h).clamp(0, len(self.probs))
        lo = pos.floor().long().clamp(max=len(self.probs) - 1)
        frac = pos - lo
        return cum[lo] + frac * (cum[lo + 1] - cum[lo])


def grid_density(log_density: Callable[[Tensor], Tensor], lows: Sequence[float], highs: Sequence[float],
                 num_points: int | Sequence[int] = 2001, edge_tol: float = 1e-12,
                 dtype: torch.dtype = torch.float64) -> GridDensity:
    """Normalise an unnormalised ``log_density`` ((P, d) -> (P,)) on a uniform grid over a box (d <= 2).

    Raises ValueError when the boundary cells carry more than ``edge_tol`` of the peak density: the box is too
    small or the target is not normalisable.
    """
    d = len(lows)
    if d not in (1, 2) or len(highs) != d:
        raise ValueError("grid_density supports 1-D and 2-D boxes: lows and highs of length 1 or 2")
    counts = [num_points] * d if isinstance(num_points, int) else list(num_points)
    if len(counts) != d or any(n < 3 for n in counts):
        raise ValueError("num_points must be >= 3 per dimension")
    if any(hi <= lo for lo, hi in zip(lows, highs)):
        raise ValueError("highs must exceed lows")
    spacing = torch.tensor([(hi - lo) / n for lo, hi, n in zip(lows, highs, counts)], dtype=dtype)
    axes = [lo + (torch.arange(n, dtype=dtype) + 0.5) * h for lo, n, h in zip(lows, counts, spacing)]
    mesh = torch.meshgrid(*axes, indexing="ij")
    points = torch.stack([m.reshape(-1) for m in mesh], dim=-1)
    log_p = log_density(points).reshape(*counts)
    if not torch.isfinite(log_p).any():
        raise ValueError("log_density is not finite anywhere on the grid")
    log_p = log_p - log_p.max()
    edge = torch.cat([log_p.select(i, j).reshape(-1) for i in range(d) for j in (0, -1)])
    if float(edge.max().exp()) > edge_tol:
        raise ValueError("the density does not vanish at the box boundary: widen lows/highs, or the target "
                         "is not normalisable")
    probs = torch.softmax(log_p.reshape(-1), dim=0)
    return GridDensity(points, probs, spacing)


def _box(mixtures: Sequence[GaussianMixture], widen: float) -> tuple[list[float], list[float]]:
    lows, highs = [], []
    for i in range(mixtures[0].dim):
        lo = min(float((m.means[:, i] - widen * m.covs[:, i, i].sqrt()).min()) for m in mixtures)
        hi = max(float((m.means[:, i] + widen * m.covs[:, i, i].sqrt()).max()) for m in mixtures)
        lows.append(lo)
        highs.append(hi)
    return lows, highs


def annealed_grid(mixture: GaussianMixture, beta: float, num_points: int | Sequence[int] | None = None,
                  widen: float = 10.0) -> GridDensity:
    """Grid reference for ``p^beta`` of a 1-D/2-D mixture (use ``mixture.noised(a, s)`` for ``p_t^beta``)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    lows, highs = _box([mixture], widen / math.sqrt(min(beta, 1.0)))
    n = num_points or (4001 if mixture.dim == 1 else 401)
    return grid_density(lambda x: beta * mixture.log_prob(x), lows, highs, n)


def geometric_grid(cond: GaussianMixture, uncond: GaussianMixture, weight: float,
                   num_points: int | Sequence[int] | None = None, widen: float = 10.0) -> GridDensity:
    """Grid reference for the CFG target ``p_c^w p_u^(1-w)`` of 1-D/2-D mixtures."""
    if cond.dim != uncond.dim:
        raise ValueError("cond and uncond must have the same dimension")
    lows, highs = _box([cond, uncond], widen)
    n = num_points or (4001 if cond.dim == 1 else 401)
    return grid_density(lambda x: weight * cond.log_prob(x) + (1 - weight) * uncond.log_prob(x), lows, highs, n)
