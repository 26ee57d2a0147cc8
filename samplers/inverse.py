"""One reverse-diffusion loop for measurement-guided solvers (DPS, MCG, EnKG, PSLD, P2L).

Each step ``i`` runs, on the VP state ``x_t = alpha x0 + sigma eps``:

1. ``x = solver.prepare(model, x, plan, i)`` — work before the denoiser call (EnKG's ensemble Kalman
   update, P2L's prompt tuning); identity for gradient-only solvers.
2. ``x0_hat = model(x, level)`` (with a graph to ``x`` if ``solver.needs_grad``) and the DDIM(eta) move
   to level ``i + 1`` (Song et al. 2021, Eq. 12; ``eta = 1`` is DDPM's ancestral step).
3. ``x_next = solver.correct(transition)`` — the data-consistency step (DPS gradient, MCG projection).

The solver is duck-typed, so this module knows nothing of operators or measurements. The DDIM move never
divides by alpha, so a flow plan's pure-noise first level (alpha = 0) is taken exactly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor
from tqdm.auto import trange

from .base import BLOWUP_RATIO, DenoiseFn, Level, as_denoised, norm_ratio
from .schedule import Plan


@dataclass
class SolverStats:
    """Work done by one solve, counted in per-sample evaluations (one batch of B rows counts B)."""

    denoiser_calls: int = 0
    gradient_calls: int = 0        # backward passes through the denoiser (or decoder / text embedding)
    forward_model_calls: int = 0   # evaluations of the forward operator A

    def per_sample(self, num_samples: int) -> dict[str, float]:
        return {k: v / num_samples for k, v in vars(self).items()}


@dataclass
class Transition:
    """One DDIM move ``x (level) -> x_next (alpha_next, sigma_next)`` with the ``x0_hat`` it used.

    ``x`` carries a graph to ``x0_hat``, ``eps_hat`` and ``x_next`` when the solver asked for gradients.
    ``x0_weight = d x_next / d x0_hat`` at fixed ``x`` (how a change of ``x0_hat`` moves ``x_next``).
    """

    x: Tensor
    x0_hat: Tensor
    eps_hat: Tensor
    x_next: Tensor
    level: Level
    alpha_next: Tensor
    sigma_next: Tensor
    x0_weight: float
    generator: torch.Generator | None = field(default=None, repr=False)


class InverseSolver(Protocol):
    needs_grad: bool
    default_eta: float
    stats: SolverStats

    def reset(self) -> None: ...
    def prepare(self, model: DenoiseFn, x: Tensor, plan: Plan, index: int) -> Tensor: ...
    def correct(self, transition: Transition) -> Tensor: ...


def level_at(plan: Plan, index: int, like: Tensor) -> Level:
    """The :class:`Level` of step ``index`` of ``plan`` on ``like``'s device and dtype."""
    return Level(t=plan.timesteps[index], alpha=plan.alpha(index).to(like.device, like.dtype),
                 sigma=plan.sigma_vp(index).to(like.device, like.dtype), index=index, num_steps=plan.num_steps)


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def ddim_move(x: Tensor, x0_hat: Tensor, alpha: Tensor, sigma: Tensor, alpha_next: Tensor, sigma_next: Tensor,
              eta: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor, float]:
    """DDIM (Song et al. 2021, Eq. 12) in VP form; returns ``(x_next, eps_hat, d x_next / d x0_hat)``.

    ``std = eta * (sigma_next / sigma) * sqrt(1 - alpha^2 / alpha_next^2)``,
    ``x_next = alpha_next x0_hat + c eps_hat + std z`` with ``c = sqrt(sigma_next^2 - std^2)``.
    """
    eps_hat = (x - alpha * x0_hat) / sigma
    if float(sigma_next) == 0.0:
        return alpha_next * x0_hat, eps_hat, float(alpha_next)
    std = eta * float(sigma_next / sigma) * math.sqrt(max(1.0 - float(alpha**2 / alpha_next**2), 0.0))
    c = math.sqrt(max(float(sigma_next) ** 2 - std**2, 0.0))
    x_next = alpha_next * x0_hat + c * eps_hat
    if std > 0:
        x_next = x_next + std * noise_like(x, generator)
    return x_next, eps_hat, float(alpha_next) - c * float(alpha / sigma)


