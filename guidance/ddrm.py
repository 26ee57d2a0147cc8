"""DDRM (Kawar, Elad, Ermon, Song, NeurIPS 2022, arXiv 2201.11793) and DDNM (Wang, Yu, Zhang, ICLR 2023,
arXiv 2212.00490): restoration steps that need no gradient through the denoiser.

DDRM works in the spectral coordinates of ``A = U diag(s) V^T`` (``operator.has_svd``): ``x_bar = V^T x`` in the
VE state ``x / alpha`` (noise ``sigma = sigma_vp / alpha``), ``y_bar_i = (U^T y)_i / s_i`` with noise
``n_i = sigma_y / s_i``. At the first level (paper Eq. 7) the given noise is reshaped into
``x_bar_T,i ~ N(y_bar_i, sigma_T^2 - n_i^2)`` where ``sigma_T > n_i`` or ``N(0, sigma_T^2)`` elsewhere (the official
code's ``large_singulars_index``: a coordinate noisier than the first level starts from noise, not from ``y_bar``). Then, with
``x_bar0 = V^T x0_hat`` and ``sigma'`` the next level (paper Eq. 8):

    s_i = 0:           x_bar'_i = x_bar0_i + sqrt(1 - eta^2) sigma' (x_bar_i - x_bar0_i) / sigma + eta sigma' z
    sigma' <  n_i:     x_bar'_i = x_bar0_i + sqrt(1 - eta^2) sigma' (y_bar_i - x_bar0_i) / n_i  + eta sigma' z
    sigma' >= n_i:     x_bar'_i = (1 - eta_b) x_bar0_i + eta_b y_bar_i + sqrt(sigma'^2 - eta_b^2 n_i^2) z

DeepInverse's ``DDRM`` draws ``z / sqrt(2)`` and treats ``s_i <= sigma_y`` as unmeasured; here ``z ~ N(0, I)``
and every ``s_i > 0`` is measured, as in the paper.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from diffguide.samplers.base import DenoiseFn
from diffguide.samplers.inverse import Transition, noise_like
from diffguide.samplers.schedule import Plan

from .measurement import MeasurementSolver, check_operator, check_positive


def check_svd(operator: Any, who: str) -> None:
    if not getattr(operator, "has_svd", False) or not all(
            callable(getattr(operator, m, None)) for m in ("V", "V_adjoint", "U", "U_adjoint")):
        raise ValueError(f"{who} needs an operator with an SVD view (has_svd: inpainting, average-pool or bicubic SR, "
                         f"colorization, circular blur, matrices), got {type(operator).__name__}; "
                         "use guidance.DPS, DiffPIR or PiGDM for other operators")


class DDRM(MeasurementSolver):
    """DDRM with the paper's defaults ``eta = 0.85``, ``eta_b = 1`` (20 steps in the paper: "DDRM-20").

    Args:
        operator: linear operator with an SVD view (``operator.has_svd``).
        y: measurement ``(1 or B, *operator.out_shape)``.
        eta: ``eta``, the stochasticity of the unmeasured and noise-dominated coordinates (0: deterministic).
        eta_b: ``eta_b``, the weight on the measurement where it is less noisy than the level.
        sigma_y: measurement noise (default ``operator.sigma_y``).
    """

    needs_grad = False
    default_eta = 0.0            # the loop's DDIM move is replaced by Eq. 8

    def __init__(self, operator: Any, y: Tensor, eta: float = 0.85, eta_b: float = 1.0,
                 sigma_y: float | None = None) -> None:
        check_operator(operator, "DDRM", needs_linear=True)
        check_svd(operator, "DDRM")
        super().__init__(operator, y)
        self.eta = check_positive("eta", eta)
        self.eta_b = check_positive("eta_b", eta_b)
        if self.eta > 1 or self.eta_b > 1:
            raise ValueError(f"eta and eta_b must lie in [0, 1], got {eta} and {eta_b}")
        self.sigma_y = check_positive("sigma_y", operator.sigma_y if sigma_y is None else sigma_y)

    def spectral_measurement(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(y_bar, n, measured)``: ``U^T y / s``, the per-coordinate noise ``sigma_y / s`` and ``s > 0``."""
        s = self.operator.singular_values.to(device=like.device, dtype=like.dtype)
        measured = s > 0
        safe = torch.where(measured, s, torch.ones_like(s))
        y = self.y.to(like).expand(like.shape[0], *self.y.shape[1:])
        y_bar = torch.where(measured, self.operator.U_adjoint(y) / safe, 0.0)
        return y_bar, torch.where(measured, self.sigma_y / safe, 0.0), measured.expand_as(like)

    def prepare(self, model: DenoiseFn, x: Tensor, plan: Plan, index: int) -> Tensor:
        if index != 0:
            return x
        if not math.isfinite(float(plan.sigmas[0])):
            raise ValueError("DDRM starts from a finite noise level; pass plan.starting_at(1) for a flow plan")
        alpha, sigma_vp = plan.alpha(0).to(x), plan.sigma_vp(0).to(x)
        sigma = sigma_vp / alpha
        z = self.operator.V_adjoint(x) / sigma_vp                           # the given noise, standardised
        y_bar, n, measured = self.spectral_measurement(x)
        informative = measured & (n < sigma)
        x_bar = torch.where(informative, y_bar + (sigma**2 - n**2).clamp_min(0).sqrt() * z, sigma * z)   # Eq. 7
        return alpha * self.operator.V(x_bar)

    def correct(self, t: Transition) -> Tensor:
        sigma = t.level.sigma / t.level.alpha
        sigma_next = t.sigma_next / t.alpha_next
        x_bar = self.operator.V_adjoint(t.x / t.level.alpha)
        x0_bar = self.operator.V_adjoint(t.x0_hat)
        y_bar, n, measured = self.spectral_measurement(t.x)
        z = noise_like(t.x, t.generator) if float(sigma_next) > 0 else torch.zeros_like(t.x)
        keep = math.sqrt(1 - self.eta**2) * sigma_next
        unmeasured = x0_bar + keep * (x_bar - x0_bar) / sigma + self.eta * sigma_next * z
        noisy = x0_bar + keep * (y_bar - x0_bar) / torch.where(n > 0, n, torch.ones_like(n)) + self.eta * sigma_next * z
        clean = (1 - self.eta_b) * x0_bar + self.eta_b * y_bar + \
            (sigma_next**2 - (self.eta_b * n) ** 2).clamp_min(0).sqrt() * z
        x_bar_next = torch.where(~measured, unmeasured, torch.where(sigma_next < n, noisy, clean))   # Eq. 8
        self.stats.forward_model_calls += 2 * t.x.shape[0]                  # V^T, U^T / V (one SVD pass each)
        return t.alpha_next * self.operator.V(x_bar_next)

    def __repr__(self) -> str:
        return f"DDRM(eta={self.eta}, eta_b={self.eta_b}, sigma_y={self.sigma_y})"


