"""Textual inversion of a new token on a few images: zeroth-order (ZOODiP) or backprop (diffusers' recipe).

    pipe = zoo.load("digits-t2i")
    images = load_image_folder("my_sevens/", *expected_image_format(pipe))
    trainer = TextualInversion(pipe, images, "<s1>", "digit", PersonalizeConfig(method="zo", steps=500))
    path = trainer.train("out/")            # out/learned_embeds.safetensors, loadable by diffusers:
    fresh = zoo.load("digits-t2i")
    fresh.load_textual_inversion(path, token="<s1>")

Both methods minimise the latent-diffusion loss of ZOODiP Eq. 1 / Textual Inversion,
``L(theta) = E ||target - net(z_t, t, c(y*; theta))||^2`` over the one new embedding row ``theta``:

- ``method="zo"`` (ZOODiP, Seo et al. CVPR 2025): int8 weights, ``n + 1`` forward passes per step sharing
  image, noise and timestep (or one pass of batch ``n + 1`` with ``batch_directions=True``: faster, more
  activation memory), :func:`guidance.zo_personalize.random_gradient_estimate`, Subspace Gradient,
  ZO-Adam (``torch.optim.Adam``, eps 1e-3), PUTS timesteps ``t ~ U{500..899}``; no autograd graph is ever
  built, and the int8 layers dequantize
  into one shared buffer (:class:`tasks.int8_forward.SharedDequantBuffer`, quanto's results bit for bit).
- ``method="backprop"`` (diffusers ``examples/textual_inversion``): float weights, AdamW (weight decay 1e-2)
  over the whole token-embedding matrix with every row but the new one restored after each step,
  ``t ~ U{0..999}``.

All randomness (image, flip, caption template, latent sample, noise, timestep, ZO directions) comes from one
``torch.Generator`` seeded by ``config.seed``; a checkpoint stores its state, so a resumed run continues
exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from diffguide.guidance.zo_personalize import (PartialUniformTimesteps, SubspaceGradient, random_gradient_estimate,
                                               zo_adam)
from diffguide.tasks.int8_forward import SharedDequantBuffer
from diffguide.tasks.quantize import COMPONENTS, float_weights_fingerprint, is_quantized, quantize_module
from diffguide.tasks.metrics.features import tensors_fingerprint

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
EMBEDDING_FILE = "learned_embeds.safetensors"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = 2      # 2: Adam state under optimizer.step / exp_avg / exp_avg_sq for both methods
OBJECT_TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
                    "a photo of a clean {}", "a close-up photo of a {}", "a bright photo of the {}",
                    "a good photo of a {}")
Method = Literal["zo", "backprop"]


# ------------------------------------------------------------------------------------------- images
def expected_image_format(pipe) -> tuple[int, str]:
    """``(size, PIL mode)`` of the pipeline's training images: ``sample_size * vae_scale_factor``, "L" or "RGB"."""
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    channels = int(pipe.vae.config.in_channels)
    modes = {1: "L", 3: "RGB"}
    if channels not in modes:
        raise ValueError(f"the VAE takes {channels}-channel images; only 1 (L) and 3 (RGB) are supported")
    return size, modes[channels]


def load_image_folder(folder: str | Path, size: int, mode: str, resize: bool = False) -> Tensor:
    """Images of ``folder`` as ``(N, C, size, size)`` float32 in [-1, 1], in file-name order.

    Every file with an image extension must be ``size x size`` in PIL ``mode`` ("L" or "RGB"); with
    ``resize=True`` other sizes are resized (bicubic, as diffusers' textual inversion does) and other modes
    converted. Raises ``ValueError`` for a missing or empty folder, unreadable files and, without ``resize``,
    images of another size or mode.
    """
    from PIL import Image, UnidentifiedImageError

    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images in {str(folder)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    tensors, wrong = [], []
    for path in files:
        try:
            with Image.open(path) as opened:
                image = opened.copy()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {str(path)!r}: {err}") from None
        if image.size != (size, size) or image.mode != mode:
            if not resize:
                wrong.append(f"{path.name} ({image.size[0]}x{image.size[1]} {image.mode})")
                continue
            image = image.convert(mode).resize((size, size), Image.Resampling.BICUBIC)
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        tensors.append(array.reshape(size, size, len(mode)).permute(2, 0, 1).float() / 127.5 - 1.0)
    if wrong:
        raise ValueError(f"images must be {size}x{size} in mode {mode!r} for this pipeline; got "
                         f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}. Pass resize=True "
                         "(--resize) to resize and convert them")
    return torch.stack(tensors)