def sample_inverse(model: DenoiseFn | None, x: Tensor, plan: Plan, solver: InverseSolver, eta: float | None = None,
                   generator: torch.Generator | None = None, callback: Callable[[dict], Any] | None = None,
                   disable: bool = False) -> Tensor:
    """Solve an inverse problem by reverse diffusion from VP noise ``x`` with a measurement ``solver``.

    ``eta`` defaults to the solver's (1 for DPS/MCG as in their DDPM code, 0 for EnKG's PF-ODE and P2L's
    DDIM). ``solver.stats`` counts denoiser, gradient and forward-model evaluations. ``model=None`` takes the
    solver's own denoiser (``solver.denoiser()``, e.g. P2L's, which reads its tuned text embedding). The first
    step whose correction leaves a sample more than ``BLOWUP_RATIO`` times the uncorrected step's norm warns
    (``UserWarning``: a scale far too large; the result will be noise).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a samplers.Plan, got {type(plan).__name__}")
    for hook in ("prepare", "correct", "reset"):
        if not callable(getattr(solver, hook, None)):
            raise TypeError(f"solver must have a {hook}() method (see samplers.inverse.InverseSolver)")
    if model is None:
        if not callable(getattr(solver, "denoiser", None)):
            raise TypeError(f"{type(solver).__name__} has no denoiser(); pass the model")
        model = solver.denoiser()
    eta = float(solver.default_eta if eta is None else eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    solver.reset()
    warned = False
    for i in trange(plan.num_steps, disable=disable, desc=type(solver).__name__):
        x = solver.prepare(model, x.detach(), plan, i).detach()
        level = level_at(plan, i, x)
        alpha_next = plan.alpha(i + 1).to(x.device, x.dtype)
        sigma_next = plan.sigma_vp(i + 1).to(x.device, x.dtype)
        with torch.enable_grad() if solver.needs_grad else torch.no_grad():
            x_in = x.requires_grad_(True) if solver.needs_grad else x
            x0_hat = as_denoised(model(x_in, level)).x0
            solver.stats.denoiser_calls += x.shape[0]
            x_next, eps_hat, x0_weight = ddim_move(x_in, x0_hat, level.alpha, level.sigma, alpha_next, sigma_next,
                                                   eta, generator)
            transition = Transition(x_in, x0_hat, eps_hat, x_next, level, alpha_next, sigma_next, x0_weight,
                                    generator)
            x_next = solver.correct(transition)
        if not bool(torch.isfinite(x_next).all()):
            raise FloatingPointError(f"{type(solver).__name__} produced non-finite values at step {i}; "
                                     "lower the guidance scale")
        ratio = 0.0 if warned else norm_ratio(x_next, transition.x_next)   # watched until it first blows up
        if ratio > BLOWUP_RATIO:
            warned = True
            warnings.warn(f"{solver!r}: at step {i + 1} of {plan.num_steps} the corrected sample's norm is "
                          f"{ratio:.3g}x the uncorrected step's (more than {BLOWUP_RATIO:g}x): the result will be "
                          "noise; lower the scale", stacklevel=2)
        x = x_next.detach()
        if callback is not None:
            callback({"x": x, "i": i, "t": level.t, "sigma": float(plan.sigmas[i]), "x0_hat": x0_hat.detach()})
    return x


class NoCorrection:
    """The identity solver: ``sample_inverse`` with it is plain DDIM(eta) sampling."""

    needs_grad = False
    default_eta = 0.0

    def __init__(self) -> None:
        self.stats = SolverStats()

    def reset(self) -> None:
        self.stats = SolverStats()

    def prepare(self, model: DenoiseFn, x: Tensor, plan: Plan, index: int) -> Tensor:
        return x

    def correct(self, transition: Transition) -> Tensor:
        return transition.x_next

