"""Components of the tiny digits text-to-image pipelines (built offline): ``StableDiffusionPipeline``
(``digits-t2i``) and the rectified-flow ``StableDiffusion3Pipeline`` (``digits-flow``).

The tokenizer is a real byte-level BPE ``CLIPTokenizer`` whose merges are learned here from the caption
words, so every caption word is one token and any other text still tokenizes (byte fallback); new tokens
(e.g. ``<s1>`` for textual inversion) can be added with ``tokenizer.add_tokens``.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffguide.tasks.digits import caption_words
from diffguide.tasks.pipelines import sampling_scheduler

IMAGE_SIZE = 16
LATENT_CHANNELS = 4
TEXT_WIDTH = 64
MAX_LENGTH = 16
FLOW_WIDTH = 96
FLOW_LAYERS = 4
FLOW_PATCH = 2
FLOW_SHIFT = 1.0
EXTRA_WORDS = ("an", "image", "in", "photo", "picture", "style")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_alphabet() -> list[str]:
    """The 256 printable characters standing for bytes in byte-level BPE (GPT-2/CLIP convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    mapping = {b: b for b in printable} | {b: 256 + n for n, b in enumerate(extra)}
    return [chr(mapping[b]) for b in range(256)]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on a word list until every word is a single symbol (ties broken alphabetically)."""
    symbols = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in symbols.values()):
        counts = Counter(pair for s in symbols.values() for pair in pairwise(s))
        best = max(sorted(counts), key=counts.__getitem__)
        merges.append(best)
        for word, seq in symbols.items():
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    merged.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            symbols[word] = merged
    return merges


def build_tokenizer(max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """``CLIPTokenizer`` over bytes + caption-word merges; ``<|startoftext|>``/``<|endoftext|>`` come last."""
    alphabet = byte_alphabet()
    merges = learn_merges(sorted(set(caption_words()) | set(EXTRA_WORDS)))
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(pair) for pair in merges), BOS, EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length,
                         bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)


def text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A 2-layer, 64-wide causal CLIP text transformer sized to ``tokenizer`` (64-d projection)."""
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                            num_hidden_layers=2, num_attention_heads=4, projection_dim=TEXT_WIDTH,
                            max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """The digits-t2i text encoder: ``CLIPTextModel`` of ``text_config``."""
    return CLIPTextModel(text_config(tokenizer))


def build_projected_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """An SD3 CLIP text encoder: ``text_config`` with its pooled-output projection (``text_embeds``)."""
    return CLIPTextModelWithProjection(text_config(tokenizer))


def build_vae() -> AutoencoderKL:
    """``AutoencoderKL`` for 1x16x16 images with 4x8x8 latents (scale factor 2)."""
    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                         sample_size=IMAGE_SIZE)


def build_unet() -> UNet2DConditionModel:
    """Text-conditional UNet on 4x8x8 latents with cross-attention to the 64-d text states."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=2)


def training_scheduler() -> DDPMScheduler:
    """The Stable Diffusion noise schedule (scaled linear 0.00085..0.012, 1000 steps, epsilon)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon")


def build_pipeline(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                   tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    """Assemble the pipeline with a DDIM scheduler and no safety checker."""
    scheduler = sampling_scheduler(training_scheduler())
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


# ------------------------------------------------------------------------------ rectified flow (SD3)
def build_flow_transformer() -> SD3Transformer2DModel:
    """``SD3Transformer2DModel`` on 4x8x8 latents: patch ``FLOW_PATCH`` (2, as SD3: 16 image tokens),
    ``FLOW_LAYERS`` joint blocks of width ``FLOW_WIDTH``; context = the two CLIP encoders' token states side
    by side (2 x 64 = 128 features), pooled = their two 64-d projections (128)."""
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=FLOW_PATCH, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=FLOW_LAYERS, attention_head_dim=FLOW_WIDTH // 4, num_attention_heads=4,
        joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=FLOW_WIDTH, pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=IMAGE_SIZE // 2)


def flow_scheduler(shift: float = FLOW_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler, 1000 training levels, ``shift`` (SD3 eq. 23: s' = shift s / (1 + (shift - 1) s)).

    SD3 raises the shift with resolution (3.0 at 1024px, 16x128x128 latents); these 4x8x8 latents are far
    below its 256px base, so no shift (1.0).
    """
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_flow_pipeline(vae: AutoencoderKL, transformer: SD3Transformer2DModel,
                        text_encoders: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection],
                        tokenizer: CLIPTokenizer, scheduler: FlowMatchEulerDiscreteScheduler
                        ) -> StableDiffusion3Pipeline:
    """Assemble SD3 with both CLIP slots on the digits tokenizer and no T5 (``text_encoder_3=None``)."""
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoders[0], tokenizer=tokenizer,
                                    text_encoder_2=text_encoders[1], tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
