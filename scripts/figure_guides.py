"""The README figure of what the guides do: ``docs/guides.png``.

One digit per column (class labels 0-9 for ``digits-class``, the captions "a handwritten digit zero" ... for
``digits-t2i``), one guide and scale per row, each column starting from the same noise in every row (seed
hash(seed, column)), so a row differs from another only by its guide. DDIM, 25 steps, through
``diffguide-sample``'s own sampling code.

    python scripts/figure_guides.py                      # writes docs/guides.png (a few minutes on a CPU)
    python scripts/figure_guides.py --steps 10 --out /tmp/guides.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from diffguide.scripts import sample
from diffguide.scripts._cli import HelpFormatter, check_writable, number, set_threads
from diffguide.tasks.digits import caption

ROWS = [  # (guide spec for diffguide-sample, scale, row label)
    ("none", None, "no guidance (conditional only)"),
    ("cfg", 1.5, "CFG 1.5"),
    ("cfg", 3.0, "CFG 3"),
    ("cfg", 6.0, "CFG 6"),
    ("cfgpp", 0.2, "CFG++ lam 0.2"),
    ("cfgpp", 0.6, "CFG++ lam 0.6"),
    ("apg:eta=0,norm_threshold=2", 3.0, "APG 3 (eta 0)"),
    ("apg:eta=0,norm_threshold=2", 6.0, "APG 6 (eta 0)"),
    ("cfg-rescale:phi=0.7", 6.0, "CFG-rescale 6 (phi 0.7)"),
    ("cfg-zero-star", 6.0, "CFG-Zero* 6"),
]
MODELS = ("digits-class", "digits-t2i")


def model_grid(model: str, steps: int, seed: int) -> np.ndarray:
    """``(rows, 10, H, W)`` uint8 images of ``model``: one row per entry of ``ROWS``, one column per digit."""
    from diffguide.tasks import zoo

    pipe = zoo.load(model, device="cpu")
    condition = (["--prompt", *[caption(d, 0) for d in range(10)]] if model == "digits-t2i"
                 else ["--class-labels", *map(str, range(10))])
    rows = []
    for spec, scale, _ in ROWS:
        argv = ["--model", model, *condition, "--guidance", spec, "--steps", str(steps), "--seed", str(seed),
                "--no-progress", *(["--scale", str(scale)] if scale is not None else [])]
        images, _ = sample.sample(sample.parse_args(argv), pipe)
        rows.append(np.stack([np.asarray(im.convert("L")) for im in images]))
    return np.stack(rows)


def tile(grid: np.ndarray, gap: int = 2) -> np.ndarray:
    """``(R, C, H, W)`` -> one ``(R (H + gap) - gap, C (W + gap) - gap)`` picture with white gaps
    (``torchvision.utils.make_grid``, its outer border cropped)."""
    import torch
    from einops import rearrange
    from torchvision.utils import make_grid

    cols = grid.shape[1]
    canvas = make_grid(rearrange(torch.from_numpy(grid), "r c h w -> (r c) 1 h w"), nrow=cols, padding=gap,
                       pad_value=255)
    return canvas[0, gap:-gap, gap:-gap].numpy()


def figure(grids: dict[str, np.ndarray], steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(5.2 * len(grids) + 1.6, 5.4), squeeze=False)
    for k, (ax, (model, grid)) in enumerate(zip(axes[0], grids.items())):
        height, width = grid.shape[2:]
        ax.imshow(tile(grid), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([c * (width + 2) + width / 2 - 0.5 for c in range(grid.shape[1])])
        ax.set_xticklabels([str(d) for d in range(grid.shape[1])])
        ax.set_yticks([r * (height + 2) + height / 2 - 0.5 for r in range(grid.shape[0])])
        ax.set_yticklabels([label for _, _, label in ROWS] if k == 0 else [])
        ax.tick_params(length=0)
        condition = "class label" if model == "digits-class" else 'prompt "a handwritten digit <word>"'
        ax.set_title(f"{model}  (columns: {condition})", fontsize=10)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(f"The guides on the shipped digits models: DDIM {steps} steps, the same noise in every row",
                 fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="figure_guides", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--steps", type=number(int, 5), default=25, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0, help="base seed; column c uses the seed hash(seed, c)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "guides.png",
                   help="output PNG")
    p.add_argument("--threads", type=number(int, 1), default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    check_writable(p, "--out", args.out)
    set_threads(args.threads)
    grids = {model: model_grid(model, args.steps, args.seed) for model in MODELS}
    figure(grids, args.steps, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
