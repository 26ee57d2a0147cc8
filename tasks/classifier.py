"""A small CNN digit classifier, used to judge samples (accuracy) and as a feature extractor (FID-digits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn


class DigitClassifier(nn.Module, PyTorchModelHubMixin):
    """CNN on ``(N, 1, S, S)`` images in [-1, 1] (ink bright); inputs of another size are resized to ``image_size``.

    ``save_pretrained``/``from_pretrained`` (from ``PyTorchModelHubMixin``) write and read
    ``config.json`` + ``model.safetensors``.
    """

    def __init__(self, image_size: int = 16, channels: tuple[int, int] = (32, 64), feature_dim: int = 64,
                 num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.image_size = image_size
        self.feature_dim = feature_dim
        c1, c2 = channels

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(*block(1, c1), *block(c1, c1), nn.MaxPool2d(2),
                                  *block(c1, c2), *block(c2, c2), nn.MaxPool2d(2))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c2 * (image_size // 4) ** 2, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (N, 1, H, W), got {tuple(images.shape)}")
        if images.shape[1] == 3:                               # RGB of a gray image -> gray
            images = images.mean(dim=1, keepdim=True)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        param = next(self.parameters())
        return images.to(device=param.device, dtype=param.dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding ``(N, feature_dim)``, non-negative (after ReLU)."""
        return self.embed(self.body(self._prepare(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)``."""
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted labels ``(N,)``; switches the module to eval mode."""
        self.eval()
        return torch.cat([self(chunk).argmax(dim=1) for chunk in images.split(batch_size)]).cpu()

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of ``images`` classified as ``labels``."""
        return (self.predict(images) == torch.as_tensor(labels).cpu()).float().mean().item()
