"""diffguide guides in the ``guider`` slot of classic pipelines that run CFG through it (HunyuanVideo 1.5
text- and image-to-video, HunyuanImage 2.1 and its refiner).

``guidance.apply`` refuses these pipelines; ``pipe.guider = as_diffusers_guider(guide, pipe.scheduler)`` runs the
guide inside the pipeline's own loop. References: diffusers' own guiders in the same slot, same call.
"""

import pytest
import torch

pytest.importorskip("diffusers.guiders")

from diffusers.guiders import ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance  # noqa: E402

from diffguide import guidance  # noqa: E402
from diffguide.guidance.families import _refusal as family_refusal  # noqa: E402
from diffguide.guidance.modular import as_diffusers_guider  # noqa: E402

from tiny_guider_slot import (IMAGE_TEXT_DIM, refiner_image_latents, tiny_image, tiny_image_refiner,  # noqa: E402
                              tiny_video15, tiny_video15_i2v, prompt_embeddings, video15_image)

SCALE = 4.0
SHAPES = {"HunyuanVideo15Pipeline": (1, 4, 2, 4, 4),  # batch, channels, frames (3 // 2 + 1), 16 / 4, 16 / 4
          "HunyuanVideo15ImageToVideoPipeline": (1, 4, 2, 4, 4),
          "HunyuanImagePipeline": (1, 4, 2, 2),  # batch, channels, 16 / 8, 16 / 8
          "HunyuanImageRefinerPipeline": (1, 4, 1, 4, 4)}  # batch, channels, 1 frame, 16 / 4, 16 / 4


@pytest.fixture(scope="module", params=[tiny_video15, tiny_video15_i2v, tiny_image, tiny_image_refiner],
                ids=["video15", "video15_i2v", "image", "image_refiner"])
def pipe(request):
    return request.param()


def run(pipe, guider) -> torch.Tensor:
    """Latents of a 2-step 16x16 call (3 frames for video) with ``guider`` in the slot."""
    pipe.guider = guider
    kwargs = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    if type(pipe).__name__ == "HunyuanVideo15ImageToVideoPipeline":  # its size is the image's
        return pipe(image=video15_image(), **prompt_embeddings(), num_frames=3, **kwargs).frames
    kwargs.update(height=16, width=16)
    if type(pipe).__name__ == "HunyuanVideo15Pipeline":
        return pipe(**prompt_embeddings(), num_frames=3, **kwargs).frames
    embeddings = prompt_embeddings(dims=(IMAGE_TEXT_DIM, IMAGE_TEXT_DIM))
    if type(pipe).__name__ == "HunyuanImageRefinerPipeline":  # one text encoder
        embeddings = {name: value for name, value in embeddings.items() if not name.endswith("_2")}
        kwargs.update(image=refiner_image_latents())
    return pipe(**embeddings, **kwargs).images


def test_cfg_in_the_slot_is_bit_identical_to_diffusers_cfg(pipe):
    native = run(pipe, ClassifierFreeGuidance(guidance_scale=SCALE))
    guider = as_diffusers_guider(guidance.CFG(SCALE), pipe.scheduler)
    ours = run(pipe, guider)
    assert ours.shape == SHAPES[type(pipe).__name__]
    assert torch.equal(ours, native)
    assert guider.stats.rows_per_step == [2, 2]
    assert not torch.equal(native, run(pipe, ClassifierFreeGuidance(guidance_scale=1.5)))  # the scale matters


def test_cfg_zero_star_in_the_slot_is_bit_identical_to_diffusers(pipe):
    native = run(pipe, ClassifierFreeZeroStarGuidance(guidance_scale=SCALE, zero_init_steps=1))
    ours = run(pipe, as_diffusers_guider(guidance.CFGZeroStar(SCALE, zero_init_steps=1, arithmetic="official"),
                                         pipe.scheduler))
    assert torch.equal(ours, native)
    # the default (zero-init of 1 step on flow models, float32 combination) is the same here (float32 latents)
    assert torch.equal(run(pipe, as_diffusers_guider(guidance.CFGZeroStar(SCALE), pipe.scheduler)), native)


def test_adaptive_guidance_truncation_matches_diffusers_cfg_stopped_after_the_first_step(pipe):
    guide = guidance.AdaptiveGuidance(SCALE, threshold=0.01)  # truncates once the cosine passes 0.01
    guider = as_diffusers_guider(guide, pipe.scheduler)
    ours = run(pipe, guider)
    assert guide.truncated_at.tolist() == [1]
    assert guider.stats.rows_per_step == [2, 1]  # the pipeline ran no unconditional batch at step 1
    assert torch.equal(ours, run(pipe, ClassifierFreeGuidance(guidance_scale=SCALE, stop=0.5)))
    # the pipeline asks num_conditions before the next call's first step, to encode its negative prompt
    assert guider.num_conditions == 2
    untruncated = run(pipe, as_diffusers_guider(guidance.AdaptiveGuidance(SCALE, threshold=1.0), pipe.scheduler))
    assert torch.equal(untruncated, run(pipe, ClassifierFreeGuidance(guidance_scale=SCALE)))


def test_apg_in_the_slot_runs(pipe):
    guider = as_diffusers_guider(guidance.APG(SCALE), pipe.scheduler)
    ours = run(pipe, guider)
    assert ours.shape == SHAPES[type(pipe).__name__] and bool(ours.isfinite().all())
    assert guider.stats.rows_per_step == [2, 2]
    assert not torch.equal(ours, run(pipe, ClassifierFreeGuidance(guidance_scale=SCALE)))


def test_apply_refusal_names_the_guider_slot(pipe):
    reason = family_refusal(pipe, type(pipe).__name__)
    assert "pipe.guider = guidance.modular.as_diffusers_guider(guide, pipe.scheduler)" in reason
    with pytest.raises(TypeError, match="as_diffusers_guider"):
        with guidance.apply(pipe, guidance.CFG(SCALE)):
            pass
