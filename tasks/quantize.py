"""Weight-only int8 quantization of diffusers pipelines with optimum-quanto (ZOODiP §3.2, "W8").

Every ``nn.Linear`` and ``nn.Conv2d`` of the UNet, the VAE and the text encoder is replaced by quanto's
``QLinear``/``QConv2d`` holding int8 weights with one float scale per output channel (symmetric absmax),
``W_hat = s * round(W / s)``, ``s = max|W_row| / 127``. Activations stay float. A layer's float weight exists
only inside its own forward call (``s * W_int8`` then a float matmul/convolution on CPU), never as stored
state: the modules' ``state_dict`` holds int8 tensors. Token embeddings, norms and biases stay float, so a
textual-inversion row can still be written into the embedding matrix.

:func:`load_int8_pipeline` builds the same int8 pipeline from a float checkpoint folder without ever holding
all float weights: each component is built with its parameters on the meta device and filled from its
safetensors file one tensor at a time, every Linear/Conv2d quantized as soon as its weights are in, so the
peak is the int8 total plus about one layer's float weights.
"""

from __future__ import annotations

import importlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from diffguide.tasks.metrics.features import tensors_fingerprint, weights_fingerprint

COMPONENTS = ("unet", "vae", "text_encoder")
WEIGHT_TYPES = ("int8",)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")     # diffusers, transformers
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
FLOAT_FINGERPRINT = "float_weights_fingerprint"       # attribute set by load_int8_component


def _quanto():
    try:
        from optimum import quanto
    except ImportError as err:                                         # pragma: no cover - install hint
        raise ImportError("int8 quantization needs optimum-quanto: pip install 'diffguide[quant]'") from err
    return quanto


def quantize_module(module: nn.Module, weights: str = "int8") -> nn.Module:
    """Quantize ``module``'s Linear and Conv2d weights in place (quanto ``quantize`` + ``freeze``); returns it."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if weights not in WEIGHT_TYPES:
        raise ValueError(f"weights must be one of {WEIGHT_TYPES}, got {weights!r}")
    if is_quantized(module):
        raise ValueError(f"{type(module).__name__} is already quantized")
    quanto = _quanto()
    quanto.quantize(module, weights=quanto.qint8)
    quanto.freeze(module)
    return module


def quantize_pipeline(pipe, weights: str = "int8", components: Iterable[str] = COMPONENTS):
    """Quantize the named components of a diffusers pipeline in place (default: UNet, VAE, text encoder)."""
    components = tuple(components)
    for name in components:
        if name not in COMPONENTS:
            raise ValueError(f"components must be among {COMPONENTS}, got {name!r}")
        module = getattr(pipe, name, None)
        if module is None:
            raise ValueError(f"the pipeline has no {name!r} component")
        quantize_module(module, weights)
    return pipe


def _quantize_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace ``model``'s submodule ``name`` by its frozen int8 counterpart, as ``quantize`` + ``freeze`` do."""
    quanto = _quanto()
    qmodule = quanto.nn.quantize_module(module, weights=quanto.qint8)
    if qmodule is None:                                 # no quantized counterpart (norms, embeddings)
        return
    qmodule.name = name
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, qmodule)
    for param_name in [n for n, p in module._parameters.items() if p is not None]:
        setattr(module, param_name, None)               # the float module keeps no weights (as quanto does)
    qmodule.freeze()


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere). Freed float buffers
    between the int8 tensors allocated after them otherwise stay resident: loading a float SD-1.5 UNet layer by
    layer peaked at 3.8 GB RSS without it, 2.1 GB with it."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def float_weights_fingerprint(module: nn.Module) -> str:
    """The float weights' fingerprint (:func:`weights_fingerprint` before quantization) of ``module``: the one
    recorded by :func:`load_int8_component`, else that of its current state dict."""
    return getattr(module, FLOAT_FINGERPRINT, None) or weights_fingerprint(module)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class _SafetensorsWeights:
    """The tensors of a component folder's safetensors file(s) (single file or sharded index), read one at a time.

    Each tensor is read with one ``readinto`` at its offset (safetensors format: 8-byte little-endian header
    length, JSON header of dtype/shape/data_offsets, data) into a fresh tensor, not through a memory map as
    ``safetensors.safe_open`` does, whose pages stay resident until the file is closed. Pickle formats are
    refused.
    """

    def __init__(self, folder: Path) -> None:
        self.files: dict[str, Path] = {}
        self.headers: dict[Path, tuple[int, dict]] = {}
        for base in WEIGHT_FILES:
            single, index = folder / base, folder / f"{base}.index.json"
            if single.is_file():
                self.files = dict.fromkeys(self._open(single), single)
                return
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"cannot read weights index {str(index)!r}: {err}") from None
                for shard in sorted(set(weight_map.values())):
                    self._open(folder / shard)
                self.files = {key: folder / shard for key, shard in weight_map.items()}
                return
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"{str(folder)!r} holds weights only as {', '.join(pickles)}: int8 loading reads "
                             "safetensors only (no pickle); convert them with safetensors.torch.save_file")
        raise ValueError(f"no {' or '.join(WEIGHT_FILES)} (or sharded index) in {str(folder)!r}")

    def _open(self, path: Path) -> list[str]:
        """Read and check the header: every tensor's byte range matches its dtype and shape and lies in the file."""
        try:
            size = path.stat().st_size
            with open(path, "rb") as file:
                length = int.from_bytes(file.read(8), "little")
                if not 0 < length <= size - 8:
                    raise ValueError(f"header length {length} does not fit a file of {size} bytes")
                header = json.loads(file.read(length))
            header.pop("__metadata__", None)
            for key, entry in header.items():
                begin, end = entry["data_offsets"]
                itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[entry["dtype"]]).element_size()
                if not (0 <= begin <= end <= size - 8 - length and end - begin == math.prod(entry["shape"]) * itemsize):
                    raise ValueError(f"tensor {key!r} lies outside the file or does not match its shape (truncated?)")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"cannot read weights file {str(path)!r}: {err}") from None
        self.headers[path] = (8 + length, header)
        return list(header)

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        path = self.files[key]
        if path not in self.headers:
            raise ValueError(f"{key!r} is listed in the index for {str(path)!r}, which does not exist")
        data_start, header = self.headers[path]
        entry = header.get(key)
        if entry is None or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"cannot read tensor {key!r} from {str(path)!r}: missing or unsupported dtype")
        begin, end = entry["data_offsets"]
        stored = SAFETENSORS_DTYPES[entry["dtype"]]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb") as file:
            file.seek(data_start + begin)
            if file.readinto(buffer.numpy()) != end - begin:
                raise ValueError(f"cannot read tensor {key!r} from {str(path)!r}: the file is truncated")
        tensor = buffer.view(stored).reshape(entry["shape"])
        return tensor if stored == dtype else tensor.to(dtype)


