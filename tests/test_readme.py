"""The README's code blocks run as pasted, and what it states about the code is what the code does.

Every fenced block of ``README.md`` and ``tasks/zoo/README.md`` is run offline on one thread in its own empty working
folder, in a process of its own forked from one that has imported torch, diffusers and diffguide, from fresh globals (so a
block that uses a name it does not define or import fails as in a fresh interpreter). A block whose first line is ``# needs: WHAT`` cannot run offline: ``hub`` blocks
are run with the hub model replaced by a tiny random-weight pipeline of the same class; blocks needing anything
else (an install, the user's own images, a long training run) are compiled (``bash -n`` for shell blocks).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = (ROOT / "README.md", ROOT / "tasks" / "zoo" / "README.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
NEEDS = re.compile(r"^# needs: (\w+)")
KNOWN_NEEDS = {"hub", "install", "data", "training"}  # hub: run on stand-ins (python) or parsed (bash)
BLOCK_TIMEOUT = 120  # seconds per block; each takes a few seconds here besides the imports


def code_blocks() -> list[tuple[str, str, str]]:
    """(id "FILE:LINE", language, code) of every fenced block."""
    blocks = []
    for readme in READMES:
        text = readme.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{readme.relative_to(ROOT)}:{line}", match.group(1), match.group(2)))
    return blocks


BLOCKS = code_blocks()


def needs(code: str) -> str | None:
    match = NEEDS.match(code)
    return match.group(1) if match else None


# The hub models of the `hub` blocks, replaced by tiny random-weight pipelines of the same class (tests/tiny_pipes).
HUB_STANDINS = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import diffusers, tiny_pipes

def standin(build, **attrs):
    def from_pretrained(cls, name, *args, torch_dtype=None, **kwargs):
        pipe = build()
        for key, value in attrs.items():
            setattr(pipe, key, value)
        return pipe.to(torch_dtype) if torch_dtype is not None else pipe
    return classmethod(from_pretrained)

def modular_sdxl(self, name, *args, **kwargs):
    diffusers.StableDiffusionXLAutoBlocks.init_pipeline = init_pipeline   # tiny_modular_sdxl calls it
    return tiny_pipes.tiny_modular_sdxl(tiny_pipes.tiny_sdxl())

diffusers.StableDiffusionPipeline.from_pretrained = standin(tiny_pipes.tiny_sd)
diffusers.FluxPipeline.from_pretrained = standin(tiny_pipes.tiny_flux_with_text_encoders, default_sample_size=4)
init_pipeline = diffusers.StableDiffusionXLAutoBlocks.init_pipeline
diffusers.StableDiffusionXLAutoBlocks.init_pipeline = modular_sdxl
diffusers.ModularPipeline.load_components = lambda self, *args, **kwargs: None   # the stand-in's weights are in
"""

