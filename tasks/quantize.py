"""Weight-only int8 quantization of diffusers pipelines with optimum-quanto (ZOODiP §3.2, "W8").

Every ``nn.Linear`` and ``nn.Conv2d`` of the UNet, the VAE and the text encoder is replaced by quanto's
``QLinear``/``QConv2d`` holding int8 weights with one float scale per output channel (symmetric absmax),
``W_hat = s * round(W / s)``, ``s = max|W_row| / 127``. Activations stay float. A layer's float weight exists
only inside its own forward call (``s * W_int8`` then a float matmul/convolution on CPU; under
:class:`tasks.int8_forward.SharedDequantBuffer` in one buffer the layers share), never as stored state: the modules' ``state_dict`` holds int8 tensors. Token embeddings, norms and biases stay float, so a
textual-inversion row can still be written into the embedding matrix.

:func:`load_int8_pipeline` builds the same int8 pipeline from a float checkpoint folder without ever holding
all float weights: each component is built with its parameters on the meta device and filled from its
safetensors file one tensor at a time, every Linear/Conv2d quantized as soon as its weights are in, so the
peak is the int8 total plus about one layer's float weights. :func:`save_int8_pipeline` writes an int8
pipeline once (optimum-quanto's serialization: quantization map + safetensors, and a manifest of the quanto
version and the source model's float-weights fingerprint); :func:`load_saved_int8_pipeline` reads it back
straight into int8, refusing a damaged folder or one from another model or quanto version.
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

from diffguide.tasks.int8_forward import avoid_fused_int8_kernel
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
    return avoid_fused_int8_kernel(module)


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
    avoid_fused_int8_kernel(qmodule)


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

    def entry(self, key: str) -> tuple[torch.dtype, list[int]]:
        """The stored dtype and shape of ``key``."""
        path = self.files[key]
        entry = self.headers.get(path, (0, {}))[1].get(key)
        if entry is None or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"cannot read tensor {key!r} from {str(path)!r}: missing or unsupported dtype")
        return SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]

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


def _empty_model(folder: Path, cls: type) -> nn.Module:
    """``cls`` built from ``folder/config.json`` with its parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights

    if not (folder / "config.json").is_file():
        raise ValueError(f"no config.json in {str(folder)!r}")
    with init_empty_weights(include_buffers=False):          # parameters on meta, buffers (position ids) real
        if hasattr(cls, "load_config"):                      # diffusers ModelMixin
            return cls.from_config(cls.load_config(folder))
        return cls._from_config(cls.config_class.from_pretrained(folder))     # transformers PreTrainedModel


def _float_tensors(model: nn.Module, weights: _SafetensorsWeights, prefix: str):
    """``(state-dict key, float tensor)`` from the file in sorted key order, in the model's dtype and shape
    (checked); buffers the file does not hold are skipped (they keep their init)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for key in sorted(model.state_dict()):
        if key not in params and prefix + key not in weights.files:
            continue
        target = params.get(key, buffers.get(key))
        tensor = weights.read(prefix + key, target.dtype)
        if tensor.shape != target.shape:
            raise ValueError(f"{key!r} has shape {tuple(tensor.shape)} in {weights.files[prefix + key]}, "
                             f"the model expects {tuple(target.shape)}")
        yield key, tensor


def _load_whole(folder: Path, cls: type) -> nn.Module:
    """``cls.from_pretrained`` (safetensors only) for a folder whose weight names need the library's renaming."""
    warnings.warn(f"{folder}: weight names differ from {cls.__name__}'s; loading it whole in float "
                  "(higher peak memory)", stacklevel=3)
    try:
        model, info = cls.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
    except (ValueError, RuntimeError, OSError, KeyError) as err:     # another model's weights
        raise ValueError(f"cannot load {str(folder)!r} as {cls.__name__}: {err}") from None
    missing = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
    if missing:                                          # the library would fill them with random values
        raise ValueError(f"cannot load {str(folder)!r} as {cls.__name__}: its weights file lacks "
                         f"{len(missing)} of the model's tensors, e.g. {', '.join(map(str, missing[:3]))}")
    return model


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
    folder = Path(folder)
    _refuse_saved_int8(folder.parent)
    model = _empty_model(folder, cls)
    weights = _SafetensorsWeights(folder)
    params = dict(model.named_parameters(remove_duplicate=False))
    prefix = _file_prefix(params, weights.files)
    if prefix is None:
        model = _load_whole(folder, cls)
        fingerprint = weights_fingerprint(model)
        quantize_module(model)
        setattr(model, FLOAT_FINGERPRINT, fingerprint)
        return model.eval()
    pending = {name: sum(p is not None for p in m._parameters.values()) for name, m in model.named_modules()}

    def load_each():
        """Yield ``(name, float tensor)`` in sorted order for the fingerprint, then put the tensor in place."""
        for key, tensor in _float_tensors(model, weights, prefix):
            yield key, tensor
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name)
            if key in params:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=params[key].requires_grad)
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