# ------------------------------------------------------------------------------------------- tokens
def load_tokenizer(folder: str | Path):
    """The tokenizer of the diffusers pipeline folder ``folder``, read from its own files (no weights are read)."""
    import transformers

    folder = Path(folder)
    library, class_name = json.loads((folder / "model_index.json").read_text())["tokenizer"]
    if library != "transformers" or not hasattr(transformers, class_name):
        raise ValueError(f"its tokenizer is {library}.{class_name}, not a transformers tokenizer")
    return getattr(transformers, class_name).from_pretrained(folder / "tokenizer")


def check_placeholder_token(tokenizer, token: str, initializer_token: str) -> int:
    """``ValueError`` unless ``token`` is new to ``tokenizer`` (a string it already reads as one token, a word of
    its vocabulary or an added token, is refused, as diffusers' ``load_textual_inversion`` would refuse it later)
    and ``initializer_token`` is exactly one of its tokens; returns the initializer's id."""
    for name, value in (("token", token), ("initializer_token", initializer_token)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        if not value.strip() or value != value.strip() or any(c.isspace() for c in value):
            raise ValueError(f"{name} must be one non-empty word without spaces, got {value!r}")
    if token in tokenizer.get_vocab() or len(tokenizer.encode(token, add_special_tokens=False)) == 1:
        raise ValueError(f"token {token!r} is already in the tokenizer's vocabulary; choose a new string "
                         "such as '<s1>'")
    init_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"initializer_token {initializer_token!r} must be a single token of the vocabulary, "
                         f"it encodes to {len(init_ids)} tokens")
    return init_ids[0]


def add_placeholder_token(tokenizer, text_encoder, token: str, initializer_token: str) -> int:
    """Add ``token`` to the tokenizer, grow the embedding matrix, copy the initializer's row; returns its id.

    ``token`` and ``initializer_token`` as :func:`check_placeholder_token` requires.
    """
    init_id = check_placeholder_token(tokenizer, token, initializer_token)
    if tokenizer.add_tokens([token]) != 1:
        raise ValueError(f"the tokenizer refused to add {token!r}")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id >= text_encoder.get_input_embeddings().weight.shape[0]:        # grow only, never shrink
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = weight[init_id]
    if tokenizer.encode(f"a {token}", add_special_tokens=False)[-1] != token_id:
        raise ValueError(f"the tokenizer does not read {token!r} back as one token")
    return token_id


