"""What a person sees of diffguide-evaluate: the plot of a grid, the plot of an --images run, file permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest
from PIL import Image

from diffguide.scripts import evaluate
from diffguide.tasks.run_folder import atomic_write, write_json


def rows(kid_values):
    """Result rows of a 2-method grid (the values only matter for the KID note)."""
    out = []
    for method, scales in (("cfg", (1.0, 2.0, 3.0)), ("apg(eta=0)", (2.0, 4.0))):
        for k, scale in enumerate(scales):
            out.append({"model": "digits-class", "method": method, "guide": method[:3], "params": {},
                        "scale": scale, "nfe": 2.0 * 5, "num_images": 20, "steps": 5, "seed": 0,
                        "fid": 10.0 - scale, "kid": kid_values[k], "accuracy": 0.5 + 0.1 * scale})
    return out


def test_grid_plot_has_title_one_legend_a_marker_per_method_and_a_kid_note():
    fig = evaluate.rows_figure(rows([0.5, -0.2, 0.1]))
    assert fig._suptitle.get_text() == "digits-class: 20 images per point, 5 sampling steps (the model's own scheduler), seed 0"
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["cfg", "apg(eta=0)"]
    for ax in fig.axes:
        markers = [line.get_marker() for line in ax.get_lines() if line.get_label() in ("cfg", "apg(eta=0)")]
        assert len(set(markers)) == 2
    titles = {ax.get_ylabel(): ax.get_title() for ax in fig.axes}
    assert "KID < 0" in titles["kid"] and titles["fid"] == ""
    assert "KID < 0" not in evaluate.rows_figure(rows([0.5, 0.2, 0.1])).axes[1].get_title()


def test_points_are_labelled_with_their_scale_off_the_scale_axis():
    fig = evaluate.rows_figure(rows([0.1, 0.2, 0.3]), x="fid")
    labels = sorted(t.get_text() for t in fig.axes[0].texts)
    assert labels == sorted(["1", "2", "3", "2", "4"])
    assert "scale" in fig.axes[0].get_xlabel()


def test_images_run_writes_its_plot_and_files_keep_the_umask(tmp_path, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(6):
        Image.new("L", (16, 16), 30 * i).save(folder / f"{i:03d}.png")
    out = tmp_path / "out"
    old = os.umask(0o002)
    try:
        evaluate.main(["--images", str(folder), "--metrics", "fid", "kid", "--kid-subset-size", "3", "--out",
                       str(out), "--stats-dir", str(tmp_path / "stats"), "--no-progress"])
    finally:
        os.umask(old)
    assert "plot.png" in capsys.readouterr().err
    assert Image.open(out / "plot.png").size[0] > 300
    assert json.loads((out / "results.json").read_text())[0]["num_images"] == 6
    for name in ("plot.png", "results.json", "results.csv"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o664      # 0o666 less the umask, not 0o600


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        atomic_write(tmp_path / "b.txt", lambda tmp: tmp.write_text("b"))
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("c")
    finally:
        os.umask(old)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == plain
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == plain


def test_rectified_flow_model_is_evaluated_out_of_the_box(tmp_path):
    """diffguide-evaluate on digits-flow (SD3 pipeline, flow-matching scheduler) with a guide that skips rows."""
    out = tmp_path / "runs"
    evaluate.main(["--model", "digits-flow", "--guide", "cfg@2", "--guide", "ag@2:threshold=0.9", "--num-images", "10",
                   "--steps", "4", "--metrics", "accuracy", "--out", str(out), "--no-progress"])
    results = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert results["cfg"]["nfe"] == 8.0                       # [uncond; cond] rows at each of 4 steps
    assert results["ag(threshold=0.9)"]["nfe"] < 8.0          # adaptive guidance skips unconditional rows
    assert results["cfg"]["accuracy"] >= 0.5                  # the classifier reads the prompted digits
