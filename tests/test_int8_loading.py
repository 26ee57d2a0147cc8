"""Int8 pipelines loaded layer by layer from a float checkpoint, and saved int8 pipelines loaded straight into
int8: equal to whole-pipeline quantization bit for bit (weights, fingerprint, trained embedding), a load peak
of about one layer's float weights above the int8 total, and damaged or foreign folders refused with the file
named."""

import json
import os
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from diffguide.tasks import zoo
from diffguide.tasks.metrics.features import weights_fingerprint
from diffguide.tasks.personalize import PersonalizeConfig, TextualInversion
from diffguide.tasks.quantize import (COMPONENTS, MANIFEST, QMAP, float_weights_fingerprint, load_int8_component,
                                      load_int8_pipeline, load_saved_int8_pipeline, quantize_pipeline,
                                      save_int8_pipeline, weight_report)
from tiny_pipes import tiny_sd

pytest.importorskip("optimum.quanto")

LAYER_TRANSIENTS = 5     # float copies of one layer alive while it is quantized: read buffer, quanto's
                         # to_empty weight, |W|, W / s, round(W / s) (the last three inside quanto's quantizer)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_sd().save_pretrained(folder)
    return folder


def digits_images():
    from diffguide.tasks.digits import load_digits_tensors

    images, labels = load_digits_tensors("test", 16)
    return images[labels == 7][:3]


CASES = {  # model -> (images, token, initializer, templates)
    "tiny": (lambda: torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1,
             "<s1>", "a", ("a {}", "{}")),
    "digits-t2i": (digits_images, "<s1>", "digit", ("a handwritten digit {}",)),
}


def assert_same_int8_weights(a, b):
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), (name, key)
        assert any(v.dtype == torch.int8 for v in sa.values())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batched", [False, True])
def test_layer_by_layer_load_trains_the_same_embedding_bit_for_bit(case, batched, tiny_folder):
    model = str(tiny_folder) if case == "tiny" else "digits-t2i"
    make_images, token, initializer, templates = CASES[case]
    config = PersonalizeConfig(method="zo", steps=3, tau=2, learning_rate=0.05, templates=templates, flip_prob=0.0,
                               seed=3, batch_directions=batched)
    whole = zoo.load(model)                                     # today's path: float pipeline, quantized whole
    float_fingerprints = {name: weights_fingerprint(getattr(whole, name)) for name in COMPONENTS}
    reference = TextualInversion(whole, make_images(), token, initializer, config)
    layered = TextualInversion(model, make_images(), token, initializer, config)   # int8 layer by layer
    assert_same_int8_weights(layered.pipe, reference.pipe)
    for name in COMPONENTS:
        assert float_weights_fingerprint(getattr(layered.pipe, name)) == float_fingerprints[name]
    assert layered.model_fingerprint == reference.model_fingerprint       # a checkpoint resumes across paths
    start = layered.embedding
    for _ in range(config.steps):
        assert layered.step() == reference.step()
    assert torch.equal(layered.embedding, reference.embedding)
    assert not torch.equal(layered.embedding, start)


@pytest.mark.parametrize("case", CASES)
def test_saved_int8_folder_trains_the_same_embedding_bit_for_bit(case, tiny_folder, tmp_path):
    model = str(tiny_folder) if case == "tiny" else "digits-t2i"
    make_images, token, initializer, templates = CASES[case]
    config = PersonalizeConfig(method="zo", steps=3, tau=2, learning_rate=0.05, templates=templates, flip_prob=0.0,
                               seed=3, batch_directions=case == "tiny")
    # written from the float pipeline (quantized in place) for tiny, from the layer-by-layer load for digits
    source = zoo.load(model) if case == "tiny" else load_int8_pipeline(model)
    save_int8_pipeline(source, tmp_path / "int8")
    assert json.loads((tmp_path / "int8" / "unet" / QMAP).read_text())        # quanto's map, one entry per layer
    saved = TextualInversion(load_saved_int8_pipeline(tmp_path / "int8", model=model), make_images(), token,
                             initializer, config)
    reference = TextualInversion(zoo.load(model), make_images(), token, initializer, config)    # quantized whole
    assert_same_int8_weights(saved.pipe, reference.pipe)
    assert saved.model_fingerprint == reference.model_fingerprint        # a checkpoint resumes across paths
    for _ in range(config.steps):
        assert saved.step() == reference.step()
    assert torch.equal(saved.embedding, reference.embedding)