def save_learned_embedding(path: str | Path, token: str, embedding: Tensor) -> Path:
    """Write ``{token: embedding[1, d]}`` (the format of diffusers ``load_textual_inversion``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save({token: embedding.detach().float().reshape(1, -1).cpu().contiguous()}, path)
    return path


def load_learned_embedding(path: str | Path) -> tuple[str, Tensor]:
    """``(token, embedding[d])`` from a file written by :func:`save_learned_embedding`."""
    state = load_file(str(path))
    if len(state) != 1:
        raise ValueError(f"{path} holds {len(state)} tensors; a learned embedding file holds one")
    token, tensor = next(iter(state.items()))
    return token, tensor.reshape(-1)


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    """``save_file`` to a temporary name, then rename; the file gets the permissions of the user's umask
    (safetensors itself creates files readable by their owner only)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def checkpoint_exists(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a checkpoint, complete or not (a damaged one is refused, never restarted)."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    return any((folder / name).exists() for name in ("state.json", "state.safetensors"))


def read_checkpoint_meta(out_dir: str | Path) -> dict:
    """The ``state.json`` of ``out_dir``'s checkpoint, after checking that it and ``state.safetensors`` are
    readable (``ValueError`` naming the damaged or missing file)."""
    from safetensors import safe_open

    folder = Path(out_dir) / CHECKPOINT_DIR
    meta_path, state_path = folder / "state.json", folder / "state.safetensors"
    try:
        meta = json.loads(meta_path.read_text())
        PersonalizeConfig.from_json(meta["config"])
        int(meta["step"])
        version = int(meta.get("format", 1))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"damaged checkpoint {str(meta_path)!r} ({type(err).__name__}: {err}); remove "
                         f"{str(folder)!r} to start afresh") from None
    if version > CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {str(meta_path)!r} has format {version}, newer than this diffguide reads "
                         f"({CHECKPOINT_FORMAT}): resume it with the diffguide that wrote it")
    try:
        with safe_open(str(state_path), "pt") as handle:
            handle.keys()
    except Exception as err:                                  # SafetensorError, FileNotFoundError
        raise ValueError(f"damaged checkpoint {str(state_path)!r} ({type(err).__name__}: {err}); remove "
                         f"{str(folder)!r} to start afresh") from None
    return meta


