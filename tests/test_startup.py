"""First contact: ``import diffguide`` is lazy, the command lines answer ``--help`` and usage errors without
importing torch, warnings print as one line, a scale that blows the prediction up is named, and the shipped
tiny models run on one thread by default."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

import diffguide
from diffguide.scripts import _cli, personalize, sample
from diffguide.tasks import zoo

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "open_clip", "diffguide.guidance", "diffguide.samplers")


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_diffguide_imports_nothing_heavy():
    out = run_python(f"import sys, diffguide; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.strip() == "[]"


def test_every_exported_name_resolves_to_its_module_object():
    guidance = importlib.import_module("diffguide.guidance")
    expected = {"guidance": guidance, "samplers": importlib.import_module("diffguide.samplers"),
                "tasks": importlib.import_module("diffguide.tasks"), "zoo": zoo}
    for name in diffguide.__all__:
        assert getattr(diffguide, name) is expected.get(name, getattr(guidance, name, None)), name
    assert set(diffguide.__all__) <= set(dir(diffguide))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diffguide.nope
    namespace: dict = {}
    exec("from diffguide import *", namespace)
    assert set(diffguide.__all__) <= set(namespace)


HELP_AND_USAGE = [   # (command, argv, exit code, words of the last line)
    ("sample", ["--help"], 0, ["rcfgpp", "predictor_fraction"]),
    ("sample", ["--class-labels", "11"], 2, ["--class-labels", "0..9"]),
    ("sample", ["--steps", "0"], 2, ["--steps", ">= 1"]),
    ("sample", ["--device", "banana"], 2, ["--device", "'banana'"]),
    ("sample", ["--guidance", "cgf:scale=3"], 2, ["--guidance", "unknown guide 'cgf'", "cfgpp"]),
    ("evaluate", ["--help"], 0, ["rcfgpp"]),
    ("evaluate", ["--model", "digits-class", "--guide", "cfg@1", "--guide", "apgg@2", "--out", "{tmp}/o"], 2,
     ["--guide", "unknown guide 'apgg'"]),
    ("evaluate", ["--model", "digits-class", "--metrics", "clip_score", "--out", "{tmp}/o"], 2,
     ["clip_score", "class-conditional"]),
    ("evaluate", ["--model", "digits-class", "--num-images", "1", "--out", "{tmp}/o"], 2, ["at least 2"]),
    ("solve", ["--help"], 0, ["--no-progress"]),
    ("solve", ["--model", "digits-t2i", "--out", "{tmp}/x.png"], 2, ["--solver", "class-conditional"]),
    ("solve", ["--index", "400"], 2, ["--index", "0..359"]),
    ("personalize", ["--help"], 0, ["--no-progress"]),
    ("personalize", ["{tmp}", "--token", "<s1>", "--initializer-token", "digit", "--out", "{tmp}/o",
                     "--timesteps", "0:5000"], 2, ["--timesteps HIGH"]),
]


def test_help_and_usage_errors_answer_without_torch(tmp_path):
    """All in one fresh process: every ``--help`` and these usage errors leave torch, diffusers and
    transformers unimported (each error is still the usual one line, exit 2)."""
    cases = [(c, [a.format(tmp=tmp_path) for a in argv]) for c, argv, _, _ in HELP_AND_USAGE]
    code = f"""
import contextlib, importlib, io, json, sys
results = []
for command, argv in {cases!r}:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            importlib.import_module("diffguide.scripts." + command).main(argv)
            exit_code = 0
        except SystemExit as stop:
            exit_code = stop.code
    text = (out.getvalue() + err.getvalue()).strip().splitlines()
    results.append([exit_code, text[-1] if text else ""])
