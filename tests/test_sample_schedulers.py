"""diffguide-sample / diffguide-evaluate with the k-diffusion-style schedulers and Karras / exponential sigmas."""

import numpy as np
import pytest

from diffguide.scripts import evaluate, sample
from diffguide.tasks import zoo


@pytest.fixture(scope="module")
def class_pipe():
    return zoo.load("digits-class")


def images(pipe, *extra, batch_size=64):
    args = sample.parse_args(["--class-labels", "3", "--num-images", "3", "--steps", "8", "--no-progress",
                              "--batch-size", str(batch_size), *extra])
    pils, _ = sample.sample(args, pipe)
    return np.stack([np.asarray(im) for im in pils]).astype(float)


@pytest.fixture(scope="module")
def euler_images(class_pipe):
    return images(class_pipe, "--scheduler", "euler")


@pytest.mark.parametrize("scheduler, schedule", [("heun", "karras"), ("dpm_2_ancestral", "default"),
                                                 ("lms", "exponential"), ("dpm_2", "default"),
                                                 ("dpmpp_sde", "karras")])
def test_new_schedulers_sample_digits(class_pipe, euler_images, scheduler, schedule):
    out, plain = images(class_pipe, "--scheduler", scheduler, "--schedule", schedule), euler_images
    assert out.shape == plain.shape and np.isfinite(out).all()
    assert 0 < np.abs(out - plain).mean() < 64  # another sampler of the same images: close, not equal


@pytest.mark.parametrize("scheduler", ["dpmpp_sde", "dpm_2_ancestral"])
def test_sde_schedulers_do_not_depend_on_the_batch_size(class_pipe, scheduler):
    """Image i has its own generator (DPM-2 ancestral) or Brownian tree seed (DPM++ SDE)."""
    one, all_ = (images(class_pipe, "--scheduler", scheduler, batch_size=b) for b in (1, 64))
    assert np.array_equal(one, all_) and not np.array_equal(one[0], one[1])


def test_schedule_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as err:
        sample.parse_args(["--scheduler", "ddim", "--schedule", "karras"])
    assert err.value.code == 2 and "ddim has no karras sigmas" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        sample.parse_args(["--schedule", "rho7"])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        evaluate.parse_args(["--model", "digits-class", "--out", "x", "--scheduler", "euler_ancestral",
                             "--schedule", "exponential"])
    assert err.value.code == 2 and "euler_ancestral has no exponential sigmas" in capsys.readouterr().err


def test_cfgpp_on_a_scheduler_without_a_cfgpp_form_is_refused_by_name(class_pipe):
    args = sample.parse_args(["--class-labels", "3", "--steps", "6", "--no-progress", "--scheduler", "heun",
                              "--guidance", "cfgpp"])
    with pytest.raises(ValueError, match="HeunDiscreteScheduler"):
        sample.sample(args, class_pipe)
