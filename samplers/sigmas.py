"""Plans from lists of noise levels: Karras, exponential and polyexponential schedules, or any decreasing list.

The builders return the VE sigmas of k-diffusion's ``get_sigmas_karras`` / ``get_sigmas_exponential`` /
``get_sigmas_polyexponential`` (``n`` levels and a final 0) as a :class:`SigmaPlan`: a ``Plan`` that also knows the
network timestep of *any* level, which the two-stage loops (Heun, DPM-2, DPM++ 2S / SDE) need between the listed
levels. The timestep follows the model's training table: a diffusers scheduler's ``alphas_cumprod`` (log-sigma
interpolation between integer timesteps, k-diffusion's ``DiscreteSchedule.sigma_to_t``), ``num_train_timesteps *
s / (1 + s)`` for a flow model (diffusers' FlowMatch timesteps ``1000 u`` at flow level ``u``), or the VE sigma
itself for a continuous VE model. ``kind="flow"`` reads the list as flow levels ``u`` in [0, 1] (``u = 1`` pure
noise), the schedule then spaced in ``u`` as diffusers' FlowMatch schedulers do with ``use_karras_sigmas``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .schedule import Plan, has_flow_sigmas, scheduler_prediction_type

TimestepFn = Callable[[Tensor], Tensor]
KINDS = ("ve", "flow")


@dataclass(frozen=True)
class SigmaPlan(Plan):
    """A ``Plan`` with ``timestep_fn``: VE sigma (float64 tensor, ``inf`` allowed) -> network timestep."""

    timestep_fn: TimestepFn | None = None

    def starting_at(self, index: int) -> "SigmaPlan":
        plan = Plan.starting_at(self, index)
        return SigmaPlan(plan.timesteps, plan.sigmas, plan.prediction_type, self.timestep_fn)


def timestep_at(plan: Plan, s: float, index: int) -> Tensor:
    """The network timestep of VE level ``s`` met during step ``index`` of ``plan``.

    A listed level gives its own timestep; a ``SigmaPlan`` maps any other level through its ``timestep_fn``; a plain
    ``Plan`` (``plan_from_scheduler``) interpolates its neighbouring listed levels: linearly in the flow level
    ``s / (1 + s)`` for a flow plan (exact for FlowMatch timesteps), in ``log s`` otherwise.
    """
    for k in (index, index + 1):
        if k < plan.num_steps and float(plan.sigmas[k]) == s:
            return plan.timesteps[k]
    fn = getattr(plan, "timestep_fn", None)
    if fn is not None:
        return fn(torch.tensor(s, dtype=torch.float64)).to(plan.timesteps.dtype)
    sig, ts = plan.sigmas[: plan.num_steps], plan.timesteps.to(torch.float64)
    if plan.prediction_type == "flow_prediction":
        key, ref = s / (1 + s), torch.where(torch.isinf(sig), torch.ones_like(sig), sig / (1 + sig))
        key_ref = torch.cat([ref, torch.zeros(1, dtype=torch.float64)])  # u = 0 at t = 0
        t_ref = torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
    else:
        finite = torch.isfinite(sig)
        key, key_ref, t_ref = math.log(s), sig[finite].log(), ts[finite]
    if len(key_ref) == 1:
        return t_ref[0].to(plan.timesteps.dtype)
    j = int(torch.searchsorted(-key_ref, torch.tensor(-key, dtype=torch.float64)).clamp(1, len(key_ref) - 1))
    w = (key - key_ref[j - 1]) / (key_ref[j] - key_ref[j - 1])
    return (t_ref[j - 1] + w * (t_ref[j] - t_ref[j - 1])).to(plan.timesteps.dtype)


def _table_timestep_fn(scheduler) -> tuple[TimestepFn, str]:
    prediction_type = scheduler_prediction_type(scheduler)
    steps = int(scheduler.config.num_train_timesteps)
    if has_flow_sigmas(scheduler):
        return (lambda s: torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s)) * steps), prediction_type
    abar = scheduler.alphas_cumprod.to(torch.float64)
    log_sigmas = ((1 - abar) / abar).sqrt().log()  # increasing with t

    def fn(s: Tensor) -> Tensor:  # k-diffusion's DiscreteSchedule.sigma_to_t (log-sigma interpolation)
        log_s = s.log().clamp(log_sigmas[0], log_sigmas[-1])
        low = int((torch.searchsorted(log_sigmas, log_s, right=True) - 1).clamp(0, len(log_sigmas) - 2))
        w = (log_sigmas[low] - log_s) / (log_sigmas[low] - log_sigmas[low + 1])
        return (1 - w) * low + w * (low + 1)

    return fn, prediction_type


def plan_from_sigmas(sigmas: Sequence[float] | Tensor, *, kind: str = "ve", scheduler=None,
                     timestep_fn: TimestepFn | None = None, prediction_type: str | None = None) -> SigmaPlan:
    """A plan through ``sigmas``: the ``N + 1`` levels of ``N`` steps, strictly decreasing (the last may be 0).

    ``kind="ve"``: VE sigmas (k-diffusion's); ``kind="flow"``: flow levels ``u`` in [0, 1] (the first may be 1, pure
    noise). Timesteps: ``timestep_fn`` (VE sigma -> timestep) if given, else the ``scheduler``'s training table (and its
    ``prediction_type``), else ``1000 u`` for ``kind="flow"`` and the VE sigma itself for ``kind="ve"``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    levels = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().clone()
    if levels.ndim != 1 or len(levels) < 2:
        raise ValueError(f"sigmas must be a 1-D list of at least 2 levels (N + 1 for N steps), got shape "
                         f"{tuple(levels.shape)}")
    if bool(levels.isnan().any()) or bool((levels[:-1] <= levels[1:]).any()) or float(levels[-1]) < 0:
        raise ValueError(f"sigmas must decrease strictly to a last level >= 0, got {levels.tolist()}")
    if kind == "flow":
        if float(levels[0]) > 1:
            raise ValueError(f"flow levels must lie in [0, 1], got {levels.tolist()}")
        ve = torch.where(levels == 1, torch.full_like(levels, math.inf), levels / (1 - levels))
    else:
        if math.isinf(float(levels[0])):
            raise ValueError("VE sigmas must be finite (a pure-noise first level is kind='flow' with u = 1)")
        ve = levels
    if timestep_fn is None and scheduler is not None:
        timestep_fn, read_type = _table_timestep_fn(scheduler)
        prediction_type = read_type if prediction_type is None else prediction_type
    if timestep_fn is None:
        timestep_fn = (lambda s: torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s)) * 1000.0) \
            if kind == "flow" else (lambda s: s)
    if not callable(timestep_fn):
        raise TypeError(f"timestep_fn must be callable, got {type(timestep_fn).__name__}")
    timesteps = torch.stack([torch.as_tensor(timestep_fn(s), dtype=torch.float64).reshape(()) for s in ve[:-1]])
    return SigmaPlan(timesteps.to(torch.float32), ve, prediction_type, timestep_fn)