class DDNM(MeasurementSolver):
    """DDNM's range-null-space step (Wang et al. 2023, Sec. 3.2), then the sampler's reverse step:
    ``x0 <- A^+ y + (I - A^+ A) x0_hat = x0_hat + A^+ (y - A x0_hat)``, then the DDIM(eta) move from that ``x0``.

    Exact for noiseless measurements; with ``sigma_y > 0`` it copies the noise into the estimate on every
    non-inpainting operator (a warning says so; DDNM+'s noise scaling is not implemented).
    """

    needs_grad = False
    default_eta = 0.85            # DDNM's sampler: DDIM with eta = 0.85

    def __init__(self, operator: Any, y: Tensor) -> None:
        check_operator(operator, "DDNM", needs_linear=True)
        super().__init__(operator, y)
        if operator.sigma_y > 0:
            warnings.warn(f"DDNM replaces A x0 by the noisy y (sigma_y = {operator.sigma_y}); the measurement noise is "
                          "copied into the estimate (DDNM+'s noise handling is not implemented)", stacklevel=2)

    def correct(self, t: Transition) -> Tensor:
        correction = self.operator.pinv(self.residual(t.x0_hat))
        self.stats.forward_model_calls += t.x.shape[0]                      # pinv
        return t.x_next + t.x0_weight * correction                          # the move is affine in x0

    def __repr__(self) -> str:
        return "DDNM()"
