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
            if "guidance_scale" in params or "true_cfg_scale" in params:
                found[name] = cls
    return found


def test_every_cfg_running_class_is_served_or_refused_with_its_reason():
    classes = _cfg_running_classes()
    served = set(supported_pipelines())
    assert len(classes) > 250 and {"StableDiffusionPipelineSafe", "FluxPipeline"} <= set(classes)
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
        if "has no family row yet" in message or (name in REFUSED and REFUSED[name] not in message):
            undecided[name] = message[:120]
    assert not undecided, undecided


def test_a_distilled_klein_checkpoint_is_refused_up_front():
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(**builds._flux2_klein_parts(), is_distilled=True)
    with pytest.raises(TypeError, match="guidance-distilled \\(is_distilled"):
        family_of(pipe)
    assert family_of(builds.flux2_klein()).distilled_flag == "is_distilled"  # the undistilled one is served
