"""Forward operators ``y = A(x) + n`` for imaging inverse problems: the protocol, composition, noise.

Conventions (the same for every operator in this package):

* Images are batches ``(B, C, H, W)`` in the data range **[-1, 1]**; ``sigma_y`` is the standard
  deviation of the Gaussian measurement noise **in that same range** (DPS's 0.05 is 0.025 on [0, 1]).
* ``forward`` is the noiseless ``A(x)``; ``measure`` adds seeded noise ``sigma_y * n``, or Poisson noise after
  ``with_poisson(gain)`` (``sigma_y`` then holds the Gaussian surrogate that Gaussian-likelihood solvers read).
* A :class:`LinearOperator` has the true ``adjoint`` (``<A x, v> = <x, A^T v>``), a ``pinv`` (the
  Moore-Penrose pseudo-inverse ``A^+``; closed form where one exists, conjugate gradients otherwise)
  and the measurement-set projection ``project(x, y) = x + A^+ (y - A x)``.
* ``is_blackbox`` operators are only evaluated (no autograd, no adjoint): derivative-free solvers only.
* ``A @ B`` is the composition ``x -> A(B(x))``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .noise import PoissonNoise

Shape = tuple[int, int, int]


def check_shape(shape: Sequence[int], name: str = "shape") -> Shape:
    """Validate a ``(C, H, W)`` image shape."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as err:
        raise TypeError(f"{name} must be a (C, H, W) tuple of ints, got {shape!r}") from err
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{name} must be a (C, H, W) tuple of positive ints, got {shape!r}")
    return shape  # type: ignore[return-value]


def check_sigma_y(sigma_y: float) -> float:
    if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float)):
        raise TypeError(f"sigma_y must be a real number, got {type(sigma_y).__name__}")
    if not math.isfinite(sigma_y) or sigma_y < 0:
        raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y}")
    return float(sigma_y)


def _check_batch(t: Tensor, shape: tuple[int, ...], what: str, who: str) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{who}: {what} must be a floating-point tensor")
    if t.ndim != len(shape) + 1 or tuple(t.shape[1:]) != tuple(shape):
        raise ValueError(f"{who}: {what} must have shape (B, {', '.join(map(str, shape))}), got {tuple(t.shape)}")