def float_checkpoint_fingerprint(folder: str | Path, cls: type) -> str:
    """The float weights' fingerprint of the checkpoint ``folder`` of model ``cls`` (what
    :func:`float_weights_fingerprint` gives once loaded), read one tensor at a time."""
    folder = Path(folder)
    model = _empty_model(folder, cls)
    weights = _SafetensorsWeights(folder)
    prefix = _file_prefix(dict(model.named_parameters(remove_duplicate=False)), weights.files)
    if prefix is None:
        return weights_fingerprint(_load_whole(folder, cls))
    return tensors_fingerprint(_float_tensors(model, weights, prefix))


def _pipeline_classes(folder: Path) -> dict[str, type]:
    """The classes ``folder/model_index.json`` names for the UNet, VAE and text encoder."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(folder / 'model_index.json')!r}: {err}") from None
    classes = {}
    for name in COMPONENTS:
        library, class_name = (index.get(name) or (None, None))[:2]
        if library is None:
            raise ValueError(f"{str(folder)!r} has no {name!r} component; int8 loading needs {', '.join(COMPONENTS)}")
        classes[name] = getattr(importlib.import_module(library), class_name)
    return classes


def load_int8_pipeline(name_or_path: str | Path, device: str | torch.device | None = None):
    """A diffusers pipeline from a float checkpoint (shipped model name, folder or hub id) with int8 UNet, VAE
    and text encoder loaded by :func:`load_int8_component`: the float weights are never all in memory."""
    from diffusers import DiffusionPipeline

    from diffguide.tasks.zoo import resolve_model

    folder = resolve_model(name_or_path)
    _refuse_saved_int8(folder)
    components = {name: load_int8_component(folder / name, cls) for name, cls in _pipeline_classes(folder).items()}
    pipe = DiffusionPipeline.from_pretrained(folder, **components)
    release_freed_memory()
    return pipe.to(device) if device is not None else pipe


# ------------------------------------------------------------------------------ saved int8 pipelines
MANIFEST = "diffguide_int8.json"       # what the folder was made from (written last: its absence = incomplete)
QMAP = "quanto_qmap.json"              # optimum-quanto's quantization map, the name its own models use
INT8_CONFIG = {"weights": "qint8", "activations": "none"}     # weight-only int8, as quantize_module makes


def _refuse_saved_int8(folder: Path) -> None:
    if (folder / MANIFEST).is_file():
        raise ValueError(f"{str(folder)!r} holds a saved int8 pipeline ({MANIFEST}), not float weights: load it "
                         "with load_saved_int8_pipeline (diffguide-personalize --quantized)")


def save_int8_pipeline(pipe, folder: str | Path) -> Path:
    """Write ``pipe`` with int8 UNet, VAE and text encoder to the new ``folder``, for
    :func:`load_saved_int8_pipeline`; returns the folder.

    Each component folder holds ``config.json``, its int8 state dict as safetensors (optimum-quanto's
    serialization: ``weight._data`` int8 and ``weight._scale`` per Linear/Conv2d) and ``quanto_qmap.json``
    (``optimum.quanto.quantization_map``); the other components are saved by their own ``save_pretrained``.
    ``diffguide_int8.json`` records the optimum-quanto version and, per component, the float weights'
    fingerprint (:func:`float_weights_fingerprint`, the model the folder was made from) and the int8 weights'.
    A float component is quantized in place first (:func:`quantize_module`); an int8 one must carry its float
    fingerprint (from :func:`load_int8_pipeline`, or saved and loaded again).
    """
    from safetensors.torch import save_file

    quanto = _quanto()
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{str(folder)!r} exists and is not an empty folder; choose a new one")
    modules = {}
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"the pipeline has no {name!r} component; saving int8 needs {', '.join(COMPONENTS)}")
        if is_quantized(module) and getattr(module, FLOAT_FINGERPRINT, None) is None:
            raise ValueError(f"the {name} is already int8 without a record of its float weights: save the float "
                             "pipeline (it is quantized here) or one from load_int8_pipeline")
        modules[name] = module
    for module in modules.values():
        if not is_quantized(module):
            fingerprint = weights_fingerprint(module)
            quantize_module(module)
            setattr(module, FLOAT_FINGERPRINT, fingerprint)
    manifest = {"format": "diffguide int8 pipeline", "optimum_quanto": quanto.__version__,
                "source": str(getattr(pipe, "name_or_path", "") or ""), "components": {}}
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        (folder / name).mkdir()
        if hasattr(module, "save_config"):                    # diffusers ModelMixin
            module.save_config(folder / name)
            file = WEIGHT_FILES[0]
        else:                                                 # transformers PreTrainedModel
            module.config.save_pretrained(folder / name)
            file = WEIGHT_FILES[1]
        save_file({key: tensor.contiguous() for key, tensor in module.state_dict().items()}, folder / name / file)
        (folder / name / QMAP).write_text(json.dumps(quanto.quantization_map(module), indent=1))
        manifest["components"][name] = {"file": f"{name}/{file}",
                                        "float_weights_fingerprint": getattr(module, FLOAT_FINGERPRINT),
                                        "int8_weights_fingerprint": weights_fingerprint(module)}
    for name, component in pipe.components.items():
        if name not in COMPONENTS and component is not None and hasattr(component, "save_pretrained"):
            component.save_pretrained(folder / name)
    pipe.save_config(folder)                                  # model_index.json
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def read_int8_manifest(folder: str | Path) -> dict:
    """The manifest of a folder written by :func:`save_int8_pipeline`, checked: readable, complete, and
    written with the installed optimum-quanto (``ValueError`` naming the file otherwise)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder")
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} in {str(folder)!r}: not a folder written by save_int8_pipeline "
                         "(diffguide-personalize --save-quantized), or an incomplete one")
    try:
        manifest = json.loads(path.read_text())
        version = manifest["optimum_quanto"]
        entries = [manifest["components"][name] for name in COMPONENTS]
        if not all(isinstance(e["file"], str) and e["float_weights_fingerprint"] and e["int8_weights_fingerprint"]
                   for e in entries):
            raise ValueError("a component entry is incomplete")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read {str(path)!r} (damaged?): {type(err).__name__}: {err}") from None
    installed = _quanto().__version__
    if version != installed:
        raise ValueError(f"{str(path)!r} was written with optimum-quanto {version}, this is {installed}: its "
                         "int8 serialization is read only by the version that wrote it; save the pipeline again")
    return manifest


