"""The main job: diffguide-sample on the shipped default model."""

import hashlib

import pytest
from PIL import Image

from diffguide.scripts import sample


def run(tmp_path, *args, name="out.png"):
    out = tmp_path / name
    sample.main(["--steps", "4", "--no-progress", "--out", str(out), *args])
    return out


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_run_writes_a_grid_and_is_reproducible(tmp_path):
    first = run(tmp_path, name="a.png")
    again = run(tmp_path, name="b.png")
    other = run(tmp_path, "--seed", "1", name="c.png")
    image = Image.open(first)
    assert image.size == (10 * 64, 64)  # one digit per class, upscaled 4x
    assert digest(first) == digest(again) and digest(first) != digest(other)


@pytest.mark.parametrize("guide", ["cfgpp", "apg:eta=0,norm_threshold=2", "cfg-zero-star", "none"])
def test_guides_and_schedulers(tmp_path, guide):
    out = run(tmp_path, "--guidance", guide, "--scheduler", "euler", "--class-labels", "3", "7")
    assert Image.open(out).size == (2 * 64, 64)


@pytest.mark.parametrize("args,match", [
    (["--model", "no-such-model"], "no-such-model"),
    (["--class-labels", "11"], "class label"),
    (["--prompt", "a digit"], "class-conditional"),
    (["--guidance", "nope"], "unknown guide"),
    (["--guidance", "cfg:foo=1"], "foo"),
])
def test_bad_input_is_reported(tmp_path, args, match, capsys):
    with pytest.raises(SystemExit) as err:
        run(tmp_path, *args)
    assert match in str(err.value)


@pytest.mark.parametrize("args", [["--steps", "0"], ["--prompt", ""], ["--num-images", "0"]])
def test_bad_arguments_exit_with_usage(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as err:
        sample.main([*args, "--out", str(tmp_path / "x.png")])
    assert err.value.code == 2 and "error" in capsys.readouterr().err


def test_text_to_image_model_and_local_folder(tmp_path):
    from diffguide.tasks import zoo

    prompts = ["a handwritten digit three", "the number 8"]
    first = run(tmp_path, "--model", "digits-t2i", "--prompt", *prompts, "--guidance", "cfgpp", name="t2i.png")
    assert Image.open(first).size == (2 * 64, 64)
    folder = tmp_path / "copy"
    zoo.load("digits-t2i").save_pretrained(folder)           # the same weights, loaded from a folder
    again = run(tmp_path, "--model", str(folder), "--prompt", *prompts, "--guidance", "cfgpp", name="folder.png")
    assert digest(first) == digest(again)
