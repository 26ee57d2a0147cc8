"""SharedDequantBuffer: frozen int8 quanto layers dequantized into one reused buffer give quanto's outputs bit for
bit (tiny pipeline, digits-t2i, every load path), ZO personalization trains the same embedding with it, autograd
falls back to quanto, and the layers are quanto's again after the block."""

import pytest
import torch
from torch import nn

from diffguide.tasks import zoo
from diffguide.tasks.int8_forward import SharedDequantBuffer
from diffguide.tasks.personalize import PersonalizeConfig, TextualInversion
from diffguide.tasks.quantize import load_int8_pipeline, load_saved_int8_pipeline, quantize_pipeline, save_int8_pipeline
from tiny_pipes import tiny_sd

quanto = pytest.importorskip("optimum.quanto")


def int8_layers(module):
    return [m for m in module.modules() if isinstance(m, (quanto.nn.QLinear, quanto.nn.QConv2d))]


def unet_and_text_outputs(pipe, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    latents = torch.randn(2, pipe.unet.config.in_channels, size, size, generator=gen)
    ids = torch.randint(2, len(pipe.tokenizer), (2, pipe.tokenizer.model_max_length), generator=gen)
    states = pipe.text_encoder(ids)[0]
    return states, pipe.unet(latents, torch.tensor([500, 20]), states).sample


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_sd().save_pretrained(folder)
    return folder


def loaded(how, model, tmp_path):
    if how == "whole":
        return quantize_pipeline(zoo.load(model))
    if how == "layers":
        return load_int8_pipeline(model)
    save_int8_pipeline(load_int8_pipeline(model), tmp_path / "int8")
    return load_saved_int8_pipeline(tmp_path / "int8")


@pytest.mark.parametrize("how", ["whole", "layers", "saved"])
@pytest.mark.parametrize("model", ["tiny", "digits-t2i"])
@torch.no_grad()
def test_outputs_equal_quantos_bit_for_bit_and_the_layers_are_restored(model, how, tiny_folder, tmp_path):
    pipe = loaded(how, str(tiny_folder) if model == "tiny" else model, tmp_path)
    layers = int8_layers(pipe.unet) + int8_layers(pipe.text_encoder)
    reference = unet_and_text_outputs(pipe)
    scratch = SharedDequantBuffer(pipe.unet, pipe.text_encoder)
    assert scratch.layers == layers                                        # every int8 layer takes the buffer
    with scratch:
        assert all("forward" in layer.__dict__ for layer in layers)
        fast = unet_and_text_outputs(pipe)
    for ours, theirs in zip(fast, reference):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    linear = [layer for layer in layers if isinstance(layer, quanto.nn.QLinear)]   # every load path avoids the
    assert linear and all(type(layer).forward is not quanto.nn.QLinear.forward for layer in linear)  # fused kernel
    (buffer,) = scratch._buffers.values()
    assert buffer.numel() == max(layer.weight.numel() for layer in layers)
    assert scratch.nbytes == buffer.numel() * buffer.element_size()
    assert not any("forward" in layer.__dict__ for layer in layers)       # quanto's forward again
    assert all(torch.equal(a, b) for a, b in zip(unet_and_text_outputs(pipe), reference))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_precision_outputs_equal_quantos_bit_for_bit(dtype):
    pipe = quantize_pipeline(tiny_sd().to(dtype=dtype))
    gen = torch.Generator().manual_seed(0)
    latents, states = torch.randn(2, 4, 8, 8, generator=gen).to(dtype), torch.randn(2, 16, 16, generator=gen).to(dtype)
    reference = pipe.unet(latents, torch.tensor([500, 20]), states).sample
    with SharedDequantBuffer(pipe.unet) as scratch:
        out = pipe.unet(latents, torch.tensor([500, 20]), states).sample
    assert out.dtype == dtype and torch.equal(out, reference)
    assert [b.dtype for b in scratch._buffers.values()] == [dtype]           # the convolutions used it


def test_the_buffer_is_used_and_overwritten_by_each_layer():
    pipe = quantize_pipeline(tiny_sd())
    scratch = SharedDequantBuffer(pipe.unet)
    first, last = scratch.layers[0], scratch.layers[-1]
    with torch.no_grad(), scratch:
        unet_and_text_outputs(pipe)
    (buffer,) = scratch._buffers.values()
    # after the pass the buffer begins with the weight of the last layer run (conv_out, last in module order too)
    expected = last.weight.dequantize().flatten()
    assert torch.equal(buffer[:expected.numel()], expected)
    assert not torch.equal(buffer[:first.weight.numel()], first.weight.dequantize().flatten())


def test_with_autograd_the_layers_fall_back_to_quanto():
    torch.manual_seed(0)
    net = quantize_pipeline(tiny_sd()).unet
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    states = torch.randn(1, 5, 16)
    reference = net(latents, 10, states).sample
    (grad_ref,) = torch.autograd.grad(reference.square().sum(), latents)
    with SharedDequantBuffer(net) as scratch:
        out = net(latents, 10, states).sample
        (grad,) = torch.autograd.grad(out.square().sum(), latents)
    assert torch.equal(out, reference) and torch.equal(grad, grad_ref)
    assert not scratch._buffers                                            # never dequantized into the buffer


def test_float_layers_and_replaced_forwards_are_left_alone():
    pipe = tiny_sd()
    assert SharedDequantBuffer(pipe.unet, pipe.text_encoder).layers == []     # float pipeline: nothing to do
    quantize_pipeline(pipe)
    layer = int8_layers(pipe.unet)[0]
    own = lambda input: torch.zeros(1)
    layer.forward = own                                   # e.g. an offloading hook's wrapper
    scratch = SharedDequantBuffer(pipe.unet)
    assert layer not in scratch.layers and len(scratch.layers) == len(int8_layers(pipe.unet)) - 1
    with scratch:
        assert layer.forward is own
    assert layer.forward is own


def test_without_optimum_quanto_a_float_pipeline_has_no_int8_layers(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optimum.quanto", None)             # import optimum.quanto: ImportError
    pipe = tiny_sd()
    with SharedDequantBuffer(pipe.unet, pipe.text_encoder) as scratch:
        assert scratch.layers == []


def test_bad_arguments_and_reentry_are_refused():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        SharedDequantBuffer("unet")
    scratch = SharedDequantBuffer(nn.Linear(2, 2))
    with scratch, pytest.raises(RuntimeError, match="already active"):
        with scratch:
            pass


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("model", ["tiny", "digits-t2i"])
def test_zo_trains_the_same_embedding_as_with_quantos_forward(model, batched, tiny_folder):
    from test_int8_loading import CASES

    make_images, token, initializer, templates = CASES[model]
    model = str(tiny_folder) if model == "tiny" else model
    config = PersonalizeConfig(method="zo", steps=3, tau=2, learning_rate=0.05, templates=templates,
                               flip_prob=0.0, seed=3, batch_directions=batched)
    fast = TextualInversion(model, make_images(), token, initializer, config)
    plain = TextualInversion(model, make_images(), token, initializer, config)
    plain.int8_forward = SharedDequantBuffer()                              # quanto's own forward
    assert len(fast.int8_forward.layers) == len(int8_layers(fast.pipe.unet)) + len(int8_layers(fast.pipe.text_encoder))
    start = fast.embedding
    for _ in range(config.steps):
        assert fast.step() == plain.step()
    assert fast.int8_forward._buffers and not plain.int8_forward._buffers
    assert torch.equal(fast.embedding, plain.embedding) and not torch.equal(fast.embedding, start)


def _fused_kernel_crashes(*args, **kwargs):
    raise AssertionError("torch._weight_int8pack_mm called (it crashes some CPUs on narrow bfloat16 layers)")


@torch.no_grad()
def test_bfloat16_on_cpu_never_reaches_the_fused_int8_kernel(monkeypatch):
    pipe = quantize_pipeline(tiny_sd().to(torch.bfloat16))          # narrow layers: 8 input features
    assert pipe.unet.dtype == torch.bfloat16
    monkeypatch.setattr(torch, "_weight_int8pack_mm", _fused_kernel_crashes)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen).to(torch.bfloat16)
    states = pipe.text_encoder(torch.randint(2, len(pipe.tokenizer), (2, 5), generator=gen))[0]
    out = pipe.unet(latents, torch.tensor([500, 20]), states).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with SharedDequantBuffer(pipe.unet, pipe.text_encoder):
        assert torch.equal(pipe.unet(latents, torch.tensor([500, 20]), states).sample, out)


@pytest.mark.parametrize("in_features", [8, 6])
@torch.no_grad()
def test_bfloat16_linear_is_quantos_unfused_arithmetic(in_features, monkeypatch):
    from diffguide.tasks.quantize import quantize_module

    torch.manual_seed(0)
    ours = quantize_module(nn.Sequential(nn.Linear(in_features, 5)).to(torch.bfloat16))
    x = torch.randn(3, 2, in_features).to(torch.bfloat16)
    layer = ours[0]
    weight = layer.weight._scale * layer.weight._data.to(torch.bfloat16)            # s * W_int8, independently
    expected = (x.reshape(-1, in_features) @ weight.t()).reshape(3, 2, 5) + layer.bias
    monkeypatch.setattr(torch, "_weight_int8pack_mm", _fused_kernel_crashes)
    assert torch.equal(ours(x), expected)
    quanto_layer = quanto.nn.QLinear.forward                                       # quanto's own class
    if in_features % 4:                      # quanto computes this width unfused itself: the same bits
        assert torch.equal(quanto_layer(layer, x), expected)
    else:                                    # quanto would hand this width to the fused kernel
        with pytest.raises(AssertionError, match="_weight_int8pack_mm"):
            quanto_layer(layer, x)
