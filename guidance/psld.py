"""Latent DPS and PSLD (Rout, Raoof, Daras, Caramanis, Dimakis, Shakkottai, NeurIPS 2023, arXiv 2307.00619).

One DDIM step in latent space, then (official ``psld.py::p_sample_ddim``, both norms non-squared):

    L = omega ||y - A D(z0_hat)|| + gamma ||z0_hat - E(A^T y + (I - A^T A) D(z0_hat))||,    z_{t-1} = z' - grad_{z_t} L

``gamma = 0`` is latent DPS (LDPS). The "gluing" image ``A^T y + (I - A^T A) D(z0)`` keeps the measured part
from ``y`` and the rest from the decoder; it lies on ``{A x = y}`` only when ``A`` has orthonormal rows
(inpainting). Here it is built with ``A^+`` — ``A^+ y + (I - A^+ A) D(z0)`` — the orthogonal projection of
``D(z0)`` onto ``{A x = y}`` for every linear ``A``, and identical to the paper's for orthonormal rows.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from diffguide.samplers.inverse import Transition

from .dps import DPS
from .measurement import batch_norms, check_operator, check_positive


class PSLD(DPS):
    """PSLD: latent DPS plus the gluing term.

    Args:
        operator: differentiable forward model on decoded images (linear if ``gluing > 0``).
        y: measurement ``(1 or B, *operator.out_shape)``.
        decode: latents -> images (e.g. ``guidance.latent.vae_decoder(pipe.vae)``).
        encode: images -> latents (``guidance.latent.vae_encoder(pipe.vae)``); needed if ``gluing > 0``.
        scale: ``omega``, the step on ``grad ||y - A D(z0_hat)||`` (official SD box inpainting: 0.1 at 1000 steps).
        gluing: ``gamma`` (official: 0.1 SR/deblur, 0.01 box inpainting; 0 = latent DPS).
    """

    default_eta = 0.0  # DDIM eta = 0, as the official script

    def __init__(self, operator: Any, y: Tensor, decode: Callable[[Tensor], Tensor],
                 encode: Callable[[Tensor], Tensor] | None = None, scale: float = 1.0, gluing: float = 0.1) -> None:
        if decode is None:
            raise ValueError("PSLD works on latents: pass decode (latents -> images)")
        super().__init__(operator, y, scale=scale, normalize="norm", decode=decode)
        self.gluing = check_positive("gluing", gluing)
        if self.gluing > 0:
            check_operator(operator, "PSLD with gluing > 0", needs_gradient=True, needs_linear=True)
            if encode is None or not callable(encode):
                raise ValueError("PSLD with gluing > 0 needs encode (images -> latents)")
        self.encode = encode

    def glue(self, image: Tensor) -> Tensor:
        """``A^+ y + (I - A^+ A) image``: the projection of ``image`` onto ``{x : A x = y}``."""
        return self.operator.project(image, self.y.to(image).expand(image.shape[0], *self.y.shape[1:]))

    def data_loss(self, x0_hat: Tensor) -> Tensor:
        """Per-sample ``omega ||y - A D(z0)|| + gamma ||z0 - E(glue(D(z0)))||``: the weights are inside the loss, as
        in the official code (``error = inpaint_error * gamma + meas_error * omega``), so ``omega = 0`` keeps the
        gluing step."""
        image = self.decode(x0_hat)
        self.stats.forward_model_calls += x0_hat.shape[0]
        loss = self.scale * batch_norms(self.y.to(image) - self.operator.forward(image))
        if self.gluing > 0:
            loss = loss + self.gluing * batch_norms(x0_hat - self.encode(self.glue(image)))
        return loss

    def step_weight(self, transition: Transition) -> float:
        """1: ``omega`` and ``gamma`` already weigh the two terms of :meth:`data_loss`."""
        return 1.0
