"""The shipped model zoo: offline loading, output shapes and ranges, quality with fixed seeds, errors."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,
                       StableDiffusionPipeline)
from PIL import Image
from sklearn.datasets import load_digits

from diffguide.tasks import zoo
from diffguide.tasks.classifier import DigitClassifier
from diffguide.tasks.digits import CAPTION_TEMPLATES, DIGIT_WORDS, caption, load_digits_tensors, random_captions
from diffguide.tasks.pipelines import ClassConditionalPipeline
from diffguide.tasks.training_flow import (T5_TOKENS, CountedTokenAttnProcessor, counted_t5_zeros, flow_targets,
                                           sample_levels)

REPO = Path(__file__).resolve().parents[1]


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def classifier():
    return zoo.load("digits-classifier")


@pytest.fixture(scope="module")
def class_pipe():
    return quiet(zoo.load("digits-class"))


@pytest.fixture(scope="module")
def t2i_pipe():
    return quiet(zoo.load("digits-t2i"))


@pytest.fixture(scope="module")
def flow_pipe():
    return quiet(zoo.load("digits-flow"))


# ------------------------------------------------------------------------------------------- registry
def test_list_models_and_unknown_name():
    assert zoo.list_models() == ["digits-class", "digits-class-weak", "digits-classifier", "digits-t2i",
                                 "digits-clip", "digits-flow"]
    for name in zoo.list_models():
        assert zoo.model_path(name).is_dir(), name
        assert not list(zoo.model_path(name).rglob("*.bin")) and not list(zoo.model_path(name).rglob("*.pt"))
    with pytest.raises(ValueError, match="known models: digits-class, digits-class-weak"):
        zoo.load("digits-unknown")


def test_load_dtype_and_device():
    pipe = zoo.load("digits-class", device="cpu", dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.device.type == "cpu"
    assert next(zoo.load("digits-classifier", dtype=torch.float64).parameters()).dtype == torch.float64
    assert next(zoo.load("digits-clip", dtype=torch.float64).model.parameters()).dtype == torch.float64


# ----------------------------------------------------------------------------------------------- data
def test_digits_split_and_captions():
    x_train, _ = load_digits_tensors("train")
    x_test, y_test = load_digits_tensors("test")
    assert x_train.shape == (1437, 1, 16, 16) and x_test.shape == (360, 1, 16, 16)
    assert x_train.min() >= -1 and x_train.max() <= 1 and x_train.mean() < -0.3     # dark background
    assert torch.bincount(y_test).min() >= 35                                        # stratified
    # the 8x8 splits partition sklearn's digits (scaled 0..16 -> [-1, 1]) with their labels
    raw = load_digits()
    index = {(image.astype(np.float32) / 8 - 1).tobytes(): int(label) for image, label in zip(raw.images, raw.target)}
    seen = 0
    for split in ("train", "test"):
        x8, y8 = load_digits_tensors(split, size=8)
        assert all(index[image[0].numpy().tobytes()] == label for image, label in zip(x8, y8.tolist()))
        seen += len(x8)
    assert seen == len(raw.images)
    upsampled = torch.nn.functional.interpolate(load_digits_tensors("test", size=8)[0], size=16, mode="bilinear")
    assert torch.allclose(upsampled.clamp(-1, 1), x_test)
    assert caption(7) == "a handwritten digit seven" and caption(7, 1) == "the number 7"
    assert random_captions([3] * 50, torch.Generator().manual_seed(0), drop_prob=1.0) == [""] * 50
    with pytest.raises(ValueError):
        load_digits_tensors("val")


# ------------------------------------------------------------------------------------------ classifier
def test_classifier_accuracy_and_features(classifier):
    assert isinstance(classifier, DigitClassifier) and not classifier.training
    x_test, y_test = load_digits_tensors("test")
    assert classifier.accuracy(x_test, y_test) >= 0.95
    assert classifier.features(x_test[:5]).shape == (5, 64)
    assert classifier.accuracy(load_digits_tensors("test", size=8)[0], y_test) >= 0.9   # other sizes resized


# ---------------------------------------------------------------------------------- class-conditional
def test_class_pipeline_outputs(class_pipe):
    assert isinstance(class_pipe.scheduler, DDIMScheduler) and class_pipe.num_classes == 10
    gen = lambda: torch.Generator().manual_seed(0)
    pt = class_pipe([1, 7], num_inference_steps=4, generator=gen(), output_type="pt").images
    npy = class_pipe([1, 7], num_inference_steps=4, generator=gen(), output_type="np").images
    pil = class_pipe([1, 7], num_inference_steps=4, generator=gen()).images
    assert pt.shape == (2, 1, 16, 16) and 0 <= pt.min() and pt.max() <= 1
    assert npy.shape == (2, 16, 16, 1) and np.allclose(npy[..., 0], pt[:, 0].numpy())
    assert isinstance(pil[0], Image.Image) and pil[0].size == (16, 16) and pil[0].mode == "L"
    three = class_pipe(3, num_images_per_label=3, num_inference_steps=2, output_type="pt").images
    assert three.shape == (3, 1, 16, 16)


def test_class_samples_follow_labels(class_pipe, classifier):
    labels = [i % 10 for i in range(64)]
    images = class_pipe(labels, guidance_scale=2.0, num_inference_steps=20,
                        generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.mean() < 0.4                                                       # bright ink on dark
    assert classifier.accuracy(images * 2 - 1, torch.tensor(labels)) >= 0.9


def test_weak_checkpoint_is_weaker(class_pipe, classifier):
    weak = quiet(zoo.load("digits-class-weak"))
    config = lambda pipe: {k: v for k, v in pipe.unet.config.items() if k != "_name_or_path"}
    assert config(weak) == config(class_pipe)
    labels = [i % 10 for i in range(40)]
    accuracy = {}
    for name, pipe in (("strong", class_pipe), ("weak", weak)):
        images = pipe(labels, guidance_scale=1.0, num_inference_steps=20,
                      generator=torch.Generator().manual_seed(1), output_type="pt").images
        accuracy[name] = classifier.accuracy(images * 2 - 1, torch.tensor(labels))
    assert accuracy["weak"] <= accuracy["strong"] - 0.05, accuracy                  # 0.85 vs 0.975 when shipped


@pytest.mark.parametrize("kwargs", [{"class_labels": []}, {"class_labels": [11]}, {"class_labels": [-1]},
                                    {"class_labels": [2.5]}, {"class_labels": [1], "num_inference_steps": 0},
                                    {"class_labels": [1], "output_type": "jpg"}])
def test_class_pipeline_bad_inputs(class_pipe, kwargs):
    with pytest.raises(ValueError):
        class_pipe(**kwargs)


def test_class_pipeline_save_and_reload(class_pipe, tmp_path):
    class_pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "ClassConditionalPipeline"
    reloaded = quiet(ClassConditionalPipeline.from_pretrained(tmp_path))              # HF_HUB_OFFLINE=1 (conftest)
    assert isinstance(reloaded.scheduler, DDIMScheduler)
    images = [pipe([4], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
              for pipe in (class_pipe, reloaded)]
    assert torch.equal(*images)


# -------------------------------------------------------------------------------------- text-to-image
def test_t2i_samples_follow_prompts(t2i_pipe, classifier):
    assert isinstance(t2i_pipe, StableDiffusionPipeline) and t2i_pipe.safety_checker is None
    labels = [i % 10 for i in range(20)]
    prompts = [caption(c, i // 10) for i, c in enumerate(labels)]
    images = t2i_pipe(prompts, guidance_scale=3.0, num_inference_steps=20,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (20, 1, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert classifier.accuracy(images * 2 - 1, torch.tensor(labels)) >= 0.8           # chance is 0.1; 1.0 shipped


def test_t2i_latents_and_tokenizer(t2i_pipe, tmp_path):
    vae, tokenizer = t2i_pipe.vae, t2i_pipe.tokenizer
    x = load_digits_tensors("test")[0][:64]
    latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert latents.shape == (64, 4, 8, 8) and 0.6 < latents.std() < 1.6
    prompt = caption(5, 2)
    ids = tokenizer(prompt).input_ids
    assert len(ids) == len(prompt.split()) + 2                        # one token per caption word
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded(prompt, padding="max_length").input_ids == tokenizer(prompt, padding="max_length").input_ids
    assert reloaded.add_tokens("<s1>") == 1
    ids = reloaded("a photo of <s1>", return_tensors="pt").input_ids
    assert ids[0, -2] == len(reloaded) - 1
    text_encoder = copy.deepcopy(t2i_pipe.text_encoder)
    text_encoder.resize_token_embeddings(len(reloaded))                # what textual inversion does
    assert text_encoder(ids)[0].shape == (1, ids.shape[1], text_encoder.config.hidden_size)


# ------------------------------------------------------------------------------------- rectified flow
def test_flow_pipeline_is_sd3_without_t5(flow_pipe, t2i_pipe):
    assert isinstance(flow_pipe, StableDiffusion3Pipeline)
    assert isinstance(flow_pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert flow_pipe.text_encoder_3 is None and flow_pipe.tokenizer_3 is None
    # the digits-t2i latent space (same VAE weights) and tokenizer
    for name, weight in t2i_pipe.vae.state_dict().items():
        assert torch.equal(flow_pipe.vae.state_dict()[name], weight), name
    assert flow_pipe.tokenizer.get_vocab() == t2i_pipe.tokenizer.get_vocab() == flow_pipe.tokenizer_2.get_vocab()
    # shift_factor / scaling_factor normalise the held-out latents as the pipeline decodes them
    vae = flow_pipe.vae
    latents = (vae.encode(load_digits_tensors("test")[0]).latent_dist.mean - vae.config.shift_factor) \
        * vae.config.scaling_factor
    assert abs(latents.mean()) < 0.1 and 0.8 < latents.std() < 1.25             # VAE noise adds to train std
    record = json.loads((zoo.model_path("digits-flow") / "training.json").read_text())
    assert record["shift"] == flow_pipe.scheduler.config.shift


def test_flow_samples_follow_prompts_offline(flow_pipe, classifier):
    labels = [i % 10 for i in range(20)]
    prompts = [caption(c, i // 10) for i, c in enumerate(labels)]
    images = flow_pipe(prompts, guidance_scale=3.0, num_inference_steps=12,
                       generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (20, 1, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert classifier.accuracy(images * 2 - 1, torch.tensor(labels)) >= 0.8           # chance is 0.1


def test_counted_zero_tokens_equal_the_native_t5_padding(flow_pipe):
    """One zero token with log(256) on its logit == the 256 zero tokens SD3 appends without T5."""
    transformer = flow_pipe.transformer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    clip_states = torch.randn(3, 16, transformer.config.joint_attention_dim, generator=gen)
    pooled = torch.randn(3, transformer.config.pooled_projection_dim, generator=gen)
    padded = torch.cat([clip_states, torch.zeros(3, T5_TOKENS, clip_states.shape[-1])], dim=1)
    call = dict(hidden_states=x, pooled_projections=pooled, timestep=torch.tensor([999.0, 500.0, 20.0]))
    reference = transformer(encoder_hidden_states=padded, **call).sample
    with counted_t5_zeros(transformer):
        counted = transformer(encoder_hidden_states=padded[:, :17], **call).sample
    assert torch.allclose(counted, reference, atol=1e-5), (counted - reference).abs().max()   # fp32 sums
    assert torch.equal(transformer(encoder_hidden_states=padded, **call).sample, reference)    # restored
    # and through the pipeline: max_sequence_length=1 under the processor == the default call
    run = lambda **kw: flow_pipe("the number 4", num_inference_steps=3, guidance_scale=2.0, output_type="latent",
                                 generator=torch.Generator().manual_seed(0), **kw).images
    native = run()
    with counted_t5_zeros(transformer):
        assert torch.allclose(run(max_sequence_length=1), native, atol=1e-4)
    with pytest.raises(ValueError):
        CountedTokenAttnProcessor(0)


def test_rectified_flow_objective_and_sd3_timestep_sampling():
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    timesteps, sigmas = sample_levels(scheduler, 4, torch.Generator().manual_seed(0))
    x_s, v = flow_targets(x0, noise, sigmas)
    assert torch.allclose(x_s, scheduler.scale_noise(x0, timesteps, noise), atol=1e-6)    # diffusers' forward process
    s = sigmas.view(-1, 1, 1, 1)
    assert torch.allclose(x_s - s * v, x0, atol=1e-5) and torch.allclose(x_s + (1 - s) * v, noise, atol=1e-5)
    # u ~ logit-normal(0, 1), then the shift s' = 3u / (1 + 2u), on the scheduler's 1000 levels
    timesteps, sigmas = sample_levels(scheduler, 20000, torch.Generator().manual_seed(1))
    assert torch.allclose(timesteps, sigmas * 1000)
    u = sigmas / (3 - 2 * sigmas)                                   # inverse shift
    logit = torch.logit(u.clamp(1e-4, 1 - 1e-4))
    assert abs(logit.mean()) < 0.05 and abs(logit.std() - 1) < 0.05          # n = 20000: se 0.007


def test_damaged_flow_folder_names_the_bad_file(tmp_path):
    import shutil

    def broken(change) -> Path:
        folder = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(zoo.model_path("digits-flow"), folder)
        change(folder)
        return folder

    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    cases = {
        "transformer/diffusion_pytorch_model.safetensors": lambda f: (
            f / "transformer/diffusion_pytorch_model.safetensors").unlink(),
        "text_encoder_2/model.safetensors": lambda f: truncate(f / "text_encoder_2/model.safetensors"),
        "vae/diffusion_pytorch_model.safetensors": lambda f: (
            f / "vae/diffusion_pytorch_model.safetensors").write_bytes(b"not weights"),
        "tokenizer_2/tokenizer.json": lambda f: (f / "tokenizer_2/tokenizer.json").unlink(),
        "scheduler": lambda f: shutil.rmtree(f / "scheduler"),
        "text_encoder/config.json": lambda f: truncate(f / "text_encoder/config.json"),
        "model_index.json": lambda f: truncate(f / "model_index.json"),
    }
    for name, change in cases.items():
        folder = broken(change)
        with pytest.raises(zoo.DamagedModelError, match=re.escape(str(folder / name))):
            zoo.load(folder)
    assert isinstance(zoo.load(broken(lambda f: None)), StableDiffusion3Pipeline)      # an intact copy loads


# ---------------------------------------------------------------------------------------------- CLIP
def test_clip_zero_shot_and_preprocess():
    clip = zoo.load("digits-clip")
    model, preprocess, tokenizer = clip
    x_test, y_test = load_digits_tensors("test")
    assert (clip.zero_shot_predict(x_test) == y_test).float().mean() >= 0.9           # chance 0.1; 0.989 shipped
    image = Image.fromarray(((x_test[0, 0].numpy() + 1) * 127.5).astype(np.uint8), "L")
    pixels = preprocess(image)[None]
    assert pixels.shape == (1, 3, 16, 16)
    assert torch.allclose(model.encode_image(pixels, normalize=True), clip.image_features(x_test[:1]), atol=0.05)
    words = tokenizer([f"a handwritten digit {w}" for w in DIGIT_WORDS])
    assert words.shape == (10, 16) and len(CAPTION_TEMPLATES) >= 3


# ------------------------------------------------------------------------------------------- training
def test_train_zoo_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "scripts/train_zoo.py", "--quick", "--out", str(tmp_path), "--no-progress"]
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in zoo.list_models():
        record = json.loads((tmp_path / name / "training.json").read_text())
        assert record["model"] == name
        assert zoo.load(tmp_path / name) is not None
