"""CFG++ inversion on the shipped text-to-image model reconstructs real digits better than CFG inversion."""

import pytest
import torch

from diffguide import guidance
from diffguide.tasks import editing, zoo
from diffguide.tasks.digits import caption, load_digits_tensors
from diffguide.tasks.inverse import scores


@pytest.fixture(scope="module")
def pipe():
    return zoo.load("digits-t2i")


def round_trip_psnr(pipe, images, prompts, guide, steps):
    noise = editing.invert(pipe, images, prompts, guide, steps=steps)
    return scores(editing.generate(pipe, noise, prompts, guide, steps=steps), images)["psnr"]


def test_cfgpp_inverts_better_than_cfg_at_the_same_steps(pipe):
    """The paper's scale pairing (w = 7.5 vs lam = 0.6), 10 DDIM steps, 16 held-out digits under their captions."""
    images, labels = load_digits_tensors("test")
    images, labels = images[:16], labels[:16]
    prompts = [caption(int(label)) for label in labels]
    cfg = round_trip_psnr(pipe, images, prompts, guidance.CFG(7.5), steps=10)
    cfgpp = round_trip_psnr(pipe, images, prompts, guidance.CFGPlusPlus(0.6), steps=10)
    gain = cfgpp - cfg
    # deterministic (DDIM eta = 0); the margin is 4 standard errors of the per-image gain above zero
    assert gain.mean() > 4 * gain.std() / len(gain) ** 0.5, (cfg.mean(), cfgpp.mean())


def test_editing_changes_the_digit(pipe):
    images, labels = load_digits_tensors("test")
    sevens = images[(labels == 7).nonzero().flatten()[:4]]
    guide = guidance.CFGPlusPlus(0.6)
    noise = editing.invert(pipe, sevens, caption(7), guide, steps=10)
    edited = editing.generate(pipe, noise, caption(1), guide, steps=10)
    with torch.no_grad():
        read = zoo.load("digits-classifier")(edited).argmax(1)
    assert (read == 1).float().mean() >= 0.75


def test_bad_input(pipe):
    images, _ = load_digits_tensors("test")
    with pytest.raises(ValueError, match="one per image"):
        editing.invert(pipe, images[:3], ["a", "b"], guidance.CFG(2.0), steps=2)
    with pytest.raises(ValueError, match="steps"):
        editing.invert(pipe, images[:1], "a", guidance.CFG(2.0), steps=0)
    with pytest.raises(ValueError, match="B, C, H, W"):
        editing.invert(pipe, images[0], "a", guidance.CFG(2.0), steps=2)
