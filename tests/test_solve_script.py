"""``tasks.inverse`` and ``diffguide-solve`` end to end on a tiny random class-conditional pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image

from diffguide.scripts import solve
from diffguide.tasks import inverse
from diffguide.tasks.digits import load_digits_tensors
from diffguide.tasks.pipelines import ClassConditionalPipeline


@pytest.fixture(scope="module")
def tiny_class_pipe(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11)
    pipe = ClassConditionalPipeline(unet, DDIMScheduler(clip_sample=False))
    folder = tmp_path_factory.mktemp("tiny-class")
    pipe.save_pretrained(folder)
    return folder


def test_solve_pixel_counts_and_scores(tiny_class_pipe):
    pipe = ClassConditionalPipeline.from_pretrained(tiny_class_pipe)
    pipe.unet.requires_grad_(False)
    truth = inverse.held_out_digits([0, 1])
    op = inverse.make_task("inpaint_box", sigma_y=0.0, seed=0)
    y = op.measure(truth)
    recon, stats = inverse.solve_pixel(pipe, op, y, "mcg", steps=4, scale=0.5, particles=2)
    assert recon.shape == (4, 1, 16, 16) and stats.gradient_calls == 4 * 4
    measured = op.mask.bool().expand_as(recon)
    assert torch.allclose(recon[measured], y.repeat_interleave(2, 0)[measured].clamp(-1, 1), atol=1e-3)
    perfect = inverse.scores(truth, truth)
    assert torch.isinf(perfect["psnr"]).all() and torch.allclose(perfect["ssim"], torch.ones(2))
    with pytest.raises(ValueError, match="particles"):
        inverse.solve_pixel(pipe, op, y, "enkg", steps=2, particles=1)
    with pytest.raises(ValueError):
        inverse.make_task("nope")
    with pytest.raises(ValueError):
        inverse.held_out_digits([360])


def test_cli_writes_triptych_and_metrics(tiny_class_pipe, tmp_path):
    out = tmp_path / "res.png"
    solve.main(["--task", "sr4", "--index", "2", "--solver", "dps", "--steps", "3", "--model", str(tiny_class_pipe),
                "--out", str(out), "--zoom", "8", "--no-progress"])
    image = np.asarray(Image.open(out).convert("L"))
    assert image.shape[1] == 3 * (128 + 6) + 6           # three 128-px panels, captions under them
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["task"] == "sr4" and report["solver"] == "dps" and "pinv_psnr" in report
    images, labels = load_digits_tensors("test", size=16)
    assert report["index"] == 2 and report["digit_class"] == int(labels[2])
    truth = ((images[2, 0] + 1) * 127.5).round().numpy().repeat(8, 0).repeat(8, 1)
    found = [(y, x) for y in range(image.shape[0] - 127) for x in (6 + 2 * 134,)
             if np.abs(image[y:y + 128, x:x + 128].astype(float) - truth).max() <= 1]
    assert found                                           # the third panel is the held-out digit, magnified
    assert report["calls_per_sample"]["gradient_calls"] == 3


def test_digit_class_picks_a_digit_of_that_class(tiny_class_pipe, tmp_path):
    out = tmp_path / "c.png"
    solve.main(["--digit-class", "4", "--solver", "pinv", "--model", str(tiny_class_pipe), "--out", str(out),
                "--no-progress"])
    report = json.loads(out.with_suffix(".json").read_text())
    _, labels = load_digits_tensors("test", size=16)
    assert report["digit_class"] == 4 and report["index"] == int((labels == 4).nonzero()[0])
    solve.main(["--digit", "5", "--solver", "pinv", "--model", str(tiny_class_pipe), "--out", str(out),
                "--no-progress"])                          # the deprecated name of --index still works
    assert json.loads(out.with_suffix(".json").read_text())["index"] == 5


def test_cli_image_input_and_black_box_error(tiny_class_pipe, tmp_path):
    picture = tmp_path / "in.png"
    Image.fromarray((torch.rand(40, 30) * 255).byte().numpy()).save(picture)
    out = tmp_path / "heat.png"
    solve.main(["--task", "heat", "--image", str(picture), "--solver", "enkg", "--particles", "4", "--steps", "4",
                "--model", str(tiny_class_pipe), "--out", str(out), "--no-progress"])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["calls_per_sample"]["gradient_calls"] == 0 and len(report["psnr_per_particle"]) == 4
    with pytest.raises(SystemExit) as exit_info:          # a usage error (exit 2), found before loading the model
        solve.main(["--task", "heat", "--index", "0", "--solver", "dps", "--steps", "2", "--model",
                    str(tiny_class_pipe), "--out", str(tmp_path / "x.png"), "--no-progress"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("solver", ["p2l", "latent_dps"])
def test_cli_latent_solvers_on_the_shipped_t2i_model(solver, tmp_path):
    out = tmp_path / f"{solver}.png"
    solve.main(["--task", "inpaint_box", "--index", "5", "--solver", solver, "--steps", "4", "--device", "cpu",
                "--out", str(out), "--zoom", "1", "--no-progress"])
    assert Image.open(out).size[0] == 3 * (110 + 6) + 6     # panels at least 110 px wide for their captions
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model"] == "digits-t2i" and report["solver"] == solver
    calls = report["calls_per_sample"]
    if solver == "latent_dps":                                       # one denoiser call and one gradient per step
        assert calls["denoiser_calls"] == calls["gradient_calls"] == 4
    else:                                                            # P2L adds its prompt-tuning passes
        assert calls["denoiser_calls"] > 4 and calls["gradient_calls"] > 4
    assert 0.0 < report["psnr"] < 100.0
