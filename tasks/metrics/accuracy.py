"""Classifier accuracy of class-conditional samples (torchmetrics ``MulticlassAccuracy``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from .images import check_images


class ClassifierAccuracy(MulticlassAccuracy):
    """Fraction of images a classifier assigns to the class they were sampled for.

    ``classifier`` maps [-1, 1] images to logits (the shipped ``digits-classifier``); ``update(images,
    labels)`` takes float images in [0, 1].
    """

    def __init__(self, classifier: nn.Module, num_classes: int = 10, **kwargs) -> None:
        super().__init__(num_classes=num_classes, average="micro", **kwargs)
        self.classifier = classifier.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "ClassifierAccuracy":
        return super().train(False)

    @torch.no_grad()
    def update(self, images: Tensor, labels: Tensor) -> None:
        check_images(images)
        try:
            labels = torch.as_tensor(labels, device=images.device).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"labels must be int class indices, got {labels!r}") from None
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be int class indices, got a {labels.dtype} tensor")
        if len(labels) != len(images):
            raise ValueError(f"got {len(images)} images and {len(labels)} labels; pass one label per image")
        outside = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(outside):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, got {sorted(set(outside.tolist()))}")
        param = next(self.classifier.parameters())
        logits = self.classifier(images.to(param.device, param.dtype) * 2 - 1)
        super().update(logits, labels.to(logits.device))
