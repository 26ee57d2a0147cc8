"""Zeroth-order personalization maths of ZOODiP (Seo, Jeong, Lee & Chun, CVPR 2025, arXiv 2503.14868).

Textual inversion of one token embedding ``theta`` with forward passes only:

- :func:`random_gradient_estimate` — forward-difference random gradient estimate (RGE), Eq. 3;
- :class:`SubspaceGradient` — PCA of the recent token values, project out the low-variance directions
  (§3.3, Alg. 1-2, Eq. 4-8);
- :class:`PartialUniformTimesteps` — PUTS, ``t ~ U{T_L, ..., T_U - 1}`` (§3.4);
- :func:`zo_adam` — ``torch.optim.Adam`` on the estimated gradient with the official code's ``eps = 1e-3``.

Where the paper and the official code differ, the code is followed by default and the paper is an option:
the RGE normalisation (``scaling="repo"``: divide by ``n * sqrt((d_eff + n - 1) / n)``; ``"paper"``: by ``n``),
and the SG basis keeps the official PCA of *standardised* token values. Deliberate deviations: the
perturbation is written into an fp32 master copy (no add/subtract drift), directions come from a passed
``torch.Generator`` (no global reseeding), and the PCA component beyond the rank of the centred history
(an arbitrary vector) is not projected out unless ``drop_null_component=False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

Scaling = Literal["repo", "paper"]


def _check_positive(name: str, value: float, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


@dataclass
class GradientEstimate:
    """Output of :func:`random_gradient_estimate`."""

    grad: Tensor                    # the estimate, same shape/dtype/device as theta
    base_loss: Tensor               # L(theta)
    perturbed_losses: Tensor        # L(theta + mu e_i), i = 1..n
    directions: Tensor              # e_i, shape (n, *theta.shape)


def random_gradient_estimate(loss_fn: Callable[[Tensor], Tensor], theta: Tensor, num_directions: int = 2,
                             mu: float = 1e-3, generator: torch.Generator | None = None,
                             scaling: Scaling = "repo", effective_dim: int | None = None,
                             clip: float | None = None, batched: bool = False) -> GradientEstimate:
    """Forward-difference RGE (Eq. 3): ``g = 1/n sum_i [L(theta + mu e_i) - L(theta)] / mu * e_i``, ``e_i ~ N(0, I)``.

    ``loss_fn`` must evaluate the *same* objective for all ``n + 1`` calls (same image, noise and timestep).
    For a quadratic ``L`` the estimate is unbiased: ``E[g] = grad L`` (the ``mu/2 e^T A e e`` term has zero mean).
    ``scaling="repo"`` divides by ``n * sqrt((d_eff + n - 1) / n)`` instead of ``n`` as the official code does
    (``d_eff = effective_dim``, default ``theta.numel()``; :attr:`SubspaceGradient.effective_dim` during SG).
    ``clip`` bounds each directional derivative to ``[-clip, clip]`` (QZO's DDC; off by default).
    ``batched=True``: ``loss_fn`` takes the stacked points ``(n + 1, *theta.shape)`` (``theta`` first) and returns
    their ``n + 1`` losses in one call; same directions, same estimate.
    """
    _check_positive("num_directions", num_directions, integer=True)
    _check_positive("mu", mu)
    if scaling not in ("repo", "paper"):
        raise ValueError(f"scaling must be 'repo' or 'paper', got {scaling!r}")
    if clip is not None:
        _check_positive("clip", clip)
    if not theta.is_floating_point():
        raise TypeError(f"theta must be a floating-point tensor, got {theta.dtype}")
    dim = theta.numel() if effective_dim is None else effective_dim
    _check_positive("effective_dim", dim, integer=True)

    draw = lambda: torch.randn((num_directions, *theta.shape), generator=generator, dtype=theta.dtype,
                               device=generator.device if generator is not None else theta.device).to(theta.device)
    if batched:
        directions = draw()
        losses = torch.as_tensor(loss_fn(torch.cat([theta[None], theta + mu * directions]))).detach()
        if losses.shape != (num_directions + 1,):
            raise ValueError(f"a batched loss_fn must return {num_directions + 1} losses, got shape {tuple(losses.shape)}")
        base_loss, perturbed = losses[0], list(losses[1:])
    else:
        base_loss = torch.as_tensor(loss_fn(theta)).detach()
        directions = draw()
        perturbed = [torch.as_tensor(loss_fn(theta + mu * direction)).detach() for direction in directions]
    grad = torch.zeros_like(theta)
    for direction, loss in zip(directions, perturbed):
        slope = (loss - base_loss) / mu                                      # directional derivative
        if clip is not None:
            slope = slope.clamp(-clip, clip)
        grad += slope.to(theta.dtype) * direction
    norm = num_directions * (math.sqrt((dim + num_directions - 1) / num_directions) if scaling == "repo" else 1.0)
    return GradientEstimate(grad / norm, base_loss, torch.stack(perturbed), directions)


class SubspaceGradient:
    """Subspace Gradient (§3.3): denoise a ZO gradient with the PCA of the last ``tau`` token values.

    :meth:`push` records the updated token after every step (Alg. 1); every ``tau`` pushes the history
    ``B (m x d)`` is standardised per feature (Eq. 4), its principal directions ``V`` and variances
    ``lambda_i`` computed (Eq. 5), ``i* = min{i : sum_{j<=i} lambda_j / sum_k lambda_k > 1 - nu}`` (Eq. 6), and
    the basis ``P`` = the principal directions after ``i*`` (Eq. 7). :meth:`project` returns
    ``g (I - P^T P)`` (Eq. 8). Until the first refresh it is the identity.

    Only directions inside the span of the recent trajectory are removed (at most ``min(m - 1, d)``).
    Components past the rank of the centred history have zero variance and arbitrary direction; they are
    kept out of ``P`` unless ``drop_null_component=False`` (the official code includes the ``tau``-th one).
    """

    def __init__(self, dim: int, tau: int = 128, nu: float = 1e-3, drop_null_component: bool = True) -> None:
        _check_positive("dim", dim, integer=True)
        _check_positive("tau", tau, integer=True)
        if tau < 2:
            raise ValueError(f"tau must be at least 2 (a PCA needs two samples), got {tau}")
        _check_positive("nu", nu)
        if nu >= 1:
            raise ValueError(f"nu is a fraction of discarded variance and must be < 1, got {nu}")
        self.dim, self.tau, self.nu, self.drop_null_component = dim, tau, float(nu), bool(drop_null_component)
        self.history: Tensor | None = None         # (tau, dim) ring buffer
        self.basis: Tensor | None = None           # P, (k, dim), orthonormal rows
        self.num_pushed = 0

    @property
    def effective_dim(self) -> int:
        """``d - k``: the dimension left after projection (used by the official RGE normalisation)."""
        return self.dim - (0 if self.basis is None else self.basis.shape[0])

    def project(self, grad: Tensor) -> Tensor:
        """``g' = g - (g P^T) P`` (Eq. 8); ``grad`` has shape ``(dim,)`` or ``(..., dim)``."""
        if grad.shape[-1] != self.dim:
            raise ValueError(f"grad must end in dimension {self.dim}, got shape {tuple(grad.shape)}")
        if self.basis is None or self.basis.shape[0] == 0:
            return grad
        basis = self.basis.to(device=grad.device, dtype=grad.dtype)
        return grad - (grad @ basis.T) @ basis

    @torch.no_grad()
    def push(self, theta: Tensor) -> bool:
        """Record the updated token value; returns ``True`` when the basis was refreshed."""
        value = theta.detach().reshape(-1)
        if value.numel() != self.dim:
            raise ValueError(f"theta must have {self.dim} elements, got {value.numel()}")
        if self.history is None:
            self.history = torch.zeros(self.tau, self.dim, dtype=torch.float64, device=value.device)
        self.history[self.num_pushed % self.tau] = value.to(self.history.device, torch.float64)
        self.num_pushed += 1
        if self.num_pushed % self.tau == 0:
            basis = self.low_variance_directions(self.history, self.nu, self.drop_null_component)
            self.basis = self._row_major(basis.to(theta.dtype))
            return True
        return False

    @staticmethod
    def low_variance_directions(history: Tensor, nu: float, drop_null_component: bool = True) -> Tensor:
        """Rows of ``P`` (Eq. 4-7) from a history ``(m, d)``: principal directions of the standardised history
        beyond the fewest that explain more than ``1 - nu`` of its variance."""
        if history.ndim != 2 or history.shape[0] < 2:
            raise ValueError(f"history must be (m >= 2, d), got shape {tuple(history.shape)}")
        values = history.double()
        mean, std = values.mean(0), values.std(0, unbiased=False)
        standardised = (values - mean) / torch.where(std > 0, std, torch.ones_like(std))    # Eq. 4
        _, singular, components = torch.linalg.svd(standardised - standardised.mean(0), full_matrices=False)
        variance = singular ** 2                                                             # Eq. 5
        if variance.sum() == 0:
            return components[:0].to(history.dtype)
        explained = torch.cumsum(variance / variance.sum(), 0)
        above = torch.nonzero(explained > 1 - nu)
        cut = int(above[0]) if len(above) else len(variance) - 1                           # Eq. 6, 0-based i*
        rank = min(history.shape[0] - 1, history.shape[1])
        end = rank if drop_null_component else components.shape[0]
        return components[cut + 1:end].to(history.dtype)                                   # Eq. 7

    @staticmethod
    def _row_major(tensor: Tensor) -> Tensor:
        """A copy with row-major strides: the rounding of ``g @ P.T`` depends on ``P``'s memory layout, which
        differs between an SVD's output and a tensor read back from a checkpoint."""
        return tensor.clone(memory_format=torch.contiguous_format)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to resume from (history, basis, number of pushes)."""
        state = {"num_pushed": torch.tensor(self.num_pushed, dtype=torch.int64)}
        if self.history is not None:
            state["history"] = self.history.clone()
        if self.basis is not None:
            state["basis"] = self.basis.clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` if it cannot come from this ``dim`` and ``tau``."""
        num_pushed = int(state["num_pushed"])
        history, basis = state.get("history"), state.get("basis")
        problems = [f"num_pushed {num_pushed} < 0"] if num_pushed < 0 else []
        if (history is None) != (num_pushed == 0) or (
                history is not None and tuple(history.shape) != (self.tau, self.dim)):
            problems.append(f"history {None if history is None else tuple(history.shape)} after {num_pushed} pushes "
                            f"(expected {(self.tau, self.dim) if num_pushed else None})")
        if (basis is None) != (num_pushed < self.tau) or (basis is not None and (
                basis.ndim != 2 or basis.shape[0] > self.tau or basis.shape[1] != self.dim)):
            problems.append(f"basis {None if basis is None else tuple(basis.shape)} after {num_pushed} pushes "
                            f"(expected {'none' if num_pushed < self.tau else f'(k <= {self.tau}, {self.dim})'})")
        if problems:
            raise ValueError(f"subspace state does not fit dim={self.dim}, tau={self.tau}: {'; '.join(problems)}")
        self.num_pushed = num_pushed
        self.history = None if history is None else self._row_major(history.double())
        self.basis = None if basis is None else self._row_major(basis)

    def __repr__(self) -> str:
        return f"SubspaceGradient(dim={self.dim}, tau={self.tau}, nu={self.nu}, effective_dim={self.effective_dim})"


class PartialUniformTimesteps:
    """PUTS (§3.4): integer timesteps uniform on ``[low, high)``; ZOODiP uses 500..899 of 1000.

    ``PartialUniformTimesteps(0, num_train_timesteps)`` is the usual uniform sampling of textual inversion.
    """

    def __init__(self, low: int = 500, high: int = 900, num_train_timesteps: int = 1000) -> None:
        for name, value in (("low", low), ("high", high), ("num_train_timesteps", num_train_timesteps)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= low < high <= num_train_timesteps:
            raise ValueError(f"need 0 <= low < high <= num_train_timesteps, got low={low}, high={high}, "
                             f"num_train_timesteps={num_train_timesteps}")
        self.low, self.high, self.num_train_timesteps = low, high, num_train_timesteps

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
        """``(batch_size,)`` int64 timesteps."""
        _check_positive("batch_size", batch_size, integer=True)
        ts = torch.randint(self.low, self.high, (batch_size,), generator=generator,
                           device=generator.device if generator is not None else "cpu")
        return ts.to(device) if device is not None else ts

    def __repr__(self) -> str:
        return f"PartialUniformTimesteps(low={self.low}, high={self.high})"


def zo_adam(theta: Tensor, lr: float = 5e-3, betas: tuple[float, float] = (0.9, 0.999),
            eps: float = 1e-3) -> torch.optim.Adam:
    """ZO-Adam of the official code as ``torch.optim.Adam`` over the token vector ``theta``: no weight decay,
    constant ``lr``, ``eps = 1e-3`` added outside the square root,
    ``theta -= lr * (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)``.

    Set ``theta.grad`` to the (projected) estimate, then call ``step()``; ``theta`` must be a leaf tensor.
    """
    _check_positive("lr", lr)
    _check_positive("eps", eps)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not theta.is_leaf or not theta.is_floating_point():
        raise TypeError("theta must be a floating-point leaf tensor (the vector the optimizer updates in place)")
    return torch.optim.Adam([theta], lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps))


def __getattr__(name: str):
    if name == "ZOAdam":
        raise AttributeError("ZOAdam was replaced by torch.optim.Adam: use zo_adam(theta, lr) and set theta.grad "
                             "before step()")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
