"""``ImageMetrics``: several metrics updated from one batch, by name, with the inputs each one needs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from .accuracy import ClassifierAccuracy
from .clip_score import CLIPScore
from .distribution import FID, KID
from .features import InceptionFeatures
from .images import check_images
from .real_stats import load_real_stats, save_real_stats
from .reference import LPIPS, PSNR, SSIM

METRICS = ("fid", "kid", "clip_score", "accuracy", "psnr", "ssim", "lpips")
NEEDS_TARGET = ("psnr", "ssim", "lpips")


class ImageMetrics:
    """Build the metrics named in ``names`` and feed them batches of generated images in [0, 1].

    Args:
        names: any of ``fid``, ``kid`` (need ``feature``), ``clip_score`` (needs ``clip``), ``accuracy``
            (needs ``classifier``), ``psnr``, ``ssim``, ``lpips`` (need ``target`` images in ``update``).
        feature: extractor for FID/KID: default ``InceptionFeatures(antialias=False)`` (needs torch-fidelity
            and its weights); ``DigitFeatures(classifier)`` for the offline "FID-digits".
        classifier: digit classifier for ``accuracy`` (logits from [-1, 1] images).
        clip: ``(model, preprocess, tokenizer)`` of an open_clip model for ``clip_score``.
        kid_subset_size: KID subset size (capped at the number of images).
        lpips_net: LPIPS backbone, ``alex``, ``vgg`` or ``squeeze``.

    ``compute()`` is collective under ``torch.distributed``: call it on every rank.
    """

    def __init__(self, names: Sequence[str], *, feature: nn.Module | None = None,
                 classifier: nn.Module | None = None, clip: tuple | None = None,
                 kid_subset_size: int = 1000, lpips_net: str = "alex") -> None:
        if isinstance(names, str):
            names = [names]
        unknown = [name for name in names if name not in METRICS]
        if unknown or not names:
            raise ValueError(f"unknown metric(s) {unknown or names!r}; allowed: {', '.join(METRICS)}")
        if feature is None and {"fid", "kid"} & set(names):
            feature = InceptionFeatures(antialias=False)
        needs = {"accuracy": ("classifier", classifier), "clip_score": ("clip", clip)}
        for name in names:
            if name in needs and needs[name][1] is None:
                raise ValueError(f"metric {name!r} needs {needs[name][0]}=...")
        builders = {
            "fid": lambda: FID(feature),
            "kid": lambda: KID(feature, subset_size=kid_subset_size),
            "clip_score": lambda: CLIPScore(*tuple(clip)),
            "accuracy": lambda: ClassifierAccuracy(classifier),
            "psnr": PSNR, "ssim": SSIM, "lpips": lambda: LPIPS(lpips_net),
        }
        self.names = list(dict.fromkeys(names))
        self.metrics: dict[str, Metric] = {name: builders[name]() for name in self.names}
        self.num_images = 0                     # generated images added since the last reset (this process)

    def to(self, device: torch.device | str) -> "ImageMetrics":
        for metric in self.metrics.values():
            metric.to(device)
        return self

    @property
    def needs_labels(self) -> bool:
        return "accuracy" in self.metrics

    @property
    def needs_prompts(self) -> bool:
        return "clip_score" in self.metrics

    def update(self, images: Tensor, *, labels: Tensor | Sequence[int] | None = None,
               prompts: Sequence[str] | None = None, target: Tensor | None = None) -> None:
        """Add generated ``images`` (float ``(N, C, H, W)`` in [0, 1]) with what the chosen metrics need."""
        check_images(images)
        for name, metric in self.metrics.items():
            if name in ("fid", "kid"):
                metric.update(images, real=False)
            elif name == "accuracy":
                if labels is None:
                    raise ValueError("metric 'accuracy' needs labels=... (the class each image was sampled for)")
                metric.update(images, labels)
            elif name == "clip_score":
                if prompts is None:
                    raise ValueError("metric 'clip_score' needs prompts=... (one per image)")
                metric.update(images, prompts)
            else:
                if target is None:
                    raise ValueError(f"metric {name!r} needs target=... (reference images)")
                metric.update(images, target)
        self.num_images += len(images)

    def update_real(self, images: Tensor) -> None:
        """Add real images to the real side of FID / KID."""
        for name in ("fid", "kid"):
            if name in self.metrics:
                self.metrics[name].update(images, real=True)

    @property
    def _distribution(self) -> dict:
        return {"fid": self.metrics.get("fid"), "kid": self.metrics.get("kid")}

    def save_real(self, path: str | Path, metadata: dict | None = None) -> Path:
        """Save the real statistics of FID / KID (see ``save_real_stats``)."""
        return save_real_stats(path, **self._distribution, metadata=metadata)

    def load_real(self, path: str | Path) -> dict:
        """Load real statistics saved by :meth:`save_real` (see ``load_real_stats``)."""
        return load_real_stats(path, **self._distribution)

    def compute(self) -> dict[str, float]:
        """All values as floats; KID adds ``kid_std``. Collective: call on every rank.

        ``ValueError`` if no generated image was added (single process; under ``torch.distributed`` a rank
        may legitimately hold none).
        """
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.num_images == 0 and not distributed:
            raise ValueError(f"compute() before update(): no generated images were added to {', '.join(self.names)}")
        results: dict[str, float] = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            if name == "kid":
                results["kid"], results["kid_std"] = float(value[0]), float(value[1])
            else:
                results[name] = float(value)
        return results

    def reset(self) -> None:
        """Forget generated images (real statistics are kept)."""
        self.num_images = 0
        for metric in self.metrics.values():
            metric.reset()