class Operator:
    """A forward model ``x (B, *in_shape) -> y (B, *out_shape)`` with Gaussian measurement noise.

    Subclasses implement ``_forward`` and set ``out_shape``. ``forward`` checks shapes and must be
    differentiable by autograd unless ``is_blackbox``.
    """

    is_linear: bool = False
    is_blackbox: bool = False
    has_svd: bool = False
    noise: PoissonNoise | None = None    # None: Gaussian with sigma_y

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], sigma_y: float = 0.0) -> None:
        self.in_shape: tuple[int, ...] = tuple(int(s) for s in in_shape)
        self.out_shape: tuple[int, ...] = tuple(int(s) for s in out_shape)
        self.sigma_y = check_sigma_y(sigma_y)

    @property
    def name(self) -> str:
        return type(self).__name__

    def _forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Noiseless ``A(x)``."""
        _check_batch(x, self.in_shape, "x", self.name)
        return self._forward(x)

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def with_poisson(self, gain: float) -> "Operator":
        """Switch this operator's noise to :class:`PoissonNoise` ``(gain)``; ``sigma_y`` becomes its Gaussian
        surrogate ``sqrt(2 gain)``. Returns ``self``."""
        self.noise = PoissonNoise(gain)
        self.sigma_y = self.noise.gaussian_std
        return self

    def add_noise(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``y + sigma_y * n``, ``n ~ N(0, I)`` drawn from ``generator`` (Poisson counts after ``with_poisson``)."""
        if self.noise is not None:
            return self.noise.sample(y, generator)
        if self.sigma_y == 0:
            return y
        return y + self.sigma_y * randn_like(y, generator)

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A noisy measurement ``y = A(x) + sigma_y n`` (seeded by ``generator``)."""
        with torch.no_grad():
            return self.add_noise(self.forward(x), generator)

    def __matmul__(self, inner: "Operator") -> "Operator":
        return compose(self, inner)

    def __repr__(self) -> str:
        noise = "" if self.noise is None else f", noise={self.noise!r}"
        return f"{self.name}(in_shape={self.in_shape}, out_shape={self.out_shape}, sigma_y={self.sigma_y}{noise})"


class LinearOperator(Operator):
    """A linear operator with its true adjoint, pseudo-inverse and measurement-set projection.

    Subclasses implement ``_adjoint`` and, where a closed form exists, ``_pinv``; the default ``_pinv``
    is the minimum-norm least-squares solution by conjugate gradients on ``A^T A x = A^T y`` from
    ``x = 0`` (CGLS: the iterates stay in the range of ``A^T``).
    """

    is_linear = True
    cg_iterations: int = 200
    cg_tolerance: float = 1e-10

    def _adjoint(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:
        """The adjoint ``A^T y`` (``<A x, y> = <x, A^T y>``)."""
        _check_batch(y, self.out_shape, "y", f"{self.name}.adjoint")
        return self._adjoint(y)

    def _pinv(self, y: Tensor) -> Tensor:
        return conjugate_gradient(lambda v: self._adjoint(self._forward(v)), self._adjoint(y), self.cg_iterations,
                                  self.cg_tolerance)

    def pinv(self, y: Tensor) -> Tensor:
        """The pseudo-inverse ``A^+ y``: the minimum-norm ``x`` minimising ``||A x - y||``."""
        _check_batch(y, self.out_shape, "y", f"{self.name}.pinv")
        return self._pinv(y)

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        """Orthogonal projection of ``x`` onto ``{x : A x = y}``: ``x + A^+ (y - A x)``."""
        return x + self.pinv(y - self.forward(x))

    def project_null(self, v: Tensor) -> Tensor:
        """Component of ``v`` in the null space of A: ``(I - A^+ A) v``."""
        return v - self.pinv(self.forward(v))

    def _prox_l2(self, z: Tensor, y: Tensor, weight: float) -> Tensor:
        rhs = self._adjoint(y) + weight * z
        return conjugate_gradient(lambda v: self._adjoint(self._forward(v)) + weight * v, rhs, self.cg_iterations,
                                  self.cg_tolerance)

    def prox_l2(self, z: Tensor, y: Tensor, weight: float) -> Tensor:
        """``argmin_x ||A x - y||^2 + weight ||x - z||^2 = (A^T A + weight I)^{-1} (A^T y + weight z)``."""
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        _check_batch(z, self.in_shape, "z", f"{self.name}.prox_l2")
        _check_batch(y, self.out_shape, "y", f"{self.name}.prox_l2")
        return self._prox_l2(z, y, float(weight))


class Composed(Operator):
    """``x -> outer(inner(x))``; the noise is the outer operator's unless ``sigma_y`` is given."""

    def __init__(self, outer: Operator, inner: Operator, sigma_y: float | None = None) -> None:
        if tuple(inner.out_shape) != tuple(outer.in_shape):
            raise ValueError(f"cannot compose {outer.name} after {inner.name}: {inner.name} outputs "
                             f"{inner.out_shape} but {outer.name} takes {outer.in_shape}")
        super().__init__(inner.in_shape, outer.out_shape, outer.sigma_y if sigma_y is None else sigma_y)
        self.outer, self.inner = outer, inner
        self.is_blackbox = outer.is_blackbox or inner.is_blackbox

    @property
    def name(self) -> str:
        return f"{self.outer.name}@{self.inner.name}"

    def _forward(self, x: Tensor) -> Tensor:
        return self.outer.forward(self.inner.forward(x))


class ComposedLinear(Composed, LinearOperator):
    """Composition of two linear operators: adjoint ``B^T A^T``; pseudo-inverse by conjugate gradients."""

    def _adjoint(self, y: Tensor) -> Tensor:
        return self.inner.adjoint(self.outer.adjoint(y))


def compose(outer: Operator, inner: Operator, sigma_y: float | None = None) -> Operator:
    """The operator ``x -> outer(inner(x))`` (linear when both are)."""
    for op in (outer, inner):
        if not isinstance(op, Operator):
            raise TypeError(f"can only compose tasks.operators.Operator objects, got {type(op).__name__}")
    if isinstance(outer, LinearOperator) and isinstance(inner, LinearOperator):
        return ComposedLinear(outer, inner, sigma_y)
    return Composed(outer, inner, sigma_y)


def conjugate_gradient(apply_matrix, rhs: Tensor, max_iter: int, tol: float) -> Tensor:
    """Solve ``M u = rhs`` per batch item for a symmetric positive semi-definite ``M`` (consistent rhs)."""
    dims = tuple(range(1, rhs.ndim))
    u = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(dims, keepdim=True)
    scale = rs.clamp_min(torch.finfo(rhs.dtype).tiny)
    for _ in range(max_iter):
        if bool((rs <= tol**2 * scale).all()):
            break
        mp = apply_matrix(p)
        denom = (p * mp).sum(dims, keepdim=True)
        step = torch.where(denom > 0, rs / denom.clamp_min(torch.finfo(rhs.dtype).tiny), torch.zeros_like(rs))
        u = u + step * p
        r = r - step * mp
        rs_new = (r * r).sum(dims, keepdim=True)
        p = r + torch.where(rs > 0, rs_new / rs.clamp_min(torch.finfo(rhs.dtype).tiny), torch.zeros_like(rs)) * p
        rs = rs_new
    if not bool(torch.isfinite(u).all()):
        raise FloatingPointError("conjugate gradients produced non-finite values")
    return u


def randn_like(t: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``t``, drawn on the generator's device, moved to ``t``'s."""
    device = generator.device if generator is not None else t.device
    return torch.randn(t.shape, generator=generator, device=device, dtype=t.dtype).to(t.device)
