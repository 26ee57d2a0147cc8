"""Inverse problems: measurement tasks, diffusion priors (``tasks.priors``), solvers by name, and scores.

    from diffguide.tasks import inverse, zoo
    pipe = zoo.load("digits-class")
    truth = inverse.held_out_digits([0, 1, 2])
    op = inverse.make_task("inpaint_box", sigma_y=0.05, seed=0)
    y = op.measure(truth, torch.Generator().manual_seed(0))
    recon, stats = inverse.solve_pixel(pipe, op, y, "dps", steps=100, seed=0)
    inverse.scores(recon, truth)      # {"psnr": (B,), "ssim": (B,)}

The prior may be any pixel pipeline or ``UNet2DModel`` folder / hub id (``solve_pixel``) or an SD / SDXL / SD3 /
Flux / DiT pipeline (``solve_latent``), loaded with ``tasks.priors.load_prior``.

Images live in [-1, 1] (the digits' and the operators' range); scores map them to [0, 1].
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from diffguide.guidance import DAPS, DDNM, DDRM, DPS, MCG, P2L, PSLD, DiffPIR, EnKG, PiGDM, REDDiff
from diffguide.samplers import diffusers_model_fn, sample_inverse
from diffguide.samplers.base import DenoiseFn, Level
from diffguide.samplers.inverse import SolverStats
from diffguide.samplers.schedule import to_x0
from diffguide.tasks.digits import load_digits_tensors, to_unit
from diffguide.tasks.operators import Operator, make_operator
from diffguide.tasks.priors import LatentPrior, PixelPrior, frozen, load_prior, text_states
from diffguide.tasks.problems import DIGIT_SHAPE, LATENT_SOLVERS, PIXEL_SOLVERS, TASKS  # noqa: F401


def make_task(name: str, sigma_y: float = 0.05, seed: int = 0, shape: Sequence[int] = DIGIT_SHAPE) -> Operator:
    """The operator of task ``name`` (one of ``TASKS``) for images of ``shape``; random parts seeded by ``seed``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    operator, options = TASKS[name]
    return make_operator(operator, shape, sigma_y=sigma_y, generator=torch.Generator().manual_seed(seed), **options)


def held_out_digits(indices: Sequence[int]) -> Tensor:
    """Held-out test digits ``(B, 1, 16, 16)`` in [-1, 1] (``tasks.digits`` test split)."""
    images, _ = load_digits_tensors("test", size=16)
    if not indices or min(indices) < 0 or max(indices) >= len(images):
        raise ValueError(f"digit indices must lie in 0..{len(images) - 1}, got {list(indices)}")
    return images[list(indices)]


def class_denoiser(pipe: Any, label: int | None = None) -> DenoiseFn:
    """``(x_t, level) -> x0_hat`` of a ``ClassConditionalPipeline`` for one class (``None``: the null class,
    i.e. the unconditional prior), for any batch size."""
    label = pipe.null_class_label if label is None else int(label)
    model_fn = diffusers_model_fn(pipe.unet)
    prediction_type = pipe.scheduler.config.prediction_type

    def denoise(x: Tensor, level: Level) -> Tensor:
        labels = torch.full((x.shape[0],), label, device=x.device, dtype=torch.long)
        return to_x0(model_fn(x, level.t, labels), x, level.alpha, level.sigma, prediction_type)

    return denoise


def text_embedding(pipe: Any, prompt: str = "") -> Tensor:
    """The text-encoder states ``(1, L, D)`` of ``prompt`` (``""``: the null prompt P2L starts from)."""
    return text_states(pipe, prompt)


