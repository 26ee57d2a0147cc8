"""``samplers.schedule.ScheduleReader``: the one place a diffusers scheduler is read as noise levels."""

from __future__ import annotations

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)

from diffguide.guidance.families import FAMILIES
from diffguide.guidance.layouts import LAYOUTS, BatchedLayout, TwoCalls
from diffguide.samplers.schedule import ScheduleReader, has_flow_sigmas, is_flow

SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(),
    "euler": lambda: EulerDiscreteScheduler(),
    "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "dpm_flow": lambda: DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_levels_have_the_noise_to_signal_ratio_of_the_schedulers_own_arrays(name):
    """Independent reference: the flow level ``s`` (``alpha = 1 - s``), the VE sigma (``alpha_bar = 1 / (1 + sigma^2)``)
    or ``alphas_cumprod`` at the timestep (DDIM), read off the scheduler's own arrays."""
    scheduler = SCHEDULERS[name]()
    scheduler.set_timesteps(6)
    reader = ScheduleReader(scheduler)
    saved = {**scheduler.config, "_class_name": type(scheduler).__name__}  # a config as written to disk
    assert reader.flow == (name in ("flow", "dpm_flow")) == is_flow(scheduler) == has_flow_sigmas(saved)
    for index, t in enumerate(scheduler.timesteps):
        level = reader.level(t, index, "cpu", torch.float64)
        if reader.flow:
            s = float(scheduler.sigmas[index])
            expected = (1 - s, s)
        elif name == "euler":
            abar = 1 / (1 + float(scheduler.sigmas[index]) ** 2)
            expected = (abar**0.5, (1 - abar) ** 0.5)
        else:
            abar = float(scheduler.alphas_cumprod[int(t)])
            expected = (abar**0.5, (1 - abar) ** 0.5)
        assert (level.index, level.num_steps) == (index, 6)
        assert float(level.alpha) == pytest.approx(expected[0], rel=1e-5, abs=1e-6)
        assert float(level.sigma) == pytest.approx(expected[1], rel=1e-5, abs=1e-6)


def test_step_index_follows_set_begin_index_then_the_schedulers_own_index():
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(8)
    reader = ScheduleReader(scheduler)
    assert reader.begin_index() == 0 and reader.step_index(scheduler.timesteps[2]) == 2  # found by its timestep
    scheduler.set_begin_index(3)   # img2img / inpainting start part-way
    assert reader.begin_index() == 3 and reader.step_index(scheduler.timesteps[3]) == 3
    x = torch.zeros(1, 4)
    scheduler.step(torch.zeros(1, 4), scheduler.timesteps[3], x)
    assert reader.step_index(scheduler.timesteps[4]) == 4


def test_next_level_comes_from_the_float64_sigmas():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    reader = ScheduleReader(scheduler)
    level = reader.level(scheduler.timesteps[1], 1, "cpu", torch.bfloat16)
    nxt = reader.next_level(level, lambda t, s, s_new: t * (s_new / s))
    s, s_next = float(scheduler.sigmas[1]), float(scheduler.sigmas[2])
    assert nxt.index == 2 and float(nxt.t) == pytest.approx(float(scheduler.timesteps[1]) * s_next / s, rel=1e-12)
    assert reader.next_level(reader.level(scheduler.timesteps[4], 5, "cpu", torch.float32), lambda t, *_: t) is None
    assert ScheduleReader(DDIMScheduler()).next_level(level, lambda t, *_: t) is None   # diffusion: no flow level


def test_every_family_names_a_layout_object():
    assert set(LAYOUTS) == {"uc", "cu", "list_cu", "two_calls", "text_image_uncond"}
    for family in FAMILIES:
        layout = LAYOUTS[family.layout](family)
        assert isinstance(layout, TwoCalls if family.layout == "two_calls" else BatchedLayout)
    uc, cu = LAYOUTS["uc"](FAMILIES[0]), LAYOUTS["cu"](FAMILIES[0])
    assert [r.tolist() for r in uc.cfg_rows(4)] == [[2, 3], [0, 1]] and [r.tolist() for r in cu.cfg_rows(4)] == [
        [0, 1], [2, 3]]
