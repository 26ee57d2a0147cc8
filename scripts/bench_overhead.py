"""Overhead of ``guidance.apply`` on a StableDiffusionPipeline: wall-time and network-row ratios vs native CFG.

Runs native CFG and the hooked guides interleaved (round-robin, same seeds) on an offline pipeline with random
weights, and reports median time ratios and the rows the UNet really evaluates (counted at its ``conv_in``).
Writes the ``overhead`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from diffguide import guidance  # noqa: E402
from diffguide.scripts._bench_md import write_section  # noqa: E402
from tiny_pipes import tiny_sd  # noqa: E402


def bench_pipe() -> StableDiffusionPipeline:
    """The tiny offline pipeline with a UNet large enough that the network, not Python, dominates a step."""
    pipe = tiny_sd()
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8).eval()
    pipe.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return pipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    pipe = bench_pipe()
    net_rows: list[int] = []
    # count at conv_in, which every UNet pass goes through: a hook on the UNet itself sees only the pipeline's
    # [uncond; cond] input, since the hooked forward calls the original forward directly
    pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: net_rows.append(a[0].shape[0]))
    kw = dict(prompt=["a handwritten digit"] * args.batch, height=64, width=64, num_inference_steps=args.steps,
              output_type="latent")
    guides = {"CFG(7.5)": guidance.CFG(7.5), "APG(7.5)": guidance.APG(7.5, norm_threshold=5.0),
              "CFG++(0.6)": guidance.CFGPlusPlus(0.6)}
    times: dict[str, list[float]] = {name: [] for name in ["native", *guides]}
    rows: dict[str, int] = {}

    def run(name: str) -> None:
        net_rows.clear()
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        if name == "native":
            pipe(guidance_scale=7.5, generator=gen, **kw)
        else:
            with guidance.apply(pipe, guides[name]):
                pipe(generator=gen, **kw)
        times[name].append(time.perf_counter() - start)
        rows[name] = sum(net_rows)

    for name in times:  # warm-up
        run(name)
        times[name].clear()
    names = list(times)
    for r in range(args.repeats):  # rotate the order each round so no run always follows another
        for name in names[r % len(names):] + names[: r % len(names)]:
            run(name)
    base = statistics.median(times["native"])
    lines = ["Written by `scripts/bench_overhead.py`: offline StableDiffusionPipeline (random weights, UNet "
             f"(64, 128) channels, 32x32 latents), batch {args.batch}, {args.steps} DDIM steps, median of "
             f"{args.repeats} interleaved runs.", "",
             "| run | wall-time ratio vs native CFG | UNet rows | rows ratio |", "|---|---|---|---|"]
    for name in times:
        ratio = statistics.median(times[name]) / base
        lines.append(f"| {name if name != 'native' else 'native CFG (guidance_scale=7.5)'} | {ratio:.3f} | "
                     f"{rows[name]} | {rows[name] / rows['native']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("overhead", "## Hook overhead\n\n" + text)


if __name__ == "__main__":
    main()
