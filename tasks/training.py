"""Seeded training loops for the embedded model zoo (see ``scripts/train_zoo.py``).

Each ``train_*`` function trains one model on the digits train split, saves it to ``out_dir`` in the
format ``tasks.zoo.load`` reads, and returns a dict of measured numbers.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn
from tqdm.auto import tqdm

from diffguide.tasks.classifier import DigitClassifier
from diffguide.tasks.digits import CAPTION_TEMPLATES, NUM_CLASSES, caption, load_digits_tensors
from diffguide.tasks.pipelines import ClassConditionalPipeline, sampling_scheduler


class EMA:
    """Exponential moving average of a module's parameters, with the usual warm-up ``(1 + n) / (10 + n)``."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for ema_param, param in zip(self.model.parameters(), model.parameters()):
            ema_param.lerp_(param.detach(), 1 - decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)


def batches(num_items: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches drawn uniformly with replacement."""
    for _ in range(steps):
        yield torch.randint(num_items, (batch_size,), generator=generator)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with background (-1)."""
    if max_shift == 0:
        return images
    pad = F.pad(images, [max_shift] * 4, value=-1.0)
    size = images.shape[-1]
    offsets = torch.randint(2 * max_shift + 1, (images.shape[0], 2), generator=generator).tolist()
    return torch.stack([pad[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])


def cosine_lr(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 50,
              final: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to ``final`` times the base rate."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, lr_sched: torch.optim.lr_scheduler.LRScheduler,
                   *averaged: tuple[EMA, nn.Module]) -> None:
    """Backward, optimizer and learning-rate step, then update each ``(ema, model)`` pair."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    lr_sched.step()
    for ema, model in averaged:
        ema.update(model)


def progress_bar(steps: int, desc: str, progress: bool) -> tqdm:
    """``range(steps)`` with a progress bar (``progress`` False: silent)."""
    return tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0)


_loop = progress_bar  # the former private name


# ----------------------------------------------------------------------------------------- classifier
def train_classifier(out_dir: str | Path, steps: int = 800, batch_size: int = 128, seed: int = 0,
                     progress: bool = True) -> dict[str, float]:
    """Train ``DigitClassifier`` with shift augmentation and light noise; report test accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digits_tensors("train", 16)
    x_test, y_test = load_digits_tensors("test", 16)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    lr_sched = cosine_lr(opt, steps, warmup=20, final=0.02)
    start = time.perf_counter()
    model.train()
    bar = progress_bar(steps, "classifier", progress)
    for idx, _ in zip(batches(len(x_train), batch_size, steps, gen), bar):
        x = random_shift(x_train[idx], 1, gen)
        x = x + 0.1 * torch.rand(len(x), 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
        loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.05)
        optimizer_step(loss, opt, lr_sched)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    seconds = time.perf_counter() - start
    accuracy = model.accuracy(x_test, y_test)
    model.save_pretrained(out_dir)
    Path(out_dir, "README.md").unlink(missing_ok=True)          # the mixin's generic hub card
    return {"steps": steps, "batch_size": batch_size, "test_accuracy": accuracy, "train_seconds": seconds}


# ------------------------------------------------------------------------- class-conditional diffusion
def class_unet(sample_size: int = 16) -> UNet2DModel:
    """The digits-class UNet: (32, 64, 64) channels, one layer per block, attention in the lower blocks."""
    return UNet2DModel(
        sample_size=sample_size, in_channels=1, out_channels=1,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32, norm_num_groups=8, num_class_embeds=NUM_CLASSES + 1)


def training_scheduler() -> DDPMScheduler:
    """DDPM, 1000 steps, cosine (``squaredcos_cap_v2``) schedule, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon")


def diffusion_loss(unet: nn.Module, noise_sched: DDPMScheduler, x0: torch.Tensor, gen: torch.Generator,
                   **cond) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps."""
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(noise_sched.config.num_train_timesteps, (len(x0),), generator=gen)
    x_t = noise_sched.add_noise(x0, noise, t)
    return F.mse_loss(unet(x_t, t, **cond).sample, noise)


def train_class_diffusion(out_dir: str | Path, steps: int = 2500, batch_size: int = 128, seed: int = 0,
                          p_uncond: float = 0.1, lr: float = 1e-3,
                          snapshots: dict[int, str | Path] | None = None, stop_after: int | None = None,
                          progress: bool = True) -> dict[str, float]:
    """Train the class-conditional digits UNet (label dropped to the null class with ``p_uncond``).

    The EMA weights are saved as a ``ClassConditionalPipeline`` to ``out_dir`` after ``steps``, and to
    ``snapshots[k]`` after ``k`` steps (the under-trained checkpoint for autoguidance). ``stop_after``
    ends the run early, saving to ``out_dir`` what a snapshot at that step would hold (the learning-rate
    schedule still spans ``steps``).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digits_tensors("train", 16)
    unet = class_unet()
    noise_sched = training_scheduler()
    ema = EMA(unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = cosine_lr(opt, steps)
    snapshots = dict(snapshots or {})
    times: dict[str, float] = {}
    start = time.perf_counter()

    def save(path: str | Path) -> None:
        ClassConditionalPipeline(unet=ema.model, scheduler=sampling_scheduler(noise_sched)).save_pretrained(path)

    unet.train()
    run_steps = min(steps, stop_after or steps)
    bar = progress_bar(run_steps, Path(out_dir).name, progress)
    for step, (idx, _) in enumerate(zip(batches(len(x_train), batch_size, run_steps, gen), bar), start=1):
        labels = y_train[idx].clone()
        labels[torch.rand(len(idx), generator=gen) < p_uncond] = NUM_CLASSES
        loss = diffusion_loss(unet, noise_sched, x_train[idx], gen, class_labels=labels)
        optimizer_step(loss, opt, lr_sched, (ema, unet))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step in snapshots:
            save(snapshots.pop(step))
            times[f"snapshot_{step}_seconds"] = time.perf_counter() - start
    times["train_seconds"] = time.perf_counter() - start
    save(out_dir)
    return {"steps": run_steps, "schedule_steps": steps, "batch_size": batch_size, **times}


# ------------------------------------------------------------------------------------ text-to-image
def _caption_table(tokenize: Callable[[list[str]], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Token ids of every (class, template) caption, row ``c * T + j``; the last row is the empty caption."""
    texts = [caption(c, j) for c in range(NUM_CLASSES) for j in range(len(CAPTION_TEMPLATES))] + [""]
    return tokenize(texts), len(CAPTION_TEMPLATES)


def _caption_rows(labels: torch.Tensor, num_templates: int, drop_prob: float, gen: torch.Generator) -> torch.Tensor:
    rows = labels * num_templates + torch.randint(num_templates, labels.shape, generator=gen)
    rows[torch.rand(labels.shape, generator=gen) < drop_prob] = NUM_CLASSES * num_templates
    return rows


def train_vae(vae: nn.Module, images: torch.Tensor, steps: int, batch_size: int, gen: torch.Generator,
              kl_weight: float = 1e-3, lr: float = 1e-3, progress: bool = True) -> nn.Module:
    """Fit an ``AutoencoderKL``: per-pixel MSE + ``kl_weight`` x KL per pixel; returns the EMA copy."""
    ema = EMA(vae, decay=0.995)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = cosine_lr(opt, steps, warmup=20)
    vae.train()
    bar = progress_bar(steps, "vae", progress)
    for idx, _ in zip(batches(len(images), batch_size, steps, gen), bar):
        x = random_shift(images[idx], 1, gen)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = F.mse_loss(vae.decode(z).sample, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = recon + kl_weight * kl
        optimizer_step(loss, opt, lr_sched, (ema, vae))
        bar.set_postfix(recon=f"{recon.item():.4f}", kl=f"{kl.item():.3f}", refresh=False)
    return ema.model


def train_t2i(out_dir: str | Path, steps: int = 3500, vae_steps: int = 800, batch_size: int = 64,
              vae_batch_size: int = 128, seed: int = 0, caption_dropout: float = 0.1, lr: float = 1e-3,
              progress: bool = True) -> dict[str, float]:
    """Train the digits ``StableDiffusionPipeline``: the VAE first, then UNet + text encoder on its latents.

    The VAE's ``scaling_factor`` is set to 1 / std of the training latents; captions use random templates
    and are replaced by ``""`` with probability ``caption_dropout`` (the pipeline's default negative prompt).
    """
    from diffguide.tasks import t2i

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digits_tensors("train", t2i.IMAGE_SIZE)
    start = time.perf_counter()
    vae = train_vae(t2i.build_vae(), x_train, vae_steps, vae_batch_size, gen, progress=progress)
    vae_seconds = time.perf_counter() - start
    with torch.no_grad():
        posterior = vae.encode(x_train).latent_dist
        x_test = load_digits_tensors("test", t2i.IMAGE_SIZE)[0]
        recon_mse = F.mse_loss(vae.decode(vae.encode(x_test).latent_dist.mean).sample, x_test).item()
    latent_mean, latent_std = posterior.mean, posterior.std
    scaling_factor = 1.0 / posterior.sample(gen).std().item()
    vae.register_to_config(scaling_factor=scaling_factor)

    tokenizer = t2i.build_tokenizer()
    table, num_templates = _caption_table(
        lambda texts: tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids)
    text_encoder, unet = t2i.build_text_encoder(tokenizer), t2i.build_unet()
    noise_sched = t2i.training_scheduler()
    ema_unet, ema_text = EMA(unet), EMA(text_encoder)
    opt = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=lr, weight_decay=0.0)
    lr_sched = cosine_lr(opt, steps)
    unet.train()
    text_encoder.train()
    bar = progress_bar(steps, "t2i unet", progress)
    for idx, _ in zip(batches(len(x_train), batch_size, steps, gen), bar):
        noise = torch.randn(latent_mean[idx].shape, generator=gen)
        latents = (latent_mean[idx] + latent_std[idx] * noise) * scaling_factor
        rows = _caption_rows(y_train[idx], num_templates, caption_dropout, gen)
        text_states = text_encoder(table[rows])[0]
        loss = diffusion_loss(unet, noise_sched, latents, gen, encoder_hidden_states=text_states)
        optimizer_step(loss, opt, lr_sched, (ema_unet, unet), (ema_text, text_encoder))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    seconds = time.perf_counter() - start
    t2i.build_pipeline(vae, ema_unet.model, ema_text.model, tokenizer).save_pretrained(out_dir)
    return {"steps": steps, "batch_size": batch_size, "vae_steps": vae_steps, "vae_batch_size": vae_batch_size,
            "vae_test_recon_mse": recon_mse, "scaling_factor": scaling_factor,
            "vae_seconds": vae_seconds, "train_seconds": seconds}


# ------------------------------------------------------------------------------------------- CLIP
def multi_positive_clip_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, labels: torch.Tensor,
                             logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where every caption of the same digit counts as a positive (uniform target)."""
    logits = logit_scale.exp().clamp(max=100) * image_feats @ text_feats.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def train_clip(out_dir: str | Path, steps: int = 2000, batch_size: int = 256, seed: int = 0, lr: float = 1e-3,
               name: str = "digits-clip", progress: bool = True) -> dict[str, float]:
    """Train the tiny open_clip model contrastively on (digit image, random caption) pairs."""
    from diffguide.tasks import clip

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / f"{name}.json"
    config_path.write_text(json.dumps(clip.CONFIG, indent=2) + "\n")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, preprocess, tokenizer = clip.create(name, config_path)
    bundle = clip.DigitClip(model, preprocess, tokenizer)
    x_train, y_train = load_digits_tensors("train", clip.CONFIG["vision_cfg"]["image_size"])
    x_test, y_test = load_digits_tensors("test", clip.CONFIG["vision_cfg"]["image_size"])
    table, num_templates = _caption_table(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    lr_sched = cosine_lr(opt, steps)
    start = time.perf_counter()
    model.train()
    bar = progress_bar(steps, "clip", progress)
    for idx, _ in zip(batches(len(x_train), batch_size, steps, gen), bar):
        labels = y_train[idx]
        rows = _caption_rows(labels, num_templates, 0.0, gen)
        image_feats = bundle.image_features(random_shift(x_train[idx], 1, gen))
        text_feats = model.encode_text(table[rows], normalize=True)
        loss = multi_positive_clip_loss(image_feats, text_feats, labels, model.logit_scale)
        optimizer_step(loss, opt, lr_sched)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    seconds = time.perf_counter() - start
    clip.save(model, out_dir, table.unique().tolist())
    reloaded = clip.DigitClip(clip.create(name)[0], preprocess, tokenizer)
    clip.load_state(reloaded.model, out_dir / clip.WEIGHTS)         # measure what was shipped (fp16)
    accuracy = (reloaded.zero_shot_predict(x_test) == y_test).float().mean().item()
    return {"steps": steps, "batch_size": batch_size, "zero_shot_test_accuracy": accuracy, "train_seconds": seconds}
