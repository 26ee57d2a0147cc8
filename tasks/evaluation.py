"""Evaluation runs: sample N images of a model under a guide into a :class:`RunFolder`, then score them.

Both passes are data-parallel under ``torch.distributed`` (via accelerate's ``PartialState``): the
missing images are cut into fixed blocks of ``batch_size`` consecutive indices and the blocks are
split between processes without padding; the metric pass splits the indices the same way and
torchmetrics sums the states. Image ``i`` always starts from the noise of ``image_seed(seed, i)``
and has condition ``i % 10``, so the images do not depend on the process count, and a restarted
run only samples what is missing.
"""

from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import PartialState
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffguide import guidance
from diffguide.tasks.digits import CAPTION_TEMPLATES, NUM_CLASSES, caption, load_digits_tensors, to_unit
from diffguide.tasks.metrics import ImageMetrics, extractor_id, real_stats_file
from diffguide.tasks.pipelines import denoising_network, latent_shape
from diffguide.tasks.run_folder import RunFolder, atomic_write, image_seed, load_image

REAL_SETS = ("digits-train", "digits-test", "digits-all")


# ------------------------------------------------------------------------------------------ conditions
def pipeline_kind(pipe) -> str:
    """``"text"`` for prompt-driven pipelines (a tokenizer), ``"class"`` for class-conditional ones."""
    if getattr(pipe, "tokenizer", None) is not None:
        return "text"
    if hasattr(pipe, "num_classes"):
        return "class"
    raise TypeError(f"{type(pipe).__name__} is neither text-conditional nor class-conditional")


def image_labels(indices: Sequence[int], num_classes: int = NUM_CLASSES) -> list[int]:
    """Class of image ``i``: ``i % num_classes`` (balanced classes for any N)."""
    return [int(i) % num_classes for i in indices]


