import inspect

import pytest
import torch

import tiny_zoo_extra as builds
from zoo_harness import assert_build_reproduces_native

from diffguide.guidance.families import REFUSED, family_of, supported_pipelines


@pytest.mark.parametrize("name", sorted(builds.BUILDS))
def test_native_cfg_is_reproduced_bit_for_bit(name):
    assert_build_reproduces_native(builds.BUILDS, name)


def _cfg_running_classes() -> dict[str, type]:
    """Every diffusers pipeline class (top level and deprecated) whose ``__call__`` takes guidance_scale or
    true_cfg_scale."""
    import diffusers
    import diffusers.pipelines.deprecated as deprecated
    from diffusers import DiffusionPipeline

    found = {}
    for module in (diffusers, deprecated):
        for name in dir(module):
            if "Pipeline" not in name:
                continue
            cls = getattr(module, name)
            if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)) or cls is DiffusionPipeline:
                continue
            params = inspect.signature(cls.__call__).parameters
            takes_guider = "guider" in inspect.signature(cls.__init__).parameters  # CFG by a guider component
            if "guidance_scale" in params or "true_cfg_scale" in params or takes_guider:
                found[name] = cls
    return found


def test_every_cfg_running_class_is_served_or_refused_with_its_reason():
    classes = _cfg_running_classes()
    served = set(supported_pipelines())
    assert len(classes) > 250
    assert {"StableDiffusionPipelineSafe", "FluxPipeline", "HunyuanVideo15Pipeline"} <= set(classes)
    undecided = {}
    for name, cls in classes.items():
        owner = next(c for c in cls.__mro__ if "__call__" in vars(c))
        if owner.__name__ in served:
            continue
        pipe = cls.__new__(cls)  # no components: the refusal is read from the class alone
        object.__setattr__(pipe, "transformer", torch.nn.Identity())
        with pytest.raises(TypeError) as refusal:
            family_of(pipe)
        message = str(refusal.value)
        if "has no family row yet" in message or "does not run classifier-free" in message or (
                name in REFUSED and REFUSED[name] not in message):
            undecided[name] = message[:120]
    assert not undecided, undecided


def test_a_distilled_klein_checkpoint_is_refused_up_front():
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(**builds._flux2_klein_parts(), is_distilled=True)
    with pytest.raises(TypeError, match="guidance-distilled \\(is_distilled"):
        family_of(pipe)
    assert family_of(builds.flux2_klein()).distilled_flag == "is_distilled"  # the undistilled one is served


def _sigma_of(scheduler, timestep) -> torch.Tensor:
    """The noise level of ``timestep`` read from the scheduler's own arrays (no begin index involved)."""
    t = torch.as_tensor(timestep).flatten()[0]
    if type(scheduler).__name__.startswith("FlowMatch"):
        return scheduler.sigmas[int((scheduler.timesteps == t).nonzero()[0])].double()
    return (1 - scheduler.alphas_cumprod[int(t)].double()).sqrt()


@pytest.mark.parametrize("name", ["StableDiffusionInpaintPipelineLegacy", "PIAPipeline", "Flux2KleinInpaintPipeline"])
def test_runs_that_start_part_way_hand_guides_the_level_the_scheduler_steps_from(name):
    """strength 0.6 of 4 steps: the run starts part-way down the schedule; every step's guide sees the level and
    the step index of the timestep the scheduler is handed (Legacy cuts its timesteps without set_begin_index:
    start "timestep")."""
    from diffguide import guidance

    make, call = builds.BUILDS[name]
    pipe = make()
    seen, stepped, indices, positions = [], [], [], []

    class Probe(guidance.CFG):
        def combine(self, step):
            seen.append(step.sigma.double().flatten()[0])
            indices.append(step.index)
            return super().combine(step)

    orig_step = pipe.scheduler.step

    def step(model_output, timestep, *args, **kwargs):
        stepped.append(_sigma_of(pipe.scheduler, timestep))
        positions.append(int((pipe.scheduler.timesteps == torch.as_tensor(timestep).flatten()[0]).nonzero()[0]))
        return orig_step(model_output, timestep, *args, **kwargs)

    pipe.scheduler.step = step
    with guidance.apply(pipe, Probe(3.0)):
        pipe(**call(3.0), generator=torch.Generator().manual_seed(0))
    assert 0 < len(seen) == len(stepped) < 4  # the schedule was cut
    torch.testing.assert_close(torch.stack(seen), torch.stack(stepped), rtol=1e-6, atol=0)
    assert indices == positions and positions[0] > 0
    assert stepped[0] < _sigma_of(pipe.scheduler, pipe.scheduler.timesteps[0])  # part-way, not the first level


@pytest.mark.parametrize("name, change", [
    ("StableDiffusionPipelineSafe", dict(sld_guidance_scale=1000)),  # its default: the safety-concept branch on
    ("StableDiffusionInpaintPipelineLegacy", dict(add_predicted_noise=True)),
    ("AnimateDiffSparseControlNetPipeline", dict(guess_mode=True)),
    ("QwenImageLayeredPipeline", dict(cfg_normalize=True)),
])
def test_what_is_not_cfg_is_refused_before_the_run(name, change):
    from diffguide import guidance

    make, call = builds.BUILDS[name]
    pipe = make()
    arg = next(iter(change))
    with guidance.apply(pipe, guidance.CFG(3.0)), pytest.raises(ValueError, match=f"{arg} must be"):
        pipe(**dict(call(3.0), **change))
