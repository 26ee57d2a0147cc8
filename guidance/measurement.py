"""What every inverse-problem solver shares: the operator / measurement contract and its bookkeeping.

Operators are duck-typed (``tasks.operators`` provides them): ``forward(x)``, ``in_shape``, ``out_shape``,
``is_linear``, ``is_blackbox``, ``sigma_y``; linear ones add ``adjoint``, ``pinv``, ``project``,
``project_null``. Measurements ``y`` have shape ``(1 or B, *operator.out_shape)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from diffguide.samplers.base import DenoiseFn
from diffguide.samplers.inverse import SolverStats, Transition
from diffguide.samplers.schedule import Plan


def check_operator(operator: Any, who: str, needs_gradient: bool = False, needs_linear: bool = False) -> Any:
    """Validate the duck-typed operator's capabilities for solver ``who``."""
    for attr in ("forward", "in_shape", "out_shape"):
        if not hasattr(operator, attr):
            raise TypeError(f"{who}: operator must have forward, in_shape and out_shape (see tasks.operators)")
    if needs_gradient and getattr(operator, "is_blackbox", False):
        raise ValueError(f"{who} differentiates through the forward model, but {type(operator).__name__} is a "
                         "black box without gradients; use guidance.EnKG (derivative-free) instead")
    if needs_linear:
        if not getattr(operator, "is_linear", False) or not all(
                callable(getattr(operator, m, None)) for m in ("adjoint", "pinv", "project", "project_null")):
            raise ValueError(f"{who} needs a linear operator with adjoint, pinv and project "
                             f"(got {type(operator).__name__}); use guidance.DPS or guidance.EnKG for nonlinear ones")
    return operator


def check_measurement(y: Tensor, operator: Any, who: str) -> Tensor:
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise TypeError(f"{who}: y must be a floating-point tensor")
    if y.ndim != len(operator.out_shape) + 1 or tuple(y.shape[1:]) != tuple(operator.out_shape):
        raise ValueError(f"{who}: y must have shape (B, {', '.join(map(str, operator.out_shape))}) to match the "
                         f"operator, got {tuple(y.shape)}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{who}: y contains non-finite values")
    return y.detach()


def check_positive(name: str, value: float, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")
    return float(value)


def check_count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def batch_norms(residual: Tensor) -> Tensor:
    """Per-sample Euclidean norms ``(B,)`` of a ``(B, ...)`` tensor."""
    return residual.flatten(1).norm(dim=1)


class MeasurementSolver:
    """Base of the inverse-problem solvers run by :func:`samplers.inverse.sample_inverse`.

    Holds the operator and measurement, counts work in ``stats`` and does nothing by default.
    """

    needs_grad: bool = False
    default_eta: float = 0.0

    def __init__(self, operator: Any, y: Tensor, decode: Callable[[Tensor], Tensor] | None = None) -> None:
        self.operator = operator
        self.y = check_measurement(y, operator, type(self).__name__)
        if decode is not None and not callable(decode):
            raise TypeError("decode must be a callable latent -> image (e.g. a VAE decoder) or None")
        self.decode = decode
        self.stats = SolverStats()

    def reset(self) -> None:
        self.stats = SolverStats()

    def to_image(self, x0: Tensor) -> Tensor:
        """The signal the operator sees: ``decode(x0)`` for latent models, ``x0`` otherwise."""
        return x0 if self.decode is None else self.decode(x0)

    def residual(self, x0: Tensor) -> Tensor:
        """``y - A(x0)`` (decoded first for latent models); counts forward-model calls."""
        self.stats.forward_model_calls += x0.shape[0]
        return self.y.to(x0) - self.operator.forward(self.to_image(x0))

    def prepare(self, model: DenoiseFn, x: Tensor, plan: Plan, index: int) -> Tensor:
        return x

    def correct(self, transition: Transition) -> Tensor:
        return transition.x_next