print(json.dumps({{"results": results, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""
    report = json.loads(run_python(code).strip().splitlines()[-1])
    assert report["heavy"] == []
    for (command, argv, exit_code, words), (got_code, last) in zip(HELP_AND_USAGE, report["results"]):
        assert got_code == exit_code, (command, argv, last)
        if exit_code == 2:
            assert last.startswith(f"diffguide-{command}: error: "), last
        for word in words:
            assert word in last, (command, argv, last)


def test_guide_keys_for_help_match_the_registry():
    from diffguide.guidance.registry import GUIDES, guide_keys

    registry = {name: guide_keys(name) for name in GUIDES}
    assert _cli.GUIDE_KEYS == registry, f"write scripts/_cli.GUIDE_KEYS = {registry!r}"


# ------------------------------------------------------------------------------------------- warnings
def test_one_line_warnings_while_a_main_runs_only():
    library_format = warnings.formatwarning

    @_cli.one_line_warnings("diffguide-x")
    def main():
        return (warnings.formatwarning("first line\n  second", UserWarning, "/a/b.py", 3, "written = f(...)"),
                warnings.formatwarning("old", FutureWarning, "/a/b.py", 3, None))

    user, future = main()
    assert user == "diffguide-x: warning: first line second\n"
    assert future == "diffguide-x: warning (FutureWarning): old\n"
    assert warnings.formatwarning is library_format


def _print_warnings_as_python_does(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@pytest.mark.parametrize("scale, warned", [("1e6", True), ("2", False)])
def test_sample_names_the_step_and_scale_of_a_blown_up_prediction(scale, warned, tmp_path, capsys, monkeypatch):
    """A huge scale still exits 0, with one clean warning line naming the first step and the scale; a normal
    scale prints none."""
    monkeypatch.setattr(warnings, "showwarning", _print_warnings_as_python_does)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        sample.main(["--scale", scale, "--steps", "5", "--class-labels", "3", "--out", str(tmp_path / "x.png"),
                     "--no-progress", "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    warning_lines = [line for line in lines if "warning" in line]
    if not warned:
        assert warning_lines == []
        return
    assert len(warning_lines) == 1, lines
    assert warning_lines[0].startswith("diffguide-sample: warning: CFG(scale=1000000.0): at step 1 of 5")
    assert not any("warn(" in line or "sample(" in line or ".py:" in line for line in lines)


@pytest.mark.parametrize("scale, warned", [(1e9, True), (1.0, False)])
def test_inverse_solver_warns_once_when_its_correction_blows_up(scale, warned):
    from diffguide.tasks import inverse

    pipe = zoo.load("digits-class")
    truth = inverse.held_out_digits([0])
    op = inverse.make_task("inpaint_box", 0.05, seed=0)
    y = op.measure(truth, torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inverse.solve_pixel(pipe, op, y, "dps", steps=4, scale=scale)
    blowups = [str(w.message) for w in caught if "norm is" in str(w.message)]
    assert len(blowups) == (1 if warned else 0), blowups
    if warned:
        assert "DPS(scale=1000000000.0" in blowups[0] and "at step 1 of 4" in blowups[0]


# --------------------------------------------------------------------------------- checks before loading
def test_personalize_refuses_images_of_the_wrong_size_or_mode_before_loading(tmp_path, capsys, monkeypatch):
    from diffguide.tasks import personalize as tasks_personalize

    monkeypatch.setattr(tasks_personalize, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("L", (16, 16), 40).save(images / "a.png")
    Image.new("RGB", (20, 20), 40).save(images / "b.png")
    Image.new("RGB", (16, 16), 40).save(images / "c.png")
    argv = [str(images), "--token", "<s1>", "--initializer-token", "digit", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        personalize.main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert "16x16 in mode 'L'" in last and "b.png (20x20 RGB)" in last and "c.png (16x16 RGB)" in last
    assert "a.png" not in last and "--resize" in last
    assert personalize.parse_args(argv + ["--resize"]).config is not None      # --resize accepts them
    size, mode = tasks_personalize.expected_image_format(zoo.load("digits-t2i"))
    assert _cli.pipeline_image_format(zoo.model_path("digits-t2i")) == (size, mode)


# ---------------------------------------------------------------------------------------------- threads
def test_shipped_models_run_on_one_thread_by_default(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    _cli.set_threads(None, ["digits-class"])
    _cli.set_threads(None, [zoo.model_path("digits-t2i"), "digits-classifier"])
    _cli.set_threads(3, ["digits-class"])
    assert calls == [1, 1, 3]
    _cli.set_threads(None, ["digits-class", "someone/big-model"])
    _cli.set_threads(None, [tmp_path])
    _cli.set_threads(None, [])
    assert calls == [1, 1, 3]
