"""scikit-learn handwritten digits as a tiny image dataset for diffusion experiments.

Images are the 1,797 8x8 ``load_digits`` scans scaled to [-1, 1] (ink bright, +1, on a dark
background, -1) and bilinearly upsampled. The train/test split is stratified and seeded, so the
test split stays fixed for metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four",
                                "five", "six", "seven", "eight", "nine")
NUM_CLASSES = 10
TEST_SIZE = 360
SPLIT_SEED = 0

# "{word}" is the digit's name ("seven"), "{digit}" its numeral ("7").
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {word}",
    "the number {digit}",
    "a drawing of the digit {word}",
    "the digit {digit}",
    "a handwritten {word}",
    "the number {word}",
)

Split = Literal["train", "test", "all"]


@cache
def _split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float32) / 8.0 - 1.0          # 0..16 -> [-1, 1]
    labels = data.target.astype(np.int64)
    if split == "all":
        return images, labels
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=SPLIT_SEED)
    return (x_train, y_train) if split == "train" else (x_test, y_test)


def load_digits_tensors(split: Split = "train", size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: images ``(N, 1, size, size)`` float32 in [-1, 1], labels ``(N,)`` int64.

    ``split`` is ``"train"`` (1,437 images), ``"test"`` (360, held out for metrics) or ``"all"``.
    ``size`` other than 8 upsamples bilinearly.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    images, labels = _split_arrays(split)
    x = torch.from_numpy(images).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x.contiguous(), torch.from_numpy(labels)


def caption(label: int, template: int = 0) -> str:
    """Caption of a digit with one of ``CAPTION_TEMPLATES``: ``caption(7) == "a handwritten digit seven"``,
    ``caption(7, 1) == "the number 7"``."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label must be in 0..9, got {label}")
    return CAPTION_TEMPLATES[template].format(word=DIGIT_WORDS[int(label)], digit=int(label))


def random_captions(labels: Sequence[int] | torch.Tensor, generator: torch.Generator | None = None,
                    drop_prob: float = 0.0) -> list[str]:
    """One caption per label with a random template; with probability ``drop_prob`` the caption is ``""``."""
    labels = [int(v) for v in labels]
    templates = torch.randint(len(CAPTION_TEMPLATES), (len(labels),), generator=generator).tolist()
    dropped = (torch.rand(len(labels), generator=generator) < drop_prob).tolist()
    return ["" if drop else caption(label, tmpl) for label, tmpl, drop in zip(labels, templates, dropped)]


def caption_words() -> list[str]:
    """Every word that occurs in a caption, sorted (used to build the tiny text tokenizers)."""
    words = {w for tmpl in CAPTION_TEMPLATES for w in tmpl.split() if "{" not in w}
    return sorted(words | set(DIGIT_WORDS))


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1]."""
    return (images / 2 + 0.5).clamp(0, 1)


def from_unit(images: torch.Tensor) -> torch.Tensor:
    """Map images from [0, 1] to [-1, 1]."""
    return images * 2 - 1
