"""P2L: prompt-tuning latent diffusion for inverse problems (Chung, Ye, Milanfar, Delbracio 2023, arXiv 2310.01110).

Latent DPS on a text-to-image latent model, plus two additions (abstract: "jointly optimizes the text
embedding on-the-fly while running the reverse diffusion process" and keeps "the evolution of latent
variables within the range space of the encoder, by projection"). Per DDIM step ``t`` (Alg. 1 as far as
it could be reconstructed without the paper's code; no official implementation is public):

1. prompt tuning, ``K`` Adam steps warm-started from the previous step's embedding ``c``:
   ``c <- Adam(c, grad_c ||y - A(D(z0_hat(z_t, c)))||^2)``
2. a latent DPS step with the tuned ``c``:
   ``z_{t-1} = DDIM(z_t; z0_hat, eps_hat) - rho grad_{z_t} ||y - A(D(z0_hat))||``
3. every ``project_every`` steps, the encoder-range projection ``z0_hat <- E(D(z0_hat))`` (or the proximal
   variant ``z0_hat <- E(argmin_x ||y - A x||^2 + lambda ||x - D(z0_hat)||^2)``), carried into ``z_{t-1}``
   as ``z_{t-1} += alpha_{t-1} (E(.) - z0_hat)``: the DDIM step re-noised with the same ``eps_hat``.

With ``prompt_steps=0`` and ``project_every=0`` this is exactly latent DPS (``DPS(..., decode=...)``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from diffguide.samplers.base import DenoiseFn, Level
from diffguide.samplers.inverse import Transition, level_at
from diffguide.samplers.models import call_network
from diffguide.samplers.schedule import Plan, check_prediction_type, to_x0

from .dps import DPS
from .measurement import check_count, check_operator, check_positive

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]


def _each(embedding: Tensor | dict[str, Tensor], fn: Callable[[Tensor], Tensor]) -> Tensor | dict[str, Tensor]:
    """``fn`` on an embedding tensor, or on each tensor of a dict of them."""
    return {k: fn(v) for k, v in embedding.items()} if isinstance(embedding, dict) else fn(embedding)


def _leaves(embedding: Tensor | dict[str, Tensor]) -> list[Tensor]:
    return list(embedding.values()) if isinstance(embedding, dict) else [embedding]


class P2L(DPS):
    """Prompt-tuned latent DPS with encoder-range projection.

    Args:
        operator: differentiable forward model on decoded images (linear when ``prox_weight`` is set).
        y: measurement ``(1 or B, *operator.out_shape)``.
        model_fn: ``(z_t, t, text_embedding) -> network output`` (``samplers.diffusers_model_fn(pipe.unet)``).
        embedding: starting text embedding ``(1 or B, L, D)`` — the null prompt's in the paper — or a dict of
            such per-row tensors (any shape after the batch), all tuned, passed to ``model_fn`` as a dict: e.g.
            ``{"prompt_embeds": ..., "pooled_prompt_embeds": ...}`` for SDXL, SD3 and Flux (``tasks.priors``).
        decode, encode: latents <-> images (``guidance.latent.vae_decoder`` / ``vae_encoder``).
        prediction_type: of ``model_fn``'s output.
        scale, normalize: the latent DPS step (as :class:`DPS`).
        prompt_steps: ``K`` Adam steps on the embedding per diffusion step (0 disables prompt tuning).
        prompt_lr: Adam learning rate for the embedding.
        project_every: projection interval ``gamma`` in steps (0 disables the projection).
        prox_weight: ``lambda`` of the proximal projection; ``None`` projects with ``E(D(z0_hat))``.
    """

    default_eta = 0.0

    def __init__(self, operator: Any, y: Tensor, model_fn: ModelFn, embedding: Tensor | dict[str, Tensor],
                 decode: Callable[[Tensor], Tensor], encode: Callable[[Tensor], Tensor],
                 prediction_type: str = "epsilon", scale: float = 1.0, normalize: str = "norm",
                 prompt_steps: int = 1, prompt_lr: float = 1e-3, project_every: int = 5,
                 prox_weight: float | None = None) -> None:
        if not callable(model_fn) or not callable(decode) or not callable(encode):
            raise TypeError("P2L needs callables model_fn(z, t, embedding), decode(z) and encode(x)")
        super().__init__(operator, y, scale=scale, normalize=normalize, decode=decode)
        if isinstance(embedding, dict):
            if not embedding or not all(isinstance(v, Tensor) and v.is_floating_point() and v.ndim >= 2
                                        for v in embedding.values()):
                raise ValueError("embedding as a dict must map names to floating-point tensors (1 or B, ...)")
            if len({v.shape[0] for v in embedding.values()}) != 1:
                raise ValueError("the tensors of an embedding dict must have the same batch (1 or B)")
        elif not isinstance(embedding, Tensor) or embedding.ndim != 3 or not embedding.is_floating_point():
            raise ValueError("embedding must be a floating-point text embedding of shape (1 or B, L, D)")
        self.model_fn, self.encode = model_fn, encode
        self.prediction_type = check_prediction_type(prediction_type)
        self.initial_embedding = _each(embedding, lambda v: v.detach().clone())
        self.prompt_steps = check_count("prompt_steps", prompt_steps, 0)
        self.prompt_lr = check_positive("prompt_lr", prompt_lr, allow_zero=False)
        self.project_every = check_count("project_every", project_every, 0)
        if prox_weight is not None:
            check_positive("prox_weight", prox_weight, allow_zero=False)
            check_operator(operator, "P2L with prox_weight", needs_gradient=True, needs_linear=True)
            if not callable(getattr(operator, "prox_l2", None)):
                raise ValueError("P2L with prox_weight needs operator.prox_l2 (tasks.operators.LinearOperator)")
        self.prox_weight = prox_weight
        self.embedding: Tensor | dict[str, Tensor] = _each(self.initial_embedding, Tensor.clone)
        self.optimizer: torch.optim.Optimizer | None = None
        self.prompt_losses: list[float] = []

    def reset(self) -> None:
        super().reset()
        self.embedding = _each(self.initial_embedding, Tensor.clone)
        self.optimizer = None
        self.prompt_losses = []

    # -- the denoiser that reads the current embedding --------------------------------------------------------
    def _x0(self, z: Tensor, level: Level, embedding: Tensor | dict[str, Tensor]) -> Tensor:
        rows = lambda v: (v.expand(z.shape[0], *v.shape[1:]) if v.shape[0] == 1 else v).to(z.dtype)
        out = call_network(self.model_fn, z, level, _each(embedding, rows), self.prediction_type)
        return to_x0(out, z, level.alpha, level.sigma, self.prediction_type)

    def denoiser(self) -> DenoiseFn:
        """The sampler's denoiser ``(z_t, level) -> z0_hat`` under the current (tuned) embedding."""
        return lambda z, level: self._x0(z, level, _each(self.embedding, Tensor.detach))

    # -- 1. prompt tuning ----------------------------------------------------------------------------------------
    def _start_tuning(self, batch: int, like: Tensor) -> None:
        rows = next(iter(_leaves(self.embedding))).shape[0]
        if rows not in (1, batch):
            raise ValueError(f"P2L: embedding batch {rows} does not match the latents' {batch}")
        self.embedding = _each(self.embedding, lambda v: v.to(like.device).expand(batch, *v.shape[1:]).clone()
                               .requires_grad_(True))
        self.optimizer = torch.optim.Adam(_leaves(self.embedding), lr=self.prompt_lr)

    def prepare(self, model: DenoiseFn, x: Tensor, plan: Plan, index: int) -> Tensor:
        if self.prompt_steps == 0:
            return x
        if self.optimizer is None:
            self._start_tuning(x.shape[0], x)
        level = level_at(plan, index, x)
        with torch.enable_grad():
            for _ in range(self.prompt_steps):
                self.optimizer.zero_grad(set_to_none=True)
                x0 = self._x0(x.detach(), level, self.embedding)
                loss = self.residual(x0).flatten(1).square().sum(1)
                loss.sum().backward()
                if not all(v.grad is None or bool(torch.isfinite(v.grad).all()) for v in _leaves(self.embedding)):
                    raise FloatingPointError("P2L: non-finite text-embedding gradient; lower prompt_lr")
                self.optimizer.step()
                self.stats.denoiser_calls += x.shape[0]
                self.stats.gradient_calls += x.shape[0]
                self.prompt_losses.append(float(loss.detach().mean()))
        return x

    # -- 3. encoder-range projection -------------------------------------------------------------------------------
    @torch.no_grad()
    def project_latent(self, z0: Tensor) -> Tensor:
        """``E(D(z0))``, or ``E(prox(D(z0)))`` with ``prox(v) = argmin_x ||y - A x||^2 + lambda ||x - v||^2``."""
        image = self.decode(z0)
        if self.prox_weight is not None:
            y = self.y.to(image).expand(image.shape[0], *self.y.shape[1:])
            image = self.operator.prox_l2(image, y, self.prox_weight)
        return self.encode(image)

    def correct(self, transition: Transition) -> Tensor:
        x_next = super().correct(transition)
        index = transition.level.index
        if self.project_every and (index + 1) % self.project_every == 0:
            z0 = transition.x0_hat.detach()
            x_next = x_next + transition.alpha_next * (self.project_latent(z0) - z0)
        return x_next

    def __repr__(self) -> str:
        return (f"P2L(scale={self.scale}, prompt_steps={self.prompt_steps}, prompt_lr={self.prompt_lr}, "
                f"project_every={self.project_every}, prox_weight={self.prox_weight})")
