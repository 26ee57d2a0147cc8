"""The media builds (AnimateDiff, audio, Kandinsky, DeepFloyd IF): native CFG reproduced bit for bit under apply."""

import pytest
from diffusers import DDPMScheduler

import tiny_zoo_media as builds
from zoo_harness import assert_build_reproduces_native, assert_native_reproduced


@pytest.mark.parametrize("name", sorted(builds.BUILDS))
def test_native_cfg_is_reproduced_bit_for_bit(name):
    assert_build_reproduces_native(builds.BUILDS, name)


@pytest.mark.parametrize("name", sorted(builds.LEARNED_VARIANCE))
def test_learned_variance_channels_are_the_native_ones(name):
    """With a scheduler that steps on the learned variance (DDPM ``learned_range``), the variance channels the
    pipeline hands ``scheduler.step`` under apply must be the native ones (the conditional rows'), or the latents
    differ."""
    make, call = builds.BUILDS[name]
    pipe = make()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type="learned_range")
    assert_native_reproduced(pipe, call)
