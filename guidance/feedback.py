"""Scoring the images a step predicts: evaluators for feedback-driven guides (dynamic CFG, GFCG).

An evaluator is any callable ``(images, step) -> scores`` with ``images`` ``(B, C, H, W)`` in [-1, 1] (the
x0 estimate of the step, decoded for latent models) and ``scores`` ``(B,)``, higher is better. The model
objects (classifier, open_clip model, VAE) are passed in; nothing here loads weights.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Step

Evaluator = Callable[[Tensor, Step], Tensor]
Decode = Callable[[Tensor], Tensor]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vae_decoder(vae: torch.nn.Module) -> Decode:
    """``latents -> images`` in [-1, 1] for a diffusers ``AutoencoderKL`` (undoes ``scaling_factor``/``shift_factor``)."""
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def decode(latents: Tensor) -> Tensor:
        param = next(vae.parameters())
        return vae.decode(latents.to(param.dtype) / scale + shift, return_dict=False)[0].to(latents.dtype)

    return decode


@torch.no_grad()
def predicted_images(x0: Tensor, decode: Decode | None = None, clip: bool = True) -> Tensor:
    """The step's x0 estimate as images: decoded (latent models), clamped to [-1, 1] (``clip``), no autograd graph."""
    images = x0 if decode is None else decode(x0)
    return images.clamp(-1, 1) if clip else images


def check_scores(scores: Any, batch_size: int, who: str) -> Tensor:
    """Scores must be a finite real tensor of shape ``(batch_size,)``."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"{who} must return a tensor of shape ({batch_size},), got {type(scores).__name__}")
    if scores.shape != (batch_size,):
        raise ValueError(f"{who} must return scores of shape ({batch_size},), got {tuple(scores.shape)}")
    if not scores.is_floating_point() or not torch.isfinite(scores).all():
        raise ValueError(f"{who} returned non-finite or non-float scores: {scores}")
    return scores


def target_labels(labels: Tensor | None, step: Step, batch_size: int, who: str) -> Tensor:
    """Class labels ``(B,)``: ``labels`` if given, else the step's condition when it is a class-label tensor."""
    if labels is None:
        labels = step.cond
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.shape != (batch_size,):
            raise ValueError(f"{who} needs target labels: the condition is not a class-label tensor of shape "
                             f"({batch_size},); pass labels= (e.g. the digit of each prompt)")
    labels = torch.as_tensor(labels)
    if labels.shape != (batch_size,):
        raise ValueError(f"{who}: labels must have shape ({batch_size},), got {tuple(labels.shape)}")
    return labels.long()


class ClassifierConfidence:
    """``log p(y | image)`` under a classifier returning logits ``(B, K)`` (temperature ``T``: softmax of logits/T).

    ``labels`` are the targets ``(B,)``; by default the step's class-label condition. The classifier runs
    under ``torch.no_grad`` (inference mode, as dynamic CFG's evaluators and GFCG use it).
    """

    def __init__(self, classifier: Callable[[Tensor], Tensor], labels: Tensor | None = None,
                 temperature: float = 1.0) -> None:
        if not callable(classifier):
            raise TypeError(f"classifier must be callable (images -> logits), got {type(classifier).__name__}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.classifier, self.labels, self.temperature = classifier, labels, float(temperature)

    def __call__(self, images: Tensor, step: Step) -> Tensor:
        labels = target_labels(self.labels, step, images.shape[0], "ClassifierConfidence").to(images.device)
        with torch.no_grad():
            logits = self.classifier(images)
        if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
            raise ValueError(f"classifier must return logits (B, K), got {tuple(logits.shape)}")
        log_p = torch.log_softmax(logits.double() / self.temperature, dim=1)
        return log_p.gather(1, labels.view(-1, 1).to(log_p.device))[:, 0].to(images.dtype)


class ClipAlignment:
    """CLIP alignment ``cos(E_img(image), E_txt(prompt))`` with an open_clip model (CLIP score / 100).

    ``text_features`` are ``(B, D)`` (one prompt per sample) or ``(D,)``; :meth:`from_prompts` encodes prompts.
    Images in [-1, 1] are mapped to [0, 1], gray is repeated to RGB, resized to the model's input size and
    normalised with ``mean``/``std`` (the model's ``preprocess_cfg`` or OpenAI CLIP's).
    """

    def __init__(self, model: torch.nn.Module, text_features: Tensor, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> None:
        if not hasattr(model, "encode_image"):
            raise TypeError(f"model must be an open_clip model with encode_image, got {type(model).__name__}")
        if text_features.ndim not in (1, 2):
            raise ValueError(f"text_features must be (D,) or (B, D), got {tuple(text_features.shape)}")
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        size = getattr(model.visual, "image_size", 224)
        self.model = model
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.mean = tuple(mean or cfg.get("mean", OPENAI_CLIP_MEAN))
        self.std = tuple(std or cfg.get("std", OPENAI_CLIP_STD))
        self.text_features = F.normalize(text_features.float(), dim=-1)

    @classmethod
    @torch.no_grad()
    def from_prompts(cls, model: torch.nn.Module, tokenizer: Callable, prompts: list[str], **kwargs) -> "ClipAlignment":
        """Encode ``prompts`` (one per sample) with ``tokenizer`` and ``model.encode_text``."""
        if not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        param = next(model.parameters())
        return cls(model, model.encode_text(tokenizer(list(prompts)).to(param.device)).float(), **kwargs)

    def prepare(self, images: Tensor) -> Tensor:
        """[-1, 1] images -> the CLIP input (RGB, model size, normalised)."""
        x = (images.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False).clamp(0, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: Tensor, step: Step | None = None) -> Tensor:
        param = next(self.model.parameters())
        with torch.no_grad():
            emb = self.model.encode_image(self.prepare(images).to(param.device, param.dtype), normalize=True).float()
        text = self.text_features.to(emb.device)
        if text.ndim == 2 and text.shape[0] != emb.shape[0]:
            raise ValueError(f"ClipAlignment has {text.shape[0]} prompts for {emb.shape[0]} images")
        return (emb * text).sum(-1).to(images.dtype)