def _file_prefix(names: Iterable[str], file_keys: Iterable[str]) -> str | None:
    """The prefix the file puts before the model's names ("" or e.g. "text_model."), None if they do not match."""
    names, file_keys = list(names), set(file_keys)
    candidates = [""] + sorted({key.split(".")[0] + "." for key in file_keys})
    return next((p for p in candidates if all(p + name in file_keys for name in names)), None)


def load_int8_component(folder: str | Path, cls: type) -> nn.Module:
    """Load the diffusers/transformers model ``cls`` from ``folder`` with int8 weights, one tensor at a time.

    The model is built from its config with parameters on the meta device; the state-dict entries are then
    read in sorted order, each Linear/Conv2d is quantized (quanto ``qint8``, frozen) as soon as its weight
    and bias are in, other tensors are kept float (float32, as ``from_pretrained`` loads them). The result
    equals ``quantize_module(cls.from_pretrained(folder))`` bit for bit, and the float weights' fingerprint
    (:func:`weights_fingerprint` of the float model) is recorded on it (:func:`float_weights_fingerprint`).
    A folder whose names do not match the model's (older layouts the libraries rename) is loaded whole by
    ``from_pretrained`` and then quantized, with a warning.
    """
    from accelerate import init_empty_weights

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"no config.json in {str(folder)!r}")
    weights = _SafetensorsWeights(folder)
    with init_empty_weights(include_buffers=False):          # parameters on meta, buffers (position ids) real
        if hasattr(cls, "load_config"):                      # diffusers ModelMixin
            model = cls.from_config(cls.load_config(folder))
        else:                                                # transformers PreTrainedModel
            model = cls._from_config(cls.config_class.from_pretrained(folder))
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    prefix = _file_prefix(params, weights.files)
    if prefix is None:
        warnings.warn(f"{folder}: weight names differ from {cls.__name__}'s; loading it whole in float, then "
                      "quantizing (higher peak memory)", stacklevel=2)
        try:
            model, info = cls.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
        except (ValueError, RuntimeError, OSError, KeyError) as err:     # another model's weights
            raise ValueError(f"cannot load {str(folder)!r} as {cls.__name__}: {err}") from None
        missing = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
        if missing:                                          # the library would fill them with random values
            raise ValueError(f"cannot load {str(folder)!r} as {cls.__name__}: its weights file lacks "
                             f"{len(missing)} of the model's tensors, e.g. {', '.join(map(str, missing[:3]))}")
        fingerprint = weights_fingerprint(model)
        quantize_module(model)
        setattr(model, FLOAT_FINGERPRINT, fingerprint)
        return model.eval()
    pending = {name: sum(p is not None for p in m._parameters.values()) for name, m in model.named_modules()}

    def load_each():
        """Yield ``(name, float tensor)`` in sorted order for the fingerprint, then put the tensor in place."""
        for key in sorted(model.state_dict()):
            if key not in params and prefix + key not in weights.files:
                continue                                     # a buffer the file does not hold keeps its init
            target = params.get(key, buffers.get(key))
            tensor = weights.read(prefix + key, target.dtype)
            if tensor.shape != target.shape:
                raise ValueError(f"{key!r} has shape {tuple(tensor.shape)} in {weights.files[prefix + key]}, "
                                 f"the model expects {tuple(target.shape)}")
            yield key, tensor
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name)
            if key in params:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=target.requires_grad)
                pending[module_name] -= 1
                if pending[module_name] == 0:                # weight and bias in: quantize this layer now
                    _quantize_submodule(model, module_name, module)
                    if tensor.numel() >= 2 ** 18:                # after a layer of >= 1 MiB of float weights
                        release_freed_memory()
            else:
                module._buffers[attr] = tensor

    fingerprint = tensors_fingerprint(load_each())
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{str(folder)!r} misses weights for {', '.join(left[:5])}")
    setattr(model, FLOAT_FINGERPRINT, fingerprint)
    return model.eval()


