"""A tiny open_clip model for digits: custom config, open_clip's own model creation and tokenizer.

The model folder holds ``<name>.json`` (an open_clip model config, registered with
``open_clip.add_model_config``) and ``model.safetensors``. Only the token-embedding rows of tokens seen
in training are stored (``token_embedding.ids`` / ``token_embedding.rows``); the other rows are zero.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffguide.tasks.digits import CAPTION_TEMPLATES, DIGIT_WORDS

IMAGE_MEAN = (0.5, 0.5, 0.5)   # [0, 1] -> [-1, 1], the range the digits are stored in
IMAGE_STD = (0.5, 0.5, 0.5)
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
WEIGHTS = "model.safetensors"
_SPARSE = "token_embedding"


def create(name: str, config_path: str | Path | None = None) -> tuple[torch.nn.Module, Callable, Callable]:
    """Create an untrained ``(model, preprocess, tokenizer)`` for the open_clip config ``name``.

    ``config_path`` (a ``.json`` file or a folder of them) is registered with ``open_clip.add_model_config``.
    """
    import open_clip

    if config_path is not None:
        open_clip.add_model_config(config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, image_mean=IMAGE_MEAN,
                                                                 image_std=IMAGE_STD)
    return model, preprocess, open_clip.get_tokenizer(name)


def _create_quietly(name: str, config_path: Path) -> tuple[torch.nn.Module, Callable, Callable]:
    """:func:`create` without open_clip's "no pretrained weights loaded" warning (weights follow)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return create(name, config_path)
    finally:
        root.setLevel(level)


def save(model: torch.nn.Module, folder: str | Path, used_token_ids: Sequence[int], dtype=torch.float16) -> None:
    """Write ``model.safetensors`` with only the ``used_token_ids`` rows of the token embedding."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
             if k != f"{_SPARSE}.weight"}
    ids = torch.as_tensor(sorted({int(i) for i in used_token_ids}), dtype=torch.int64)
    state[f"{_SPARSE}.ids"] = ids
    state[f"{_SPARSE}.rows"] = model.state_dict()[f"{_SPARSE}.weight"][ids].to(dtype).contiguous()
    save_file(state, str(Path(folder) / WEIGHTS))


def load_state(model: torch.nn.Module, weights: str | Path) -> None:
    """Load a file written by :func:`save` into ``model`` (strict: every other key must match, else
    ``loading.DamagedModelError`` names the tensors)."""
    from diffguide.tasks.loading import check_loaded_weights

    state = load_file(str(weights))
    current = model.state_dict()
    sparse = {f"{_SPARSE}.ids", f"{_SPARSE}.rows"}
    check_loaded_weights(weights, missing=set(current) - {f"{_SPARSE}.weight"} - set(state) | sparse - set(state),
                         unexpected=set(state) - set(current) - sparse)
    ids, rows = state.pop(f"{_SPARSE}.ids"), state.pop(f"{_SPARSE}.rows")
    embedding = torch.zeros_like(current[f"{_SPARSE}.weight"])
    embedding[ids] = rows.to(embedding.dtype)
    state[f"{_SPARSE}.weight"] = embedding
    model.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()}, strict=True)


@dataclass
class DigitClip:
    """A loaded digits CLIP: the open_clip ``model``, its PIL ``preprocess`` and ``tokenizer``."""

    model: Any
    preprocess: Callable
    tokenizer: Callable

    def __iter__(self):                      # model, preprocess, tokenizer = load("digits-clip")
        return iter((self.model, self.preprocess, self.tokenizer))

    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of ``(N, 1|3, H, W)`` images in [-1, 1] (ink bright)."""
        size = self.model.visual.image_size
        size = size if isinstance(size, tuple) else (size, size)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        param = self._param()
        return self.model.encode_image(images.to(param.device, param.dtype), normalize=True)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings of ``texts``."""
        return self.model.encode_text(self.tokenizer(list(texts)).to(self._param().device), normalize=True)

    @torch.no_grad()
    def class_text_features(self, templates: Sequence[str] = CAPTION_TEMPLATES) -> torch.Tensor:
        """``(10, D)`` zero-shot class embeddings: the mean over caption templates, renormalised."""
        feats = torch.stack([self.text_features([tmpl.format(word=word, digit=digit)
                                                 for digit, word in enumerate(DIGIT_WORDS)])
                             for tmpl in templates]).mean(0)
        return F.normalize(feats, dim=-1)

    @torch.no_grad()
    def zero_shot_predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Zero-shot digit labels ``(N,)`` by cosine similarity to the class text embeddings."""
        self.model.eval()
        classes = self.class_text_features()
        scores = [self.image_features(chunk) @ classes.T for chunk in images.split(batch_size)]
        return torch.cat(scores).argmax(-1).cpu()


def load_pretrained(folder: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> DigitClip:
    """Register the folder's open_clip config, create the model with open_clip and load the weights."""
    folder = Path(folder)
    configs = [p for p in sorted(folder.glob("*.json")) if "vision_cfg" in json.loads(p.read_text())]
    if len(configs) != 1:
        raise ValueError(f"{folder} must hold exactly one open_clip model config (*.json), found {len(configs)}")
    model, preprocess, tokenizer = _create_quietly(configs[0].stem, configs[0])
    load_state(model, folder / WEIGHTS)
    return DigitClip(model.to(device=device, dtype=dtype).eval(), preprocess, tokenizer)
