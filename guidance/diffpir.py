"""DiffPIR: denoising diffusion models for plug-and-play image restoration (Zhu, Zhang, Liang, Cao, Wen, Timofte,
Van Gool, CVPRW 2023, arXiv 2305.08995), Algorithm 1.

Per step, with ``x0 = D(x_t)`` and the VE level ``sigma_bar_t = sigma_t / alpha_t``:

    x0_hat  = argmin_x ||y - A x||^2 + rho_t ||x - x0||^2,      rho_t = lambda sigma_y^2 / sigma_bar_t^2    (data step)
    eps_hat = (x_t - alpha_t x0_hat) / sigma_t
    x_{t-1} = alpha_{t-1} x0_hat + sigma_{t-1} (sqrt(1 - zeta) eps_hat + sqrt(zeta) z)                     (sampling step)

``sigma_y`` and ``sigma_bar_t`` are both in the data's units. The official code and DeepInverse measure
``sigma_y`` on [0, 1] images while ``sigma_bar_t`` is on [-1, 1], and DeepInverse's data term is half the
official one: DeepInverse's ``lambda_`` equals twice this ``lam`` on [-1, 1] data. With ``sigma_y = 0`` the
data step is the projection onto ``{A x = y}``. Linear operators only (``prox_l2``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from diffguide.samplers.inverse import Transition, noise_like

from .dps import check_range
from .measurement import MeasurementSolver, check_operator, check_positive


class DiffPIR(MeasurementSolver):
    """DiffPIR with ``lam = 7`` (DeepInverse's default; the paper tunes it in [3, 25]) and ``zeta = 0.3`` (the
    paper's value for deblurring and SR; it uses 1.0 for inpainting).

    Args:
        operator: linear operator with ``prox_l2`` (closed form for inpainting and circular blur, CG otherwise).
        y: measurement ``(1 or B, *operator.out_shape)``.
        lam: ``lambda`` in ``rho_t``.
        zeta: fresh-noise fraction of the sampling step (0: DDIM, 1: fully re-noised).
        sigma_y: measurement noise in the data's units (default ``operator.sigma_y``).
        clip_x0: ``(low, high)`` clamps the denoiser's ``x0`` before the data step (DeepInverse: ``(-1, 1)``).
    """

    needs_grad = False
    default_eta = 0.0

    def __init__(self, operator: Any, y: Tensor, lam: float = 7.0, zeta: float = 0.3, sigma_y: float | None = None,
                 clip_x0: tuple[float, float] | None = None) -> None:
        check_operator(operator, "DiffPIR", needs_linear=True)
        if not callable(getattr(operator, "prox_l2", None)):
            raise ValueError(f"DiffPIR needs operator.prox_l2, which {type(operator).__name__} lacks")
        super().__init__(operator, y)
        self.lam = check_positive("lam", lam, allow_zero=False)
        self.zeta = check_positive("zeta", zeta)
        if self.zeta > 1:
            raise ValueError(f"zeta must lie in [0, 1], got {zeta}")
        self.sigma_y = check_positive("sigma_y", operator.sigma_y if sigma_y is None else sigma_y)
        self.clip_x0 = check_range("clip_x0", clip_x0)

    def data_step(self, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """``argmin_x ||y - A x||^2 + rho_t ||x - x0||^2`` (the projection onto ``A x = y`` when ``rho_t = 0``)."""
        y = self.y.to(x0).expand(x0.shape[0], *self.y.shape[1:])
        self.stats.forward_model_calls += x0.shape[0]
        rho = self.lam * self.sigma_y**2 * float(alpha / sigma) ** 2
        if rho == 0:
            return self.operator.project(x0, y)
        return self.operator.prox_l2(x0, y, rho)

    def correct(self, t: Transition) -> Tensor:
        x0 = t.x0_hat if self.clip_x0 is None else t.x0_hat.clamp(*self.clip_x0)
        x0_hat = self.data_step(x0, t.level.alpha, t.level.sigma)
        if float(t.sigma_next) == 0:
            return t.alpha_next * x0_hat
        eps_hat = (t.x - t.level.alpha * x0_hat) / t.level.sigma
        noise = noise_like(t.x, t.generator) if self.zeta > 0 else 0.0
        return t.alpha_next * x0_hat + t.sigma_next * ((1 - self.zeta) ** 0.5 * eps_hat + self.zeta**0.5 * noise)

    def __repr__(self) -> str:
        return f"DiffPIR(lam={self.lam}, zeta={self.zeta}, sigma_y={self.sigma_y})"
