"""Inverse problems on the digits: measurement tasks, priors from the model zoo, solvers by name, and scores.

    from diffguide.tasks import inverse, zoo
    pipe = zoo.load("digits-class")
    truth = inverse.held_out_digits([0, 1, 2])
    op = inverse.make_task("inpaint_box", sigma_y=0.05, seed=0)
    y = op.measure(truth, torch.Generator().manual_seed(0))
    recon, stats = inverse.solve_pixel(pipe, op, y, "dps", steps=100, seed=0)
    inverse.scores(recon, truth)      # {"psnr": (B,), "ssim": (B,)}

Images live in [-1, 1] (the digits' and the operators' range); scores map them to [0, 1].
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from diffguide.guidance import DAPS, DDNM, DDRM, DPS, MCG, P2L, PSLD, DiffPIR, EnKG, PiGDM, REDDiff
from diffguide.guidance.latent import vae_decoder, vae_encoder
from diffguide.samplers import diffusers_model_fn, plan_from_scheduler, sample_inverse
from diffguide.samplers.base import DenoiseFn, Level
from diffguide.samplers.inverse import SolverStats
from diffguide.samplers.schedule import to_x0
from diffguide.tasks.digits import load_digits_tensors, to_unit
from diffguide.tasks.operators import Operator, make_operator

DIGIT_SHAPE = (1, 16, 16)

# name -> (operator name, options): the digit benchmark tasks (16x16 images)
TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "inpaint_box": ("inpaint_box", {"box_size": (8, 8), "margin": 2}),
    "inpaint_random": ("inpaint_random", {"missing_fraction": 0.7}),
    "sr4": ("sr_avg", {"factor": 4}),
    "sr4_bicubic": ("sr_bicubic", {"factor": 4}),
    "deblur_gauss": ("blur_gauss", {"kernel_size": 9, "std": 2.0}),
    "deblur_motion": ("blur_motion", {"kernel_size": 9, "intensity": 0.5}),
    "phase_retrieval": ("phase_retrieval", {"oversample": 2.0}),
    "heat": ("heat", {"num_steps": 5, "stride": 2}),
}

PIXEL_SOLVERS = ("dps", "dps_likelihood", "mcg", "enkg", "ddrm", "ddnm", "diffpir", "pigdm", "daps", "reddiff", "pinv")
LATENT_SOLVERS = ("latent_dps", "psld", "p2l")


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
    tokens = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    with torch.no_grad():
        return pipe.text_encoder(tokens)[0]


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


def solve_pixel(pipe: Any, operator: Operator, y: Tensor, solver: str, steps: int = 100, seed: int = 0,
                scale: float | None = None, particles: int = 1, label: int | None = None, progress: bool = False,
                **options: Any) -> tuple[Tensor, SolverStats]:
    """Reconstruct each measurement in ``y`` ``particles`` times with a ``ClassConditionalPipeline`` prior.

    Returns ``(images (B * particles, C, H, W) in measurement-major order, stats)``. ``"pinv"`` returns
    ``A^+ y`` (linear operators only). EnKG runs one ensemble of ``particles`` (>= 2) per measurement.
    """
    if solver == "pinv":
        if not getattr(operator, "is_linear", False):
            raise ValueError("pinv needs a linear operator")
        return operator.pinv(y).clamp(-1, 1).repeat_interleave(particles, 0), SolverStats()
    if solver == "enkg" and particles < 2:
        raise ValueError("EnKG needs an ensemble: particles >= 2")
    batch = y.shape[0] * particles
    y_rows = y if solver == "enkg" else y.repeat_interleave(particles, 0)
    method = pixel_solver(solver, operator, y_rows, scale, ensemble_size=particles, **options)
    plan = plan_from_scheduler(pipe.scheduler, steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *operator.in_shape, generator=g).to(pipe.unet.device, pipe.unet.dtype)
    flags = [(p, p.requires_grad) for p in pipe.unet.parameters()]
    pipe.unet.requires_grad_(False)          # gradients flow to x_t only
    try:
        out = sample_inverse(class_denoiser(pipe, label), x, plan, method, generator=g, disable=not progress)
    finally:
        for param, flag in flags:            # leave the caller's network as it was
            param.requires_grad_(flag)
    return out.clamp(-1, 1), method.stats


def solve_latent(pipe: Any, operator: Operator, y: Tensor, solver: str, steps: int = 100, seed: int = 0,
                 scale: float | None = None, prompt: str = "", progress: bool = False,
                 **options: Any) -> tuple[Tensor, SolverStats]:
    """Reconstruct with a latent ``StableDiffusionPipeline`` prior: ``"latent_dps"``, ``"psld"`` or ``"p2l"``.

    The prior is conditioned on ``prompt`` (``""``: the null prompt); P2L tunes that embedding. All three run
    DDIM with ``eta = 0`` (PSLD's and P2L's sampler), so they differ only in their data-consistency steps.
    """
    if solver not in LATENT_SOLVERS:
        raise ValueError(f"unknown latent solver {solver!r}; choose from {LATENT_SOLVERS}")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    decode, encode = vae_decoder(pipe.vae), vae_encoder(pipe.vae)
    embedding = text_embedding(pipe, prompt)
    model_fn = diffusers_model_fn(pipe.unet)
    prediction_type = pipe.scheduler.config.prediction_type
    scale = 1.0 if scale is None else scale
    if solver == "p2l":
        method = P2L(operator, y, model_fn, embedding, decode, encode, prediction_type, scale=scale, **options)
        model: Callable | None = None
    else:
        method = DPS(operator, y, scale, decode=decode) if solver == "latent_dps" else \
            PSLD(operator, y, decode, encode, scale=scale, **options)

        def model(z: Tensor, level: Level) -> Tensor:
            cond = embedding.expand(z.shape[0], *embedding.shape[1:])
            return to_x0(model_fn(z, level.t, cond), z, level.alpha, level.sigma, prediction_type)
    plan = plan_from_scheduler(pipe.scheduler, steps)
    g = torch.Generator().manual_seed(seed)
    channels = pipe.unet.config.in_channels
    size = pipe.unet.config.sample_size
    z = torch.randn(y.shape[0], channels, size, size, generator=g).to(pipe.unet.device, pipe.unet.dtype)
    out = sample_inverse(model, z, plan, method, eta=0.0, generator=g, disable=not progress)
    with torch.no_grad():
        images = decode(out)
    return images.clamp(-1, 1), method.stats
