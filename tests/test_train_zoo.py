"""scripts/train_zoo.py never overwrites the shipped models unless told to."""

import hashlib
import json

import pytest
import torch

from diffguide.scripts import train_zoo
from diffguide.tasks import zoo


def shipped_digest() -> str:
    """SHA-256 over every file of the shipped zoo (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in train_zoo.ZOO_DIR.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(train_zoo.ZOO_DIR)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_default_output_is_a_new_folder_and_the_shipped_zoo_is_refused(tmp_path, monkeypatch, capsys, keep_threads):
    before = shipped_digest()
    assert train_zoo.ZOO_DIR.resolve() in train_zoo.shipped_zoo_folders()
    assert zoo.ZOO_DIR.resolve() in train_zoo.shipped_zoo_folders()                 # the importable package's
    for out in (train_zoo.ZOO_DIR, train_zoo.ZOO_DIR / "digits-classifier" / "..", zoo.ZOO_DIR):
        with pytest.raises(SystemExit) as exit_info:
            train_zoo.main(["--model", "digits-classifier", "--quick", "--out", str(out), "--no-progress"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "would overwrite the shipped model" in err and "--overwrite-shipped" in err, err

    monkeypatch.chdir(tmp_path)
    train_zoo.main(["--model", "digits-classifier", "--steps", "2", "--batch-size", "8", "--no-progress"])
    written = [p.parent for p in tmp_path.glob("zoo-*/digits-classifier/training.json")]
    assert len(written) == 1, list(tmp_path.rglob("*"))
    assert json.loads((written[0] / "training.json").read_text())["steps"] == 2
    assert shipped_digest() == before
