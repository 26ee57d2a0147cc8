"""Every command-line mistake: one last line naming the option, the bad value and what is allowed; exit code 2
for usage errors (found before any model is loaded) and 1 for failures at run time.

Add a row to ``USAGE_ERRORS`` for each new option. ``{name}`` in an argument is replaced by a file made by the
``files`` fixture (a corrupt image, a folder of mixed sizes, ...).
"""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from PIL import Image

from diffguide.scripts import evaluate, sample, solve
from diffguide.tasks import zoo

MAINS = {"sample": sample.main, "solve": solve.main, "evaluate": evaluate.main}
NO_GPU = not torch.cuda.is_available()

# (command, argv, words the last line of stderr must hold): every row must exit with code 2
USAGE_ERRORS = [
    # diffguide-sample
    ("sample", ["--steps", "0"], ["--steps", "'0'", ">= 1"]),
    ("sample", ["--steps", "1"], ["--steps", "t = 1", "--steps 5 or more"]),
    ("sample", ["--steps", "two"], ["--steps", "'two'", "integer"]),
    ("sample", ["--num-images", "-3"], ["--num-images", "'-3'", ">= 1"]),
    ("sample", ["--batch-size", "0"], ["--batch-size", "'0'", ">= 1"]),
    ("sample", ["--scale", "nan"], ["--scale", "'nan'", "finite"]),
    ("sample", ["--class-labels", "11"], ["--class-labels", "11", "0..9"]),
    ("sample", ["--class-labels", "-1"], ["--class-labels", "'-1'", ">= 0"]),
    ("sample", ["--prompt", "a digit"], ["--prompt", "class-conditional", "--class-labels"]),
    ("sample", ["--prompt", " "], ["--prompt", "non-empty"]),
    ("sample", ["--model", "digits-t2i", "--class-labels", "3"], ["--class-labels", "text-to-image", "--prompt"]),
    ("sample", ["--model", "nope"], ["--model", "'nope'", "digits-class"]),
    ("sample", ["--model", "digits-classifier"], ["--model", "not a diffusion pipeline", "digits-t2i"]),
    ("sample", ["--guidance", "nope"], ["--guidance", "unknown guide 'nope'", "cfgpp"]),
    ("sample", ["--guidance", "cfg:foo=1"], ["--guidance", "'foo'", "allowed: scale, sigma_lo, sigma_hi"]),
    ("sample", ["--guidance", "apg:scale"], ["--guidance", "'scale'", "key=value"]),
    ("sample", ["--guidance", "cfg@"], ["--guidance", "'cfg@'", "finite numbers"]),
    ("sample", ["--guidance", "cfg@,"], ["--guidance", "'cfg@,'", "finite numbers"]),
    ("sample", ["--guidance", "cfg@2"], ["--guidance", "--scale"]),
    ("sample", ["--guidance", "cfg:scale=3", "--scale", "2"], ["--guidance", "'cfg:scale=3'", "scale once"]),
    ("sample", ["--guidance", "apg:momentum=x"], ["--guidance", "'apg:momentum=x'"]),
    ("sample", ["--scheduler", "heun_pp"], ["--scheduler", "'heun_pp'", "ddim"]),
    ("sample", ["--guidance", "rcfgpp"], ["--guidance", "'rcfgpp'", "other noise levels", "StableDiffusion3Pipeline",
                                          "digits-class is a ClassConditionalPipeline"]),
    ("sample", ["--model", "digits-flow", "--scheduler", "ddim"], ["--scheduler", "rectified-flow", "flow_euler"]),
    ("sample", ["--scheduler", "flow_euler"], ["--scheduler", "diffusion (VP)", "ddim"]),
    ("sample", ["--model", "digits-flow", "--timestep-spacing", "trailing"], ["--timestep-spacing", "use auto"]),
    ("sample", ["--timestep-spacing", "linspace", "--steps", "1"], ["--steps", "linspace", "not noise"]),
    ("sample", ["--device", "banana"], ["--device", "'banana'", "cpu"]),
    ("sample", ["--threads", "0"], ["--threads", "'0'", ">= 1"]),
    ("sample", ["--out", "{a_file}/x.png"], ["--out", "x.png", "not a folder"]),
    ("sample", ["--out", "{a_folder}"], ["--out", "is a folder", "file"]),
    # diffguide-solve
    ("solve", ["--index", "360"], ["--index", "'360'", "0..359"]),
    ("solve", ["--digit", "-1"], ["--digit", "'-1'", "0..359"]),
    ("solve", ["--digit-class", "10"], ["--digit-class", "'10'", "0..9"]),
    ("solve", ["--index", "3", "--image", "{good_png}"], ["--image", "not allowed with", "--index"]),
    ("solve", ["--image", "{missing_png}"], ["--image", "missing.png", "no image file"]),
    ("solve", ["--image", "{corrupt_png}"], ["--image", "corrupt.png", "not a readable image"]),
    ("solve", ["--image", "{text_png}"], ["--image", "text.png", "not a readable image"]),
    ("solve", ["--sigma-y", "nan"], ["--sigma-y", "'nan'", "finite"]),
    ("solve", ["--sigma-y", "-0.1"], ["--sigma-y", "'-0.1'", ">= 0"]),
    ("solve", ["--model", "nope"], ["--model", "'nope'", "digits-class"]),
    ("solve", ["--solver", "latent_dps", "--model", "digits-class"],
     ["--solver", "latent_dps", "latent text-to-image", "digits-class"]),
    ("solve", ["--solver", "dps", "--model", "digits-t2i"], ["--solver", "dps", "class-conditional", "digits-t2i"]),
    ("solve", ["--solver", "enkg", "--particles", "1"], ["--particles", "1", "2 or more"]),
    ("solve", ["--solver", "pinv", "--task", "phase_retrieval"], ["--solver", "pinv", "phase_retrieval", "linear"]),
    ("solve", ["--task", "denoise"], ["--task", "'denoise'", "inpaint_box"]),
    ("solve", ["--task", "heat", "--solver", "dps"], ["--solver", "dps", "--task heat", "black box", "enkg"]),
    ("solve", ["--task", "heat", "--solver", "latent_dps"], ["--solver", "latent_dps", "black box", "enkg"]),
    ("solve", ["--task", "phase_retrieval", "--solver", "mcg"], ["--solver", "mcg", "phase_retrieval", "linear"]),
    ("solve", ["--steps", "0"], ["--steps", "'0'", ">= 1"]),
    ("solve", ["--steps", "1"], ["--steps", "digits-class", "t = 1", "not noise", "--steps 5 or more"]),
    ("solve", ["--zoom", "0"], ["--zoom", "'0'", "1..64"]),
    ("solve", ["--scale", "inf"], ["--scale", "'inf'", "finite"]),
    ("solve", ["--threads", "-2"], ["--threads", "'-2'", ">= 1"]),
    ("solve", ["--out", "{a_file}/x.png"], ["--out", "not a folder"]),
    # diffguide-evaluate
    ("evaluate", ["--model", "digits-flow", "digits-t2i", "--guide", "cfg@2", "--guide", "rcfgpp@1", "--out", "{out}"],
     ["--guide", "'rcfgpp@1'", "other noise levels", "digits-t2i is a StableDiffusionPipeline"]),
    ("evaluate", ["--images", "{corrupt_folder}", "--out", "{out}"], ["--images", "bad.png", "not a readable image"]),
    ("evaluate", ["--images", "{mixed_folder}", "--out", "{out}"], ["--images", "20x20", "16x16", "one size"]),
    ("evaluate", ["--images", "{a_folder}", "--out", "{out}"], ["--images", "no .png"]),
    ("evaluate", ["--images", "{one_image_folder}", "--out", "{out}"], ["--images", "fid and kid", "at least 2", "1"]),
    ("evaluate", ["--images", "{one_image_folder}", "--metrics", "kid", "--out", "{out}"], ["--images", "kid need"]),
    ("evaluate", ["--images", "{corrupt_folder}", "--metrics", "clip_score", "--out", "{out}"],
     ["--metrics", "clip_score", "'text'", "metadata.jsonl"]),
    ("evaluate", ["--images", "{corrupt_folder}", "--metrics", "accuracy", "--out", "{out}"],
     ["--metrics", "accuracy", "'label'"]),
    ("evaluate", ["--model", "digits-class", "--metrics", "clip_score", "--out", "{out}"],
     ["--metrics", "clip_score", "digits-class", "class-conditional"]),
    ("evaluate", ["--model", "digits-class", "--num-images", "1", "--out", "{out}"],
     ["--num-images", "fid and kid", "at least 2", "got 1"]),
    ("evaluate", ["--model", "digits-class", "--eta", "nan", "--out", "{out}"], ["--eta", "'nan'", "finite"]),
    ("evaluate", ["--model", "digits-class", "--threads", "-2", "--out", "{out}"], ["--threads", "'-2'", ">= 1"]),
    ("evaluate", ["--model", "digits-class", "--num-images", "0", "--out", "{out}"], ["--num-images", "'0'"]),
    ("evaluate", ["--model", "digits-class", "--steps", "2", "--out", "{out}"], ["--steps", "t = 501", "--steps 5"]),
    ("evaluate", ["--model", "nope", "--out", "{out}"], ["--model", "'nope'", "digits-class"]),
    ("evaluate", ["--model", "digits-class", "--guide", "cfg@", "--out", "{out}"], ["--guide", "'cfg@'"]),
    ("evaluate", ["--model", "digits-class", "--guide", "cfg@,", "--out", "{out}"], ["--guide", "'cfg@,'"]),
    ("evaluate", ["--model", "digits-class", "--guide", "apg:etta=0", "--out", "{out}"],
     ["--guide", "'etta'", "allowed: scale, eta, norm_threshold, momentum"]),
    ("evaluate", ["--model", "digits-class", "--scales", "1", "nan", "--out", "{out}"], ["--scales", "'nan'"]),
    ("evaluate", ["--model", "digits-class", "--metrics", "fid", "iss", "--out", "{out}"], ["--metrics", "iss", "fid"]),
    ("evaluate", ["--model", "digits-class", "--real", "nope", "--out", "{out}"], ["--real", "'nope'", "digits-train"]),
    ("evaluate", ["--model", "digits-class", "--out", "{a_file}"], ["--out", "is a file", "folder"]),
    ("evaluate", ["--model", "digits-class", "--device", "banana", "--out", "{out}"], ["--device", "'banana'"]),
]
if NO_GPU:
    USAGE_ERRORS += [(command, ["--device", "cuda"] + (["--model", "digits-class", "--out", "{out}"]
                                                       if command == "evaluate" else []),
                      ["--device", "'cuda'", "--device cpu"]) for command in MAINS]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture
