"""Super-resolution operators: average pooling and anti-aliased bicubic downsampling, with true adjoints.

DPS's SR operator pairs a bicubic resizer with nearest upsampling as its "transpose", which is not the
adjoint; here both operators are explicit linear maps whose adjoint and pseudo-inverse are exact.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LinearOperator, check_shape
from .svd import SVDView, dct_matrix

BOUNDARIES = ("renormalize", "circular", "reflect", "replicate", "valid")


def _check_factor(factor: int, shape: tuple[int, int, int]) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(f"image size {shape[1]}x{shape[2]} is not divisible by factor {factor}")
    return factor


class AveragePooling(SVDView, LinearOperator):
    """``A x`` = means over ``factor x factor`` blocks.

    ``A^T y`` spreads each value over its block divided by ``factor^2``; since ``A A^T = I / factor^2``,
    ``A^+ y`` is nearest-neighbour upsampling. SVD: ``V^T`` is the 2-D DCT-II of each block, arranged so that
    coefficient ``(a, b)`` of block ``(p, q)`` sits at ``(a H/f + p, b W/f + q)``; ``s = 1/f`` on the block means
    (the top-left ``H/f x W/f`` corner) and 0 elsewhere; ``U`` reads that corner.
    """

    def __init__(self, shape: Sequence[int], factor: int, sigma_y: float = 0.0) -> None:
        shape = check_shape(shape)
        self.factor = _check_factor(factor, shape)
        c, h, w = shape
        super().__init__(shape, (c, h // factor, w // factor), sigma_y)
        self.block_dct = dct_matrix(factor)
        self.singular_values = torch.zeros(shape, dtype=torch.float64)
        self.singular_values[:, :h // factor, :w // factor] = 1.0 / factor

    def _forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.factor)

    def _V_adjoint(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        f = self.factor
        blocks = x.reshape(b, c, h // f, f, w // f, f)
        d = self.block_dct.to(x)
        coeffs = torch.einsum("ai,bj,ncpiqj->ncapbq", d, d, blocks)
        return coeffs.reshape(b, c, h, w)

    def _V(self, z: Tensor) -> Tensor:
        b, c, h, w = z.shape
        f = self.factor
        coeffs = z.reshape(b, c, f, h // f, f, w // f)
        d = self.block_dct.to(z)
        return torch.einsum("ai,bj,ncapbq->ncpiqj", d, d, coeffs).reshape(b, c, h, w)

    def _U_adjoint(self, y: Tensor) -> Tensor:
        out = y.new_zeros(y.shape[0], *self.in_shape)
        out[..., :y.shape[-2], :y.shape[-1]] = y
        return out

    def _U(self, z: Tensor) -> Tensor:
        return z[..., :self.out_shape[1], :self.out_shape[2]]

    def _pinv(self, y: Tensor) -> Tensor:
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._pinv(y) / self.factor**2


def cubic(s: Tensor, a: float = -0.5) -> Tensor:
    """Keys' cubic convolution kernel (``a = -0.5``: MATLAB ``imresize``, PIL, torch antialias)."""
    s = s.abs()
    near = ((a + 2) * s - (a + 3)) * s * s + 1
    far = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    return torch.where(s <= 1, near, torch.where(s < 2, far, torch.zeros_like(s)))


def _fold(index: int, size: int, boundary: str) -> int | None:
    """Where tap ``index`` reads under ``boundary`` (``None``: outside the signal)."""
    if 0 <= index < size:
        return index
    if boundary == "circular":
        return index % size
    if boundary == "replicate":
        return min(max(index, 0), size - 1)
    if boundary == "reflect":                       # whole-sample symmetric, as F.pad(mode="reflect")
        period = 2 * (size - 1)
        index = abs(index) % period if period else 0
        return period - index if index >= size else index
    return None


