"""Seeded rectified-flow training of ``digits-flow``, a tiny ``StableDiffusion3Pipeline`` (see ``scripts/train_zoo.py``).

Objective (SD3, Esser et al. 2024, eq. 1-3 with the rectified-flow path): ``x_s = (1 - s) x0 + s eps`` and
the transformer predicts ``v = eps - x0``, plain MSE; ``s`` is drawn logit-normal(0, 1) (SD3 Sec. 3.1) and
mapped through the training scheduler's shifted levels, as diffusers' ``train_dreambooth_sd3.py`` does.

Without T5 the pipeline appends ``max_sequence_length`` (256) zero vectors to the CLIP token states.
Those tokens are identical in every layer (the context has no position embedding and every op but
attention is per token), so attending to them equals attending to one of them with ``log 256`` added to
its attention logit. Training runs that exact shortcut (``CountedTokenAttnProcessor``): 17 context tokens
instead of 272, about 6x faster; the saved model is the plain diffusers one.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

from diffguide.tasks.digits import load_digits_tensors, random_captions
from diffguide.tasks.training import EMA, batches, cosine_lr, optimizer_step, progress_bar

T5_TOKENS = inspect.signature(StableDiffusion3Pipeline.__call__).parameters["max_sequence_length"].default


class CountedTokenAttnProcessor:
    """SD3 joint attention in which the last context token stands for ``count`` identical tokens.

    softmax over keys with ``count`` copies of key k (value v) == softmax with k once and ``log(count)``
    added to its logit, so the outputs equal ``JointAttnProcessor2_0`` on the repeated sequence.
    """

    def __init__(self, count: int):
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.log_count = math.log(count)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_image = hidden_states.shape[:2]

        def heads(x: torch.Tensor, norm) -> torch.Tensor:
            x = x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        query = torch.cat([heads(attn.to_q(hidden_states), attn.norm_q),
                           heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        key = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                         heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        value = torch.cat([heads(attn.to_v(hidden_states), None),
                           heads(attn.add_v_proj(encoder_hidden_states), None)], dim=2)
        log_multiplicity = torch.zeros(1, key.shape[2], dtype=query.dtype, device=query.device)
        log_multiplicity[:, -1] = self.log_count
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=log_multiplicity)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        image_out, context_out = out[:, :num_image], out[:, num_image:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return attn.to_out[1](attn.to_out[0](image_out)), context_out


@contextmanager
def counted_t5_zeros(transformer: torch.nn.Module, count: int = T5_TOKENS) -> Iterator[torch.nn.Module]:
    """Within the block the last context token counts ``count`` times; call the pipeline with
    ``max_sequence_length=1`` to get the default (``count`` zero T5 tokens) result at a fraction of the cost.
    The transformer's own processors are restored on exit."""
    original = transformer.attn_processors
    transformer.set_attn_processor(CountedTokenAttnProcessor(count))
    try:
        yield transformer
    finally:
        transformer.set_attn_processor(original)