def _check_range(n: int, sigma_min: float, sigma_max: float, kind: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not (isinstance(sigma_min, (int, float)) and isinstance(sigma_max, (int, float))) \
            or not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    if kind == "flow" and sigma_max > 1:
        raise ValueError(f"flow levels lie in (0, 1]: sigma_max must be <= 1, got {sigma_max}")


def karras_plan(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *, kind: str = "ve",
                **plan_kwargs) -> SigmaPlan:
    """Karras et al. (2022) Eq. 5: ``(sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    ``n`` levels and a final 0. ``plan_kwargs`` go to :func:`plan_from_sigmas` (``scheduler=``, ``timestep_fn=``)."""
    _check_range(n, sigma_min, sigma_max, kind)
    if not isinstance(rho, (int, float)) or not rho > 0:
        raise ValueError(f"rho must be positive, got {rho!r}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])
    return plan_from_sigmas(sigmas, kind=kind, **plan_kwargs)


def exponential_plan(n: int, sigma_min: float, sigma_max: float, *, kind: str = "ve", **plan_kwargs) -> SigmaPlan:
    """``n`` levels evenly spaced in ``log sigma`` from ``sigma_max`` to ``sigma_min``, and a final 0."""
    _check_range(n, sigma_min, sigma_max, kind)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return plan_from_sigmas(torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]), kind=kind, **plan_kwargs)


def polyexponential_plan(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, *, kind: str = "ve",
                         **plan_kwargs) -> SigmaPlan:
    """``log sigma`` a polynomial of degree ``rho`` in the ramp: ``exp(r^rho (log sigma_max - log sigma_min) +
    log sigma_min)``, ``r`` from 1 to 0 (``rho = 1``: the exponential schedule), and a final 0."""
    _check_range(n, sigma_min, sigma_max, kind)
    if not isinstance(rho, (int, float)) or not rho > 0:
        raise ValueError(f"rho must be positive, got {rho!r}")
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return plan_from_sigmas(torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]), kind=kind, **plan_kwargs)
