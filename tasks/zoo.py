"""The embedded model zoo: small digits models trained by ``scripts/train_zoo.py`` and shipped in ``tasks/zoo/``.

    from diffguide.tasks import zoo
    pipe = zoo.load("digits-class")                  # ClassConditionalPipeline
    sd = zoo.load("digits-t2i")                      # StableDiffusionPipeline
    flow = zoo.load("digits-flow")                   # StableDiffusion3Pipeline (rectified flow, no T5)
    classifier = zoo.load("digits-classifier")       # DigitClassifier (eval mode)
    model, preprocess, tokenizer = zoo.load("digits-clip")

``load`` also takes a local folder laid out like one of these, or a Hugging Face Hub repo id.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffguide.tasks.loading import DamagedModelError, check_loaded_weights  # noqa: F401 (public here too)

if TYPE_CHECKING:
    import torch

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
MODELS: dict[str, str] = {
    "digits-class": "class-conditional pixel UNet2DModel, 16x16, DDIM (ClassConditionalPipeline)",
    "digits-class-weak": "early EMA checkpoint of digits-class (for autoguidance)",
    "digits-classifier": "CNN digit classifier on 16x16 [-1, 1] images with a 64-d features() embedding",
    "digits-t2i": "tiny StableDiffusionPipeline: AutoencoderKL, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer",
    "digits-clip": "tiny open_clip model trained contrastively on digit images and captions",
    "digits-flow": "tiny rectified-flow StableDiffusion3Pipeline: SD3Transformer2DModel, FlowMatchEuler, 2 CLIP, no T5",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def list_models() -> list[str]:
    """Names of the shipped models."""
    return list(MODELS)


def model_path(name: str) -> Path:
    """Folder of a shipped model."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return ZOO_DIR / name