# Runs the blocks one after another, each in a child forked from one interpreter that has imported torch and
# diffusers (paid once): every block starts from fresh globals (it must import what it uses) and the state of
# one block (seeds, patches, threads) never reaches the next.
RUNNER = """
import json, os, signal, sys, time, traceback
import torch, diffusers, transformers
import diffguide.guidance, diffguide.samplers, diffguide.tasks.zoo
blocks, results = json.load(open(sys.argv[1])), {}
for block_id, code, prelude, cwd in blocks:
    read, write = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.chdir(cwd)
        signal.alarm(int(sys.argv[3]))
        status, message = 0, b""
        try:
            exec(compile(prelude, "stand-ins", "exec"), {"__name__": "standins"})
            exec(compile(code, block_id, "exec"), {"__name__": "__main__"})
        except BaseException:
            status, message = 1, traceback.format_exc()[-6000:].encode()
        os.write(write, message)
        os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    results[block_id] = {"exit": code, "message": message or f"exit code {code}",
                         "seconds": time.perf_counter() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime}
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def block_results(tmp_path_factory) -> dict:
    """Exit status, error and seconds of every python block that runs (offline, or hub with stand-ins)."""
    folder = tmp_path_factory.mktemp("readme")
    runnable = []
    for block_id, language, code in BLOCKS:
        if language == "python" and needs(code) in (None, "hub"):
            cwd = folder / re.sub(r"\W", "_", block_id)
            cwd.mkdir()
            runnable.append((block_id, code, HUB_STANDINS if needs(code) == "hub" else "", str(cwd)))
    (folder / "blocks.json").write_text(json.dumps(runnable))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", RUNNER, str(folder / "blocks.json"), str(folder / "out.json"),
                             str(BLOCK_TIMEOUT)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((folder / "out.json").read_text())


def test_every_block_is_found_and_marked_with_a_known_need():
    fences = sum(line.startswith("```") for readme in READMES for line in readme.read_text().splitlines())
    assert fences == 2 * len(BLOCKS) and len(BLOCKS) >= 15, [block_id for block_id, _, _ in BLOCKS]
    for block_id, language, code in BLOCKS:
        assert language in ("python", "bash"), f"{block_id}: fence language {language!r}"
        assert needs(code) in KNOWN_NEEDS | {None}, f"{block_id}: unknown need {needs(code)!r}"
        if language == "bash":  # a shell block installs, trains or reads the user's files
            assert needs(code) is not None, f"{block_id}: shell block without a '# needs:' line"


@pytest.mark.parametrize("block_id,code", [(b, c) for b, lang, c in BLOCKS if lang == "python"],
                         ids=[b for b, lang, _ in BLOCKS if lang == "python"])
def test_python_block_runs_as_pasted(block_id, code, block_results):
    if needs(code) not in (None, "hub"):
        compile(code, block_id, "exec")
        return
    result = block_results[block_id]
    print(f"{block_id}: {result['seconds']:.1f} s, CPU {result['cpu_seconds']:.1f} s")
    assert result["exit"] == 0, f"{block_id} failed:\n{code}\n{result['message']}"


@pytest.mark.parametrize("block_id,code", [(b, c) for b, lang, c in BLOCKS if lang == "bash"],
                         ids=[b for b, lang, _ in BLOCKS if lang == "bash"])
def test_shell_block_parses(block_id, code):
    result = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
    assert result.returncode == 0, f"{block_id}: {result.stderr}"


def test_ci_runs_the_readme_test_command():
    """CI runs the README's "Run the tests" command (pip's ``-q`` aside)."""
    text = READMES[0].read_text()
    command = FENCE.search(text[text.index("Run the tests:"):]).group(2).splitlines()[-1]
    ci = (ROOT / ".ci" / "run").read_text().replace(" -q ", " ")
    assert command.replace(" -q ", " ") in ci, f"{command!r} is not in .ci/run"


# ------------------------------------------------------------------------------------- stated facts vs the code
def readme_units(text: str) -> list[str]:
    """Table rows and prose sentences (a fact and the model it is about sit in the same unit)."""
    text = FENCE.sub("", text)
    rows = [line for line in text.splitlines() if line.startswith("|")]
    prose = " ".join(line for line in text.splitlines() if not line.startswith("|"))
    return rows + re.split(r"(?<=[.;])\s+(?=[A-Z`])", prose)


def test_guide_names_listed_are_the_cli_registry():
    from diffguide.guidance.registry import GUIDES

    listed = re.search(r"`--guidance ([a-z|+-]+)\[", READMES[0].read_text()).group(1).split("|")
    assert set(listed) - {"none"} == set(GUIDES), f"README lists {listed}, the command line knows {list(GUIDES)}"


def test_every_command_takes_threads_and_the_count_is_right(capsys):
    import importlib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    word = re.search(r"All (\w+) take `--threads`", READMES[0].read_text()).group(1)
    numbers = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
    assert numbers[word] == len(scripts), f"README says 'All {word} take --threads'; there are {len(scripts)}: {scripts}"
    for command, target in scripts.items():
        module, function = target.split(":")
        with pytest.raises(SystemExit) as exit_info:
            getattr(importlib.import_module(module), function)(["--help"])
        assert exit_info.value.code == 0 and "--threads" in capsys.readouterr().out, command


def test_training_facts_are_the_shipped_training_json():
    """Steps and training minutes stated for a shipped model equal its ``training.json``."""
    from diffguide.tasks import zoo

    names = sorted(zoo.list_models(), key=len, reverse=True)  # digits-class-weak before digits-class
    model_name = re.compile("|".join(map(re.escape, names)))
    steps = re.compile(r"(?:trained for|after) ([\d,]+)(?: of ([\d,]+))? steps|([\d,]+) training steps")
    minutes = re.compile(r"([\d.]+) min\b")
    checked = 0
    for readme in READMES:
        for unit in readme_units(readme.read_text()):
            facts = [int(n.replace(",", "")) for match in steps.finditer(unit) for n in match.groups() if n]
            if not facts or not model_name.search(unit):
                continue
            name = model_name.search(unit).group(0)
            record = json.loads((zoo.model_path(name) / "training.json").read_text())
            counts = {value for key, value in record.items() if "steps" in key and isinstance(value, int)}
            assert set(facts) <= counts, f"{readme.relative_to(ROOT)}: {unit!r} states {facts} steps; training.json: {record}"
            for stated in minutes.findall(unit):
                decimals = len(stated.partition(".")[2])
                measured = {round(record[key] / 60, decimals) for key in ("train_seconds", "wall_seconds")}
                assert float(stated) in measured, f"{readme.relative_to(ROOT)}: {unit!r} states {stated} min; measured {measured}"
            checked += len(facts)
    assert checked >= 4  # digits-class-weak's 300 of 2,500, digits-flow's 6000 in both READMEs