def test_saved_int8_folders_that_are_damaged_or_foreign_are_refused_naming_the_file(tiny_folder, tmp_path):
    from optimum import quanto

    saved = save_int8_pipeline(load_int8_pipeline(tiny_folder), tmp_path / "int8")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        save_int8_pipeline(load_int8_pipeline(tiny_folder), saved)
    with pytest.raises(ValueError, match="already int8 without a record of its float weights"):
        save_int8_pipeline(quantize_pipeline(zoo.load(tiny_folder)), tmp_path / "whole")
    with pytest.raises(ValueError, match=f"holds a saved int8 pipeline .*{MANIFEST}.*load_saved_int8_pipeline"):
        load_int8_pipeline(saved)                                               # not a float checkpoint
    with pytest.raises(ValueError, match=f"no {MANIFEST} in .*model"):
        load_saved_int8_pipeline(tiny_folder)                                   # a float checkpoint
    other_seed = tmp_path / "seed1"
    tiny_sd(seed=1).save_pretrained(other_seed)
    with pytest.raises(ValueError, match=f"{MANIFEST}.* records a unet with float weights .*another model"):
        load_saved_int8_pipeline(saved, model=other_seed)
    load_saved_int8_pipeline(saved, model=tiny_folder)                          # the right model passes

    def damaged(name, edit):
        folder = copy_model(saved, tmp_path / name)
        edit(folder)
        return folder

    manifest = json.loads((saved / MANIFEST).read_text())
    old = damaged("old", lambda f: (f / MANIFEST).write_text(json.dumps({**manifest, "optimum_quanto": "0.0.1"})))
    with pytest.raises(ValueError, match=rf"{MANIFEST}.* written with optimum-quanto 0.0.1, this is {quanto.__version__}"):
        load_saved_int8_pipeline(old)
    with pytest.raises(ValueError, match=rf"cannot read .*{MANIFEST}.*damaged"):
        load_saved_int8_pipeline(damaged("badjson", lambda f: (f / MANIFEST).write_text("{")))
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match=rf"{unet_file}' is missing"):
        load_saved_int8_pipeline(damaged("nofile", lambda f: (f / unet_file).unlink()))
    truncate = lambda f: (f / unet_file).write_bytes((f / unet_file).read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"cannot read weights file .*{unet_file}.*truncated"):
        load_saved_int8_pipeline(damaged("truncated", truncate))

    def flip_last_byte(folder):
        data = bytearray((folder / unet_file).read_bytes())
        data[-1] ^= 1                                                           # same size, other weights
        (folder / unet_file).write_bytes(bytes(data))

    with pytest.raises(ValueError, match=rf"{unet_file}' holds other int8 weights than .*{MANIFEST}"):
        load_saved_int8_pipeline(damaged("flipped", flip_last_byte))
    with pytest.raises(ValueError, match=rf"quantization map .*unet/{QMAP}"):
        load_saved_int8_pipeline(damaged("noqmap", lambda f: (f / "unet" / QMAP).unlink()))
    qmap = json.loads((saved / "unet" / QMAP).read_text())
    layer = sorted(qmap)[0]
    for name, edited in (("qint4", {**qmap, layer: {"weights": "qint4", "activations": "none"}}),
                         ("fewer", {k: v for k, v in qmap.items() if k != layer})):
        folder = damaged(name, lambda f: (f / "unet" / QMAP).write_text(json.dumps(edited)))
        with pytest.raises(ValueError, match=rf"unet/{QMAP}' does not match UNet2DConditionModel.*{layer}"):
            load_saved_int8_pipeline(folder)

    def float_weight_for_one_layer(folder):                   # the map says int8, the file holds a float weight
        state = load_file(folder / unet_file)
        data, scale = state.pop(f"{layer}.weight._data"), state.pop(f"{layer}.weight._scale")
        state[f"{layer}.weight"] = data.float() * scale
        save_file(state, folder / unet_file)

    with pytest.raises(ValueError, match=rf"{unet_file}' does not hold the tensors {QMAP}.*lacks {layer}.weight._data"):
        load_saved_int8_pipeline(damaged("floatlayer", float_weight_for_one_layer))

    def scale_as_float16(folder):
        state = load_file(folder / unet_file)
        state[f"{layer}.weight._scale"] = state[f"{layer}.weight._scale"].half()
        save_file(state, folder / unet_file)

    with pytest.raises(ValueError, match=rf"'{layer}.weight._scale' is torch.float16 .* expects torch.float32"):
        load_saved_int8_pipeline(damaged("half", scale_as_float16))


