"""Gradient-free classifier guidance, GFCG (Shenoy et al., arXiv 2411.15393).

A classifier, run in inference mode on the step's x0 estimate, picks a time-adaptive reference class (the
most confusable class other than the target) and a guidance scale; the step is pushed toward the target and
away from the reference class:

    p      = softmax(f(x0_hat(D_y)) / T)
    c_ref  = argmax_{k != y} p_k
    s_t    = scale * rule(p_y, p_ref)                 (>= 0; ~0 once the target dominates)
    D      = base(D_y, D_neg) + s_t (D_y - D(x; c_ref))

with ``base`` CFG, autoguidance or nothing (``D_y``). Only the abstract is public; the reference-class rule
above follows it, while the scale rule, temperature, the active noise interval, the model that evaluates the
reference class and the additive combination with the base guide are reconstructions, each a parameter.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from diffguide.samplers.base import Level

from .base import Guidance, Guided, Step, batch_view, check_scale
from .denoiser import ModelFn
from .feedback import Decode, predicted_images, target_labels

ScaleRule = Callable[[Tensor, Tensor], Tensor]


def confusion_rule(p_target: Tensor, p_reference: Tensor) -> Tensor:
    """``p_ref / (p_y + p_ref)``: 1/2 at a tie, -> 1 when the reference class dominates, -> 0 when the target does."""
    return p_reference / (p_target + p_reference).clamp_min(torch.finfo(p_target.dtype).tiny)


def deficit_rule(p_target: Tensor, p_reference: Tensor) -> Tensor:
    """``1 - p_y``: the probability mass not on the target."""
    return 1 - p_target


def binary_rule(p_target: Tensor, p_reference: Tensor) -> Tensor:
    """1 while the target is not the classifier's top class, else 0."""
    return (p_reference >= p_target).to(p_target.dtype)


SCALE_RULES: dict[str, ScaleRule] = {"confusion": confusion_rule, "deficit": deficit_rule, "binary": binary_rule}


