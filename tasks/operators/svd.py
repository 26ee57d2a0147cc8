"""The singular value decomposition ``A = U diag(s) V^T`` of a linear operator, applied implicitly.

DDRM / DDNM (and PiGDM's exact inverse) work in the spectral coordinates ``x_bar = V^T x``. An operator with an
SVD view sets ``has_svd = True`` and implements ``_V``, ``_V_adjoint``, ``_U``, ``_U_adjoint`` and
``singular_values``, with these conventions (the same for every operator):

* spectral tensors have the *input* shape ``(B, *in_shape)``: ``V^T`` and ``V`` are orthogonal maps of the image
  space onto itself;
* ``singular_values`` is a float64 tensor of shape ``in_shape``; it is 0 on the null space of ``A``;
* ``U_adjoint(y)`` returns the spectral coefficients ``(U^T y)_i`` on the coordinates with ``s_i > 0`` and 0
  elsewhere; ``U(z)`` reads only those coordinates. So ``A x = U(s * V^T x)``, ``A^T y = V(s * U^T y)`` and
  ``A^+ y = V(U^T y / s)`` (0 where ``s = 0``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dct_matrix(size: int) -> Tensor:
    """The orthonormal DCT-II matrix ``(size, size)`` (float64); row 0 is the constant ``1 / sqrt(size)``."""
    n = torch.arange(size, dtype=torch.float64)
    k = n[:, None]
    mat = torch.cos(math.pi * (n[None, :] + 0.5) * k / size) * math.sqrt(2.0 / size)
    mat[0] = 1.0 / math.sqrt(size)
    return mat


def orthonormal_completion(vector: Tensor) -> Tensor:
    """A ``(d, d)`` orthogonal matrix whose first column is ``vector / ||vector||`` (float64)."""
    v = vector.to(torch.float64).flatten()
    v = v / v.norm()
    q, _ = torch.linalg.qr(torch.cat([v[:, None], torch.eye(len(v), dtype=torch.float64)], 1))
    q[:, 0] *= torch.sign(q[:, 0] @ v)
    return q


def hartley2(x: Tensor) -> Tensor:
    """The orthonormal 2-D discrete Hartley transform over the last two axes (its own inverse)."""
    z = torch.fft.fft2(x, norm="ortho")
    return (z.real - z.imag).to(x.dtype)


class SVDView:
    """Mixin for :class:`LinearOperator` subclasses with an implicit SVD (see the module docstring)."""

    has_svd = True
    singular_values: Tensor

    def _spectral(self, z: Tensor, who: str) -> None:
        if not isinstance(z, Tensor) or tuple(z.shape[1:]) != tuple(self.in_shape):
            raise ValueError(f"{self.name}.{who}: spectral coefficients must have shape (B, "
                             f"{', '.join(map(str, self.in_shape))})")

    def _s(self, like: Tensor) -> Tensor:
        return self.singular_values.to(device=like.device, dtype=like.dtype)

    def V_adjoint(self, x: Tensor) -> Tensor:
        """Spectral coefficients ``V^T x`` ``(B, *in_shape)``."""
        self._spectral(x, "V_adjoint")
        return self._V_adjoint(x)

    def V(self, z: Tensor) -> Tensor:
        """The image ``V z`` of spectral coefficients ``z``."""
        self._spectral(z, "V")
        return self._V(z)

    def U_adjoint(self, y: Tensor) -> Tensor:
        """``U^T y`` on the coordinates with ``s > 0`` (0 elsewhere), shape ``(B, *in_shape)``."""
        if tuple(y.shape[1:]) != tuple(self.out_shape):
            raise ValueError(f"{self.name}.U_adjoint: y must have shape (B, {', '.join(map(str, self.out_shape))})")
        return self._U_adjoint(y) * (self._s(y) > 0)

    def U(self, z: Tensor) -> Tensor:
        """``U z`` from the coordinates of ``z`` with ``s > 0``: a measurement ``(B, *out_shape)``."""
        self._spectral(z, "U")
        return self._U(z * (self._s(z) > 0))

    def svd_pinv(self, y: Tensor) -> Tensor:
        """``A^+ y = V(U^T y / s)`` with ``1 / 0 := 0``."""
        s = self._s(y)
        return self.V(torch.where(s > 0, self.U_adjoint(y) / torch.where(s > 0, s, torch.ones_like(s)), 0.0))