def tensor_peak_bytes(fn):
    """Peak net bytes of tensors allocated during ``fn()`` (the benchmark's profiler measure) and its result."""
    from bench_personalize import _tensor_peak_bytes

    result = []
    peak = _tensor_peak_bytes(lambda: result.append(fn()))
    return peak, result[0]


def test_load_peak_is_the_int8_total_plus_about_one_layer():
    folder = zoo.model_path("digits-t2i") / "unet"
    peak, unet = tensor_peak_bytes(lambda: load_int8_component(folder, UNet2DConditionModel))
    float_unet = UNet2DConditionModel.from_pretrained(folder)
    layers = [m.weight.numel() * 4 for m in float_unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    float_total = sum(p.numel() * p.element_size() for p in float_unet.parameters())
    loaded = weight_report(unet).bytes
    assert loaded < 0.3 * float_total
    assert peak <= loaded + LAYER_TRANSIENTS * max(layers), (peak, loaded, max(layers))
    assert peak < 0.6 * float_total
    # the whole-model path holds every float weight at once
    whole_peak, _ = tensor_peak_bytes(lambda: quantize_pipeline(zoo.load("digits-t2i"), components=("unet",)))
    assert whole_peak >= float_total


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_prefixed_and_renamed_weight_files(tiny_folder, tmp_path):
    from transformers import CLIPTextModel

    reference = load_int8_pipeline(tiny_folder)
    folder = copy_model(tiny_folder, tmp_path / "prefixed")
    path = folder / "text_encoder" / "model.safetensors"
    save_file({f"text_model.{k}": v for k, v in load_file(path).items()}, path)     # the original SD layout
    text_encoder = load_int8_component(folder / "text_encoder", CLIPTextModel)
    assert weights_fingerprint(text_encoder) == weights_fingerprint(reference.text_encoder)
    assert float_weights_fingerprint(text_encoder) == float_weights_fingerprint(reference.text_encoder)

    path = folder / "vae" / "diffusion_pytorch_model.safetensors"             # diffusers' deprecated names
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = load_file(path)
    for new_name, old_name in old_names.items():
        state = {k.replace(new_name, old_name): v for k, v in state.items()}
    assert any(".query." in k for k in state)
    save_file(state, path)
    with pytest.warns(UserWarning, match="loading it whole"):                  # the library converts them
        vae = load_int8_component(folder / "vae", AutoencoderKL)
    assert weights_fingerprint(vae) == weights_fingerprint(reference.vae)
    assert float_weights_fingerprint(vae) == float_weights_fingerprint(reference.vae)


def test_damaged_and_foreign_folders_are_refused_naming_the_file(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])                                     # truncated
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors.*truncated"):
        load_int8_pipeline(folder)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")     # corrupt header
    with pytest.raises(ValueError, match="cannot read weights file.*diffusion_pytorch_model.safetensors"):
        load_int8_pipeline(folder)
    weights.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.bin: int8 loading reads safetensors only"):
        load_int8_pipeline(folder)
    (folder / "unet" / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match="no diffusion_pytorch_model.safetensors"):
        load_int8_pipeline(folder)

    other = copy_model(tiny_folder, tmp_path / "other")
    shutil.copy(zoo.model_path("digits-t2i") / "unet" / "diffusion_pytorch_model.safetensors",
                other / "unet" / "diffusion_pytorch_model.safetensors")            # another model's weights
    with pytest.raises(ValueError, match=r"has shape .* in .*other/unet/diffusion_pytorch_model.safetensors"):
        load_int8_pipeline(other)
    with pytest.raises(ValueError, match=r"cannot load .*vae.* as UNet2DConditionModel"):
        load_int8_component(tiny_folder / "vae", UNet2DConditionModel)      # names differ, the library refuses

    index = json.loads((tiny_folder / "model_index.json").read_text())
    no_vae = copy_model(tiny_folder, tmp_path / "novae")
    (no_vae / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "vae"}))
    with pytest.raises(ValueError, match="no 'vae' component"):
        load_int8_pipeline(no_vae)


def test_learned_embedding_keeps_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        trainer = TextualInversion(tiny_sd(), torch.zeros(2, 3, 16, 16), "<s1>", "a",
                                   PersonalizeConfig(steps=1, templates=("a {}",), quantize=False))
        path = trainer.train(tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
    assert ((tmp_path / "run" / "checkpoint" / "state.safetensors").stat().st_mode & 0o777) == 0o644
