"""Metrics against a reference image (reconstructions, inverse problems): PSNR, SSIM, LPIPS (torchmetrics)."""

from __future__ import annotations

from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

from .features import MissingWeightsError
from .images import check_images, check_same_shape, to_rgb

LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                   "squeeze": "squeezenet1_1-b8a52dc0.pth"}


class _PairMixin:
    def update(self, images: Tensor, target: Tensor) -> None:
        check_same_shape(check_images(images), check_images(target, "target"))
        super().update(self._prepare(images), self._prepare(target))

    @staticmethod
    def _prepare(images: Tensor) -> Tensor:
        return images


class PSNR(_PairMixin, PeakSignalNoiseRatio):
    """PSNR over [0, 1] images (``data_range=1``), averaged over the images (``reduction`` per image)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(data_range=1.0, dim=(1, 2, 3), **kwargs)


class SSIM(_PairMixin, StructuralSimilarityIndexMeasure):
    """SSIM over [0, 1] images (``data_range=1``, Gaussian 11x11 window, sigma 1.5)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(data_range=1.0, **kwargs)


class LPIPS(_PairMixin, LearnedPerceptualImagePatchSimilarity):
    """LPIPS (lower is closer) on [0, 1] images, gray -> RGB; needs the torchvision backbone weights."""

    def __init__(self, net_type: str = "alex", **kwargs) -> None:
        if net_type not in LPIPS_BACKBONES:
            raise ValueError(f"net_type must be one of {sorted(LPIPS_BACKBONES)}, got {net_type!r}")
        try:
            super().__init__(net_type=net_type, normalize=True, **kwargs)
            self.net_type = net_type
        except OSError as err:                                  # URLError offline, unreadable file
            raise MissingWeightsError(
                f"LPIPS needs the ImageNet {net_type} backbone ({err}). Offline, copy "
                f"{LPIPS_BACKBONES[net_type]} to $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch).") from None

    def update(self, images: Tensor, target: Tensor) -> None:
        try:
            super().update(images, target)
        except RuntimeError as err:
            if "too small" not in str(err):
                raise
            raise ValueError(f"images of {tuple(images.shape[-2:])} pixels are too small for the LPIPS "
                             f"{self.net_type} backbone (alex needs at least 32x32); upsample images and target "
                             "first") from None

    @staticmethod
    def _prepare(images: Tensor) -> Tensor:
        return to_rgb(images)
