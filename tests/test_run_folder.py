"""RunFolder integrity on its own: every image carries the hash of the configuration that made it."""

import json

import pytest
import torch
from PIL import Image

from diffguide.tasks.run_folder import CONFIG_KEY, RunFolder, image_config, load_image


def folder_with_images(root, config, indices=(0, 1, 2)):
    folder = RunFolder(root, config)
    folder.claim()
    for i in indices:
        folder.write_image(i, torch.full((1, 4, 4), i / 4), network_rows=2)
    return folder


def test_images_carry_the_configuration_hash(tmp_path):
    folder = folder_with_images(tmp_path, {"steps": 3})
    stored = json.loads((tmp_path / "config.json").read_text())["hash"]
    assert image_config(folder.image_path(1)) == folder.hash == stored
    assert folder.network_rows(1) == 2
    assert torch.equal(load_image(folder.image_path(2)), torch.full((1, 4, 4), 128 / 255))   # 8 bits: round(0.5 * 255)


def test_identity_survives_a_deleted_config_json(tmp_path):
    folder_with_images(tmp_path, {"steps": 10})
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config.json is missing\) holds 3 image\(s\) not made by this configuration, "
                                         r"e.g. .*000000.png"):
        RunFolder(tmp_path, {"steps": 5}).claim()
    assert not (tmp_path / "config.json").exists()                  # nothing written for the wrong configuration
    same = RunFolder(tmp_path, {"steps": 10})
    assert same.claim() == [] and same.check() and same.existing() == {0, 1, 2}


def test_a_foreign_image_is_refused_by_name_even_with_config_json(tmp_path):
    other = folder_with_images(tmp_path / "other", {"steps": 5}, indices=(4,))
    folder = folder_with_images(tmp_path / "run", {"steps": 10})
    other.image_path(4).rename(folder.image_path(4))
    with pytest.raises(ValueError, match=r"holds 1 image\(s\) not made by this configuration, e.g. .*000004.png"):
        folder.claim()


def test_images_without_a_hash_need_the_matching_config_json(tmp_path):
    folder = folder_with_images(tmp_path, {"steps": 10}, indices=())
    Image.new("L", (4, 4), 7).save(folder.image_path(0))           # an image written before hashes were stored
    assert image_config(folder.image_path(0)) is None
    assert folder.claim() == [] and folder.missing(2) == [1]
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json is missing"):
        RunFolder(tmp_path, {"steps": 10}).claim()


def test_damaged_images_are_removed_and_returned(tmp_path):
    folder = folder_with_images(tmp_path, {"steps": 3}, indices=range(4))
    data = folder.image_path(1).read_bytes()
    folder.image_path(1).write_bytes(data[: len(data) - 20])       # truncated inside its last chunks
    folder.image_path(3).write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot read image .*000001.png"):
        load_image(folder.image_path(1))
    assert folder.claim() == [folder.image_path(1), folder.image_path(3)]
    assert folder.missing(4) == [1, 3]


def test_unreadable_config_json_and_rewritten_files(tmp_path):
    folder = folder_with_images(tmp_path, {"steps": 3}, indices=(0, 1))
    state = folder.files_state([0, 1])
    folder.write_image(1, torch.zeros(1, 4, 4))
    assert folder.files_state([0, 1]) != state                       # a metrics cache keyed on it is invalidated
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is unreadable"):
        folder.claim()
    assert CONFIG_KEY.startswith("diffguide:")