def resolve_model(name_or_path: str | Path) -> Path:
    """The folder of a shipped model name, a local folder, or a hub repo id (downloaded)."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"model must be a name ({', '.join(MODELS)}), a folder or a hub repo id, "
                        f"got {type(name_or_path).__name__}")
    if not str(name_or_path).strip():
        raise ValueError(f"model name is empty; give one of {', '.join(MODELS)}, a folder or a hub repo id")
    if str(name_or_path) in MODELS:
        return model_path(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if isinstance(name_or_path, str) and _REPO_ID.match(name_or_path) and not path.exists():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
        try:
            return Path(snapshot_download(name_or_path))
        except (LocalEntryNotFoundError, RepositoryNotFoundError) as err:
            raise ValueError(f"{name_or_path!r} is neither a known model nor a folder, and as a hub repo id it "
                             f"cannot be fetched ({type(err).__name__}); known models: {', '.join(MODELS)}") from None
    raise ValueError(f"{str(name_or_path)!r} is neither a known model, a folder nor a hub repo id; "
                     f"known models: {', '.join(MODELS)}")


_resolve = resolve_model  # the former private name


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DamagedModelError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedModelError(f"{path} is not valid JSON: {err}") from None


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as weights:
            weights.keys()
    except (SafetensorError, OSError) as err:
        raise DamagedModelError(f"{path} is truncated or not a safetensors file: {err}") from None


def check_pipeline_folder(folder: Path) -> dict:
    """Check that every component ``model_index.json`` lists is there and readable; return the index.

    Schedulers need ``scheduler_config.json``, tokenizers ``tokenizer_config.json`` and ``tokenizer.json``,
    models ``config.json`` and safetensors weights whose header covers the file. Raises
    ``DamagedModelError`` naming the first missing or bad file.
    """
    index = _read_json(folder / "model_index.json")
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[-1] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            raise DamagedModelError(f"{sub} is missing (model_index.json lists {name}: {spec[-1]})")
        if spec[-1].endswith("Scheduler"):
            needed = ["scheduler_config.json"]
        elif "Tokenizer" in spec[-1]:
            needed = ["tokenizer_config.json", "tokenizer.json"]
        else:
            needed = ["config.json"]
            if not list(sub.glob("*.safetensors")):
                weights = "diffusion_pytorch_model" if spec[0] == "diffusers" else "model"
                raise DamagedModelError(f"{sub / weights}.safetensors is missing (no safetensors weights in {sub})")
        for config in needed:
            _read_json(sub / config)
        for weights in sorted(sub.glob("*.safetensors")):
            _check_safetensors(weights)
    return index


def _load_component(folder: Path, library: str, class_name: str, dtype: torch.dtype | None) -> Any:
    """One diffusers or transformers model of a pipeline folder, refused unless every tensor loaded."""
    cls = getattr(importlib.import_module(library), class_name)
    dtype_arg = {"dtype" if library == "transformers" else "torch_dtype": dtype} if dtype is not None else {}
    model, info = cls.from_pretrained(folder, output_loading_info=True, **dtype_arg)
    check_loaded_weights(folder, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                         info.get("mismatched_keys", ()))
    return model


def _pipeline_models(folder: Path, index: dict, dtype: torch.dtype | None) -> dict[str, Any]:
    """The diffusers / transformers models a pipeline folder lists, each loaded and checked (schedulers,
    tokenizers and components of other libraries are left to ``from_pretrained``)."""
    import torch

    models = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] not in ("diffusers", "transformers"):
            continue
        cls = getattr(importlib.import_module(spec[0]), spec[1], None)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            models[name] = _load_component(folder / name, spec[0], spec[1], dtype)
    return models


def _kind(folder: Path) -> str:
    if (folder / "model_index.json").exists():
        return "pipeline"
    for config in folder.glob("*.json"):
        if "vision_cfg" in json.loads(config.read_text()):
            return "clip"
    if (folder / "config.json").is_file():
        return "classifier"
    raise ValueError(f"{folder} holds no model_index.json, open_clip config or classifier config.json")


def load(name_or_path: str | Path, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None) -> Any:
    """Load a zoo model by name, local folder or hub repo id, ready to use (eval mode).

    Returns a ``ClassConditionalPipeline``, ``StableDiffusionPipeline`` or ``StableDiffusion3Pipeline`` (via
    ``from_pretrained``; components ``model_index.json`` records as null, such as SD3's T5, are passed as
    None), a ``DigitClassifier``, or a ``DigitClip`` (unpacks to ``model, preprocess, tokenizer``). A pipeline
    folder with a missing or bad file raises ``DamagedModelError`` (a ``ValueError``) naming it, and so does a
    model whose weights leave a tensor unset or hold tensors it has no place for (naming the tensors): a model is
    never returned with randomly initialised parts.
    """
    folder = resolve_model(name_or_path)
    kind = _kind(folder)
    if kind == "pipeline":
        from diffusers import DiffusionPipeline

        from diffguide.tasks.pipelines import ClassConditionalPipeline

        index = check_pipeline_folder(folder)
        cls = ClassConditionalPipeline if index.get("_class_name") == ClassConditionalPipeline.__name__ \
            else DiffusionPipeline
        absent = {name: None for name, spec in index.items() if isinstance(spec, list) and spec[-1] is None}
        pipe = cls.from_pretrained(folder, torch_dtype=dtype, **absent, **_pipeline_models(folder, index, dtype))
        return pipe.to(device) if device is not None else pipe
    if kind == "classifier":
        from diffguide.tasks.classifier import DigitClassifier

        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise DamagedModelError(f"{weights} is missing")
        _check_safetensors(weights)
        from safetensors.torch import load_model

        classifier = DigitClassifier(**_read_json(folder / "config.json"))
        try:
            missing, unexpected = load_model(classifier, str(weights), strict=False)
        except RuntimeError as err:  # a tensor of the wrong shape (torch's message names it)
            raise DamagedModelError(f"{weights}: the weights do not fit the model: {err}") from None
        check_loaded_weights(weights, missing, unexpected)
        return classifier.to(device=device, dtype=dtype).eval()
    from diffguide.tasks import clip

    return clip.load_pretrained(folder, device=device, dtype=dtype)
