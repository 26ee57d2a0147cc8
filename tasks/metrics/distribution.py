"""FID and KID (torchmetrics) with a pluggable feature extractor and real statistics kept across resets.

Both take float images in [0, 1]. Differences to the plain torchmetrics classes, all about running
them in evaluation jobs: inputs are validated; a missing real set raises a clear error; KID draws its
subsets from a fixed seed (same value on every run) and caps the subset size at the sample count, and
its feature lists sync across processes even when ranks made different numbers of updates.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from .images import check_images


def _check_feature(feature: nn.Module) -> nn.Module:
    if not isinstance(feature, nn.Module) or not hasattr(feature, "num_features"):
        raise TypeError("feature must be an nn.Module with a num_features attribute (e.g. DigitFeatures, "
                        f"InceptionFeatures), got {type(feature).__name__}")
    return feature


class _SameSize:
    """Refuse generated images of another size than the real ones seen by ``update`` or restored by
    ``load_real_stats`` (features would differ by the resize alone)."""

    real_size: tuple[int, int] | None = None                  # (H, W) of the real images, kept across reset()

    def _check_size(self, images: Tensor, real: bool) -> None:
        size = tuple(images.shape[-2:])
        if real:
            self.real_size = self.real_size or size
        if self.real_size is not None and size != self.real_size:
            kind = "real" if real else "generated"
            raise ValueError(f"{kind} images are {size[0]}x{size[1]}, the real images were "
                             f"{self.real_size[0]}x{self.real_size[1]}; resize them to one size first")


class FID(_SameSize, FrechetInceptionDistance):
    """Fréchet distance between feature Gaussians of real and generated images.

    ``feature`` maps [0, 1] images to ``(N, d)`` (``DigitFeatures`` offline: "FID-digits";
    ``InceptionFeatures(antialias=False)`` for paper-comparable FID). Real statistics survive ``reset()``.
    """

    def __init__(self, feature: nn.Module, **kwargs) -> None:
        super().__init__(feature=_check_feature(feature), reset_real_features=False, normalize=True, **kwargs)
        self.orig_dtype = torch.float32                   # set by update(); also valid on a rank with no images

    def update(self, images: Tensor, real: bool) -> None:
        self._check_size(check_images(images), real)
        super().update(images, real=real)

    def compute(self) -> Tensor:
        if self.real_features_num_samples < 2:
            raise ValueError("FID has no real statistics: update it with real images (real=True) or load "
                             "cached ones (tasks.metrics.load_real_stats) first")
        if self.fake_features_num_samples < 2:
            raise ValueError(f"FID needs at least 2 generated images, got {int(self.fake_features_num_samples)}")
        return super().compute()


class KID(_SameSize, KernelInceptionDistance):
    """Kernel distance (polynomial MMD) over ``subsets`` random subsets; returns ``(mean, std)``.

    Subsets of ``min(subset_size, n_real, n_fake)`` rows are drawn with a generator seeded by ``seed``,
    so the value does not change between runs on the same features; the kernel sums run in float64.
    Keeps every feature vector in memory (N x d floats), unlike FID.
    """

    def __init__(self, feature: nn.Module, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
                 **kwargs) -> None:
        with warnings.catch_warnings():             # the memory note above, without a warning per instance
            warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save")
            super().__init__(feature=_check_feature(feature), subsets=subsets, subset_size=subset_size,
                             reset_real_features=False, normalize=True, **kwargs)
        self.num_features = int(feature.num_features)
        self.seed = seed

    def update(self, images: Tensor, real: bool) -> None:
        self._check_size(check_images(images), real)
        super().update(images, real=real)

    def _sync_dist(self, *args, **kwargs) -> None:
        # one tensor per rank and state (an empty (0, d) one on ranks without data): the gather then
        # runs the same number of collectives on every rank.
        for name in ("real_features", "fake_features"):
            rows = getattr(self, name)
            empty = torch.zeros(0, self.num_features, device=self.device)
            setattr(self, name, [torch.cat(rows) if rows else empty])
        super()._sync_dist(*args, **kwargs)

    def compute(self) -> tuple[Tensor, Tensor]:
        n_real = sum(len(rows) for rows in self.real_features)
        n_fake = sum(len(rows) for rows in self.fake_features)
        if n_real < 2:
            raise ValueError("KID has no real features: update it with real images (real=True) or load "
                             "cached ones (tasks.metrics.load_real_stats) first")
        if n_fake < 2:
            raise ValueError(f"KID needs at least 2 generated images, got {n_fake}")
        requested, real, fake = self.subset_size, self.real_features, self.fake_features
        self.subset_size = min(requested, n_real, n_fake)
        self.real_features = [torch.cat(real).double()]     # the kernel sums cancel: float32 loses digits
        self.fake_features = [torch.cat(fake).double()]
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                return super().compute()
        finally:
            self.subset_size, self.real_features, self.fake_features = requested, real, fake
