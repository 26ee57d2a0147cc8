"""One installed namespace: the wheel holds only ``diffguide/...`` and the zoo; a non-editable install works."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("guidance", "samplers", "tasks", "scripts")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy of the tracked files: setuptools builds in the source tree (build/)
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    # --no-build-isolation: build with the setuptools already installed
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source)], check=True, capture_output=True, text=True, cwd=out)
    (path,) = out.glob("diffguide-*.whl")
    return path


def test_wheel_installs_one_name_and_the_zoo(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"diffguide"}, tops
    modules = [n for n in names if n.endswith(".py")]
    assert "diffguide/__init__.py" in modules and "diffguide/guidance/hook.py" in modules
    assert "diffguide/tests/conftest.py" not in names
    assert not [n for n in names if "/bench" in n or n.endswith("support_matrix.py")], "benchmarks are not installed"
    for model in ("digits-class", "digits-class-weak", "digits-t2i", "digits-classifier", "digits-clip"):
        assert any(n.startswith(f"diffguide/tasks/zoo/{model}/") and n.endswith(".safetensors") for n in names), model
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["diffguide"]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "diffguide.scripts.sample:main" in entry_points and "= scripts." not in entry_points


def test_non_editable_install_samples_from_another_folder(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin") == [
        "diffguide"]
    code = (
        "import sys, torch\n"
        f"assert not any(p and {str(ROOT)!r} == p.rstrip('/') for p in sys.path)\n"
        "import diffguide as dg\n"
        f"assert dg.__file__.startswith({str(target)!r}), dg.__file__\n"
        "for name in " + repr(GENERIC) + ":\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError(name + ' is importable')\n"
        "from diffguide import guidance\n"
        "pipe = dg.zoo.load('digits-class')\n"
        "with guidance.apply(pipe, guidance.CFG(2.0)):\n"
        "    out = pipe(class_labels=[3], num_inference_steps=2, generator=torch.Generator().manual_seed(0),\n"
        "               output_type='np')\n"
        "print(out.images.shape)\n"
    )
    # the torch stack comes from the running environment; the editable install of this checkout is hidden by
    # running with -S (no site hooks) and putting the target and the plain site-packages folders on the path
    import site
    paths = [str(target)] + [p for p in site.getsitepackages()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(paths)
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "(1, 16, 16, 1)"
