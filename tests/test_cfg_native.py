"""What ``apply(CFG(s))`` equals natively, for every s: the pipelines run CFG only for ``guidance_scale > 1``."""

import torch

from diffguide import guidance
from guide_models import class_pipe, count_rows

KW = dict(num_inference_steps=3, output_type="pt")


def run(pipe, labels, guide=None, **kwargs):
    generator = torch.Generator().manual_seed(0)
    if guide is None:
        return pipe(class_labels=labels, generator=generator, **KW, **kwargs).images
    with guidance.apply(pipe, guide) as stats:
        images = pipe(class_labels=labels, generator=generator, **KW, **kwargs).images
    return images, stats.rows


def test_below_one_native_pipelines_ignore_the_scale_and_cfg_interpolates():
    pipe = class_pipe()
    null = [pipe.null_class_label] * 2
    rows, handle = count_rows(pipe.unet)
    native_half = run(pipe, [1, 2], guidance_scale=0.5)
    assert sum(rows) == 2 * 3                                        # no CFG: conditional rows only
    assert torch.equal(native_half, run(pipe, [1, 2], guidance_scale=1.0))   # s < 1 is the same as s = 1
    rows.clear()
    half, hooked_rows = run(pipe, [1, 2], guidance.CFG(0.5))
    handle.remove()
    assert hooked_rows == sum(rows) == 2 * 2 * 3                     # both branches, every step
    assert (half - native_half).abs().max() > 1e-3                   # CFG(0.5) is not the native s = 0.5
    zero, _ = run(pipe, [1, 2], guidance.CFG(0.0))                   # u + 0 (c - u) = u: the unconditional sample
    unconditional = run(pipe, null, guidance_scale=1.0)
    assert torch.allclose(zero, unconditional, atol=1e-6)           # float32, the UNet on 4 rows instead of 2
    one, _ = run(pipe, [1, 2], guidance.CFG(1.0))
    assert torch.equal(one, native_half)                             # s = 1: conditional only, bit-identical