# ------------------------------------------------------------------------------------------- config
@dataclass
class PersonalizeConfig:
    """Hyper-parameters; ``None`` means the method's default (:meth:`resolved`).

    ZO defaults are ZOODiP's (paper: n=2, mu=1e-3, tau=128, nu=1e-3, PUTS 500..899, lr 5e-3); backprop
    defaults are diffusers' textual inversion (AdamW, weight decay 1e-2, uniform timesteps, lr 5e-4).
    """

    method: Method = "zo"
    steps: int = 1000
    learning_rate: float | None = None
    batch_size: int = 1
    num_directions: int = 2
    mu: float = 1e-3
    scaling: Literal["repo", "paper"] = "repo"
    tau: int = 128
    nu: float = 1e-3
    timestep_range: tuple[int, int] | None = None
    weight_decay: float = 1e-2
    flip_prob: float = 0.5
    templates: tuple[str, ...] = OBJECT_TEMPLATES
    seed: int = 0
    save_every: int = 100
    quantize: bool | None = None
    batch_directions: bool = False

    DEFAULTS = {"zo": {"learning_rate": 5e-3, "timestep_range": (500, 900), "quantize": True},
                "backprop": {"learning_rate": 5e-4, "timestep_range": (0, 1000), "quantize": False}}

    def resolved(self, num_train_timesteps: int = 1000) -> "PersonalizeConfig":
        """A validated copy with the method defaults filled in."""
        if self.method not in self.DEFAULTS:
            raise ValueError(f"method must be 'zo' or 'backprop', got {self.method!r}")
        values = asdict(self)
        for key, default in self.DEFAULTS[self.method].items():
            if values[key] is None:
                values[key] = default
        if self.method == "backprop" and self.timestep_range is None:
            values["timestep_range"] = (0, num_train_timesteps)
        values["timestep_range"] = tuple(int(v) for v in values["timestep_range"])
        values["templates"] = tuple(values["templates"])
        config = PersonalizeConfig(**values)
        config._validate()
        return config

    def _validate(self) -> None:
        for name in ("steps", "batch_size", "num_directions", "tau", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("learning_rate", "mu", "nu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not self.nu < 1:
            raise ValueError(f"nu must be in (0, 1), got {self.nu!r}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError("templates must be a non-empty list of strings with exactly one '{}' each")

    def to_json(self) -> dict:
        values = asdict(self)
        values["templates"], values["timestep_range"] = list(self.templates), list(self.timestep_range or ())
        return values

    @classmethod
    def from_json(cls, values: dict) -> "PersonalizeConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["templates"] = tuple(values["templates"])
        values["timestep_range"] = tuple(values["timestep_range"]) if values.get("timestep_range") else None
        return cls(**values)


def check_checkpoint_fits(meta: dict, config: PersonalizeConfig, **expected) -> None:
    """``ValueError`` naming every difference between a checkpoint's ``state.json`` and this run: the resolved
    ``config`` except ``steps`` and ``save_every``, and each of ``expected`` (``token=...``, ...)."""
    saved, ours = PersonalizeConfig.from_json(meta["config"]).to_json(), config.to_json()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {ours[k]!r}" for k in ours
             if k not in ("steps", "save_every") and saved.get(k) != ours[k]]
    diffs += [f"{k}: checkpoint {meta.get(k)!r} vs now {now!r}" for k, now in expected.items() if meta.get(k) != now]
    if diffs:
        raise ValueError("cannot resume, the run differs from the checkpoint: " + "; ".join(diffs))


def load_pipeline(name_or_path: str | Path, int8: bool, device: str | torch.device | None = None):
    """The pipeline to personalize from a float checkpoint: int8 loaded layer by layer
    (:func:`tasks.quantize.load_int8_pipeline`) or float (``zoo.load``)."""
    if int8:
        from diffguide.tasks.quantize import load_int8_pipeline

        return load_int8_pipeline(name_or_path, device=device)
    from diffguide.tasks import zoo

    return zoo.load(name_or_path, device=device)


def max_batch_size(config: PersonalizeConfig, num_images: int) -> int:
    """Distinct (image, mirror, caption template) combinations: a larger batch repeats them in every step."""
    return num_images * (2 if config.flip_prob > 0 else 1) * len(config.templates)


def check_batch_size(config: PersonalizeConfig, num_images: int) -> None:
    """Refuse a batch larger than :func:`max_batch_size`: it only repeats images and captions (more steps
    average over noise and timesteps at no memory cost), while activation memory grows with every row."""
    limit = max_batch_size(config, num_images)
    if config.batch_size > limit:
        raise ValueError(f"batch_size {config.batch_size} is larger than the {limit} distinct (image, mirror, "
                         f"caption template) combinations of {num_images} images; a larger batch only repeats "
                         "them at more memory, use at most that many (or more steps)")


# ------------------------------------------------------------------------------------------- trainer
@dataclass
class _Batch:
    input_ids: Tensor
    noisy_latents: Tensor
    timesteps: Tensor
    target: Tensor


class TextualInversion:
    """Learn the embedding row of a new ``token`` of ``pipe`` from ``images`` ``(N, C, H, W)`` in [-1, 1].

    ``pipe`` is a loaded pipeline or a float checkpoint (shipped model name, folder or hub id): with int8
    weights (``config.quantize``, default for ``zo``) a checkpoint is loaded by
    :func:`tasks.quantize.load_int8_pipeline`, one layer at a time, so the float weights are never all in memory
    (the trained embedding is bit-identical to the one from a float pipeline quantized whole); without, by
    ``zoo.load``. Construction adds the token (initialised from ``initializer_token``), quantizes a float
    pipeline to int8 if ``config.quantize`` and caches the VAE posteriors of the images and their mirror
    images. :meth:`step` does one update and returns the loss at the current embedding; :meth:`train` loops
    with a progress bar, checkpoints every ``config.save_every`` steps and can resume.
    """

    def __init__(self, pipe, images: Tensor, token: str, initializer_token: str,
                 config: PersonalizeConfig | None = None) -> None:
        from diffusers import DDPMScheduler

        config = PersonalizeConfig() if config is None else config
        if not isinstance(config, PersonalizeConfig):
            raise TypeError(f"config must be a PersonalizeConfig, got {type(config).__name__}")
        if isinstance(pipe, (str, Path)):
            pipe = load_pipeline(pipe, config.resolved().quantize)       # validates the config before loading
        self.pipe, self.images, self.token, self.initializer_token = pipe, images, token, initializer_token
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipe, name, None) is None:
                raise TypeError(f"pipe must be a StableDiffusionPipeline-like pipeline with a {name!r} component")
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.config = config.resolved(self.noise_scheduler.config.num_train_timesteps)
        self._check_images(self.images)
        self.images_sha256 = tensors_fingerprint([(f"images{tuple(self.images.shape)}", self.images.float())], 16)
        self.model_fingerprint = "-".join(float_weights_fingerprint(getattr(pipe, name))
                                          for name in ("unet", "text_encoder", "vae"))
        check_batch_size(self.config, len(self.images))
        self.token_id = add_placeholder_token(pipe.tokenizer, pipe.text_encoder, self.token, self.initializer_token)
        if self.config.quantize:                          # token embeddings stay float: quanto skips nn.Embedding
            for name in COMPONENTS:
                if not is_quantized(getattr(pipe, name)):
                    quantize_module(getattr(pipe, name))
        self.embedding_weight = pipe.text_encoder.get_input_embeddings().weight
        self.device, self.dtype = self.embedding_weight.device, self.embedding_weight.dtype
        self.unet_dtype = next(pipe.unet.parameters()).dtype
        self.generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        self.timestep_sampler = PartialUniformTimesteps(*self.config.timestep_range,
                                                        num_train_timesteps=self.noise_scheduler.config.num_train_timesteps)
        self.template_ids = pipe.tokenizer([t.format(self.token) for t in self.config.templates], padding="max_length",
                                           max_length=pipe.tokenizer.model_max_length, truncation=True,
                                           return_tensors="pt").input_ids.to(self.device)
        cut = [t for t, ids in zip(self.config.templates, self.template_ids) if self.token_id not in ids]
        if cut:
            raise ValueError(f"the token is cut off by the tokenizer's max length "
                             f"({pipe.tokenizer.model_max_length}) in templates {cut}; use shorter templates")
        self._encode_images()
        self.step_count = 0
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False).eval()
        if self.config.method == "zo":
            self.theta = self.embedding_weight[self.token_id].detach().float().clone()     # fp32 master copy
            self.optimizer = zo_adam(self.theta, self.config.learning_rate)
            self.subspace = SubspaceGradient(self.theta.numel(), self.config.tau, self.config.nu)
            self.int8_forward = SharedDequantBuffer(pipe.unet, pipe.text_encoder)     # no-op for float layers
        else:
            self.embedding_weight.requires_grad_(True)
            self.original_embeddings = self.embedding_weight.detach().clone()
            self.keep_rows = torch.ones(len(self.original_embeddings), dtype=torch.bool, device=self.device)
            self.keep_rows[self.token_id] = False
            self.optimizer = torch.optim.AdamW([self.embedding_weight], lr=self.config.learning_rate,
                                               betas=(0.9, 0.999), eps=1e-8, weight_decay=self.config.weight_decay)

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a tensor (N, C, H, W), got {type(images).__name__}")
        size, mode = expected_image_format(self.pipe)
        expected = (len(mode), size, size)
        if images.ndim != 4 or len(images) == 0 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (N >= 1, {', '.join(map(str, expected))}), "
                             f"got {tuple(images.shape)}")
        if not images.is_floating_point() or images.min() < -1 - 1e-6 or images.max() > 1 + 1e-6:
            raise ValueError("images must be floating point in [-1, 1]")

    @torch.no_grad()
    def _encode_images(self) -> None:
        vae = self.pipe.vae
        pixels = self.images.to(self.device, next(vae.parameters()).dtype)
        pixels = torch.cat([pixels, pixels.flip(-1)])                 # row i + N is image i mirrored
        posterior = vae.encode(pixels).latent_dist
        self.latent_mean, self.latent_std = posterior.mean.float(), posterior.std.float()
        self.scaling_factor = float(vae.config.scaling_factor)

    @property
    def embedding(self) -> Tensor:
        """The current learned vector ``(d,)`` (float32)."""
        if self.config.method == "zo":
            return self.theta.clone()
        return self.embedding_weight[self.token_id].detach().float().clone()

    def sample_batch(self) -> _Batch:
        """Images, mirror flips, templates, latents ``z ~ q(z|x)``, noise and timesteps from the generator."""
        gen, b, n = self.generator, self.config.batch_size, len(self.images)
        index = torch.randint(n, (b,), generator=gen)
        flip = torch.rand(b, generator=gen) < self.config.flip_prob
        rows = (index + n * flip.long()).to(self.device)
        template = torch.randint(len(self.template_ids), (b,), generator=gen).to(self.device)
        mean, std = self.latent_mean[rows], self.latent_std[rows]
        latents = (mean + std * torch.randn(mean.shape, generator=gen).to(mean)) * self.scaling_factor
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        timesteps = self.timestep_sampler.sample(b, gen, self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        elif kind == "sample":
            target = latents
        else:
            raise ValueError(f"unsupported prediction_type {kind!r}")
        return _Batch(self.template_ids[template], noisy.to(self.unet_dtype), timesteps, target)

    def _loss(self, batch: _Batch) -> Tensor:
        states = self.pipe.text_encoder(batch.input_ids)[0].to(self.unet_dtype)
        pred = self.pipe.unet(batch.noisy_latents, batch.timesteps, states).sample
        return F.mse_loss(pred.float(), batch.target.float())

    def step(self) -> float:
        """One optimisation step; returns the loss at the embedding before the update."""
        batch = self.sample_batch()
        if self.config.method == "zo":
            loss = self._zo_step(batch)
        else:
            loss = self._backprop_step(batch)
        self.step_count += 1
        return loss

    @torch.no_grad()
    def _zo_step(self, batch: _Batch) -> float:
        def loss_at(vector: Tensor) -> Tensor:
            self.embedding_weight[self.token_id] = vector.to(self.dtype)          # write, never add/subtract
            return self._loss(batch)

        cfg = self.config
        with self.int8_forward:
            estimate = random_gradient_estimate(
                (lambda points: self._batched_losses(batch, points)) if cfg.batch_directions else loss_at,
                self.theta, cfg.num_directions, cfg.mu, self.generator, cfg.scaling,
                effective_dim=self.subspace.effective_dim, batched=cfg.batch_directions)
        self.theta.grad = self.subspace.project(estimate.grad)
        self.optimizer.step()
        self.theta.grad = None
        self.subspace.push(self.theta)
        self.embedding_weight[self.token_id] = self.theta.to(self.dtype)
        return float(estimate.base_loss)

    def _batched_losses(self, batch: _Batch, points: Tensor) -> Tensor:
        """Losses at ``k`` embedding values ``points (k, d)`` in one forward pass of batch ``k * b``: the token's
        embedding rows are replaced per sample by a forward hook (the embedding matrix is not touched)."""
        k, b = len(points), len(batch.input_ids)
        ids = batch.input_ids.repeat(k, 1)
        mask = ids == self.token_id
        vectors = points.to(self.dtype)[mask.nonzero()[:, 0] // b]

        def replace(module, inputs, output):
            output = output.clone()
            output[mask] = vectors
            return output

        handle = self.pipe.text_encoder.get_input_embeddings().register_forward_hook(replace)
        try:
            states = self.pipe.text_encoder(ids)[0].to(self.unet_dtype)
        finally:
            handle.remove()
        repeat = lambda x: x.repeat(k, *([1] * (x.ndim - 1)))
        pred = self.pipe.unet(repeat(batch.noisy_latents), repeat(batch.timesteps), states).sample
        per_sample = (pred.float() - repeat(batch.target).float()).pow(2).flatten(1).mean(1)
        return per_sample.view(k, b).mean(1)

    def _backprop_step(self, batch: _Batch) -> float:
        loss = self._loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():                                      # only the new row may change
            self.embedding_weight[self.keep_rows] = self.original_embeddings[self.keep_rows]
        return float(loss.detach())

    # --------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to continue: the vector, optimiser state, SG history/basis, generator state."""
        state = {"embedding": self.embedding, "generator": self.generator.get_state(),
                 "step_count": torch.tensor(self.step_count)}
        if self.config.method == "zo":
            state |= {f"subspace.{k}": v for k, v in self.subspace.state_dict().items()}
            adam, row = self.optimizer.state.get(self.theta, {}), slice(None)
        else:                                     # the other rows are restored every step: only this row matters
            adam, row = self.optimizer.state.get(self.embedding_weight, {}), self.token_id
        if adam:
            state |= {"optimizer.step": torch.as_tensor(adam["step"]).float(),
                      "optimizer.exp_avg": adam["exp_avg"][row].clone(),
                      "optimizer.exp_avg_sq": adam["exp_avg_sq"][row].clone()}
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (also the format before ``CHECKPOINT_FORMAT`` 2, whose ZO optimizer state
        was ``optimizer.step_count``: it continues with ``torch.optim.Adam``, which rounds differently).
        ``ValueError`` when a tensor is missing or does not fit this run."""
        state = {k: v.clone() for k, v in state.items()}             # own, aligned memory (not the file's)
        if "optimizer.step_count" in state:
            warnings.warn("checkpoint of an earlier diffguide (its own ZO-Adam): continuing with torch.optim.Adam, "
                          "whose rounding differs, so the result is not bit-identical to an uninterrupted run of "
                          "that version", stacklevel=2)
            state["optimizer.step"] = state.pop("optimizer.step_count").float()
        vector = state["embedding"].to(self.device, torch.float32)
        dim = self.embedding_weight.shape[1]
        if vector.shape != (dim,):
            raise ValueError(f"checkpoint embedding has shape {tuple(vector.shape)}, the text encoder's is ({dim},)")
        step_count = int(state["step_count"])
        adam = {k: state[f"optimizer.{k}"] for k in ("step", "exp_avg", "exp_avg_sq") if f"optimizer.{k}" in state}
        if (len(adam) != 3 if step_count else adam) or (adam and (int(adam["step"]) != step_count or any(
                adam[k].shape != (dim,) for k in ("exp_avg", "exp_avg_sq")))):
            found = ", ".join(f"{k} {tuple(v.shape)}" for k, v in adam.items()) or "none"
            raise ValueError(f"the optimizer state ({found}) does not fit {step_count} steps of a ({dim},) vector")
        if self.config.method == "zo":
            subspace = SubspaceGradient(dim, self.config.tau, self.config.nu)
            subspace.load_state_dict({k[len("subspace."):]: v.to(self.device) for k, v in state.items()
                                      if k.startswith("subspace.")})
            if subspace.num_pushed != step_count:
                raise ValueError(f"the subspace history holds {subspace.num_pushed} steps, the checkpoint {step_count}")
        self.generator.set_state(state["generator"])
        self.step_count = step_count
        self.embedding_weight[self.token_id] = vector.to(self.dtype)
        if self.config.method == "zo":
            self.theta.copy_(vector)                         # in place: the optimizer holds this tensor
            self.subspace = subspace
            target, exp_avg, exp_avg_sq = self.theta, *(adam.get(k) for k in ("exp_avg", "exp_avg_sq"))
        else:
            target = self.embedding_weight
            if adam:
                exp_avg, exp_avg_sq = torch.zeros_like(target), torch.zeros_like(target)
                exp_avg[self.token_id], exp_avg_sq[self.token_id] = adam["exp_avg"], adam["exp_avg_sq"]
        self.optimizer.state.clear()
        if adam:
            self.optimizer.state[target] = {"step": adam["step"].float(), "exp_avg": exp_avg.to(target),
                                            "exp_avg_sq": exp_avg_sq.to(target)}

    def save_checkpoint(self, out_dir: str | Path) -> Path:
        """Write ``learned_embeds.safetensors`` and ``checkpoint/state.safetensors`` + ``state.json``."""
        out_dir = Path(out_dir)
        folder = out_dir / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        embedding_path = save_learned_embedding(out_dir / EMBEDDING_FILE, self.token, self.embedding)
        _atomic_save(self.state_dict(), folder / "state.safetensors")
        meta = {"format": CHECKPOINT_FORMAT, "step": self.step_count, "token": self.token, "initializer_token": self.initializer_token,
                "num_images": len(self.images), "images_sha256": self.images_sha256,
                "model_fingerprint": self.model_fingerprint, "config": self.config.to_json()}
        tmp = folder / "state.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, folder / "state.json")
        return embedding_path

    def load_checkpoint(self, out_dir: str | Path) -> int:
        """Restore the state saved by :meth:`save_checkpoint`; returns the step reached.

        The token, initializer, images (SHA-256 of their values), model weights (fingerprint taken before
        quantization) and every setting except ``steps`` and ``save_every`` must match the checkpoint's
        (``ValueError`` names the differences).
        """
        folder = Path(out_dir) / CHECKPOINT_DIR
        meta = read_checkpoint_meta(out_dir)
        state_path = folder / "state.safetensors"
        check_checkpoint_fits(meta, self.config, token=self.token, initializer_token=self.initializer_token,
                              num_images=len(self.images), images_sha256=self.images_sha256,
                              model_fingerprint=self.model_fingerprint)
        try:
            state = load_file(str(state_path))
            self.load_state_dict(state)
        except Exception as err:                        # SafetensorError, missing keys, wrong shapes
            raise ValueError(f"damaged checkpoint {str(state_path)!r} ({type(err).__name__}: {err}); remove "
                             f"{str(folder)!r} to start afresh") from None
        if self.step_count != meta.get("step"):
            raise ValueError(f"damaged checkpoint: {str(state_path)!r} is at step {self.step_count}, "
                             f"{str(folder / 'state.json')!r} says {meta.get('step')!r}")
        return self.step_count

    def train(self, out_dir: str | Path, resume: bool = False, progress: bool = True,
              callback: Callable[[int, float], None] | None = None) -> Path:
        """Run until ``config.steps``; returns the path of ``learned_embeds.safetensors``.

        With ``resume=True`` an existing checkpoint in ``out_dir`` is continued (a missing one starts afresh);
        without it an existing checkpoint is an error, so no run is overwritten by accident.
        ``callback(step, loss)`` is called after every step.
        """
        out_dir = Path(out_dir)
        has_checkpoint = checkpoint_exists(out_dir)
        if has_checkpoint and not resume:
            raise ValueError(f"{out_dir} already holds a checkpoint; resume it or choose another output folder")
        if has_checkpoint and self.step_count == 0:
            self.load_checkpoint(out_dir)
            if self.step_count > self.config.steps:
                raise ValueError(f"the checkpoint in {out_dir} is at step {self.step_count}, past the "
                                 f"{self.config.steps} steps asked for; ask for {self.step_count} or more")
        bar = tqdm(total=self.config.steps, initial=min(self.step_count, self.config.steps), disable=not progress,
                   desc=f"textual inversion ({self.config.method})", unit="step")
        saved_at = self.step_count
        while self.step_count < self.config.steps:
            loss = self.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if callback is not None:
                callback(self.step_count, loss)
            if self.step_count % self.config.save_every == 0:
                self.save_checkpoint(out_dir)
                saved_at = self.step_count
        bar.close()
        if saved_at != self.step_count or not (out_dir / EMBEDDING_FILE).is_file():
            self.save_checkpoint(out_dir)
        return out_dir / EMBEDDING_FILE