def image_prompts(indices: Sequence[int]) -> list[str]:
    """Caption of image ``i``: digit ``i % 10`` with caption template ``(i // 10) % len(templates)``."""
    return [caption(i % NUM_CLASSES, (i // NUM_CLASSES) % len(CAPTION_TEMPLATES)) for i in indices]


# -------------------------------------------------------------------------------------------- sampling
@dataclass
class SamplingConfig:
    """Everything that determines the images of a run (batch size and process count do not)."""

    model: str
    guide: str
    scale: float
    params: dict[str, Any] = field(default_factory=dict)
    num_images: int = 500
    steps: int = 25
    seed: int = 0
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        guidance.build_guide(self.guide, self.scale, **self.params)          # validates name and values

    def build_guide(self) -> guidance.Guidance:
        return guidance.build_guide(self.guide, self.scale, **self.params)

    def label(self) -> str:
        """Method name with its non-default parameters, e.g. ``apg(eta=0,norm_threshold=2)``."""
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.guide}({extra})" if extra else self.guide


@torch.no_grad()
def sample_block(pipe, cfg: SamplingConfig, indices: Sequence[int]) -> tuple[Tensor, list[int]]:
    """Images ``(B, C, H, W)`` in [0, 1] for ``indices`` and the network rows each image took.

    An image's rows are its unconditional rows (adaptive guides skip them per sample) plus its share of
    the rows every sample gets (conditional rows, extra passes), so they do not depend on the batch.
    """
    kind = pipeline_kind(pipe)
    generators = [torch.Generator().manual_seed(image_seed(cfg.seed, i)) for i in indices]
    shape = latent_shape(pipe)
    latents = torch.stack([torch.randn(shape, generator=g) for g in generators])
    latents = latents.to(pipe.device, denoising_network(pipe).dtype)
    if hasattr(pipe.scheduler, "noise_sampler_seed"):  # DPM++ SDE: one Brownian tree per image
        pipe.scheduler.noise_sampler_seed = [image_seed(cfg.seed, i) for i in indices]
    call = dict(num_inference_steps=cfg.steps, latents=latents, generator=generators, output_type="pt")
    if "eta" in inspect.signature(type(pipe).__call__).parameters:
        call["eta"] = cfg.eta
    elif cfg.eta != 0:
        raise ValueError(f"eta={cfg.eta}: {type(pipe).__name__} takes no eta (its scheduler is deterministic)")
    with guidance.apply(pipe, cfg.build_guide()) as stats:
        if kind == "class":
            images = pipe(class_labels=image_labels(indices, pipe.num_classes), **call).images
        else:
            size = shape[-1] * pipe.vae_scale_factor
            images = pipe(prompt=image_prompts(indices), height=size, width=size, **call).images
    uncond = stats.uncond_rows_per_sample
    uncond = torch.zeros(len(indices), dtype=torch.long) if uncond is None else uncond
    shared, rest = divmod(stats.rows - int(uncond.sum()), len(indices))
    if rest or shared < 0:
        raise RuntimeError(f"{stats.rows} network rows do not split over {len(indices)} images with "
                           f"{uncond.tolist()} unconditional rows")
    return images.float().cpu(), (uncond + shared).tolist()


def network_rows_per_image(folder: RunFolder, num_images: int) -> float | None:
    """Mean network rows over the images ``0 .. num_images - 1`` (``None`` if one was saved without them)."""
    rows = [folder.network_rows(i) for i in range(num_images)]
    return None if None in rows else sum(rows) / num_images


def blocks(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group indices by the fixed blocks ``[k * batch_size, (k + 1) * batch_size)`` they fall in."""
    grouped: dict[int, list[int]] = {}
    for i in sorted(indices):
        grouped.setdefault(i // batch_size, []).append(i)
    return list(grouped.values())


def sample_run(pipe, cfg: SamplingConfig, folder: RunFolder, state: PartialState, batch_size: int = 64,
               progress: bool = True) -> int:
    """Sample the images ``folder`` is missing, split over processes; returns how many were written (all ranks).

    The main process first verifies the folder (:meth:`RunFolder.claim`: another configuration is refused,
    damaged images are removed and named in a warning, so they are re-sampled here). A block with some images
    already written is sampled whole (same batch, same numbers) and only its missing images are written, each
    with the network rows it took. At the end the main process writes their mean over all images to
    ``nfe.json`` (the same for any batch size, process count or restart).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if state.is_main_process:
        damaged = folder.claim()
        if damaged:
            warnings.warn(f"re-sampling {len(damaged)} damaged image(s) of {folder.root}: "
                          f"{', '.join(p.name for p in damaged)}", stacklevel=2)
    state.wait_for_everyone()
    folder.check()
    missing = folder.missing(cfg.num_images)
    todo = []
    for block in blocks(missing, batch_size):
        start = block[0] // batch_size * batch_size
        todo.append((list(range(start, min(start + batch_size, cfg.num_images))), block))
    written = 0
    with state.split_between_processes(todo) as mine:
        bar = tqdm(total=sum(len(b) for _, b in mine), desc=f"sampling {cfg.label()} @ {cfg.scale:g}",
                   disable=not (progress and state.is_main_process), unit="img")
        for full, needed in mine:
            images, rows = sample_block(pipe, cfg, full)
            for i, image, n in zip(full, images, rows):
                if i in needed:
                    folder.write_image(i, image, network_rows=n)
                    written += 1
            bar.update(len(needed))
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        nfe = network_rows_per_image(folder, cfg.num_images)
        if nfe is not None or folder.read_json("nfe.json") is None:     # keeps the value of an older folder
            folder.write_json("nfe.json", {"network_rows_per_image": nfe})
    state.wait_for_everyone()
    if state.num_processes > 1:
        from accelerate.utils import gather_object
        written = sum(gather_object([written]))
    return written


# -------------------------------------------------------------------------------------------- metrics
def real_images(name: str, size: int) -> Tensor:
    """A real reference set of ``size`` x ``size`` images in [0, 1], rounded to 8 bits like saved samples:
    ``digits-*`` (resized to ``size``) or an image folder (whose images must already have that size)."""
    if name in REAL_SETS:
        images = to_unit(load_digits_tensors(name.split("-", 1)[1], size)[0])
        return (images * 255).round() / 255
    folder = Path(name)
    if not folder.is_dir():
        raise ValueError(f"real set must be one of {', '.join(REAL_SETS)} or an image folder, got {name!r}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < 2:
        raise ValueError(f"{folder} holds {len(files)} images; FID/KID need at least 2 real images")
    images = [load_image(p) for p in files]
    for path, image in zip(files, images):
        if tuple(image.shape[-2:]) != (size, size):
            raise ValueError(f"real image {path} is {image.shape[-2]}x{image.shape[-1]}, the generated images "
                             f"are {size}x{size}; resize the real set to {size}x{size} first")
    if len({image.shape[0] for image in images}) > 1:
        raise ValueError(f"{folder} mixes gray and RGB images; convert them to one mode first")
    return torch.stack(images)


def prepare_real(metrics: ImageMetrics, real: str, size: int, cache_dir: str | Path, feature: nn.Module,
                 state: PartialState, batch_size: int = 256) -> Path | None:
    """Load cached real FID/KID statistics of ``real`` (computed and cached by the main process if absent)."""
    wanted = [name for name in ("fid", "kid") if name in metrics.metrics]
    if not wanted:
        return None
    tag = Path(real).name if Path(real).is_dir() else real
    path = real_stats_file(f"{tag}-{size}px", extractor_id(feature), cache_dir)
    if state.is_main_process and not _has_stats(path, wanted):
        reference = ImageMetrics(wanted, feature=feature, kid_subset_size=10**9)
        images = real_images(real, size)
        for chunk in images.split(batch_size):
            reference.update_real(chunk)
        reference.save_real(path, metadata={"real": real, "size": size, "num_images": len(images),
                                            "extractor": extractor_id(feature)})
    state.wait_for_everyone()
    metrics.load_real(path)
    return path


def _has_stats(path: Path, wanted: list[str]) -> bool:
    """The cache holds the wanted statistics and their image size (older files without it are recomputed)."""
    if not path.exists():
        return False
    from safetensors import safe_open
    with safe_open(path, "pt") as handle:
        keys = set(handle.keys())
    return "real_size" in keys and all({"fid": "fid_sum", "kid": "kid_features"}[name] in keys for name in wanted)


def score_images(metrics: ImageMetrics, paths: Sequence[Path], state: PartialState,
                 labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
                 batch_size: int = 256, progress: bool = True, device: torch.device | str = "cpu") -> dict[str, float]:
    """Update ``metrics`` with the images at ``paths`` (split over processes) and compute them (collective)."""
    if metrics.needs_labels and labels is None:
        raise ValueError("metric 'accuracy' needs a class label per image")
    if metrics.needs_prompts and prompts is None:
        raise ValueError("metric 'clip_score' needs a prompt per image")
    with state.split_between_processes(list(range(len(paths)))) as mine:
        bar = tqdm(total=len(mine), desc="metrics", disable=not (progress and state.is_main_process), unit="img")
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            images = torch.stack([load_image(paths[i]) for i in chunk]).to(device)
            metrics.update(images, labels=None if labels is None else [labels[i] for i in chunk],
                           prompts=None if prompts is None else [prompts[i] for i in chunk])
            bar.update(len(chunk))
        bar.close()
    return metrics.compute()


def folder_images(folder: str | Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Image files of a folder (sorted) and, from its ``metadata.jsonl`` if present, ``label`` / ``text``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise ValueError(f"{folder} holds no .png/.jpg images")
    meta_path = folder / "metadata.jsonl"
    if not meta_path.exists():
        return files, None, None
    rows = {row["file_name"]: row for row in map(json.loads, meta_path.read_text().splitlines()) if row}
    missing = [p.name for p in files if p.name not in rows]
    if missing:
        raise ValueError(f"{meta_path} has no entry for {len(missing)} images, e.g. {missing[0]}")
    labels = [int(rows[p.name]["label"]) for p in files] if all("label" in rows[p.name] for p in files) else None
    prompts = [str(rows[p.name]["text"]) for p in files] if all("text" in rows[p.name] for p in files) else None
    return files, labels, prompts


def write_metadata(folder: RunFolder, cfg: SamplingConfig, kind: str) -> None:
    """``images/metadata.jsonl`` (file_name, label, text), so the folder is also an evaluable image folder."""
    indices = range(cfg.num_images)
    labels = image_labels(indices)
    prompts = image_prompts(indices) if kind == "text" else [None] * cfg.num_images
    lines = []
    for i, label, text in zip(indices, labels, prompts):
        row = {"file_name": folder.image_path(i).name, "label": label}
        if text is not None:
            row["text"] = text
        lines.append(json.dumps(row))
    atomic_write(folder.images / "metadata.jsonl", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def scheduler_config(scheduler) -> dict[str, Any]:
    """A scheduler's class and public config (no ``_diffusers_version``), JSON-ready."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return json.loads(json.dumps({"class": type(scheduler).__name__, **config}, default=str))


def config_dict(cfg: SamplingConfig, model_fingerprint: str, scheduler: dict[str, Any]) -> dict[str, Any]:
    """What a run folder stores and hashes: the sampling config, the networks' weights and the scheduler."""
    return {**asdict(cfg), "model_fingerprint": model_fingerprint, "scheduler": scheduler, "labels": "i % 10",
            "prompts": "caption(i % 10, (i // 10) % 6)", "seeds": "image_seed(seed, i)"}