def flow_targets(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow point and velocity: ``x_s = (1 - s) x0 + s eps``, ``v = eps - x0``."""
    s = sigmas.view(-1, *[1] * (x0.dim() - 1))
    return (1 - s) * x0 + s * noise, noise - x0


def sample_levels(scheduler, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 timestep sampling: ``u`` logit-normal(0, 1), index into the training scheduler's (shifted) levels.

    Returns ``(timesteps, sigmas)`` with ``timesteps = sigmas * num_train_timesteps``.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling("logit_normal", batch_size, logit_mean=0.0, logit_std=1.0,
                                              generator=gen)
    indices = (u * scheduler.config.num_train_timesteps).long()
    return scheduler.timesteps[indices], scheduler.sigmas[indices]


def latent_normalisation(vae: AutoencoderKL, images: torch.Tensor, gen: torch.Generator) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)``: mean and 1 / std of posterior samples, as SD3's VAE config holds them.

    The pipeline decodes ``latents / scaling_factor + shift_factor``; training encodes the inverse.
    """
    with torch.no_grad():
        z = vae.encode(images).latent_dist.sample(gen)
    shift = z.mean().item()
    return shift, 1.0 / (z - shift).std().item()


def train_flow(out_dir: str | Path, base_dir: str | Path, steps: int = 6000, batch_size: int = 48, seed: int = 0,
               caption_dropout: float = 0.1, lr: float = 8e-4, progress: bool = True) -> dict[str, float]:
    """Train ``digits-flow`` on the latents of ``base_dir``'s (digits-t2i's) frozen VAE and save it to ``out_dir``.

    Text encoder 1 starts from ``base_dir``'s trained CLIP text encoder (its projection is new), text
    encoder 2 from scratch (same tokenizer); both are trained with the transformer. Captions are random
    templates, replaced by ``""`` (the pipeline's negative prompt) with probability ``caption_dropout``.
    """
    from diffguide.tasks import t2i

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base_dir = Path(base_dir)
    x_train, y_train = load_digits_tensors("train", t2i.IMAGE_SIZE)
    tokenizer = CLIPTokenizer.from_pretrained(base_dir / "tokenizer")
    vae = AutoencoderKL.from_pretrained(base_dir / "vae").eval().requires_grad_(False)
    shift_factor, scaling_factor = latent_normalisation(vae, x_train, gen)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    with torch.no_grad():
        posterior = vae.encode(x_train).latent_dist
    latent_mean, latent_std = posterior.mean, posterior.std

    text_encoders = (t2i.build_projected_text_encoder(tokenizer), t2i.build_projected_text_encoder(tokenizer))
    warm = CLIPTextModel.from_pretrained(base_dir / "text_encoder")       # same config, no projection
    text_encoders[0].text_model.load_state_dict(warm.state_dict())
    transformer = t2i.build_flow_transformer()
    scheduler = t2i.flow_scheduler()
    pipe = t2i.build_flow_pipeline(vae, transformer, text_encoders, tokenizer, scheduler)
    transformer.set_attn_processor(CountedTokenAttnProcessor(T5_TOKENS))
    trained = (transformer, *text_encoders)
    emas = [EMA(module) for module in trained]
    opt = torch.optim.AdamW([p for module in trained for p in module.parameters()], lr=lr, weight_decay=0.0)
    lr_sched = cosine_lr(opt, steps)
    for module in trained:
        module.train()
    start = time.perf_counter()
    bar = progress_bar(steps, "flow transformer", progress)
    for idx, _ in zip(batches(len(x_train), batch_size, steps, gen), bar):
        noise = torch.randn(latent_mean[idx].shape, generator=gen)
        x0 = (latent_mean[idx] + latent_std[idx] * noise - shift_factor) * scaling_factor
        texts = random_captions(y_train[idx].tolist(), gen, drop_prob=caption_dropout)
        context, pooled = pipe.encode_prompt(texts, texts, texts, do_classifier_free_guidance=False,
                                             max_sequence_length=1)[::2]       # 16 CLIP + 1 counted zero token
        timesteps, sigmas = sample_levels(scheduler, len(idx), gen)
        x_s, v_target = flow_targets(x0, torch.randn(x0.shape, generator=gen), sigmas)
        v_pred = transformer(hidden_states=x_s, timestep=timesteps, encoder_hidden_states=context,
                             pooled_projections=pooled).sample
        loss = F.mse_loss(v_pred, v_target)
        optimizer_step(loss, opt, lr_sched, *zip(emas, trained))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    seconds = time.perf_counter() - start
    ema_transformer, *ema_text = (ema.model for ema in emas)
    ema_transformer.set_attn_processor(JointAttnProcessor2_0())
    t2i.build_flow_pipeline(vae, ema_transformer, tuple(ema_text), tokenizer, scheduler).save_pretrained(out_dir)
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "caption_dropout": caption_dropout,
            "shift": scheduler.config.shift, "shift_factor": shift_factor, "scaling_factor": scaling_factor,
            "base": base_dir.name, "train_seconds": seconds}