def _int8_state_keys(model: nn.Module, qmap: dict) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
    """Every key the saved state dict of ``model`` quantized by ``qmap`` holds -> (dtype or None, shape)."""
    expected = {}
    for key, tensor in model.state_dict().items():
        module_name, _, attr = key.rpartition(".")
        if module_name in qmap and attr == "weight":
            expected[key + "._data"] = (torch.int8, tuple(tensor.shape))
            expected[key + "._scale"] = (tensor.dtype, (tensor.shape[0],) + (1,) * (tensor.ndim - 1))
        else:
            expected[key] = (tensor.dtype if tensor.is_floating_point() else None, tuple(tensor.shape))
    for module_name in qmap:
        prefix = f"{module_name}." if module_name else ""
        expected[prefix + "input_scale"] = expected[prefix + "output_scale"] = (None, ())
    return expected


def load_saved_int8_component(folder: str | Path, cls: type, int8_fingerprint: str | None = None) -> nn.Module:
    """Load model ``cls`` from a component folder written by :func:`save_int8_pipeline` straight into int8.

    The model is built on the meta device, every Linear/Conv2d its ``quanto_qmap.json`` lists is replaced by
    its quanto module (``optimum.quanto.quantize_module``, as ``requantize`` does) and the saved tensors are
    assigned, read one at a time from the safetensors file (quanto's ``_load_from_state_dict`` turns
    ``weight._data``/``_scale`` into the frozen int8 weight; unlike ``requantize`` no float storage is
    allocated for them). Refused, naming the file: a map that is not weight-only int8 of exactly the
    model's Linear/Conv2d layers, a weights file that is truncated or does not hold exactly the tensors the
    map and the config make (names, dtypes, shapes), and weights other than ``int8_fingerprint``.
    """
    quanto = _quanto()
    folder = Path(folder)
    qmap_path = folder / QMAP
    try:
        qmap = json.loads(qmap_path.read_text())
        if not isinstance(qmap, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the quantization map {str(qmap_path)!r}: {err}") from None
    model = _empty_model(folder, cls)
    layers = {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    unknown = sorted(set(qmap) - layers) + sorted(n for n in set(qmap) & layers if qmap[n] != INT8_CONFIG)
    if unknown or set(qmap) != layers:
        named = unknown or sorted(layers - set(qmap))
        raise ValueError(f"{str(qmap_path)!r} does not match {cls.__name__}: it must map each of its "
                         f"{len(layers)} Linear/Conv2d layers to {INT8_CONFIG}, differs at {', '.join(named[:3])}")
    weights = _SafetensorsWeights(folder)
    expected = _int8_state_keys(model, qmap)
    file = next(iter(weights.headers), folder)
    missing, extra = sorted(set(expected) - set(weights.files)), sorted(set(weights.files) - set(expected))
    if missing or extra:
        raise ValueError(f"{str(file)!r} does not hold the tensors {QMAP} and config.json describe: "
                         + (f"lacks {', '.join(missing[:3])}" if missing else f"has extra {', '.join(extra[:3])}"))
    state = {}
    for key, (dtype, shape) in expected.items():
        stored, stored_shape = weights.entry(key)
        same_shape = tuple(stored_shape) == shape or (key.endswith("._scale") and len(stored_shape) <= len(shape)
                                                      and math.prod(stored_shape) == math.prod(shape))
        if not same_shape or (dtype is not None and stored != dtype):     # (quanto squeezes a single channel)
            raise ValueError(f"{key!r} is {stored} {tuple(stored_shape)} in {str(weights.files[key])!r}, the "
                             f"quantized {cls.__name__} expects {dtype or stored} {shape}")
        state[key] = weights.read(key, stored)
    for name in qmap:                                    # meta Linear/Conv2d -> meta quanto module
        parent, _, child = name.rpartition(".")
        qmodule = quanto.nn.quantize_module(model.get_submodule(name), weights=quanto.qint8)
        qmodule.name = name
        setattr(model.get_submodule(parent), child, qmodule)
    model.load_state_dict(state, strict=True, assign=True)
    avoid_fused_int8_kernel(model)
    del state
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{str(file)!r} left {', '.join(left[:3])} unloaded")
    if int8_fingerprint is not None and weights_fingerprint(model) != int8_fingerprint:
        raise ValueError(f"{str(file)!r} holds other int8 weights than its folder's {MANIFEST} records "
                         "(damaged or replaced); save the pipeline again")
    return model.eval()


def load_saved_int8_pipeline(folder: str | Path, model: str | Path | None = None,
                             device: str | torch.device | None = None):
    """A pipeline written by :func:`save_int8_pipeline`, loaded straight into int8 (no float weights at all).

    ``model`` (a float checkpoint: shipped name, folder or hub id), if given, must be the one the folder was
    made from: its float weights' fingerprints (read one tensor at a time) must equal the manifest's. The
    float fingerprints are recorded on the modules (:func:`float_weights_fingerprint`), so a textual-inversion
    checkpoint made from the float model resumes from the saved folder. Damaged, incomplete or foreign folders
    raise ``ValueError`` naming the file.
    """
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    manifest = read_int8_manifest(folder)
    classes = _pipeline_classes(folder)
    if model is not None:
        from diffguide.tasks.zoo import resolve_model

        source = resolve_model(model)
        source_classes = _pipeline_classes(source)
        for name in COMPONENTS:
            recorded = manifest["components"][name]["float_weights_fingerprint"]
            found = (float_checkpoint_fingerprint(source / name, source_classes[name])
                     if source_classes[name] is classes[name] else f"a {source_classes[name].__name__}")
            if found != recorded:
                raise ValueError(f"{str(folder / MANIFEST)!r} records a {name} with float weights {recorded}, "
                                 f"{str(model)!r} has {found}: the folder was made from another model")
    components = {}
    for name, cls in classes.items():
        entry = manifest["components"][name]
        if entry["file"] not in (f"{name}/{base}" for base in WEIGHT_FILES):
            raise ValueError(f"{str(folder / MANIFEST)!r} names {entry['file']!r} for the {name}, expected "
                             f"{name}/ and one of {', '.join(WEIGHT_FILES)}")
        if not (folder / entry["file"]).is_file():
            raise ValueError(f"{str(folder / entry['file'])!r} is missing")
        components[name] = load_saved_int8_component(folder / name, cls, entry["int8_weights_fingerprint"])
        setattr(components[name], FLOAT_FINGERPRINT, entry["float_weights_fingerprint"])
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