def scores(reconstruction: Tensor, truth: Tensor) -> dict[str, Tensor]:
    """Per-image PSNR (dB) and SSIM of [-1, 1] images, computed on [0, 1] (``data_range = 1``)."""
    recon, target = to_unit(reconstruction.float()), to_unit(truth.float())
    psnr = peak_signal_noise_ratio(recon, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(recon, target, data_range=1.0, reduction="none")
    return {"psnr": psnr, "ssim": ssim}


def pixel_solver(name: str, operator: Operator, y: Tensor, scale: float | None = None,
                 ensemble_size: int | None = None, **options: Any):
    """Solver ``name`` in ``PIXEL_SOLVERS`` with ``scale`` its main hyper-parameter (``None``: the solver's default):
    the step of DPS / MCG / PiGDM / EnKG, DDRM's ``eta``, DiffPIR's ``lam``, DAPS's ``lr``, RED-diff's ``lam``."""
    if name == "dps":
        return DPS(operator, y, 1.0 if scale is None else scale, **options)
    if name == "dps_likelihood":
        return DPS(operator, y, 1.0 if scale is None else scale, normalize="likelihood", **options)
    if name == "mcg":
        return MCG(operator, y, 1.0 if scale is None else scale, **options)
    if name == "enkg":
        return EnKG(operator, y, 0.5 if scale is None else scale, ensemble_size=ensemble_size, **options)
    knobs = {"ddrm": (DDRM, "eta"), "ddnm": (DDNM, None), "diffpir": (DiffPIR, "lam"), "pigdm": (PiGDM, "scale"),
             "daps": (DAPS, "lr"), "reddiff": (REDDiff, "lam")}
    if name in knobs:
        cls, knob = knobs[name]
        if scale is not None:
            if knob is None:
                raise ValueError(f"{name} has no scale; pass scale=None")
            options = {knob: scale, **options}
        return cls(operator, y, **options)
    raise ValueError(f"unknown pixel solver {name!r}; choose from {PIXEL_SOLVERS}")


def pixel_prior(prior: Any, label: int | None = None) -> PixelPrior:
    """``prior`` as a :class:`~diffguide.tasks.priors.PixelPrior`: a prior, a pixel pipeline (``DDPMPipeline``,
    ``DDIMPipeline``, ``ClassConditionalPipeline``), a zoo name, a folder or a hub id; ``label`` for a
    class-conditional network (``None``: a ``ClassConditionalPipeline``'s null class)."""
    if isinstance(prior, PixelPrior):
        if label is not None and label != prior.label:
            raise ValueError(f"label={label} given for a PixelPrior built with label={prior.label}; set it there")
        return prior
    prior = load_prior(prior, label=label)
    if isinstance(prior, LatentPrior):
        raise ValueError(f"{type(prior.pipe).__name__} is a latent prior: pixel solvers ({', '.join(PIXEL_SOLVERS)}) "
                         f"need a pixel one; use a latent solver ({', '.join(LATENT_SOLVERS)})")
    return prior


def latent_prior(prior: Any, prompt: str = "", label: int | None = None) -> LatentPrior:
    """``prior`` as a :class:`~diffguide.tasks.priors.LatentPrior` conditioned on ``prompt`` (DiT: on ``label``):
    a prior, a latent pipeline (SD, SDXL, SD3, Flux, DiT), a zoo name, a folder or a hub id."""
    if isinstance(prior, LatentPrior):
        if prompt or label is not None:
            raise ValueError("prompt or label given for a LatentPrior, which is conditioned; build it with them")
        return prior
    prior = load_prior(prior, prompt=prompt, label=label)
    if isinstance(prior, PixelPrior):
        raise ValueError(f"{type(prior.network).__name__} is a pixel prior: latent solvers "
                         f"({', '.join(LATENT_SOLVERS)}) need a latent one; use a pixel solver "
                         f"({', '.join(PIXEL_SOLVERS)})")
    return prior


def check_shapes(operator: Operator, image_shape: tuple[int, ...]) -> None:
    if tuple(operator.in_shape) != tuple(image_shape):
        raise ValueError(f"the operator takes {'x'.join(map(str, operator.in_shape))} images and the prior makes "
                         f"{'x'.join(map(str, image_shape))} ones; build the task with shape={tuple(image_shape)}")


def solve_pixel(prior: Any, operator: Operator, y: Tensor, solver: str, steps: int = 100, seed: int = 0,
                scale: float | None = None, particles: int = 1, label: int | None = None, progress: bool = False,
                **options: Any) -> tuple[Tensor, SolverStats]:
    """Reconstruct each measurement in ``y`` ``particles`` times with a pixel ``prior`` (see :func:`pixel_prior`).

    Returns ``(images (B * particles, C, H, W) in measurement-major order, stats)``. ``"pinv"`` returns
    ``A^+ y`` (linear operators only). EnKG runs one ensemble of ``particles`` (>= 2) per measurement. The
    prior's network is left as it was (its parameters' ``requires_grad`` are restored).
    """
    if solver == "pinv":
        if not getattr(operator, "is_linear", False):
            raise ValueError("pinv needs a linear operator")
        return operator.pinv(y).clamp(-1, 1).repeat_interleave(particles, 0), SolverStats()
    if solver == "enkg" and particles < 2:
        raise ValueError("EnKG needs an ensemble: particles >= 2")
    prior = pixel_prior(prior, label)
    check_shapes(operator, prior.image_shape)
    batch = y.shape[0] * particles
    y_rows = y if solver == "enkg" else y.repeat_interleave(particles, 0)
    method = pixel_solver(solver, operator, y_rows, scale, ensemble_size=particles, **options)
    plan = prior.plan(steps)
    g = torch.Generator().manual_seed(seed)
    x = prior.noise(batch, g)
    with frozen(*prior.modules):            # gradients flow to x_t only
        out = sample_inverse(prior.denoiser(), x, plan, method, generator=g, disable=not progress)
    return out.clamp(-1, 1), method.stats


def solve_latent(prior: Any, operator: Operator, y: Tensor, solver: str, steps: int = 100, seed: int = 0,
                 scale: float | None = None, prompt: str = "", progress: bool = False,
                 **options: Any) -> tuple[Tensor, SolverStats]:
    """Reconstruct with a latent ``prior`` (see :func:`latent_prior`): ``"latent_dps"``, ``"psld"`` or ``"p2l"``.

    The prior is conditioned on ``prompt`` (``""``: the null prompt); P2L tunes that embedding (every text
    embedding the network reads: SDXL's, SD3's and Flux's pooled one too), so it needs a text-conditioned prior.
    All three run DDIM with ``eta = 0`` (PSLD's and P2L's sampler), so they differ only in their
    data-consistency steps.
    """
    if solver not in LATENT_SOLVERS:
        raise ValueError(f"unknown latent solver {solver!r}; choose from {LATENT_SOLVERS}")
    prior = latent_prior(prior, prompt)
    if solver == "p2l" and not prior.text:
        raise ValueError(f"p2l tunes a text embedding and {type(prior.pipe).__name__} is conditioned on a class "
                         "label, which has none; use latent_dps or psld")
    check_shapes(operator, prior.image_shape)
    scale = 1.0 if scale is None else scale
    with frozen(*prior.modules):
        if solver == "p2l":
            method = P2L(operator, y, prior.model_fn, prior.cond, prior.decode, prior.encode, prior.prediction_type,
                         scale=scale, **options)
            model: Callable | None = None
        else:
            method = DPS(operator, y, scale, decode=prior.decode) if solver == "latent_dps" else \
                PSLD(operator, y, prior.decode, prior.encode, scale=scale, **options)
            model = prior.denoiser()
        plan = prior.plan(steps)
        g = torch.Generator().manual_seed(seed)
        z = prior.noise(y.shape[0], g)
        out = sample_inverse(model, z, plan, method, eta=0.0, generator=g, disable=not progress)
        with torch.no_grad():
            images = prior.decode(out)
    return images.clamp(-1, 1), method.stats
