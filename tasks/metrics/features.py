"""Feature extractors for FID / KID: the digits classifier (offline) and Inception-v3 (needs its weights).

Both take float images ``(N, C, H, W)`` in [0, 1] and return ``(N, num_features)``.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch
from torch import Tensor, nn

from .images import to_rgb, to_uint8

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class MissingWeightsError(RuntimeError):
    """A metric's network weights are neither cached nor downloadable (offline)."""


class DigitFeatures(nn.Module):
    """Penultimate embedding of a digit classifier (``classifier.features(x)`` on [-1, 1] inputs): "FID-digits"."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(classifier, "features", None)):
            raise TypeError(f"classifier must have a features(images) method, got {type(classifier).__name__}")
        self.classifier = classifier.eval().requires_grad_(False)
        dim = getattr(classifier, "feature_dim", None)
        if dim is None:
            param = next(classifier.parameters())
            size = getattr(classifier, "image_size", 16)
            with torch.no_grad():
                dim = classifier.features(torch.zeros(1, 1, size, size, device=param.device)).shape[-1]
        self.num_features = int(dim)

    def train(self, mode: bool = True) -> "DigitFeatures":
        return super().train(False)                              # batch norm stays in inference mode

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        param = next(self.classifier.parameters())
        return self.classifier.features(images.to(param.dtype) * 2 - 1)


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3 (the FID network) via torchmetrics, on [0, 1] images (gray -> RGB).

    ``antialias=False`` resizes to 299 like TF1 / the original FID code (paper-comparable numbers);
    ``weights_path`` points to a local copy of ``weights-inception-2015-12-05-6726825d.pth``, else the
    file is taken from (or downloaded into) ``$TORCH_HOME/hub/checkpoints``.
    """

    def __init__(self, feature: int = 2048, weights_path: str | None = None, antialias: bool = False) -> None:
        super().__init__()
        if feature not in (64, 192, 768, 2048):
            raise ValueError(f"feature must be 64, 192, 768 or 2048, got {feature}")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                                                feature_extractor_weights_path=weights_path, antialias=antialias)
        except ModuleNotFoundError as err:
            raise ImportError("Inception features need torch-fidelity: pip install 'diffguide[fid]' "
                              f"(or use DigitFeatures offline); {err}") from None
        except OSError as err:                                       # URLError, missing file
            raise MissingWeightsError(
                f"the Inception-v3 weights are not available ({err}). Offline, copy {INCEPTION_WEIGHTS} to "
                "$TORCH_HOME/hub/checkpoints/ or pass weights_path=...; or use DigitFeatures.") from None
        self.num_features = feature

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.inception(to_uint8(to_rgb(images)))


def tensors_fingerprint(named: Iterable[tuple[str, Tensor]], length: int = 12) -> str:
    """Short SHA-256 of ``(name, tensor)`` pairs: the names and the tensors' bytes, in order."""
    digest = hashlib.sha256()
    for key, value in named:
        digest.update(key.encode())
        digest.update(memoryview(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))  # no copy
    return digest.hexdigest()[:length]


def weights_fingerprint(module: nn.Module) -> str:
    """Short SHA-256 of a module's state dict (names and bytes)."""
    return tensors_fingerprint(sorted(module.state_dict().items()))


def extractor_id(module: nn.Module) -> str:
    """Name and weights fingerprint of a feature extractor, e.g. ``DigitFeatures-64-3f2a9c1b7e04``."""
    return f"{type(module).__name__}-{getattr(module, 'num_features', 'x')}-{weights_fingerprint(module)}"
