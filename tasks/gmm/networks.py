"""Stand-in networks with exact outputs: a Gaussian mixture per class as a diffusers-style UNet (noise
prediction) or flow transformer (velocity), for samplers, guides and pipelines to be tested against closed forms."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .mixture import GaussianMixture, MeansLayout


class _Config(dict):
    """A read-only dict with attribute access (what pipelines read from ``unet.config``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def _blocked(self, *args, **kwargs):
        raise TypeError("config is read-only")

    __setitem__ = __delitem__ = update = pop = setdefault = _blocked


class ClassConditionalGMM(MeansLayout, torch.nn.Module):
    """One Gaussian mixture per class plus the unconditional mixture ``sum_c prior_c p_c``; exact eps/x0.

    The mixture lives on the flattened ``sample_shape = (C, H, W)`` image. Two uses:

    * model callable ``gmm.eps(x_t, t, cond) -> eps`` (``x_t`` of shape (B, d) or (B, C, H, W); ``cond``
      class labels (B,), with ``null_class_label == num_classes`` (or ``None``) for the unconditional mixture);
    * drop-in UNet: ``forward(sample, timestep, class_labels=None, ...)`` returns an object with ``.sample``
      (a tuple with ``return_dict=False``) and ``config`` carries ``in_channels``, ``sample_size``,
      ``num_class_embeds = num_classes + 1`` etc., so ``ClassConditionalPipeline(unet=gmm, scheduler=...)`` runs.

    Timesteps map to ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` through ``alphas_cumprod`` (the scheduler's):
    integer ``t`` reads ``abar[t]``; non-integer ``t`` interpolates the VE sigma ``sqrt((1 - abar)/abar)``
    linearly between neighbouring integers, as diffusers' Euler schedulers do (``interpolation_type="linear"``).
    :meth:`denoiser` skips timesteps altogether and uses a sampler ``Level``'s exact ``alpha, sigma``.
    """

    def __init__(self, class_mixtures: Sequence[GaussianMixture], alphas_cumprod: Tensor,
                 class_priors: Tensor | None = None, sample_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        alphas_cumprod = torch.as_tensor(alphas_cumprod)
        if alphas_cumprod.ndim != 1 or bool(((alphas_cumprod <= 0) | (alphas_cumprod >= 1)).any()):
            raise ValueError("alphas_cumprod must be a 1-D tensor with values in (0, 1)")
        self._register_mixtures(class_mixtures, class_priors, sample_shape, len(alphas_cumprod))
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))

    def _register_mixtures(self, class_mixtures: Sequence[GaussianMixture], class_priors: Tensor | None,
                           sample_shape: Sequence[int] | None, num_train_timesteps: int) -> None:
        if not class_mixtures or not all(isinstance(m, GaussianMixture) for m in class_mixtures):
            raise TypeError("class_mixtures must be a non-empty sequence of GaussianMixture")
        dim = class_mixtures[0].dim
        if any(m.dim != dim for m in class_mixtures):
            raise ValueError("all class mixtures must have the same dimension")
        sample_shape = (1, dim, 1) if sample_shape is None else tuple(int(s) for s in sample_shape)
        if len(sample_shape) != 3 or math.prod(sample_shape) != dim:
            raise ValueError(f"sample_shape must be (C, H, W) with C*H*W = {dim}, got {sample_shape}")
        dtype = class_mixtures[0].dtype
        priors = torch.ones(len(class_mixtures), dtype=dtype) if class_priors is None else torch.as_tensor(
            class_priors, dtype=dtype)
        if priors.shape != (len(class_mixtures),) or bool((priors <= 0).any()):
            raise ValueError(f"class_priors must be {len(class_mixtures)} positive numbers")
        self.sample_shape = sample_shape
        self.register_buffer("class_priors", priors / priors.sum())
        self.register_buffer("counts", torch.tensor([m.num_components for m in class_mixtures]))
        self.register_buffer("weights", torch.cat([m.weights.to(dtype) for m in class_mixtures]))
        self.register_buffer("means", torch.cat([m.means.to(dtype) for m in class_mixtures]))
        self.register_buffer("covs", torch.cat([m.covs.to(dtype) for m in class_mixtures]))
        self.config = _Config(
            in_channels=sample_shape[0], out_channels=sample_shape[0], sample_size=tuple(sample_shape[1:]),
            num_class_embeds=len(class_mixtures) + 1, time_cond_proj_dim=None,
            num_train_timesteps=num_train_timesteps, dim=dim)

    # -- mixtures -------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @property
    def null_class_label(self) -> int:
        return self.num_classes


    def mixture(self, label: int | None = None) -> GaussianMixture:
        """The class-``label`` mixture; ``None`` or ``null_class_label`` gives the unconditional one."""
        if label is None or label == self.null_class_label:
            priors = torch.repeat_interleave(self.class_priors, self.counts)
            return GaussianMixture(priors * self.weights, self.means, self.covs)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_classes:
            raise ValueError(f"class label must be an int in 0..{self.num_classes} ({self.num_classes} = "
                             f"unconditional), got {label!r}")
        stop = int(self.counts[: label + 1].sum())
        start = stop - int(self.counts[label])
        return GaussianMixture(self.weights[start:stop], self.means[start:stop], self.covs[start:stop])

    # -- timesteps ---------------------------------------------------------------------------------------
    def noise_level(self, timestep: float | Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` (float64, shape of ``timestep``) of a network timestep; see the class docstring."""
        t = torch.as_tensor(timestep, device=self.alphas_cumprod.device).to(torch.float64)
        last = len(self.alphas_cumprod) - 1
        if not torch.isfinite(t).all() or bool(((t < 0) | (t > last)).any()):
            raise ValueError(f"timesteps must lie in [0, {last}], got {timestep}")
        abar = self.alphas_cumprod
        lo = t.floor().long().clamp(max=last)
        hi = (lo + 1).clamp(max=last)
        frac = t - lo
        ve = ((1 - abar) / abar).sqrt()
        ve_t = ve[lo] + frac * (ve[hi] - ve[lo])
        abar_t = torch.where(frac == 0, abar[lo], 1 / (1 + ve_t**2))
        return abar_t.sqrt(), (1 - abar_t).sqrt()

    def _labels(self, labels: Tensor | int | None, batch: int) -> Tensor:
        if labels is None:
            return torch.full((batch,), self.null_class_label, dtype=torch.long)
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError("class labels must be integers")
        labels = labels.reshape(-1).cpu()
        if labels.numel() == 1:
            labels = labels.expand(batch)
        if labels.numel() != batch:
            raise ValueError(f"got {labels.numel()} class labels for a batch of {batch}")
        if bool(((labels < 0) | (labels > self.null_class_label)).any()):
            raise ValueError(f"class labels must lie in 0..{self.null_class_label} "
                             f"({self.null_class_label} = unconditional), got {labels.tolist()}")
        return labels

    def _flat(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("x_t must be a floating-point tensor")
        if x.ndim == 2 and x.shape[1] == self.dim:
            return x
        if x.ndim == 4 and tuple(x.shape[1:]) == self.sample_shape:
            return x.reshape(x.shape[0], self.dim)
        raise ValueError(f"x_t must have shape (B, {self.dim}) or (B, {', '.join(map(str, self.sample_shape))}), "
                         f"got {tuple(x.shape)}")

    def _per_class(self, x: Tensor, alpha: Tensor, sigma: Tensor, labels: Tensor, what: str) -> Tensor:
        flat = self._flat(x).to(self.dtype)
        batch = flat.shape[0]
        # one level for the batch stays 0-dim: per-row levels cost one factorisation per row
        alpha, sigma = (v.to(self.dtype).reshape(batch) if v.numel() > 1 and bool((v != v.flatten()[0]).any())
                        else v.to(self.dtype).flatten()[0] for v in (alpha, sigma))
        labels = self._labels(labels, batch)
        out = torch.empty_like(flat)
        for label in labels.unique().tolist():
            rows = (labels == label).nonzero().squeeze(1).to(flat.device)
            mixture = self.mixture(int(label))
            fn = mixture.eps if what == "eps" else mixture.denoise
            levels = [v[rows] if v.ndim else v for v in (alpha, sigma)]
            out[rows] = fn(flat[rows], *levels)
        return out.reshape(x.shape).to(x.dtype)

    # -- model callables ---------------------------------------------------------------------------------
    def eps(self, x_t: Tensor, t: float | Tensor, cond: Tensor | int | None = None) -> Tensor:
        """Exact ``E[eps | x_t]`` at network time ``t`` for class labels ``cond`` (``None`` = unconditional)."""
        alpha, sigma = self.noise_level(t)
        return self._per_class(x_t, alpha, sigma, cond, "eps")

    def denoiser(self, cond: Tensor | int | None = None) -> Callable:
        """A sampler ``DenoiseFn``: ``(x_t, level) -> E[x0 | x_t]`` at the level's exact ``alpha, sigma``."""

        def denoise(x_t: Tensor, level) -> Tensor:
            return self._per_class(x_t, torch.as_tensor(level.alpha), torch.as_tensor(level.sigma), cond, "x0")

        return denoise

    def forward(self, sample: Tensor, timestep: float | Tensor, class_labels: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, return_dict: bool = True, **kwargs):
        """UNet-style call: ``sample`` (B, C, H, W) -> eps prediction in ``.sample``."""
        from diffusers.models.unets.unet_2d import UNet2DOutput

        if sample.ndim != 4 or tuple(sample.shape[1:]) != self.sample_shape:
            raise ValueError(f"sample must have shape (B, {', '.join(map(str, self.sample_shape))}), "
                             f"got {tuple(sample.shape)}")
        eps = self.eps(sample, timestep, class_labels)
        return UNet2DOutput(sample=eps) if return_dict else (eps,)


class FlowMatchingGMM(ClassConditionalGMM):
    """The class-conditional mixtures as a rectified-flow network: exact velocities ``v = E[eps - x0 | x_s]``.

    A drop-in for SD3Transformer2DModel-style transformers: ``forward(hidden_states=x_s, timestep=t, ...)``
    reads the flow state ``x_s = (1 - s) x0 + s eps`` at ``s = t / num_train_timesteps`` (diffusers'
    FlowMatch* timesteps ``t = 1000 s``; ``s = 1`` is pure noise) and returns the velocity in ``.sample``.
    Class labels come as ``class_labels=`` (``None`` or ``null_class_label``: the unconditional mixture); the
    text-model arguments (``encoder_hidden_states``, ``pooled_projections``, ...) are accepted and ignored.
    ``v = (x_s - D) / s`` with the exact denoiser ``D = E[x0 | x_s]`` (G4) at ``alpha = 1 - s, sigma = s``.
    :meth:`denoiser` (inherited) answers x0 at a sampler ``Level``'s exact ``alpha, sigma`` (any scale).
    """

    def __init__(self, class_mixtures: Sequence[GaussianMixture], num_train_timesteps: int = 1000,
                 class_priors: Tensor | None = None, sample_shape: Sequence[int] | None = None) -> None:
        torch.nn.Module.__init__(self)
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        self._register_mixtures(class_mixtures, class_priors, sample_shape, num_train_timesteps)

    def noise_level(self, timestep: float | Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma) = (1 - s, s)`` with ``s = timestep / num_train_timesteps`` in [0, 1] (float64)."""
        s = torch.as_tensor(timestep, device=self.means.device).to(torch.float64) / self.config.num_train_timesteps
        if not torch.isfinite(s).all() or bool(((s < 0) | (s > 1)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.config.num_train_timesteps}], got {timestep}")
        return 1 - s, s

    def velocity(self, x_s: Tensor, t: float | Tensor, cond: Tensor | int | None = None) -> Tensor:
        """Exact ``E[eps - x0 | x_s]`` at network time ``t`` (flow state ``x_s``, ``s > 0``)."""
        alpha, sigma = self.noise_level(t)
        if bool((sigma == 0).any()):
            raise ValueError("the velocity needs s > 0 (timestep > 0)")
        x0 = self._per_class(x_s, alpha, sigma, cond, "x0")
        return (x_s - x0) / sigma.to(x_s.dtype).reshape(-1, *[1] * (x_s.ndim - 1))

    def forward(self, hidden_states: Tensor, timestep: float | Tensor, encoder_hidden_states: Tensor | None = None,
                pooled_projections: Tensor | None = None, class_labels: Tensor | None = None,
                return_dict: bool = True, **kwargs):
        """Transformer-style call: ``hidden_states`` (B, C, H, W) flow state -> velocity in ``.sample``."""
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if hidden_states.ndim != 4 or tuple(hidden_states.shape[1:]) != self.sample_shape:
            raise ValueError(f"hidden_states must have shape (B, {', '.join(map(str, self.sample_shape))}), "
                             f"got {tuple(hidden_states.shape)}")
        v = self.velocity(hidden_states, timestep, class_labels)
        return Transformer2DModelOutput(sample=v) if return_dict else (v,)
