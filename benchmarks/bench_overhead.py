"""Overhead of ``guidance.apply``: wall-time, CPU-time and network-row ratios vs each pipeline's native CFG.

For a StableDiffusionPipeline (batched ``[uncond; cond]`` UNet), a StableDiffusion3Pipeline (batched transformer,
flow matching) and a FluxPipeline (true CFG: two transformer calls per step), and the derived SD img2img (strength
0.6), inpaint (9-channel UNet) and ControlNet pipelines (``--zoo``: those three only, printed), runs native CFG and
the hooked guides interleaved (round-robin, same seeds) on offline pipelines with random weights, and reports
paired time ratios, the CPU time spent outside the network beyond native's, and the rows the network really
evaluates (counted at its first layer). Writes the ``overhead`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers import (DDIMScheduler, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusionPipeline,
                       UNet2DConditionModel)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from diffguide import guidance  # noqa: E402
from common import write_section  # noqa: E402
from tiny_pipes import embeds, tiny_flux, tiny_sd, tiny_sd3  # noqa: E402


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


def bench_sd3():
    pipe = tiny_sd3()
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=4,
                                             attention_head_dim=32, num_attention_heads=4, caption_projection_dim=128,
                                             joint_attention_dim=16, pooled_projection_dim=16, out_channels=4).eval()
    return pipe


def bench_flux():
    pipe = tiny_flux()
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4,
                                              attention_head_dim=32, num_attention_heads=4, joint_attention_dim=16,
                                              pooled_projection_dim=16, axes_dims_rope=[8, 12, 12]).eval()
    return pipe


def bench_zoo(kind: str):
    """SD img2img / inpaint / ControlNet on bench_pipe's components (UNet (64, 128); inpaint: 9 input channels)."""
    from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline,
                           StableDiffusionInpaintPipeline)

    parts = bench_pipe().components
    torch.manual_seed(0)
    common = dict(block_out_channels=(64, 128), layers_per_block=1, in_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=16, norm_num_groups=8,
                  attention_head_dim=8)
    if kind == "img2img":
        pipe = StableDiffusionImg2ImgPipeline(**parts)
    elif kind == "inpaint":
        unet = UNet2DConditionModel(**dict(common, in_channels=9), sample_size=32, out_channels=4,
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()
        pipe = StableDiffusionInpaintPipeline(**dict(parts, unet=unet))
    else:
        controlnet = ControlNetModel(**common, conditioning_embedding_out_channels=(16, 32)).eval()
        pipe = StableDiffusionControlNetPipeline(**parts, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def zoo_setups(batch: int) -> list[tuple[str, Callable, str, dict, dict, dict[str, guidance.Guidance]]]:
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(batch, 3, 64, 64, generator=gen)
    mask = torch.zeros(batch, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1.0
    kw = dict(prompt=["a handwritten digit"] * batch, height=64, width=64)
    cfg = lambda: {"CFG(7.5)": guidance.CFG(7.5)}  # noqa: E731
    return [
        ("StableDiffusionImg2ImgPipeline (UNet (64, 128), 32x32 latents, DDIM, strength 0.6)",
         lambda: bench_zoo("img2img"), "conv_in", dict(kw, image=image, strength=0.6), dict(guidance_scale=7.5),
         cfg()),
        ("StableDiffusionInpaintPipeline (9-channel UNet (64, 128), 32x32 latents, DDIM)",
         lambda: bench_zoo("inpaint"), "conv_in", dict(kw, image=image, mask_image=mask), dict(guidance_scale=7.5),
         cfg()),
        ("StableDiffusionControlNetPipeline (UNet and ControlNet (64, 128), 32x32 latents, DDIM)",
         lambda: bench_zoo("controlnet"), "conv_in", dict(kw, image=image), dict(guidance_scale=7.5), cfg()),
    ]


def _batch(kw: dict, batch: int) -> dict:
    return {k: v.repeat(batch, *[1] * (v.ndim - 1)) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def setups(batch: int) -> list[tuple[str, Callable, str, dict, dict, dict[str, guidance.Guidance]]]:
    """(pipeline, builder, first layer, call arguments, native CFG arguments, guides)."""
    sd_kw = dict(prompt=["a handwritten digit"] * batch, height=64, width=64)
    sd_guides = {"CFG(7.5)": guidance.CFG(7.5), "APG(7.5)": guidance.APG(7.5, norm_threshold=5.0),
                 "CFG++(0.6)": guidance.CFGPlusPlus(0.6)}
    flow_kw = {name: dict(_batch(embeds(name, 1), batch), height=32, width=32) for name in ("sd3", "flux")}
    return [
        ("StableDiffusionPipeline (UNet (64, 128), 32x32 latents, DDIM)", bench_pipe, "conv_in", sd_kw,
         dict(guidance_scale=7.5), sd_guides),
        ("StableDiffusion3Pipeline (4 joint blocks, width 128, 16x16 tokens, FlowMatchEuler)", bench_sd3,
         "pos_embed", flow_kw["sd3"], dict(guidance_scale=7.5),
         {"CFG(7.5)": guidance.CFG(7.5), "APG(7.5)": guidance.APG(7.5, norm_threshold=5.0)}),
        ("FluxPipeline true CFG (2 + 4 blocks, width 128, 16x16 tokens, FlowMatchEuler)", bench_flux, "x_embedder",
         flow_kw["flux"], dict(true_cfg_scale=4.0),
         {"CFG(4)": guidance.CFG(4.0), "CFGZeroStar(4)": guidance.CFGZeroStar(4.0, zero_init_steps=1)}),
    ]


def measure(make, layer: str, kw: dict, native_kw: dict, guides: dict, steps: int, repeats: int):
    pipe = make()
    net = pipe.unet if layer == "conv_in" else pipe.transformer
    net_rows: list[int] = []
    # count at the first layer every pass goes through: a hook on the network itself sees only the pipeline's
    # input, since the hooked forward calls the original forward directly
    # CPU time inside the network: from its first layer to the end of its forward (apply's own work before the first
    # layer and after the network returns counts as outside)
    inside = {"start": 0.0, "total": 0.0}

    def first_layer(module, args) -> None:
        net_rows.append(args[0].shape[0])
        inside["start"] = time.thread_time()

    def network_done(module, args, output) -> None:
        inside["total"] += time.thread_time() - inside["start"]

    getattr(net, layer).register_forward_pre_hook(first_layer)
    net.register_forward_hook(network_done)
    kw = dict(kw, num_inference_steps=steps, output_type="latent")
    times: dict[str, list[float]] = {name: [] for name in ["native", *guides]}
    cpu: dict[str, list[float]] = {name: [] for name in times}
    outside: dict[str, list[float]] = {name: [] for name in times}
    rows: dict[str, int] = {}

    def run(name: str) -> None:
        net_rows.clear()
        inside["total"] = 0.0
        gen = torch.Generator().manual_seed(0)
        start, start_cpu = time.perf_counter(), time.thread_time()
        if name == "native":
            pipe(generator=gen, **native_kw, **kw)
        else:
            with guidance.apply(pipe, guides[name]):
                pipe(generator=gen, **kw)
        times[name].append(time.perf_counter() - start)
        cpu[name].append(time.thread_time() - start_cpu)
        outside[name].append(cpu[name][-1] - inside["total"])
        rows[name] = sum(net_rows)

    for name in times:  # warm-up
        run(name)
        times[name].clear()
        cpu[name].clear()
        outside[name].clear()
    names = list(times)
    for r in range(repeats):  # rotate the order each round so no run always follows another
        for name in names[r % len(names):] + names[: r % len(names)]:
            run(name)
    native_name = "native CFG (" + ", ".join(f"{k}={v:g}" for k, v in native_kw.items()) + ")"

    def paired(series: dict[str, list[float]], name: str) -> float:
        """Median over rounds of the run's time / the native time of the same round (drift cancels)."""
        return statistics.median(a / b for a, b in zip(series[name], series["native"]))

    def extra_outside(name: str) -> float:
        """Median over rounds of (CPU time outside the network, minus native's) / native's total CPU time."""
        return statistics.median((o - o_native) / c_native for o, o_native, c_native
                                 in zip(outside[name], outside["native"], cpu["native"]))

    return [(native_name if name == "native" else name, paired(times, name), paired(cpu, name),
             extra_outside(name), rows[name], rows[name] / rows["native"]) for name in times]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=_positive, default=7)
    parser.add_argument("--steps", type=_positive, default=20)
    parser.add_argument("--batch", type=_positive, default=4)
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    parser.add_argument("--zoo", action="store_true", help="only the img2img, inpaint and ControlNet rows (printed, "
                        "not written)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["Written by `benchmarks/bench_overhead.py`: offline pipelines with random weights, batch "
             f"{args.batch}, {args.steps} steps, one torch thread, {args.repeats} interleaved rounds (native and "
             "hooked side by side in one process, order rotated each round); a ratio is the median over rounds "
             "of the run's time over the native time of the same round. Rows are counted at the "
             "network's first layer, so skipped rows and calls show. The CPU time outside the network (from its "
             "first layer to its return counts as inside) is what apply and the guide add beyond the network: its "
             "excess over native's, as a share of native's whole CPU time, is the least noisy measure of the "
             "overhead.", "",
             "| pipeline | run | wall-time ratio vs native CFG | CPU-time ratio | extra CPU outside the network | "
             "network rows | rows ratio |",
             "|---|---|---|---|---|---|---|"]
    chosen = zoo_setups(args.batch) if args.zoo else setups(args.batch) + zoo_setups(args.batch)
    for title, make, layer, kw, native_kw, guides in chosen:
        for name, ratio, cpu_ratio, extra, rows, rows_ratio in measure(make, layer, kw, native_kw, guides,
                                                                        args.steps, args.repeats):
            lines.append(f"| {title} | {name} | {ratio:.3f} | {cpu_ratio:.3f} | {extra:+.2%} | {rows} | "
                         f"{rows_ratio:.2f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write and not args.zoo:  # --zoo is a quick look: the full run writes those rows too
        write_section("overhead", "## Hook overhead\n\n" + text)


if __name__ == "__main__":
    main()
