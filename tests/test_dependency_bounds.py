"""The declared dependency ranges: every lower bound is pinned in the file ``.ci/lower-bounds`` installs and tests,
and a feature that needs a newer diffusers than the one installed fails alone, with one message."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
FROM_THE_MACHINE = {"torch", "torchvision"}  # .ci/lower-bounds runs on the machine's torch and torchvision


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,<;\s]+).*", requirement)
        if match:  # an upper bound alone (setuptools<81) has nothing to prove here
            bounds[norm(match.group(1))] = match.group(2)
    return bounds


def test_every_declared_lower_bound_is_pinned_for_the_check():
    pins = {}
    for line in (ROOT / "constraints" / "lower-bounds.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[norm(name)] = version
    declared = {name: version for name, version in lower_bounds().items() if name not in FROM_THE_MACHINE}
    assert pins.keys() == declared.keys(), (sorted(pins), sorted(declared))
    for name, version in declared.items():  # "0.41" and "0.41.0" name the same release
        assert Version(pins[name]) == Version(version), f"{name}: pyproject says >={version}, the check pins {pins[name]}"


def test_ci_runs_the_lower_bounds_check():
    assert os.access(ROOT / ".ci" / "lower-bounds", os.X_OK)
    assert "constraints/lower-bounds.txt" in (ROOT / ".ci" / "lower-bounds").read_text()


def test_diffusers_without_guiders_breaks_only_the_guider_adapter():
    """diffusers < 0.36 has no ``GuiderOutput``: ``import diffguide`` and ``apply`` still work, the adapter says why."""
    code = """
import diffusers.guiders.guider_utils as guider_utils
del guider_utils.GuiderOutput                         # as in diffusers 0.35
import diffguide
from diffguide.guidance.guider_apply import is_diffusers_guider
assert not is_diffusers_guider(diffguide.CFG(2.0))    # apply's first question still has an answer
try:
    diffguide.as_diffusers_guider(diffguide.CFG(2.0), None)
except ImportError as err:
    print(err)
else:
    raise SystemExit("no error")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout.strip()
    assert "needs diffusers' guiders" in message and "diffusers >= 0.36" in message and "is installed" in message
