"""Sequential Monte Carlo over a weighted denoiser: particles in the batch, log-weights from the model.

The model answers ``Weighted(x0, log_weight_rate)`` at each level. ``x0`` gives the score by Tweedie,
``s = (alpha x0 - x) / sigma^2``, and the particles follow the reverse VP SDE family

    dx = [-f + (1 + noise) / 2 * g^2 s] dt + sqrt(noise) g dW,     f = -beta(t) x / 2,  g^2 = beta(t)

discretised by DDPM's ancestral step for ``noise = 1`` (the reverse SDE), DDIM with ``eta = sqrt(noise)``
below 1, and above 1 the DDPM step plus a Langevin move on the same score with step ``(noise - 1) g^2 dt``.
Every member has the same Feynman-Kac weights. ``log_weight_rate`` is a per-particle rate ``G(x_t)``:
the step from level ``i`` to ``i + 1`` adds ``G(x_i) * g^2 dt`` to the particle's log-weight, where

    g^2 dt = integral of beta(t) dt over the step = log(alpha_bar_{i+1} / alpha_bar_i)

is the VP diffusion coefficient integrated over the step (Feynman-Kac weights ``d log w = G g^2 dt`` of
Skreta et al., ICML 2025, arXiv 2503.02819; the rates of the annealed, product and CFG targets are (FK-2) in
``guidance.fkc``, and they do not depend on the noise level). The rate is read at the step's start (left-point
rule). More noise mixes particles faster, which keeps the weights from degenerating (fewer resampling events,
lower Monte-Carlo error) at the cost of a larger time-step error; above 1 it needs small steps (``g^2 dt``
well below the target's variance scale) for the Langevin move to be stable.

A plan may start at pure noise (a flow schedule, ``alpha = 0``): every target there is ``N(0, I / B)``, the
first move is DDIM/DDPM's (finite: it never divides by alpha; the Langevin step, infinite there, is left out)
and the weight increment is 0, which needs a rate of 0 (CFG: every expert's eps is ``x`` at alpha = 0);
otherwise ``sample_smc`` refuses the plan and ``plan.starting_at(1)`` starts one level later.

Particles of one system are resampled when their effective sample size falls below ``ess_threshold * N``
(``ess_threshold = 1``: at every step), never at the last step: the result carries the final weights.
Several independent systems (e.g. one per prompt) run side by side as ``num_groups`` contiguous blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Union

import torch
from torch import Tensor
from tqdm.auto import trange

from .base import Denoised, Level
from .inverse import ddim_move, level_at, noise_like
from .resampling import RESAMPLERS, effective_sample_size, normalize_log_weights
from .schedule import Plan


class Weighted(NamedTuple):
    """A weighted denoiser's answer: the x0 estimate that sets the drift, and the log-weight rate ``(B,)``.

    ``log_weight_rate`` is per unit of integrated ``g^2 = beta(t)`` (score units, e.g. ``w (w - 1) / 2
    ||s_c - s_u||^2`` for CFG), so the sampler, which knows the step, turns it into an increment.
    """

    x0: Tensor
    log_weight_rate: Tensor


# A weighted model: VP state x_t at a level -> Weighted. A plain DenoiseFn (x0 or Denoised) gets rate 0.
# It may carry ``init_noise_sigma`` (float): the standard deviation of the target at the first level, by
# which the starting noise is scaled (as a diffusers scheduler's ``init_noise_sigma`` scales latents).
WeightedDenoiseFn = Callable[[Tensor, Level], Union[Weighted, Denoised, Tensor]]


@dataclass
class SMCResult:
    """Final particles with their weights, and the history of the run.

    ``x`` (B, ...) holds ``num_groups`` blocks of N particles; ``log_weights`` (G, N) are normalised float64
    log-weights (``log_weights.exp().flatten()`` lines up with the rows of ``x``); ``ess`` (num_steps, G) is
    the effective sample size after each step's weight update, before resampling; ``resampled``
    (num_steps, G) marks the steps after which a group was resampled.
    """

    x: Tensor
    log_weights: Tensor
    ess: Tensor
    resampled: Tensor

    @property
    def weights(self) -> Tensor:
        """Normalised weights (G, N), float64."""
        return self.log_weights.exp()

    @property
    def num_resampling_events(self) -> int:
        return int(self.resampled.sum())

    def select(self, generator: torch.Generator | None = None) -> Tensor:
        """One particle per group, drawn with probability equal to its weight: shape ``(G, *x.shape[1:])``."""
        groups, n = self.log_weights.shape
        device = generator.device if generator is not None else self.log_weights.device
        index = torch.multinomial(self.weights.to(device), 1, generator=generator).squeeze(1).to(self.x.device)
        rows = index + n * torch.arange(groups, device=self.x.device)
        return self.x[rows]


def _check_args(x: Tensor, plan: Plan, num_groups: int, ess_threshold: float, resampling: str, noise: float,
                clamp: float | None) -> int:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor of particles (B, ...)")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a samplers.Plan, got {type(plan).__name__}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if x.ndim < 1 or x.shape[0] % num_groups:
        raise ValueError(f"the batch ({x.shape[0] if x.ndim else 0}) must split into num_groups={num_groups} "
                         "equal blocks of particles")
    particles = x.shape[0] // num_groups
    if particles < 2:
        raise ValueError(f"SMC needs at least 2 particles per group, got {particles}")
    if isinstance(ess_threshold, bool) or not isinstance(ess_threshold, (int, float)) \
            or not 0.0 < float(ess_threshold) <= 1.0:
        raise ValueError(f"ess_threshold must lie in (0, 1] (1 = resample at every step), got {ess_threshold!r}")
    if resampling not in RESAMPLERS:
        raise ValueError(f"resampling must be one of {sorted(RESAMPLERS)}, got {resampling!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 < float(noise) < math.inf:
        raise ValueError(f"noise must be a finite number > 0 (resampling needs a stochastic move), got {noise!r}")
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float))
                              or not float(clamp) > 0 or math.isnan(clamp)):
        raise ValueError(f"clamp must be None or a number > 0, got {clamp!r}")
    return particles


def _as_weighted(out: Any, batch: int, index: int) -> tuple[Tensor, Tensor]:
    if isinstance(out, Weighted):
        x0, rate = out
        rate = torch.as_tensor(rate, dtype=torch.float64, device=x0.device)
        if rate.shape != (batch,):
            raise ValueError(f"step {index}: log_weight_rate must have shape ({batch},), got {tuple(rate.shape)}")
        return x0, rate
    x0 = out.x0 if isinstance(out, Denoised) else out
    if not isinstance(x0, Tensor):
        raise TypeError(f"the model must return a Tensor, Denoised or Weighted, got {type(out).__name__}")
    return x0, torch.zeros(batch, dtype=torch.float64, device=x0.device)


def _move(x: Tensor, x0: Tensor, level: Level, plan: Plan, beta_dt: float, noise: float,
          generator: torch.Generator | None) -> Tensor:
    """One step of the SDE family to level ``index + 1``: DDIM(eta = sqrt(noise)) up to noise 1 (Song et al.
    2021, Eq. 12; eta = 1 is DDPM's ancestral step), then a Langevin step of size ``(noise - 1) g^2 dt`` on the
    score ``(alpha x0 - x) / sigma^2`` (none on the final step to sigma = 0)."""
    i = level.index
    alpha_next, sigma_next = (v.to(x.device, x.dtype) for v in (plan.alpha(i + 1), plan.sigma_vp(i + 1)))
    x_next = ddim_move(x, x0, level.alpha, level.sigma, alpha_next, sigma_next, math.sqrt(min(noise, 1.0)),
                       generator)[0]
    step = (noise - 1.0) * beta_dt
    if step > 0 and math.isfinite(step) and float(sigma_next) > 0:
        score = (level.alpha * x0 - x) / level.sigma**2
        x_next = x_next + 0.5 * step * score + math.sqrt(step) * noise_like(x, generator)
    return x_next


def _resample(x: Tensor, log_w: Tensor, due: Tensor, resample, generator: torch.Generator | None
              ) -> tuple[Tensor, Tensor]:
    """Resample the groups marked ``due`` (within their own block of rows) and reset their weights."""
    groups, particles = log_w.shape
    keep = torch.arange(particles, device=x.device)
    ancestors = torch.where(due[:, None], resample(log_w, generator).to(x.device), keep)
    rows = ancestors + particles * torch.arange(groups, device=x.device)[:, None]
    uniform = torch.full_like(log_w, -math.log(particles))
    return x[rows.flatten()], torch.where(due[:, None], uniform, log_w)


@torch.no_grad()
def sample_smc(model: WeightedDenoiseFn, x: Tensor, plan: Plan, *, num_groups: int = 1, ess_threshold: float = 0.5,
               resampling: str = "systematic", noise: float = 1.0, clamp: float | None = None,
               generator: torch.Generator | None = None, callback: Callable[[dict], Any] | None = None,
               disable: bool = False) -> SMCResult:
    """Weighted reverse diffusion with adaptive resampling (SMC) from VP noise ``x`` (``torch.randn``).

    Args:
        model: ``(x_t, level) -> Weighted(x0, log_weight_rate)`` (see the module docstring), e.g.
            ``guidance.FKCDenoiser``; a plain denoiser gives uniform weights (the unweighted sampler).
        x: standard normal noise ``(B, ...)``, ``B = num_groups * N``; multiplied by the model's
            ``init_noise_sigma`` when it has one.
        plan: the noise levels (``plan_from_scheduler`` or a hand-made ``Plan``).
        num_groups: independent particle systems in the batch (contiguous blocks of N >= 2 particles).
        ess_threshold: resample a group when ``ESS < ess_threshold * N``; 1 resamples at every step.
        resampling: ``"systematic"`` (default), ``"stratified"`` or ``"multinomial"``.
        noise: SDE noise relative to the forward diffusion, ``sigma^2 / g^2`` (module docstring): 1 is DDPM's
            reverse SDE, < 1 DDIM with ``eta = sqrt(noise)``, > 1 adds a Langevin corrector. Must be > 0:
            resampling needs noise to restore diversity.
        clamp: if set, each step's increments are centred on their group mean and clipped to
            ``[-clamp, clamp]`` (the official FKC image code uses 1 with resampling at every step). Biased;
            off by default.
        generator: randomness of the moves and of resampling.
        callback: called after each step with ``x, i, t, sigma, x0_hat, log_weights, ess, resampled``.
        disable: hide the progress bar.
    Returns:
        :class:`SMCResult`. Raises FloatingPointError naming the step if weights or states become NaN/Inf.
    """
    particles = _check_args(x, plan, num_groups, ess_threshold, resampling, noise, clamp)
    x = x * float(getattr(model, "init_noise_sigma", 1.0))
    log_w = torch.full((num_groups, particles), -math.log(particles), dtype=torch.float64, device=x.device)
    ess_history, resampled_history = [], []
    for i in trange(plan.num_steps, disable=disable, desc="SMC"):
        level = level_at(plan, i, x)
        x0, rate = _as_weighted(model(x, level), x.shape[0], i)
        beta_dt = math.log((1 + float(plan.sigmas[i]) ** 2) / (1 + float(plan.sigmas[i + 1]) ** 2))  # g^2 dt
        if math.isinf(beta_dt):  # a step from pure noise: g^2 dt is infinite (alpha_bar = 0)
            if bool((rate != 0).any()):
                raise ValueError(f"step {i} starts at pure noise (alpha = 0), where g^2 dt is infinite: the "
                                 "log-weight rate must be 0 there (it is for CFG targets); start the plan one "
                                 "level later (plan.starting_at(1))")
            rate, beta_dt = torch.zeros_like(rate), 0.0
        increment = (rate.to(log_w.device) * beta_dt).view(num_groups, particles)
        if not bool(torch.isfinite(increment).all()):
            raise FloatingPointError(f"step {i} (t={float(level.t):g}): the log-weight increment is NaN/Inf for "
                                     f"{int((~torch.isfinite(increment)).sum())} of {x.shape[0]} particles")
        if clamp is not None:
            increment = (increment - increment.mean(-1, keepdim=True)).clamp(-clamp, clamp)
        log_w = normalize_log_weights(log_w + increment)
        x = _move(x, x0, level, plan, beta_dt, noise, generator)
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"step {i} (t={float(level.t):g}): the particles became NaN/Inf")
        ess = effective_sample_size(log_w)
        due = (ess < ess_threshold * particles) | (ess_threshold == 1)
        due &= i < plan.num_steps - 1  # the last weights are returned, not resampled
        if bool(due.any()):
            x, log_w = _resample(x, log_w, due, RESAMPLERS[resampling], generator)
        ess_history.append(ess)
        resampled_history.append(due)
        if callback is not None:
            callback({"x": x, "i": i, "t": level.t, "sigma": float(plan.sigmas[i]), "x0_hat": x0,
                      "log_weights": log_w, "ess": ess, "resampled": due})
    return SMCResult(x, log_w, torch.stack(ess_history), torch.stack(resampled_history))