def bicubic_matrix(size_in: int, size_out: int, boundary: str = "renormalize") -> Tensor:
    """The ``(size_out, size_in)`` matrix of anti-aliased bicubic downsampling along one axis (float64).

    The kernel is stretched by the scale ``size_in / size_out``. Taps that fall outside the signal are, by
    ``boundary``: ``"renormalize"`` dropped with the remaining weights renormalised (the convention of
    ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``); ``"circular"`` wrapped;
    ``"reflect"`` mirrored about the edge pixel; ``"replicate"`` read from the edge pixel; ``"valid"``: rows that
    need any outside tap are left out (fewer output samples).
    """
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    scale = size_in / size_out
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    rows = []
    for i in range(size_out):
        center = scale * (i + 0.5)
        lo, hi = math.floor(center - support + 0.5), math.floor(center + support + 0.5)
        taps = torch.arange(lo, hi, dtype=torch.float64)
        weights = cubic((taps - center + 0.5) * inv)
        keep = weights != 0
        taps, weights = taps[keep].long().tolist(), weights[keep]
        folded = [_fold(t, size_in, boundary) for t in taps]
        if boundary == "valid" and None in folded:
            continue
        row = torch.zeros(size_in, dtype=torch.float64)
        for j, w in zip(folded, weights):
            if j is not None:
                row[j] += w
        rows.append(row / row.sum() if boundary == "renormalize" else row / weights.sum())
    if not rows:
        raise ValueError(f"no valid output sample for {size_in} -> {size_out} with boundary='valid'")
    return torch.stack(rows)


class BicubicDownsampling(SVDView, LinearOperator):
    """``A x = W_h x W_w^T``: separable anti-aliased bicubic downsampling by an integer ``factor``.

    Adjoint ``W_h^T y W_w``; pseudo-inverse ``W_h^+ y W_w^{+T}`` (``(W_h ⊗ W_w)^+ = W_h^+ ⊗ W_w^+``).
    ``boundary`` (see :func:`bicubic_matrix`) sets how the border is read; ``"valid"`` shrinks the output.
    SVD: ``W = U_1 S_1 V_1^T`` per axis, so ``A = (U_h ⊗ U_w)(S_h ⊗ S_w)(V_h ⊗ V_w)^T``; the measured spectral
    coefficients sit in the top-left ``rank_h x rank_w`` corner.
    """

    def __init__(self, shape: Sequence[int], factor: int, sigma_y: float = 0.0,
                 boundary: str = "renormalize") -> None:
        shape = check_shape(shape)
        self.factor = _check_factor(factor, shape)
        c, h, w = shape
        self.boundary = boundary
        self.matrix_h = bicubic_matrix(h, h // factor, boundary)
        self.matrix_w = bicubic_matrix(w, w // factor, boundary)
        super().__init__(shape, (c, self.matrix_h.shape[0], self.matrix_w.shape[0]), sigma_y)
        self.pinv_h = torch.linalg.pinv(self.matrix_h)
        self.pinv_w = torch.linalg.pinv(self.matrix_w)
        self.svd_h = torch.linalg.svd(self.matrix_h, full_matrices=True)
        self.svd_w = torch.linalg.svd(self.matrix_w, full_matrices=True)
        s_h = torch.zeros(h, dtype=torch.float64)
        s_h[:len(self.svd_h[1])] = self.svd_h[1]
        s_w = torch.zeros(w, dtype=torch.float64)
        s_w[:len(self.svd_w[1])] = self.svd_w[1]
        self.singular_values = (s_h[:, None] * s_w[None, :]).expand(shape).clone()

    def _V_adjoint(self, x: Tensor) -> Tensor:
        return self._apply(self.svd_h[2], x, self.svd_w[2])              # V_h^T x V_w

    def _V(self, z: Tensor) -> Tensor:
        return self._apply(self.svd_h[2].T, z, self.svd_w[2].T)

    def _U_adjoint(self, y: Tensor) -> Tensor:
        k_h, k_w = len(self.svd_h[1]), len(self.svd_w[1])
        out = y.new_zeros(y.shape[0], *self.in_shape)
        out[..., :k_h, :k_w] = self._apply(self.svd_h[0][:, :k_h].T, y, self.svd_w[0][:, :k_w].T)
        return out

    def _U(self, z: Tensor) -> Tensor:
        k_h, k_w = len(self.svd_h[1]), len(self.svd_w[1])
        return self._apply(self.svd_h[0][:, :k_h], z[..., :k_h, :k_w], self.svd_w[0][:, :k_w])

    @staticmethod
    def _apply(left: Tensor, x: Tensor, right: Tensor) -> Tensor:
        left, right = left.to(x), right.to(x)
        return left @ x @ right.transpose(0, 1)

    def _forward(self, x: Tensor) -> Tensor:
        return self._apply(self.matrix_h, x, self.matrix_w)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._apply(self.matrix_h.T, y, self.matrix_w.T)

    def _pinv(self, y: Tensor) -> Tensor:
        return self._apply(self.pinv_h, y, self.pinv_w)

