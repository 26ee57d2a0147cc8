"""guidance.apply on the transformer pipelines of diffusers 0.42.1 (tiny random weights, prompt embeddings given).

Bars: CFG through apply is bit-identical to the native call and evaluates as many network rows (counted inside
the network, at its first layer); guides that skip the unconditional branch skip those rows or calls.
"""

import pytest
import torch

from diffguide import guidance
from diffguide.guidance.families import family_of, native_guide
from tiny_pipes import PIPELINES, embeds, first_layer


def count_rows(pipe, name):
    rows = []
    handles = [first_layer(net, name).register_forward_pre_hook(lambda m, a, k=None: rows.append(a[0].shape[0]))
               for net in _networks(pipe)]
    return rows, handles


def _networks(pipe):
    return [getattr(pipe, a) for a in ("transformer", "transformer_2") if getattr(pipe, a, None) is not None]


def run(pipe, name, seed=0, batch=2, steps=2, **extra):
    kw = dict(embeds(name, batch), num_inference_steps=steps, output_type="latent",
              generator=torch.Generator().manual_seed(seed))
    kw.update(extra)
    return pipe(**kw)[0]  # images, or frames (Wan)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_cfg_through_apply_is_bit_exact_with_native(name):
    make, _, native_kw = PIPELINES[name]
    pipe = make()
    guide = native_guide(family_of(pipe), 4.0)
    rows, handles = count_rows(pipe, name)
    native = run(pipe, name, **native_kw(4.0))
    native_rows = sum(rows)
    rows.clear()
    with guidance.apply(pipe, guide) as stats:
        hooked = run(pipe, name)  # no scale passed: the guide's rules
    for h in handles:
        h.remove()
    assert torch.equal(native, hooked), (native - hooked).abs().max()
    assert stats.rows == native_rows == sum(rows) == 2 * 2 * 2
    with guidance.apply(pipe, guide):
        other = run(pipe, name, **native_kw(9.0))  # a scale passed to the pipeline does not change the result
    assert torch.equal(native, other)
    assert torch.equal(native, run(pipe, name, **native_kw(4.0)))  # restored


@pytest.mark.parametrize("name", list(PIPELINES))
def test_cfg_scale_one_evaluates_only_conditional_rows(name):
    make = PIPELINES[name][0]
    pipe = make()
    rows, handles = count_rows(pipe, name)
    with guidance.apply(pipe, guidance.CFG(1.0)) as stats:
        run(pipe, name)
    for h in handles:
        h.remove()
    assert sum(rows) == stats.rows == 2 * 2  # conditional rows only, both steps
    assert stats.uncond_rows_per_sample.tolist() == [0, 0]
