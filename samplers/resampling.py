"""Resampling schemes for sequential Monte Carlo, and the effective sample size.

Every function reads unnormalised log-weights ``(..., N)``: the last dimension holds the particles of one
system, leading dimensions are independent systems (e.g. one per prompt). Arithmetic is float64.
Resamplers return ancestor indices ``(..., N)`` into the last dimension. References: Douc, Cappé & Moulines
(2005), "Comparison of resampling schemes for particle filtering"; Kitagawa (1996) for systematic resampling.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Resampler = Callable[[Tensor, "torch.Generator | None"], Tensor]


def _check(log_weights: Tensor) -> Tensor:
    if not isinstance(log_weights, Tensor) or not log_weights.is_floating_point():
        raise TypeError("log_weights must be a floating-point tensor")
    if log_weights.ndim < 1 or log_weights.shape[-1] < 1:
        raise ValueError(f"log_weights must have shape (..., N) with N >= 1, got {tuple(log_weights.shape)}")
    log_weights = log_weights.to(torch.float64)
    if bool(torch.isnan(log_weights).any()) or bool((log_weights == float("inf")).any()):
        raise ValueError("log_weights contain NaN or +inf")
    if bool((log_weights == float("-inf")).all(-1).any()):
        raise ValueError("every particle of a system has zero weight (all log_weights are -inf)")
    return log_weights


def normalize_log_weights(log_weights: Tensor) -> Tensor:
    """``log w_i - log sum_j w_j`` (float64): log-weights of the normalised weights."""
    log_weights = _check(log_weights)
    return log_weights - torch.logsumexp(log_weights, dim=-1, keepdim=True)


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """Kish's effective sample size ``ESS = (sum_i w_i)^2 / sum_i w_i^2`` in [1, N], float64, shape ``(...)``."""
    log_weights = _check(log_weights)
    return torch.exp(2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1))


def _inverse_cdf(log_weights: Tensor, positions: Tensor) -> Tensor:
    """Index ``j`` with ``cdf[j-1] <= u < cdf[j]`` for each position ``u`` in [0, 1)."""
    weights = torch.softmax(log_weights, dim=-1)
    cdf = weights.cumsum(-1)
    cdf = cdf / cdf[..., -1:]  # the last edge is exactly 1
    return torch.searchsorted(cdf, positions.contiguous(), right=True).clamp_(max=log_weights.shape[-1] - 1)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64).to(like.device)


def systematic_resample(log_weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Systematic resampling: one uniform ``u`` per system, positions ``(u + k) / N`` for ``k = 0..N-1``.

    Particle ``i`` is copied ``floor(N w_i)`` or ``ceil(N w_i)`` times (lowest variance of the classic schemes).
    """
    log_weights = _check(log_weights)
    n = log_weights.shape[-1]
    offset = _uniform((*log_weights.shape[:-1], 1), generator, log_weights)
    positions = (offset + torch.arange(n, dtype=torch.float64, device=log_weights.device)) / n
    return _inverse_cdf(log_weights, positions)


def stratified_resample(log_weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Stratified resampling: one uniform per stratum, positions ``(k + u_k) / N``."""
    log_weights = _check(log_weights)
    n = log_weights.shape[-1]
    offsets = _uniform(tuple(log_weights.shape), generator, log_weights)
    positions = (offsets + torch.arange(n, dtype=torch.float64, device=log_weights.device)) / n
    return _inverse_cdf(log_weights, positions)


def multinomial_resample(log_weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Multinomial resampling: ``N`` independent draws from the normalised weights."""
    log_weights = _check(log_weights)
    positions = _uniform(tuple(log_weights.shape), generator, log_weights)
    return _inverse_cdf(log_weights, positions)


RESAMPLERS: dict[str, Resampler] = {
    "systematic": systematic_resample,
    "stratified": stratified_resample,
    "multinomial": multinomial_resample,
}
