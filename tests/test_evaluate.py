"""Evaluation runs as a user runs them: real subprocesses, 1 vs 2 processes, a kill and a restart."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image

from diffguide.scripts import evaluate
from diffguide.tasks.classifier import DigitClassifier
from diffguide.tasks.evaluation import blocks, image_labels
from diffguide.tasks.pipelines import ClassConditionalPipeline
from diffguide.tasks.run_folder import RunFolder, image_seed, to_pil

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES, STEPS, BATCH = 23, 40, 3          # 23: uneven shards over 2 processes (4 + 4 blocks, 12 + 11 images)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=11)
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="trailing")
    ClassConditionalPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "pipe")
    DigitClassifier(channels=(4, 8), feature_dim=8).save_pretrained(root / "classifier")
    return root


def arguments(assets, out):
    return ["--model", str(assets / "pipe"), "--classifier", str(assets / "classifier"), "--guide", "cfg@2",
            "--num-images", str(NUM_IMAGES), "--steps", str(STEPS), "--batch-size", str(BATCH),
            "--metrics", "fid", "kid", "accuracy", "--kid-subset-size", "10", "--stats-dir", str(assets / "stats"),
            "--out", str(out), "--no-progress"]


def command(assets, out, nproc=1):
    args = arguments(assets, out)
    if nproc == 1:
        return [sys.executable, "-m", "diffguide.scripts.evaluate", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "diffguide.scripts.evaluate", *args]


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((Path(cmd[cmd.index("--out") + 1]) / "results.json").read_text())


def image_bytes(out):
    folder = out / "pipe" / "cfg" / "scale-2" / "images"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def run_here(argv):
    """The same command in this process (it is already warm: no import time)."""
    return evaluate.run(argv)


@pytest.fixture(scope="module")
def reference(assets):
    out = assets / "one-process"
    return run_here(arguments(assets, out))[0], image_bytes(out)


def test_seeds_and_blocks_do_not_depend_on_batching():
    assert image_seed(0, 5) == image_seed(0, 5) != image_seed(1, 4)
    assert blocks([0, 1, 5, 6, 7, 9], 4) == [[0, 1], [5, 6, 7], [9]]
    assert image_labels(range(12)) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_one_process_run(reference):
    row, images = reference
    assert sorted(images) == [f"{i:06d}.png" for i in range(NUM_IMAGES)]
    assert row["nfe"] == 2 * STEPS and row["sampled_now"] == NUM_IMAGES
    assert row["fid"] > 0 and 0 <= row["accuracy"] <= 1


@pytest.mark.slow
def test_two_processes_give_the_one_process_metrics(assets, reference):
    out = assets / "two-processes"
    row = run(command(assets, out, nproc=2))[0]
    assert row["sampled_now"] == NUM_IMAGES                     # no padding duplicates
    assert image_bytes(out) == reference[1]
    for key in ("fid", "kid", "accuracy"):
        assert row[key] == pytest.approx(reference[0][key], rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(assets, reference):
    out = assets / "killed"
    images = out / "pipe" / "cfg" / "scale-2" / "images"
    proc = subprocess.Popen(command(assets, out), cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (images.is_dir() and any(images.glob("0*.png"))):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before writing images"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(images.glob("0*.png")))
    assert 0 < written < NUM_IMAGES
    row = run_here(arguments(assets, out))[0]
    assert row["sampled_now"] == NUM_IMAGES - written             # continues, samples nothing twice
    assert image_bytes(out) == reference[1]
    assert {k: row[k] for k in ("fid", "kid", "accuracy")} == {k: reference[0][k] for k in ("fid", "kid", "accuracy")}


def test_other_configuration_is_refused(assets, reference, tmp_path):
    argv = arguments(assets, assets / "one-process")
    argv[argv.index("--steps") + 1] = str(STEPS + 1)
    with pytest.raises(SystemExit, match=r"another configuration \(differs in: steps\)"):
        run_here(argv)
    real_folder = Path(reference[0]["folder"]) / "images"           # not a digits-* set: Inception features
    with pytest.raises(SystemExit, match="error: .*(torch-fidelity|Inception)"):
        run_here(["--images", str(real_folder), "--real", str(real_folder), "--metrics", "fid", "--out",
                  str(tmp_path / "inception")])
    with pytest.raises(SystemExit) as usage:                       # refused by the command line (exit 2)
        run_here([*arguments(assets, tmp_path / "bad-real"), "--real", "imagenet", "--feature", "digits"])
    assert usage.value.code == 2
    folder = RunFolder(tmp_path, {"steps": 3})
    folder.claim()
    with pytest.raises(ValueError, match="differs in: steps"):
        RunFolder(tmp_path, {"steps": 4}).check()


def test_diverged_images_are_not_saved(tmp_path):
    folder = RunFolder(tmp_path, {"steps": 3})
    folder.claim()
    image = torch.rand(1, 16, 16)
    image[0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="image 3 holds NaN or inf"):
        folder.write_image(3, image)
    assert folder.existing() == set() and not list(folder.images.iterdir())
    with pytest.raises(ValueError, match="NaN or inf"):
        to_pil(torch.full((3, 4, 4), float("inf")))


def test_real_folder_of_another_size_is_refused(assets, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    for i, size in enumerate((16, 16, 8)):                         # mixed sizes: one is not 16x16
        Image.new("L", (size, size), 40 * i).save(real / f"{i}.png")
    argv = [*arguments(assets, tmp_path / "out"), "--real", str(real), "--feature", "digits",
            "--stats-dir", str(tmp_path / "stats")]
    with pytest.raises(SystemExit, match=r"error: real image .*2\.png is 8x8, the generated images are 16x16"):
        run_here(argv)
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(real / f"{i}.png")
    with pytest.raises(SystemExit, match="is 8x8, the generated images are 16x16"):
        run_here(argv)
    assert not (tmp_path / "stats").exists()                      # nothing cached under the 16px tag


def test_nfe_of_an_adaptive_guide_is_the_mean_over_all_images(assets, tmp_path):
    pipe = ClassConditionalPipeline.from_pretrained(assets / "pipe")
    with torch.no_grad():                                      # a class that matters: AG stops at different steps
        pipe.unet.class_embedding.weight.mul_(100)
    pipe.save_pretrained(tmp_path / "pipe")
    argv = ["--model", str(tmp_path / "pipe"), "--classifier", str(assets / "classifier"), "--guide",
            "ag@2:threshold=0.99", "--num-images", "12", "--steps", "10", "--metrics", "accuracy", "--no-progress"]
    results = {batch: run_here([*argv, "--batch-size", str(batch), "--out", str(tmp_path / f"batch-{batch}")])[0]
               for batch in (1, 5)}
    assert results[1]["nfe"] == results[5]["nfe"]
    rows = {batch: [RunFolder(row["folder"], {}).network_rows(i) for i in range(12)] for batch, row in results.items()}
    assert rows[1] == rows[5] and results[1]["nfe"] == sum(rows[1]) / 12
    assert sum(rows[1][:5]) / 5 != sum(rows[1]) / 12 != rows[1][0]    # not the first block's rows (batch 5 or 1)
    images = Path(results[5]["folder"]) / "images"
    for i in (3, 4, 5, 6, 11):                                    # resume with another batch size
        (images / f"{i:06d}.png").unlink()
    resumed = run_here([*argv, "--batch-size", "3", "--out", str(tmp_path / "batch-5")])[0]
    assert resumed["sampled_now"] == 5 and resumed["nfe"] == sum(rows[1]) / 12


def test_image_folder_scores_like_the_grid(assets, reference):
    row, _ = reference
    images = Path(row["folder"]) / "images"                       # has metadata.jsonl with the labels
    argv = ["--images", str(images), "--classifier", str(assets / "classifier"), "--metrics", "fid", "kid",
            "accuracy", "--kid-subset-size", "10", "--stats-dir", str(assets / "stats"),
            "--out", str(assets / "folder-eval"), "--no-progress"]
    result = run_here(argv)[0]
    assert result["num_images"] == NUM_IMAGES
    assert {k: result[k] for k in ("fid", "kid", "accuracy")} == {k: row[k] for k in ("fid", "kid", "accuracy")}


def test_text_to_image_grid_with_clip_score(assets, tmp_path):
    import json as _json

    import open_clip
    from safetensors.torch import save_file

    from tiny_pipes import tiny_sd

    tiny_sd().save_pretrained(tmp_path / "sd")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16,
                                              "patch_size": 4},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "eval-tiny-clip.json").write_text(_json.dumps(config))
    open_clip.add_model_config(tmp_path / "eval-tiny-clip.json")
    torch.manual_seed(0)
    save_file(open_clip.create_model("eval-tiny-clip").state_dict(), tmp_path / "clip.safetensors")
    argv = ["--model", str(tmp_path / "sd"), "--guide", "cfg@1", "--guide", "cfgpp@0.5", "--num-images", "12",
            "--steps", "4", "--batch-size", "8", "--classifier", str(assets / "classifier"), "--clip",
            "eval-tiny-clip", "--clip-pretrained", str(tmp_path / "clip.safetensors"), "--stats-dir", str(assets / "stats"), "--kid-subset-size", "5",
            "--out", str(tmp_path / "out"), "--plot-x", "nfe", "--no-progress"]
    rows = run_here(argv)
    assert [(r["method"], r["nfe"]) for r in rows] == [("cfg", 4.0), ("cfgpp", 8.0)]
    assert all(set(r) >= {"fid", "kid", "accuracy", "clip_score"} for r in rows)
    meta = (Path(rows[0]["folder"]) / "images" / "metadata.jsonl").read_text().splitlines()
    assert _json.loads(meta[1]) == {"file_name": "000001.png", "label": 1,
                                                           "text": "a handwritten digit one"}
    assert (tmp_path / "out" / "plot.png").stat().st_size > 0
    assert (tmp_path / "out" / "results.csv").read_text().startswith("model,method,guide")


def test_batch_size_is_not_part_of_the_result(assets, reference):
    argv = arguments(assets, assets / "other-batch")
    argv[argv.index("--batch-size") + 1] = "5"
    row = run_here(argv)[0]
    for key in ("fid", "kid", "accuracy"):                       # same seeds per image; float noise at most
        assert row[key] == pytest.approx(reference[0][key], rel=1e-2, abs=1e-6)


def copy_run(reference, out):
    """A copy of the reference run's output folder (its run folder under ``out/pipe/cfg/scale-2``)."""
    source = Path(reference[0]["folder"]).parents[2]
    shutil.copytree(source, out)
    return out / "pipe" / "cfg" / "scale-2"


