"""A model whose weights do not fit it is refused naming the tensors, never returned with random parts.

Each shipped model is copied with one tensor renamed (as another library version names it: transformers 5.0 looked
for ``text_model.*`` where digits-t2i's text encoder stores ``encoder.*``, and sampled with a random text encoder
without an error): every load path of ``zoo.load`` must raise
``DamagedModelError`` naming the tensor the model lacks and the one it has no place for.
"""

import re
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from diffguide.tasks import zoo


def rename_tensor(weights, old: str, new: str) -> None:
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
        state = {key: f.get_tensor(key) for key in f.keys()}
    assert old in state, sorted(state)[:10]
    state[new] = state.pop(old)
    save_file(state, str(weights), metadata=metadata)


def drop_tensor(weights, name: str) -> None:
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
        state = {key: f.get_tensor(key) for key in f.keys() if key != name}
    save_file(state, str(weights), metadata=metadata)


CASES = [  # model, weights file inside its folder, tensor renamed, its new name
    ("digits-t2i", "text_encoder/model.safetensors", "encoder.layers.0.mlp.fc1.weight",
     "encoder.layers.0.mlp.fc_1.weight"),
    ("digits-t2i", "unet/diffusion_pytorch_model.safetensors", "conv_in.weight", "conv_input.weight"),
    ("digits-class", "unet/diffusion_pytorch_model.safetensors", "class_embedding.weight", "label_embedding.weight"),
    ("digits-flow", "text_encoder_2/model.safetensors", "text_projection.weight", "projection.weight"),
    ("digits-classifier", "model.safetensors", "head.1.weight", "classifier.weight"),
    ("digits-clip", "model.safetensors", "ln_final.weight", "final_norm.weight"),
]


@pytest.mark.parametrize("name,weights,old,new", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_renamed_tensor_is_refused_naming_both_names(name, weights, old, new, tmp_path):
    folder = shutil.copytree(zoo.model_path(name), tmp_path / name)
    rename_tensor(folder / weights, old, new)
    with pytest.raises(zoo.DamagedModelError) as err:
        zoo.load(folder)
    message = str(err.value)
    assert old in message and new in message, message
    assert str(folder) in message and "missing" in message and "unexpected" in message, message


def test_missing_tensor_alone_is_refused(tmp_path):
    folder = shutil.copytree(zoo.model_path("digits-t2i"), tmp_path / "digits-t2i")
    drop_tensor(folder / "text_encoder/model.safetensors", "final_layer_norm.bias")
    with pytest.raises(zoo.DamagedModelError, match=r"missing.*final_layer_norm\.bias"):
        zoo.load(folder)


def test_check_loaded_weights_names_every_kind():
    zoo.check_loaded_weights("m", (), (), ())  # nothing wrong: no error
    with pytest.raises(zoo.DamagedModelError, match=r"m: .*missing.*: a.*unexpected.*: b.*wrong shape: c"):
        zoo.check_loaded_weights("m", ["a"], ["b"], [("c", (1,), (2,))])
