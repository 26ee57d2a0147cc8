"""Feynman-Kac correctors (Skreta et al., ICML 2025, arXiv 2503.02819): annealing, products and CFG made exact.

The target at every noise level is a geometric product of the experts' noised marginals,
``pi_t ∝ prod_i (q_t^i)^{beta_i}`` with ``B = sum_i beta_i > 0``. With the scores ``s_i = grad log q_t^i
= -eps_i / sigma`` (VP: ``x_t = alpha x0 + sigma eps``) and ``s_pi = sum_i beta_i s_i``:

* drift: the reverse SDE with ``-f + g^2 s_pi``, i.e. the DDPM step on ``eps_pi = sum_i beta_i eps_i``;
* weight: ``d log w = G g^2 dt`` with the rate

      G = 1/2 (||s_pi||^2 - sum_i beta_i ||s_i||^2)
        = (||eps_pi||^2 - sum_i beta_i ||eps_i||^2) / (2 sigma^2)                                   (FK-2)

  Derivation: weighted particles ``dX = u dtau + sigma_n dW``, ``d log w = G_tau dtau`` (generation time tau)
  have the self-normalised marginals ``pi_tau`` of ``d pi = -div(pi u) + sigma_n^2 / 2 Lap(pi) + G pi``, so

      G_tau = d_tau log pi + div u + <u, grad log pi> - sigma_n^2 / 2 (Lap log pi + ||grad log pi||^2)   (FK-1)

  With ``u = -f + (g^2 + sigma_n^2) / 2 s_pi`` and ``d_tau log q^i`` from the forward Fokker-Planck equation,
  every Laplacian cancels (no divergence estimator is needed) and (FK-2) remains, for any noise ``sigma_n``;
  the leftover ``(B - 1) div f`` is the same for all particles and drops out when weights are normalised;
* start: ``x_T ~ prod_i N(0, I)^{beta_i} = N(0, I / B)``, the target at the first level of a VP schedule.

Special cases: annealing ``q^beta`` has ``G = beta (beta - 1) / 2 ||s||^2``; the product ``q^1 q^2`` has
``G = <s_1, s_2>``; CFG's geometric mean ``q_c^w q_u^(1-w)`` has ``G = w (w - 1) / 2 ||s_c - s_u||^2``
and the usual CFG drift. Run them with ``samplers.sample_smc`` through :class:`FKCDenoiser`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from diffguide.samplers.base import Level
from diffguide.samplers.models import call_network
from diffguide.samplers.schedule import check_prediction_type, to_eps, to_x0
from diffguide.samplers.smc import Weighted

from .base import check_scale
from .denoiser import cat_cond, check_cond_rows

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]  # (x_t, t, cond) -> model output


def _check_exponent(name: str, value: float, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value}")
    return float(value)


def _sq_norm(v: Tensor) -> Tensor:
    """Per-sample squared norm in float64, shape (B,)."""
    return v.to(torch.float64).flatten(1).pow(2).sum(1)


class FKCGuidance:
    """Target ``prod_i (q_t^i)^{beta_i}`` over the experts named in ``expert_names`` (see the module docstring)."""

    exponents: tuple[float, ...]
    expert_names: tuple[str, ...]

    @property
    def num_experts(self) -> int:
        return len(self.exponents)

    @property
    def total_exponent(self) -> float:
        """``B = sum_i beta_i``; the target at the top of a VP schedule is ``N(0, I / B)``."""
        return float(sum(self.exponents))

    def combine(self, eps: Sequence[Tensor], sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        """Experts' noise predictions -> ``(eps_pi, log_weight_rate)`` with ``eps_pi = sum_i beta_i eps_i`` and
        the rate ``G`` of (FK-2), per sample, float64, per unit of ``g^2 dt``."""
        if len(eps) != self.num_experts:
            raise ValueError(f"{type(self).__name__} needs {self.num_experts} predictions "
                             f"({', '.join(self.expert_names)}), got {len(eps)}")
        betas = self.exponents
        eps_pi = sum(beta * e for beta, e in zip(betas, eps))
        # ||eps_pi||^2 - sum_i b_i ||eps_i||^2 = (B - 1) sum_i b_i ||eps_i||^2 - sum_{i<j} b_i b_j ||eps_i - eps_j||^2:
        # differences first, so CFG's small ||eps_c - eps_u||^2 is not lost between two large norms
        gap = (self.total_exponent - 1) * sum(b * _sq_norm(e) for b, e in zip(betas, eps))
        for i in range(len(eps)):
            for j in range(i + 1, len(eps)):
                gap = gap - betas[i] * betas[j] * _sq_norm(eps[i] - eps[j])
        sigma2 = torch.as_tensor(sigma, dtype=torch.float64, device=gap.device).reshape(-1) ** 2
        return eps_pi, gap / (2 * sigma2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(exponents={self.exponents})"


class FKCAnneal(FKCGuidance):
    """Annealed target ``q_t^beta`` of one model (``beta > 1`` sharpens, ``beta < 1`` flattens).

    Rate ``G = beta (beta - 1) / 2 ||s||^2``, drift ``-f + beta g^2 s``, start ``N(0, I / beta)``.
    """

    expert_names = ("model",)

    def __init__(self, beta: float) -> None:
        self.beta = _check_exponent("beta", beta, positive=True)
        self.exponents = (self.beta,)

    def __repr__(self) -> str:
        return f"FKCAnneal(beta={self.beta})"


class FKCProduct(FKCGuidance):
    """Product of experts ``prod_i (q_t^i)^{beta_i}`` (default two experts, exponents 1: ``q^1 q^2``).

    The experts are two (or more) models, or two conditions of one model (e.g. two class labels).
    Rate for ``q^1 q^2``: ``G = <s_1, s_2>``; start ``N(0, I / sum_i beta_i)``.
    """

    def __init__(self, exponents: Sequence[float] = (1.0, 1.0)) -> None:
        if isinstance(exponents, (str, bytes)) or not isinstance(exponents, Sequence) or len(exponents) < 2:
            raise ValueError(f"exponents must be a sequence of at least two numbers > 0, got {exponents!r}")
        self.exponents = tuple(_check_exponent(f"exponents[{i}]", b, positive=True) for i, b in enumerate(exponents))
        self.expert_names = tuple(f"expert {i}" for i in range(len(self.exponents)))


class FKCCFG(FKCGuidance):
    """Classifier-free guidance as the geometric mean ``q_c^w q_u^(1-w)``, sampled exactly with weights.

    The drift is plain CFG's (``eps_u + w (eps_c - eps_u)``); the weights ``G = w (w - 1) / 2 ||s_c - s_u||^2``
    correct the intermediate marginals that CFG alone only approximates. Experts: ``("cond", "uncond")``.
    """

    expert_names = ("cond", "uncond")

    def __init__(self, scale: float) -> None:
        self.scale = check_scale("scale", scale)
        self.exponents = (self.scale, 1.0 - self.scale)

    @property
    def total_exponent(self) -> float:
        """Exactly 1 (``w + (1 - w)``, whatever the rounding of ``1 - w``)."""
        return 1.0

    def __repr__(self) -> str:
        return f"FKCCFG(scale={self.scale})"


class FKCDenoiser:
    """Evaluate an FKC guide's experts and answer ``samplers.smc.Weighted`` for ``samplers.sample_smc``.

    Args:
        model_fn: ``(x_t, t, cond) -> output`` (e.g. ``samplers.diffusers_model_fn(unet)``), or one per expert.
        guide: an :class:`FKCGuidance` (``FKCAnneal``, ``FKCProduct``, ``FKCCFG``).
        conds: one condition per expert, in ``guide.expert_names`` order (CFG: ``(cond, uncond)``; a product of
            two classes of one model: ``(label_a, label_b)``). Experts sharing a model run in one batched call.
        prediction_type: the models' output, ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or
            ``"flow_prediction"`` (a flow network reads ``x / (alpha + sigma)``, ``samplers.call_network``).

    ``init_noise_sigma = 1 / sqrt(B)`` tells ``sample_smc`` to start from the target's ``N(0, I / B)``.
    The drift's x0 is ``sum_i beta_i x0_i + (1 - B) x / alpha`` (``= (x - sigma eps_pi) / alpha``): finite at a
    pure-noise level (alpha = 0) only for ``B = 1`` (CFG); there the target's reverse drift is infinite for
    ``B != 1`` and the denoiser refuses it (start such plans one level later, ``plan.starting_at(1)``).
    ``rows`` and ``calls`` count network rows and calls.
    """

    def __init__(self, model_fn: ModelFn | Sequence[ModelFn], guide: FKCGuidance, conds: Sequence[Any],
                 prediction_type: str = "epsilon") -> None:
        if not isinstance(guide, FKCGuidance):
            raise TypeError(f"guide must be an FKC guide (FKCAnneal, FKCProduct, FKCCFG), got {type(guide).__name__}")
        if not isinstance(conds, (list, tuple)) or len(conds) != guide.num_experts:
            raise ValueError(f"{guide!r} needs {guide.num_experts} conditions ({', '.join(guide.expert_names)}), "
                             f"got {conds!r}")
        fns = list(model_fn) if isinstance(model_fn, (list, tuple)) else [model_fn] * guide.num_experts
        if len(fns) != guide.num_experts or not all(callable(f) for f in fns):
            raise TypeError(f"model_fn must be a callable or {guide.num_experts} callables, one per expert")
        if guide.total_exponent <= 0:
            raise ValueError(f"the exponents of {guide!r} must sum to a positive number (the target at the top "
                             "of the schedule is N(0, I / sum))")
        self.guide, self.conds = guide, list(conds)
        self.prediction_type = check_prediction_type(prediction_type)
        groups: dict[int, list[int]] = {}
        for i, fn in enumerate(fns):
            groups.setdefault(id(fn), []).append(i)
        self._batches = [(fns[idx[0]], idx) for idx in groups.values()]  # experts sharing a model
        self.init_noise_sigma = 1.0 / math.sqrt(guide.total_exponent)
        self.rows = 0
        self.calls = 0

    def _evaluate(self, x: Tensor, level: Level) -> list[Tensor]:
        preds: list[Tensor | None] = [None] * self.guide.num_experts
        for fn, idx in self._batches:
            for i in idx:
                check_cond_rows(f"the condition of {self.guide.expert_names[i]}", self.conds[i], x.shape[0])
            cond = self.conds[idx[0]]
            for i in idx[1:]:
                cond = cat_cond(cond, self.conds[i])
            out = call_network(fn, torch.cat([x] * len(idx)) if len(idx) > 1 else x, level, cond,
                               self.prediction_type)
            self.rows += out.shape[0]
            self.calls += 1
            for i, chunk in zip(idx, out.chunk(len(idx))):
                preds[i] = chunk
        return preds

    def __call__(self, x: Tensor, level: Level) -> Weighted:
        total = self.guide.total_exponent
        if float(level.alpha) == 0.0 and total != 1.0:
            raise ValueError(f"{self.guide!r}: at a pure-noise level (alpha = 0) the target with exponents summing "
                             f"to {total:g} != 1 has no finite reverse drift; start the plan one level later "
                             "(plan.starting_at(1)) or use a target whose exponents sum to 1 (CFG)")
        preds = self._evaluate(x, level)
        eps = [to_eps(p, x, level.alpha, level.sigma, self.prediction_type) for p in preds]
        _, rate = self.guide.combine(eps, level.sigma)
        x0 = sum(beta * to_x0(p, x, level.alpha, level.sigma, self.prediction_type)
                 for beta, p in zip(self.guide.exponents, preds))
        if total != 1.0:
            x0 = x0 + (1 - total) * x / level.alpha
        return Weighted(x0, rate)
