"""Noise-schedule arithmetic shared by every sampler and guide.

Convention (VP and its generalisations): ``x_t = alpha * x0 + sigma * eps``. For a DDPM schedule
``alpha = sqrt(alpha_bar)``, ``sigma = sqrt(1 - alpha_bar)``; for a rectified-flow level ``s`` in [0, 1]
(diffusers' ``FlowMatchEulerDiscreteScheduler``) ``alpha = 1 - s``, ``sigma = s``. The scale-free "VE sigma"
``sigma / alpha`` is what k-diffusion calls sigma (``s / (1 - s)`` for flow: the same noise level as the VP
level of equal signal-to-noise ratio); ``x / alpha`` is its state.

Flow matching is one more prediction type, not a new world: the velocity ``v = eps - x0``
(``"flow_prediction"``, diffusers' name; alias ``"flow"``). Its converters hold for any ``(alpha, sigma)``,
so a state may be kept in VP scale or in the network's own flow scale (``x_flow = x_vp / (alpha + sigma)``)
with the same formulas; only the network's *input* needs the flow scale (:func:`network_input_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .base import Level

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
ALIASES = {"flow": "flow_prediction", "velocity": "flow_prediction"}


def check_prediction_type(prediction_type: str) -> str:
    """The canonical name of a prediction type (``"flow"`` -> ``"flow_prediction"``); ValueError otherwise."""
    prediction_type = ALIASES.get(prediction_type, prediction_type) if isinstance(prediction_type, str) else None
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} (or an alias in {sorted(ALIASES)}), "
                         f"got {prediction_type!r}")
    return prediction_type


def network_input_scale(alpha: Tensor | float, sigma: Tensor | float, prediction_type: str) -> Tensor | float:
    """Factor ``c_in`` that takes a state ``x = alpha x0 + sigma eps`` to the network's own input.

    A flow network reads ``(1 - s) x0 + s eps``, i.e. ``x / (alpha + sigma)`` (1 when the state is already in
    flow scale); the VP networks read the VP state as it is (1).
    """
    if check_prediction_type(prediction_type) == "flow_prediction":
        return 1 / (alpha + sigma)
    return 1.0


def to_x0(pred: Tensor, x: Tensor, alpha: Tensor | float, sigma: Tensor | float, prediction_type: str) -> Tensor:
    """Model output -> x0 estimate (Tweedie for epsilon; ``alpha x - sigma v`` for v on VP schedules)."""
    if prediction_type == "epsilon":
        return (x - sigma * pred) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * pred
    if prediction_type == "sample":
        return pred
    if prediction_type == "flow_prediction":
        return (x - sigma * pred) / (alpha + sigma)
    return to_x0(pred, x, alpha, sigma, check_prediction_type(prediction_type))


def to_eps(pred: Tensor, x: Tensor, alpha: Tensor | float, sigma: Tensor | float, prediction_type: str) -> Tensor:
    """Model output -> epsilon estimate."""
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return sigma * x + alpha * pred
    if prediction_type == "sample":
        return (x - alpha * pred) / sigma
    if prediction_type == "flow_prediction":
        return (x + alpha * pred) / (alpha + sigma)
    return to_eps(pred, x, alpha, sigma, check_prediction_type(prediction_type))


def from_x0(x0: Tensor, x: Tensor, alpha: Tensor | float, sigma: Tensor | float, prediction_type: str) -> Tensor:
    """x0 estimate -> model output of the given type (inverse of :func:`to_x0`; v assumes alpha^2+sigma^2=1)."""
    if prediction_type == "epsilon":
        return (x - alpha * x0) / sigma
    if prediction_type == "v_prediction":
        return (alpha * x - x0) / sigma
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow_prediction":
        return (x - (alpha + sigma) * x0) / sigma
    return from_x0(x0, x, alpha, sigma, check_prediction_type(prediction_type))


def alpha_sigma(alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
    """VP coefficients from a cumulative product of alphas."""
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


@dataclass(frozen=True)
class Plan:
    """The noise levels a sampler visits.

    ``timesteps[i]`` is what the network is told at step ``i``; ``sigmas`` holds ``num_steps + 1``
    VE sigmas (``sigma/alpha``): ``sigmas[i]`` at step ``i`` and ``sigmas[i + 1]`` the level it moves to
    (the last one is 0 for a sampler that ends on clean data, or the schedule's final level). The first one may
    be ``inf``: pure noise (``alpha = 0``), where a flow schedule starts. ``prediction_type`` is the network
    output the scheduler was configured for (``plan_from_scheduler`` fills it; ``None`` for a hand-made plan).
    """

    timesteps: Tensor
    sigmas: Tensor  # float64, length num_steps + 1
    prediction_type: str | None = None

    def __post_init__(self) -> None:
        if self.sigmas.ndim != 1 or self.timesteps.ndim != 1 or len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError("Plan needs 1-D timesteps (N) and sigmas (N + 1)")
        if len(self.timesteps) < 1:
            raise ValueError("Plan needs at least one step")
        if bool((self.sigmas[:-1] <= 0).any()) or bool((self.sigmas < 0).any()) or bool(self.sigmas.isnan().any()):
            raise ValueError("Plan sigmas must be positive (the last may be 0)")
        if bool(torch.isinf(self.sigmas[1:]).any()):
            raise ValueError("only the first Plan sigma may be inf (pure noise)")
        if self.prediction_type is not None:
            object.__setattr__(self, "prediction_type", check_prediction_type(self.prediction_type))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def alpha(self, i: int) -> Tensor:
        """VP alpha of level ``i`` (1 at sigma = 0, 0 at pure noise)."""
        return 1 / (1 + self.sigmas[i] ** 2).sqrt()

    def sigma_vp(self, i: int) -> Tensor:
        """VP sigma of level ``i`` (1 at pure noise, ``sigmas[i] = inf``)."""
        ve = self.sigmas[i]
        return torch.where(torch.isinf(ve), torch.ones_like(ve), ve / (1 + ve**2).sqrt())

    def starting_at(self, index: int) -> "Plan":
        """The same plan from step ``index`` on (e.g. past a pure-noise first level, or img2img's strength)."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_steps:
            raise ValueError(f"index must be an int in [0, {self.num_steps - 1}], got {index!r}")
        return Plan(self.timesteps[index:], self.sigmas[index:], self.prediction_type)


def _config(scheduler_or_config) -> tuple[str, dict]:
    """The class name and config of a scheduler, or of a config dict as saved (with its ``_class_name``)."""
    if isinstance(scheduler_or_config, dict):
        return str(scheduler_or_config.get("_class_name", "")), scheduler_or_config
    return type(scheduler_or_config).__name__, scheduler_or_config.config


def has_flow_sigmas(scheduler) -> bool:
    """Whether the scheduler's ``sigmas`` are rectified-flow levels ``s``: the FlowMatch* schedulers, or
    DPM-Solver / UniPC with ``use_flow_sigmas``. Takes a scheduler or a config dict as saved (``_class_name``)."""
    name, config = _config(scheduler)
    return name.startswith("FlowMatch") or bool(config.get("use_flow_sigmas", False))


def is_flow(scheduler) -> bool:
    """Whether the scheduler steps a rectified-flow network: flow sigmas, or ``prediction_type="flow_prediction"``.
    Takes a scheduler or a config dict as saved (``_class_name``)."""
    return has_flow_sigmas(scheduler) or _config(scheduler)[1].get("prediction_type") == "flow_prediction"


def scheduler_prediction_type(scheduler) -> str:
    """The network output a diffusers scheduler expects: its ``config.prediction_type``, or ``"flow_prediction"``
    for the FlowMatch* schedulers. ValueError when it cannot be read (never a silent default to epsilon)."""
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    if config is None or not callable(getattr(scheduler, "set_timesteps", None)):
        raise TypeError(f"scheduler must be a diffusers scheduler (with config and set_timesteps), got {name}")
    supported = (f"supported: the FlowMatch* schedulers, DPM-Solver / UniPC with use_flow_sigmas=True and "
                 f"prediction_type='flow_prediction', and schedulers with prediction_type in {PREDICTION_TYPES[:3]}")
    if name.startswith("EDM"):
        raise ValueError(f"{name} uses EDM preconditioning, which plans do not read; {supported}")
    flow = has_flow_sigmas(scheduler)
    default = "flow_prediction" if name.startswith("FlowMatch") else None
    prediction_type = config.get("prediction_type", default)
    if prediction_type not in PREDICTION_TYPES or flow != (prediction_type == "flow_prediction"):
        raise ValueError(f"cannot read the parametrisation of {name} (prediction_type={prediction_type!r}, "
                         f"flow sigmas: {flow}); {supported}")
    if config.get("invert_sigmas", False):
        raise ValueError(f"{name} with invert_sigmas=True (Mochi's reversed sigmas) is not supported; {supported}")
    return prediction_type


def plan_from_scheduler(scheduler, num_inference_steps: int | None, device: torch.device | str | None = None,
                        **set_timesteps_kwargs) -> Plan:
    """Read the noise levels a diffusers scheduler would visit with ``num_inference_steps`` steps.

    ``set_timesteps_kwargs`` go to ``scheduler.set_timesteps`` as a pipeline passes them: ``mu=`` for dynamic
    shifting (Flux, SD3.5), ``sigmas=`` for a custom list (then ``num_inference_steps`` may be ``None``).

    Flow schedulers (FlowMatch*, DPM-Solver / UniPC with ``use_flow_sigmas``) give flow levels ``s``; the plan
    holds the VE sigma of equal signal-to-noise ratio, ``s / (1 - s)`` (``inf`` at ``s = 1``, pure noise).
    Schedulers that keep ``sigmas`` (Euler, Euler-ancestral, DPM-Solver) give them directly; DDIM/DDPM-style
    schedulers give ``alphas_cumprod`` at each timestep and at DDIM's previous timestep
    (``t - T // N``, ``final_alpha_cumprod`` below 0) after the last one. Between listed timesteps the plan moves
    to the next *listed* level; diffusers' DDIM moves to ``t - T // N`` instead, which is the same level for its
    default "leading" spacing but not for "trailing"/"linspace" spacing when ``T % N != 0`` (there its
    trajectories and ours differ slightly, by ~1e-3 in alpha_bar). ``plan.prediction_type`` says what the
    network predicts (:func:`scheduler_prediction_type`).
    """
    custom = any(set_timesteps_kwargs.get(k) is not None for k in ("sigmas", "timesteps"))
    if not (num_inference_steps is None and custom) and (
            isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    prediction_type = scheduler_prediction_type(scheduler)
    scheduler.set_timesteps(num_inference_steps, device="cpu", **set_timesteps_kwargs)
    timesteps = scheduler.timesteps.clone()
    sigmas = getattr(scheduler, "sigmas", None)
    has_sigmas = sigmas is not None and len(sigmas) == len(timesteps) + 1
    name = type(scheduler).__name__
    if has_flow_sigmas(scheduler):
        if not has_sigmas:
            raise ValueError(f"{name} is a flow scheduler but keeps no sigmas (N + 1 flow levels) after "
                             "set_timesteps; supported: flow schedulers with scheduler.sigmas")
        s = torch.as_tensor(sigmas, dtype=torch.float64).clone()
        if bool(((s < 0) | (s > 1)).any()) or bool((s[:-1] <= s[1:]).any()):
            raise ValueError(f"{name}: flow sigmas must decrease within [0, 1], got {s.tolist()}")
        ve = torch.where(s == 1, torch.full_like(s, math.inf), s / (1 - s))
    elif has_sigmas:
        ve = torch.as_tensor(sigmas, dtype=torch.float64).clone()
    else:
        abar = scheduler.alphas_cumprod.to(torch.float64)
        final = getattr(scheduler, "final_alpha_cumprod", abar[0])
        final = torch.as_tensor(final, dtype=torch.float64)
        ratio = scheduler.config.num_train_timesteps // len(timesteps)
        levels = [abar[int(t)] for t in timesteps]
        prev = int(timesteps[-1]) - ratio
        levels.append(abar[prev] if prev >= 0 else final)
        ab = torch.stack(levels)
        ve = ((1 - ab) / ab).sqrt()
    return Plan(timesteps=timesteps.to(device) if device is not None else timesteps, sigmas=ve,
                prediction_type=prediction_type)


class ScheduleReader:
    """A diffusers scheduler read as noise levels, the one place that does it: flow or not, the level at a step, the
    flow level it steps to next, and the step it is at (runs that start part-way call ``set_begin_index``).

    Levels are computed in float64 from the scheduler's own ``sigmas`` (flow levels ``s``: ``alpha = 1 - s``,
    ``sigma = s``; VE sigmas: ``alpha_bar = 1 / (1 + sigma^2)``), or from ``alphas_cumprod`` at the timestep for
    schedulers that keep no sigma per step (DDIM, DDPM, PNDM), then cast to the latents' dtype.
    """

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.flow = is_flow(scheduler)

    @property
    def num_steps(self) -> int:
        return len(self.scheduler.timesteps)

    def begin_index(self) -> int:
        """The step a run starts at: the scheduler's ``begin_index`` (img2img, inpainting), else 0."""
        begin = getattr(self.scheduler, "begin_index", None)
        return 0 if begin is None else int(begin)

    def step_index(self, timestep) -> int:
        """The step the scheduler is at for ``timestep``: its ``step_index`` once it has stepped, else its begin
        index, else the timestep's position in its schedule (``index_for_timestep``)."""
        sched = self.scheduler
        if getattr(sched, "step_index", None) is not None:
            return int(sched.step_index)
        if getattr(sched, "begin_index", None) is not None:
            return int(sched.begin_index)
        return int(sched.index_for_timestep(torch.as_tensor(timestep)))

    def _sigmas(self):
        """The scheduler's sigmas when it keeps one per step (``num_steps + 1``), else None."""
        sigmas = getattr(self.scheduler, "sigmas", None)
        return sigmas if sigmas is not None and len(sigmas) == self.num_steps + 1 else None

    def level(self, timestep, index: int | None, device, dtype, *, step: int | None = None,
              num_steps: int | None = None) -> Level:
        """The level at network time ``timestep``, the scheduler's step ``index`` (None: :meth:`step_index`);
        ``step`` / ``num_steps`` (the level's own count) default to ``index`` / the schedule's length."""
        t = torch.as_tensor(timestep).flatten()[0]
        sigmas = self._sigmas()
        if sigmas is None and self.flow:
            found = getattr(self.scheduler, "sigmas", None)
            raise ValueError(f"{type(self.scheduler).__name__}: expected num_inference_steps + 1 sigmas, got "
                             f"{None if found is None else len(found)} for {self.num_steps} timesteps")
        if sigmas is not None:
            index = self.step_index(timestep) if index is None else index
            value = torch.as_tensor(sigmas[index], dtype=torch.float64)
            if self.flow:  # x_s = (1 - s) x0 + s eps
                alpha, sigma = 1 - value, value
            else:  # the VE sigma of a VP schedule
                alpha, sigma = alpha_sigma(1 / (1 + value**2))
        else:
            alpha, sigma = alpha_sigma(self.scheduler.alphas_cumprod[int(t.item())].to(torch.float64))
        return Level(t=t, alpha=alpha.to(device, dtype), sigma=sigma.to(device, dtype),
                     index=index if step is None else step, num_steps=self.num_steps if num_steps is None else num_steps)

    def next_level(self, level: Level, time_at: Callable[[Tensor, float, float], Tensor]) -> Level | None:
        """The flow level the scheduler steps to after ``level`` (from its float64 sigmas, not from ``level``'s
        alpha and sigma in the latents' dtype), its network time ``time_at(level.t, s, s_next)``; None on diffusion
        schedules and after the last step."""
        sigmas = getattr(self.scheduler, "sigmas", None)
        if not self.flow or sigmas is None or level.index + 1 >= len(sigmas):
            return None
        s, s_next = float(sigmas[level.index]), float(sigmas[level.index + 1])
        like = level.alpha
        return Level(t=time_at(level.t.to(torch.float64), s, s_next),
                     alpha=torch.as_tensor(1 - s_next, dtype=like.dtype, device=like.device),
                     sigma=torch.as_tensor(s_next, dtype=like.dtype, device=like.device), index=level.index + 1,
                     num_steps=level.num_steps)
