import pytest

import tiny_zoo_dit as builds
from zoo_harness import assert_build_reproduces_native


@pytest.mark.parametrize("name", sorted(builds.BUILDS))
def test_native_cfg_is_reproduced_bit_for_bit(name):
    assert_build_reproduces_native(builds.BUILDS, name)


def test_rows_along_another_dimension_follow_row_selection():
    """HiDream batches its Llama embeddings on dim 1 (``Family.batch_dims``): once AG drops the unconditional rows,
    the network's conditional-only calls get the prompt's own Llama and T5 embeddings, layer by layer."""
    import torch

    from diffguide import guidance

    make, call = builds.BUILDS["HiDreamImagePipeline"]
    pipe = make()
    kwargs = dict(call(3.0), num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    del kwargs["guidance_scale"]
    seen = []
    projections = pipe.transformer.caption_projection  # Llama layers 0 and 1, then T5
    for i, layer in enumerate(projections):
        layer.register_forward_pre_hook(lambda module, args, i=i: seen.append((i, args[0].clone())))
    ag = guidance.AdaptiveGuidance(3.0, threshold=1e-6)
    with guidance.apply(pipe, ag):
        pipe(**kwargs)
    assert int(ag.truncated_at[0]) < 2  # the last step ran the conditional rows only
    last = dict(seen[-len(projections):])
    torch.testing.assert_close(last[0], kwargs["prompt_embeds_llama3"][0], rtol=0, atol=0)
    torch.testing.assert_close(last[1], kwargs["prompt_embeds_llama3"][1], rtol=0, atol=0)
    torch.testing.assert_close(last[2], kwargs["prompt_embeds_t5"], rtol=0, atol=0)