class GFCG(Guidance):
    """GFCG on top of an optional base guide (``CFG``, ``Autoguidance``, ...).

    Args:
        classifier: ``images (B, C, H, W) in [-1, 1] -> logits (B, K)``, called once per active step under
            ``torch.no_grad`` (no gradients, the method's point).
        scale: maximal GFCG scale; ``s_t = scale * rule(p_y, p_ref)``.
        base: the guide whose output GFCG adds to; ``None`` = the conditional prediction (then a GFCG step costs
            the same two network passes as CFG: target and reference class).
        rule: ``"confusion"`` (default), ``"deficit"``, ``"binary"`` or ``fn(p_target, p_reference) -> (B,)``.
        labels: target classes ``(B,)``; by default the step's condition (class-conditional models). Set it per
            call for text-conditioned models (e.g. the digit in each prompt).
        class_conds: the network condition of every class, indexed by class (e.g. ``(K, L, D)`` prompt
            embeddings of "a handwritten digit k"); by default the class label itself.
        reference_model: the model callable ``(x_t, t, cond)`` that evaluates the reference class; by default
            the main network through ``step.evaluate`` (one extra pass, counted with the network's rows).
        decode: ``latents -> images`` for latent models, applied before the classifier.
        temperature: softmax temperature ``T`` of the classifier logits.
        sigma_lo, sigma_hi: GFCG acts only while ``sigma/alpha`` lies in ``(sigma_lo, sigma_hi]`` (early x0
            estimates are blurred and the classifier uncalibrated); the base guide acts at every step.

    After a run ``references`` and ``scales`` hold the per-step ``c_ref`` (-1 when inactive) and ``s_t``;
    ``classifier_calls`` counts classifier calls (cumulative).
    """

    def __init__(self, classifier: Callable[[Tensor], Tensor], scale: float = 1.0, base: Guidance | None = None,
                 rule: str | ScaleRule = "confusion", labels: Tensor | None = None, class_conds: Tensor | None = None,
                 reference_model: ModelFn | None = None, decode: Decode | None = None, temperature: float = 1.0,
                 sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> None:
        if not callable(classifier):
            raise TypeError(f"classifier must be callable (images -> logits), got {type(classifier).__name__}")
        if base is not None and not isinstance(base, Guidance):
            raise TypeError(f"base must be a guidance.Guidance or None, got {type(base).__name__}")
        if isinstance(rule, str):
            if rule not in SCALE_RULES:
                raise ValueError(f"rule must be one of {sorted(SCALE_RULES)} or a callable, got {rule!r}")
            rule = SCALE_RULES[rule]
        elif not callable(rule):
            raise TypeError(f"rule must be a name or a callable (p_target, p_reference) -> scale, got {rule!r}")
        for name, fn in (("reference_model", reference_model), ("decode", decode)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        self.classifier, self.base, self.rule = classifier, base, rule
        self.scale = check_scale("scale", scale)
        self.temperature = check_scale("temperature", temperature)
        if self.temperature == 0:
            raise ValueError("temperature must be > 0")
        self.sigma_lo = check_scale("sigma_lo", sigma_lo)
        if isinstance(sigma_hi, bool) or not isinstance(sigma_hi, (int, float)) or math.isnan(sigma_hi) \
                or sigma_hi <= self.sigma_lo:
            raise ValueError(f"sigma_hi must be a number > sigma_lo={self.sigma_lo}, got {sigma_hi}")
        self.sigma_hi = float(sigma_hi)
        if labels is not None:
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError):
                labels = None
            if labels is None or labels.ndim != 1 or labels.dtype == torch.bool or labels.is_floating_point() \
                    or labels.is_complex():
                raise TypeError("labels must be None or a 1-D sequence / tensor of int class indices")
        if class_conds is not None and not isinstance(class_conds, Tensor):
            raise TypeError(f"class_conds must be None or a tensor indexed by class, got {type(class_conds).__name__}")
        self.labels, self.class_conds = labels, class_conds
        self.reference_model, self.decode = reference_model, decode
        self.changes_renoise = base.changes_renoise if base is not None else False
        self.evaluates_other_levels = base.evaluates_other_levels if base is not None else False
        self.classifier_calls = 0
        self.reference_rows = 0
        self.reset()

    def reset(self) -> None:
        if self.base is not None:
            self.base.reset()
        self._references: list[Tensor] = []
        self._scales: list[Tensor] = []

    @property
    def references(self) -> Tensor | None:
        """``(num_steps, B)`` reference classes of the last run (-1 where GFCG was inactive)."""
        return torch.stack(self._references) if self._references else None

    @property
    def scales(self) -> Tensor | None:
        """``(num_steps, B)`` GFCG scales ``s_t`` of the last run."""
        return torch.stack(self._scales) if self._scales else None

    def needs_uncond(self, level: Level, batch_size: int) -> Tensor:
        if self.base is not None:
            return self.base.needs_uncond(level, batch_size)
        return torch.zeros(batch_size, dtype=torch.bool, device=level.alpha.device)

    def reference(self, step: Step) -> tuple[Tensor, Tensor]:
        """Reference classes ``(B,)`` and scales ``s_t`` ``(B,)`` from one classifier call on ``x0_hat(D_y)``."""
        batch = step.pred_cond.shape[0]
        images = predicted_images(step.x0(step.pred_cond), self.decode)
        with torch.no_grad():
            logits = self.classifier(images)
        self.classifier_calls += 1
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != batch or logits.shape[1] < 2:
            raise ValueError(f"classifier must return logits (B={batch}, K>=2), got "
                             f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
        if not torch.isfinite(logits).all():
            raise ValueError("classifier returned non-finite logits")
        labels = target_labels(self.labels, step, batch, "GFCG").to(logits.device)
        if bool((labels < 0).any() or (labels >= logits.shape[1]).any()):
            raise ValueError(f"target labels must lie in 0..{logits.shape[1] - 1}, got {labels.tolist()}")
        probs = torch.softmax(logits.double() / self.temperature, dim=1)
        rows = torch.arange(batch, device=probs.device)
        p_target = probs[rows, labels]
        others = probs.clone()
        others[rows, labels] = -1.0
        ref = others.argmax(1)
        s = self.rule(p_target, probs[rows, ref])
        if not isinstance(s, Tensor) or s.shape != (batch,) or not torch.isfinite(s).all() or bool((s < 0).any()):
            raise ValueError(f"the GFCG scale rule must return finite scales >= 0 of shape ({batch},), got {s}")
        return ref, self.scale * s.double()

    def combine(self, step: Step) -> Guided:
        out = self.base.combine(step) if self.base is not None else Guided(step.pred_cond, step.pred_cond)
        batch = step.pred_cond.shape[0]
        if not self.sigma_lo < step.ve_sigma <= self.sigma_hi:
            self._references.append(torch.full((batch,), -1, dtype=torch.long))
            self._scales.append(torch.zeros(batch, dtype=torch.float64))
            return out
        ref, s = self.reference(step)
        self._references.append(ref.cpu())
        self._scales.append(s.cpu())
        if not bool((s > 0).any()):
            return out
        pred_ref = self.reference_prediction(step, ref)
        delta = batch_view(s.to(step.pred_cond.device, step.pred_cond.dtype), step.pred_cond) * (step.pred_cond - pred_ref)
        denoise = out.denoise + delta
        return Guided(denoise, out.renoise if self.changes_renoise else denoise)

    def reference_prediction(self, step: Step, ref: Tensor) -> Tensor:
        """``D(x; c_ref)`` from ``reference_model`` or the main network (``step.evaluate``)."""
        if self.class_conds is not None:
            cond = self.class_conds[ref.to(self.class_conds.device)]
        elif isinstance(step.cond, Tensor) and not step.cond.is_floating_point():
            cond = ref.to(step.cond.device, step.cond.dtype)
        else:
            raise ValueError("GFCG: the network is not conditioned on class labels; pass class_conds= (the "
                             "condition of every class, e.g. prompt embeddings indexed by class)")
        if self.reference_model is not None:
            with torch.no_grad():
                pred = self.reference_model(step.x, step.t, cond)
            self.reference_rows += step.x.shape[0]
        elif step.evaluate is not None:
            pred = step.evaluate(step.x, cond)
        else:
            raise ValueError("GFCG needs a network pass with the reference class: run it through GuidedDenoiser or "
                             "guidance.apply (which provide step.evaluate), or pass reference_model=")
        if pred.shape != step.pred_cond.shape:
            raise ValueError(f"reference prediction has shape {tuple(pred.shape)}, expected {tuple(step.pred_cond.shape)}")
        return pred.to(step.pred_cond.dtype)

    def __repr__(self) -> str:
        rule = next((k for k, v in SCALE_RULES.items() if v is self.rule), "custom")
        return (f"GFCG(scale={self.scale}, base={self.base!r}, rule={rule!r}, temperature={self.temperature}, "
                f"sigma_lo={self.sigma_lo}, sigma_hi={self.sigma_hi})")