def files(tmp_path):
    """Named paths for the ``{name}`` placeholders of the table."""
    paths = {"a_file": tmp_path / "a_file.txt", "a_folder": tmp_path / "a_folder", "out": tmp_path / "out",
             "good_png": tmp_path / "good.png", "missing_png": tmp_path / "missing.png",
             "corrupt_png": tmp_path / "corrupt.png", "text_png": tmp_path / "text.png",
             "corrupt_folder": tmp_path / "corrupt_folder", "mixed_folder": tmp_path / "mixed_folder",
             "one_image_folder": tmp_path / "one_image_folder"}
    paths["a_file"].write_text("not a folder")
    paths["a_folder"].mkdir()
    Image.new("L", (16, 16), 128).save(paths["good_png"])
    data = paths["good_png"].read_bytes()
    paths["corrupt_png"].write_bytes(data[: len(data) // 2])            # truncated in its pixel data
    paths["text_png"].write_text("this is not an image\n")
    for name in ("corrupt_folder", "mixed_folder"):
        paths[name].mkdir()
        for i in range(3):
            Image.new("L", (16, 16), 40 * i).save(paths[name] / f"{i:03d}.png")
    (paths["corrupt_folder"] / "bad.png").write_bytes(data[:8] + _png_chunk(b"IHDR", b"\0" * 13))
    Image.new("L", (20, 20), 10).save(paths["mixed_folder"] / "zz-big.png")
    paths["one_image_folder"].mkdir()
    Image.new("L", (16, 16), 128).save(paths["one_image_folder"] / "000.png")
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the command line was checked")

    monkeypatch.setattr(zoo, "load", refuse)


def run_main(command, argv, capsys):
    """``(exit code, stderr)`` of a main; ``SystemExit(message)`` is what Python prints and exits 1 with."""
    with pytest.raises(SystemExit) as exit_info:
        MAINS[command](argv)
    code, err = exit_info.value.code, capsys.readouterr().err
    if isinstance(code, str):
        return 1, err + code + "\n"
    return code, err


@pytest.mark.parametrize("command,argv,words", USAGE_ERRORS,
                         ids=[f"{c}:{' '.join(a)}" for c, a, _ in USAGE_ERRORS])
def test_usage_error_is_one_line_before_any_model(command, argv, words, files, no_model_loading, capsys):
    argv = [arg.format(**files) for arg in argv]
    if command in ("sample", "solve") and "--out" not in argv:
        argv += ["--out", files["out"] + "/x.png"]
    code, err = run_main(command, argv, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2, err
    assert "Traceback" not in err and last.startswith(f"diffguide-{command}: error: argument ")
    for word in [w.format(**files) for w in words]:
        assert word in last, f"{word!r} not in {last!r}"


@pytest.mark.parametrize("command", sorted(MAINS))
def test_help_shows_defaults_and_guides(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        MAINS[command](["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "(default: " in out and "--threads" in out
    if command != "solve":
        assert "cfgpp" in out and "norm_threshold" in out         # the guide names and their keys


@pytest.mark.parametrize("command", ["sample", "solve"])
def test_runtime_failure_exits_1_with_one_line(command, tmp_path, capsys):
    """A hub id that is not cached (offline): loading fails at run time, exit 1, one line naming --model."""
    code, err = run_main(command, ["--model", "someone/not-cached", "--out", str(tmp_path / "x.png"),
                                   "--no-progress"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err
    assert last.startswith(f"diffguide-{command}: error: --model someone/not-cached")


def test_guide_spec_parser_refuses_empty_scales_and_lists_allowed_keys():
    from diffguide.guidance import build_guide, parse_guide_spec

    for spec in ("cfg@", "cfg@,", "cfg@1,,2", "cfg@1,", "cfg@inf"):
        with pytest.raises(ValueError, match="finite numbers"):
            parse_guide_spec(spec)
    assert parse_guide_spec("apg@1,2:eta=0") == ("apg", [1.0, 2.0], {"eta": 0})
    with pytest.raises(TypeError, match="allowed: lam, sigma_lo, sigma_hi"):        # unknown keyword: TypeError
        parse_guide_spec("cfgpp:scale=1")
    with pytest.raises(TypeError, match="allowed: scale, phi, sigma_lo, sigma_hi"):
        build_guide("cfg-rescale", 2.0, rescale=0.7)
    with pytest.raises(ValueError, match="twice"):
        parse_guide_spec("cfg:scale=1,scale=2")
