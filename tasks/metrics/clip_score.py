"""CLIP score (torchmetrics ``CLIPScore``) computed with any open_clip model.

torchmetrics expects a Hugging Face ``(model, processor)`` pair; :class:`OpenCLIPModel` and
:class:`OpenCLIPProcessor` give an open_clip model that interface, so the score, its ``100 * cos``
scale and its sync across processes are torchmetrics' own. Images are rounded to 8 bits and passed
through the model's own ``preprocess`` as PIL images, exactly as for files on disk.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torchmetrics.multimodal.clip_score import CLIPScore as _CLIPScore
from torchvision.transforms.functional import to_pil_image

from .features import MissingWeightsError
from .images import check_images, to_rgb, to_uint8


class OpenCLIPModel(nn.Module):
    """An open_clip model behind the two methods torchmetrics calls (raw, unnormalised embeddings)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.config = SimpleNamespace()                    # no text_config: open_clip's tokenizer truncates

    def train(self, mode: bool = True) -> "OpenCLIPModel":
        return super().train(False)

    @torch.no_grad()
    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values)

    @torch.no_grad()
    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model.encode_text(input_ids)


class OpenCLIPProcessor:
    """``processor(images=[...])`` / ``processor(text=[...])`` as torchmetrics calls it, over open_clip's parts."""

    def __init__(self, tokenizer: Callable[[list[str]], Tensor], preprocess: Callable) -> None:
        self.tokenizer, self.preprocess = tokenizer, preprocess

    def __call__(self, images: Sequence[Tensor] | None = None, text: Sequence[str] | None = None,
                 return_tensors: str = "pt", padding: bool = True) -> dict[str, Tensor]:
        out = {}
        if images is not None:
            out["pixel_values"] = torch.stack([self.preprocess(to_pil_image(to_uint8(to_rgb(image[None]))[0]))
                                               for image in images])
        if text is not None:
            ids = self.tokenizer(list(text))
            out["input_ids"], out["attention_mask"] = ids, (ids != 0).long()
        return out


def load_open_clip(model_name: str, pretrained: str | None = None) -> tuple[nn.Module, Callable, Callable]:
    """``(model, preprocess, tokenizer)`` from open_clip; ``pretrained`` is a tag or a local weights file."""
    import open_clip

    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; register a config with "
                         "open_clip.add_model_config or pick one of open_clip.list_models()")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError) as err:
        raise MissingWeightsError(f"could not load open_clip {model_name!r} with pretrained={pretrained!r} ({err}). "
                           "Offline, download the weights once and pass the file path as pretrained.") from None
    return model, preprocess, tokenizer


class CLIPScore(_CLIPScore):
    """torchmetrics ``CLIPScore`` (mean of ``100 * cos(image, text)``, clamped at 0) on an open_clip model.

    ``model, preprocess, tokenizer`` as open_clip gives them (``load_open_clip``, or the shipped
    ``digits-clip``). ``update(images, prompts)`` takes float images in [0, 1] and one prompt per image.
    """

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer: Callable, **kwargs) -> None:
        super().__init__(model_name_or_path=lambda: (OpenCLIPModel(model), OpenCLIPProcessor(tokenizer, preprocess)),
                         **kwargs)

    def update(self, images: Tensor, prompts: Sequence[str]) -> None:
        check_images(images)
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings, one per image")
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; pass one prompt per image")
        super().update(list(images), list(prompts))
