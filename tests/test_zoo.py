"""The shipped model zoo: offline loading, output shapes and ranges, quality with fixed seeds, errors."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from sklearn.datasets import load_digits

from diffguide.tasks import zoo
from diffguide.tasks.classifier import DigitClassifier
from diffguide.tasks.digits import CAPTION_TEMPLATES, DIGIT_WORDS, caption, load_digits_tensors, random_captions
from diffguide.tasks.pipelines import ClassConditionalPipeline

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


# ------------------------------------------------------------------------------------------- registry
def test_list_models_and_unknown_name():
    assert zoo.list_models() == ["digits-class", "digits-class-weak", "digits-classifier", "digits-t2i",
                                 "digits-clip"]
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
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in zoo.list_models():
        record = json.loads((tmp_path / name / "training.json").read_text())
        assert record["model"] == name
        assert zoo.load(tmp_path / name) is not None
