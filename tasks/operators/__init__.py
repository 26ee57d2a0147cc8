"""Forward operators for inverse problems (data range [-1, 1]; ``sigma_y`` in that range).

``make_operator(name, shape, sigma_y=..., generator=..., **options)`` builds any of ``OPERATORS``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .base import ComposedLinear, Composed, LinearOperator, Operator, compose, conjugate_gradient
from .blackbox import HeatEquation
from .blur import Blur, gaussian_kernel, motion_kernel
from .color import LUMA_WEIGHTS, Grayscale
from .inpainting import Inpainting, box_mask, random_mask
from .matrix import MatrixOperator, random_matrix
from .noise import PoissonNoise
from .nonlinear import PhaseRetrieval
from .resize import AveragePooling, BicubicDownsampling, bicubic_matrix
from .svd import SVDView


def _inpaint_box(shape, sigma_y, generator, box_size=None, margin=None):
    _, h, w = shape
    box = box_size or (h // 2, w // 2)
    margin = h // 8 if margin is None else margin
    return Inpainting(box_mask(shape, box, generator=generator, margin=margin), shape, sigma_y)


def _inpaint_random(shape, sigma_y, generator, missing_fraction=0.7):
    return Inpainting(random_mask(shape, missing_fraction, generator), shape, sigma_y)


def _blur_gauss(shape, sigma_y, generator, kernel_size=9, std=1.5, boundary="circular"):
    return Blur(shape, gaussian_kernel(kernel_size, std), sigma_y, boundary=boundary)


def _blur_motion(shape, sigma_y, generator, kernel_size=9, intensity=0.5, boundary="circular"):
    return Blur(shape, motion_kernel(kernel_size, intensity, generator), sigma_y, boundary=boundary)


OPERATORS: dict[str, Callable[..., Operator]] = {
    "inpaint_box": _inpaint_box,
    "inpaint_random": _inpaint_random,
    "sr_avg": lambda shape, sigma_y, generator, factor=2: AveragePooling(shape, factor, sigma_y),
    "sr_bicubic": lambda shape, sigma_y, generator, factor=2, boundary="renormalize": BicubicDownsampling(
        shape, factor, sigma_y, boundary),
    "blur_gauss": _blur_gauss,
    "blur_motion": _blur_motion,
    "grayscale": lambda shape, sigma_y, generator, weights=None: Grayscale(shape, weights, sigma_y),
    "phase_retrieval": lambda shape, sigma_y, generator, oversample=2.0: PhaseRetrieval(shape, oversample, sigma_y),
    "heat": lambda shape, sigma_y, generator, **kw: HeatEquation(shape, sigma_y=sigma_y, **kw),
}


def make_operator(name: str, shape: Sequence[int], sigma_y: float = 0.0, generator: torch.Generator | None = None,
                  poisson_gain: float | None = None, **options) -> Operator:
    """Build operator ``name`` (one of ``OPERATORS``) for ``(C, H, W)`` images; random parts use ``generator``.

    ``poisson_gain``: Poisson measurement noise of that gain instead of Gaussian ``sigma_y`` (see ``PoissonNoise``).
    """
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}; choose from {sorted(OPERATORS)}")
    op = OPERATORS[name](tuple(shape), sigma_y, generator, **options)
    return op if poisson_gain is None else op.with_poisson(poisson_gain)


__all__ = [
    "AveragePooling", "BicubicDownsampling", "Blur", "Composed", "ComposedLinear", "Grayscale", "HeatEquation",
    "Inpainting", "LUMA_WEIGHTS", "LinearOperator", "MatrixOperator", "OPERATORS", "Operator", "PhaseRetrieval",
    "PoissonNoise", "SVDView",
    "bicubic_matrix", "box_mask", "compose", "conjugate_gradient", "gaussian_kernel", "make_operator",
    "motion_kernel", "random_mask", "random_matrix",
]