def test_damaged_images_are_found_named_and_resampled(assets, reference, tmp_path):
    folder = copy_run(reference, tmp_path / "damaged")
    truncated, garbage, empty = (folder / "images" / f"{i:06d}.png" for i in (5, 13, 22))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage.write_bytes(b"not a png")
    empty.write_bytes(b"")
    with pytest.warns(UserWarning, match=r"re-sampling 3 damaged image\(s\).*000005.png, 000013.png, 000022.png"):
        row = run_here(arguments(assets, tmp_path / "damaged"))[0]
    assert row["sampled_now"] == 3
    assert image_bytes(tmp_path / "damaged") == reference[1]            # the same images as the first run
    assert {k: row[k] for k in ("fid", "kid", "accuracy")} == {k: reference[0][k] for k in ("fid", "kid", "accuracy")}


def test_folder_without_config_json_is_refused_for_another_configuration(assets, reference, tmp_path):
    folder = copy_run(reference, tmp_path / "no-config")
    (folder / "config.json").unlink()
    before = image_bytes(tmp_path / "no-config")
    argv = arguments(assets, tmp_path / "no-config")
    other = list(argv)
    other[other.index("--steps") + 1] = str(STEPS // 2)                  # the issue's --steps 5 after 10 steps
    with pytest.raises(SystemExit, match=r"config.json is missing\) holds 23 image\(s\) not made by this "
                                         r"configuration, e.g. .*000000.png"):
        run_here(other)
    assert not (folder / "config.json").exists() and image_bytes(tmp_path / "no-config") == before
    row = run_here(argv)[0]                                            # its own configuration: recognised
    assert row["sampled_now"] == 0 and (folder / "config.json").exists()
    assert {k: row[k] for k in ("fid", "kid", "accuracy")} == {k: reference[0][k] for k in ("fid", "kid", "accuracy")}