def load_int8_pipeline(name_or_path: str | Path, device: str | torch.device | None = None):
    """A diffusers pipeline from a float checkpoint (shipped model name, folder or hub id) with int8 UNet, VAE
    and text encoder loaded by :func:`load_int8_component`: the float weights are never all in memory."""
    from diffusers import DiffusionPipeline

    from diffguide.tasks.zoo import _resolve

    folder = _resolve(name_or_path)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(folder / 'model_index.json')!r}: {err}") from None
    components = {}
    for name in COMPONENTS:
        library, class_name = (index.get(name) or (None, None))[:2]
        if library is None:
            raise ValueError(f"{str(folder)!r} has no {name!r} component; int8 loading needs {', '.join(COMPONENTS)}")
        cls = getattr(importlib.import_module(library), class_name)
        components[name] = load_int8_component(folder / name, cls)
    pipe = DiffusionPipeline.from_pretrained(folder, **components)
    release_freed_memory()
    return pipe.to(device) if device is not None else pipe


def is_quantized(module: nn.Module) -> bool:
    """True if any submodule of ``module`` is a quanto quantized module."""
    try:
        from optimum.quanto.nn import QModuleMixin
    except ImportError:
        return False
    return any(isinstance(m, QModuleMixin) for m in module.modules())


@dataclass
class WeightReport:
    """How a module's parameters are stored."""

    int8_params: int          # elements stored as int8
    float_params: int         # elements stored in a floating dtype (scales, norms, biases, embeddings)
    bytes: int                # storage of all parameters and buffers

    @property
    def int8_fraction(self) -> float:
        """Fraction of the parameter elements stored as int8 (the paper reports 96.4 % for SD 1.5)."""
        return self.int8_params / max(1, self.int8_params + self.float_params)


def weight_report(module: nn.Module) -> WeightReport:
    """Count int8 and float elements and the bytes of ``module.state_dict()`` (quanto stores ``_data``/``_scale``)."""
    int8 = floats = size = 0
    for tensor in module.state_dict().values():
        size += tensor.numel() * tensor.element_size()
        if tensor.dtype == torch.int8:
            int8 += tensor.numel()
        elif tensor.is_floating_point():
            floats += tensor.numel()
    return WeightReport(int8, floats, size)
