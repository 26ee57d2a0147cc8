"""Sample a grid of images from a diffusion pipeline with any guide: ``diffguide-sample``.

With no arguments it samples one image per digit from the shipped ``digits-class`` model with CFG and writes
``samples.png``. ``--model`` takes a shipped model name, a local folder or a hub id; ``--prompt`` drives
text-to-image models, ``--class-labels`` class-conditional ones; ``--guidance`` is a guide spec such as
``cfg``, ``apg:eta=0,norm_threshold=2`` or ``cfgpp`` with ``--scale`` its main scale.

    diffguide-sample --class-labels 3 7 --num-images 8 --guidance apg:eta=0 --scale 4 --out apg.png
    diffguide-sample --model digits-t2i --prompt "the number 8" "a handwritten digit two" --guidance cfgpp

Image i starts from the noise of seed hash(--seed, i) and images are sampled --batch-size at a time, so the
images do not depend on the batch size. The grid shows one row per prompt / class (wrapped at 10 images),
labelled, under a caption with the model, guide, scale, scheduler and steps.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from diffguide.scripts._cli import (HelpFormatter, check_device, check_guide, check_guide_fits, check_guide_name,
                                    check_pipeline, check_writable, device_name, fewest_steps, font, guides_epilog,
                                    number, one_line_warnings, set_threads, start_problem, wrap)

SCHEDULERS = {  # name -> (diffusers class name, config overrides)
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SCHEDULES = {"default": {}, **{name: {f"use_{key}_sigmas": key == name for key in ("karras", "exponential", "beta")}
                              for name in ("karras", "exponential", "beta")}}  # --schedule -> scheduler config
FLOW_SCHEDULERS = {"flow_euler"}  # for rectified-flow models (FlowMatch* scheduler configs); the others for VP ones
SPACINGS = ("auto", "leading", "trailing", "linspace")
DEFAULT_SCALES = {"cfgpp": 0.4}  # others: 2.0, good for the shipped digits models
DEFAULT_PROMPTS = ["a handwritten digit " + w for w in ("zero", "one", "two", "three", "four")]
GRID_COLUMNS = 10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffguide-sample", description=__doc__, formatter_class=HelpFormatter,
                                epilog=guides_epilog())
    p.add_argument("--model", default="digits-class", help="shipped model name, local pipeline folder or hub id")
    p.add_argument("--prompt", nargs="+", help="prompts of a text-to-image model (default: five digit captions)")
    p.add_argument("--class-labels", nargs="+", type=number(int, 0),
                   help="class labels of a class-conditional model (default: every class)")
    p.add_argument("--guidance", default="cfg", help="guide spec NAME[:KEY=VALUE,...] (names and keys below); "
                                                     "'none' for the unguided conditional model")
    p.add_argument("--scale", type=number(float), default=None,
                   help="the guide's main scale (lam for cfgpp); default 2, 0.4 for cfgpp")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="sampler (diffusers scheduler); default ddim, or flow_euler for a rectified-flow model")
    p.add_argument("--schedule", choices=list(SCHEDULES), default="default",
                   help="noise levels: the scheduler's own, or Karras / exponential / beta spaced sigmas")
    p.add_argument("--steps", type=number(int, 1), default=25, help="sampling steps")
    p.add_argument("--timestep-spacing", choices=SPACINGS, default="auto",
                   help="where the steps sit (diffusers' timestep_spacing); auto: the model's own if its first "
                        "step is at noise, else trailing. A plan whose first step is not at noise is refused")
    p.add_argument("--seed", type=int, default=0, help="base seed: image i uses the seed hash(seed, i)")
    p.add_argument("--num-images", type=number(int, 1), default=1, help="images per prompt / label")
    p.add_argument("--batch-size", type=number(int, 1), default=64,
                   help="images sampled at once (memory); the images do not depend on it")
    p.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    p.add_argument("--threads", type=number(int, 1), default=None,
                   help="torch CPU threads (default: 1 for the shipped models, fastest for them; torch's otherwise)")
    p.add_argument("--out", default="samples.png", help="output PNG (a labelled grid)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.prompt is not None and any(not s.strip() for s in args.prompt):
        p.error("argument --prompt: every prompt must be non-empty")
    check_writable(p, "--out", args.out)
    if args.guidance != "none":
        check_guide_name(p, "--guidance", args.guidance)
    info = check_pipeline(p, "--model", args.model)
    if info is not None:
        if info.kind == "text" and args.class_labels:
            p.error(f"argument --class-labels: {args.model} is a text-to-image model: use --prompt")
        if info.kind == "class" and args.prompt:
            p.error(f"argument --prompt: {args.model} is class-conditional: use --class-labels")
        if info.kind == "class" and args.class_labels and max(args.class_labels) >= info.num_classes:
            p.error(f"argument --class-labels: class label {max(args.class_labels)} is out of range; "
                    f"{args.model} has classes 0..{info.num_classes - 1}")
        if info.kind == "other":
            p.error(f"argument --model: {args.model} is neither class-conditional nor text-to-image")
        if info.scheduler is not None:
            try:
                args.scheduler = choose_scheduler(args.scheduler, info.scheduler, args.model)
                check_schedule(args.scheduler, args.schedule)
                choose_spacing(args, info.scheduler)
            except ValueError as err:
                p.error(str(err))
    if args.guidance != "none":
        name, scales, params = check_guide(p, "--guidance", args.guidance, [args.scale])
        if scales:
            p.error(f"argument --guidance: give one scale with --scale, not NAME@scales ({args.guidance!r})")
        check_guide_fits(p, "--guidance", args.guidance, info, args.model)
        scale = args.scale
        if scale is None and not {"scale", "lam"} & set(params):
            scale = DEFAULT_SCALES.get(name, 2.0)
        args.guide = (name, scale, params)
    args.device = check_device(p, args.device)
    return args


def make_scheduler(name: str | None, config: dict, spacing: str | None = None, schedule: str = "default"):
    """Scheduler ``name`` (a ``SCHEDULERS`` key; ``None``: the config's own class) from a pipeline's scheduler
    ``config``, with ``spacing`` and ``schedule`` (a ``SCHEDULES`` key)."""
    import diffusers

    class_name, overrides = SCHEDULERS[name] if name is not None else (config["_class_name"], {})
    spacing = {"timestep_spacing": spacing} if spacing else {}
    return getattr(diffusers, class_name).from_config(dict(config), **overrides, **spacing, **SCHEDULES[schedule])


def check_schedule(name: str | None, schedule: str, config: dict | None = None) -> None:
    """``ValueError`` unless scheduler ``name`` (or the ``config``'s own class) takes ``--schedule``."""
    if not SCHEDULES[schedule]:
        return  # the scheduler's own levels (no diffusers import on this path)
    import inspect

    import diffusers

    class_name = SCHEDULERS[name][0] if name is not None else (config or {}).get("_class_name", "")
    cls = getattr(diffusers, class_name, None)
    missing = [key for key in SCHEDULES[schedule] if cls is None or key not in inspect.signature(cls).parameters]
    if missing:
        takes = sorted(k for k, (c, _) in SCHEDULERS.items() if "use_karras_sigmas" in
                       inspect.signature(getattr(diffusers, c)).parameters)
        raise ValueError(f"argument --schedule: {name or class_name} has no {schedule} sigmas "
                         f"(schedulers that take one: {', '.join(takes)})")


def is_flow_config(config: dict) -> bool:
    """Whether a scheduler config belongs to a rectified-flow model (a ``FlowMatch*`` scheduler, flow sigmas)."""
    from diffguide.samplers.schedule import has_flow_sigmas

    return has_flow_sigmas(config)


def choose_scheduler(name: str | None, config: dict, model: str) -> str:
    """``--scheduler``, defaulted for the model's parametrisation; ``ValueError`` for one of the other kind."""
    flow = is_flow_config(config)
    if name is None:
        return "flow_euler" if flow else "ddim"
    if flow != (name in FLOW_SCHEDULERS):
        allowed = sorted(FLOW_SCHEDULERS if flow else set(SCHEDULERS) - FLOW_SCHEDULERS)
        kind = "a rectified-flow" if flow else "a diffusion (VP)"
        raise ValueError(f"argument --scheduler: {model} is {kind} model; {name} cannot sample it "
                         f"(use {', '.join(allowed)})")
    return name


def choose_spacing(args: argparse.Namespace, config: dict) -> str | None:
    """The timestep spacing to sample with: ``--timestep-spacing``, or for ``auto`` the model's own spacing if
    its plan starts from noise, else ``trailing`` if that one does; ``ValueError`` when none does. Flow
    schedulers have no spacing (their plan starts at pure noise, s = 1): ``None``."""
    if args.scheduler in FLOW_SCHEDULERS:
        if args.timestep_spacing != "auto":
            raise ValueError(f"argument --timestep-spacing: {args.scheduler} has no timestep spacing (use auto)")
        return None
    own = config.get("timestep_spacing", "leading")
    candidates = [own, *(["trailing"] if own != "trailing" else [])] if args.timestep_spacing == "auto" \
        else [args.timestep_spacing]
    problems = []
    for spacing in candidates:
        problem = start_problem(make_scheduler(args.scheduler, config, spacing, getattr(args, "schedule", "default")),
                                args.steps)
        if problem is None:
            return spacing
        problems.append(f"with {spacing} spacing it {problem}")
    fewest = fewest_steps(make_scheduler(args.scheduler, config, candidates[0]), args.steps)
    hint = f"; use --steps {fewest} or more" if fewest else ""
    raise ValueError(f"argument --steps: {args.steps} steps of {args.scheduler} cannot sample this model: "
                     + "; ".join(problems) + hint)


def conditions(args: argparse.Namespace, pipe) -> tuple[str, list]:
    """``("prompt" | "class_labels", one condition per image)``, prompt / label-major."""
    if getattr(pipe, "tokenizer", None) is not None:
        if args.class_labels:
            raise ValueError(f"{args.model} is a text-to-image model: use --prompt, not --class-labels")
        key, values = "prompt", args.prompt or DEFAULT_PROMPTS
    elif hasattr(pipe, "num_classes"):
        if args.prompt:
            raise ValueError(f"{args.model} is class-conditional: use --class-labels, not --prompt")
        key, values = "class_labels", (args.class_labels if args.class_labels is not None
                                       else list(range(pipe.num_classes)))
    else:
        raise ValueError(f"{args.model} is neither class-conditional nor text-to-image")
    return key, [v for v in values for _ in range(args.num_images)]


def sample(args: argparse.Namespace, pipe=None) -> tuple[list, list]:
    """``(images as PIL, condition of each)``; image i starts from the noise of ``image_seed(args.seed, i)``."""
    import torch
    from tqdm.auto import tqdm

    from diffguide import guidance
    from diffguide.scripts._cli import load_model
    from diffguide.tasks.run_folder import image_seed

    from diffguide.tasks.pipelines import denoising_network, latent_shape

    if pipe is None:
        pipe = load_model("--model", args.model, args.device)
    args.scheduler = choose_scheduler(args.scheduler, pipe.scheduler.config, args.model)
    args.spacing = choose_spacing(args, pipe.scheduler.config)
    check_schedule(args.scheduler, args.schedule)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config, args.spacing, args.schedule)
    pipe.set_progress_bar_config(disable=True)
    key, conds = conditions(args, pipe)
    shape, dtype = latent_shape(pipe), denoising_network(pipe).dtype
    guide = guidance.build_guide(*args.guide[:2], **args.guide[2]) if args.guidance != "none" else None
    images = []
    bar = tqdm(total=len(conds), desc="sampling", unit="img", disable=args.no_progress)
    for start in range(0, len(conds), args.batch_size):
        indices = range(start, min(start + args.batch_size, len(conds)))
        generators = [torch.Generator().manual_seed(image_seed(args.seed, i)) for i in indices]
        if hasattr(pipe.scheduler, "noise_sampler_seed"):  # DPM++ SDE: one Brownian tree per image
            pipe.scheduler.noise_sampler_seed = [image_seed(args.seed, i) for i in indices]
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators])
        call = {key: [conds[i] for i in indices], "latents": latents.to(pipe.device, dtype),
                "generator": generators, "num_inference_steps": args.steps, "output_type": "pil"}
        with torch.no_grad():
            if guide is None:
                images += pipe(guidance_scale=1.0, **call).images
            else:
                with guidance.apply(pipe, guide):
                    images += pipe(**call).images
        bar.update(len(indices))
    bar.close()
    return images, conds


# ----------------------------------------------------------------------------------------------- grid
def make_grid(images: list, cols: int):
    """Tile PIL images row-major into one picture, ``cols`` per row, no labels (``torchvision.utils.make_grid``)."""
    import numpy as np
    import torch
    from einops import rearrange
    from PIL import Image
    from torchvision.utils import make_grid as tile

    pixels = np.stack([np.asarray(image) for image in images])
    pixels = pixels[..., None] if pixels.ndim == 3 else pixels  # (N, H, W, channels)
    pixels = np.concatenate([pixels, np.zeros((cols - len(images), *pixels.shape[1:]), pixels.dtype)]) \
        if len(images) < cols else pixels  # a short first row keeps the grid ``cols`` wide
    grid = tile(rearrange(torch.from_numpy(pixels), "n h w c -> n c h w"), nrow=cols, padding=0)
    grid = grid[:1] if images[0].mode == "L" else grid  # make_grid repeats one channel into three
    grid = rearrange(grid, "c h w -> h w c").numpy()
    return Image.fromarray(grid[..., 0] if images[0].mode == "L" else grid, images[0].mode)


def labelled_grid(images: list, labels: list[str], per_row_label: int, title: str, columns: int = GRID_COLUMNS):
    """A readable grid: ``title`` on top, then images in groups of ``per_row_label`` sharing one label.

    One image per label: tiles in rows of ``columns``, each labelled underneath. Several: one block per label,
    the label on the left and its images in rows of ``columns``. Tiles smaller than 64 px are magnified
    (nearest neighbour) so a person can see them.
    """
    from PIL import Image, ImageDraw

    factor = max(1, -(-64 // images[0].size[0]))
    tile_w, tile_h = images[0].size[0] * factor, images[0].size[1] * factor
    tiles = [im.convert("RGB").resize((tile_w, tile_h), Image.NEAREST) for im in images]
    small, title_font, pad, line = font(11), font(13), 4, 13
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if per_row_label == 1:
        cols = min(columns, len(tiles))
        captions = [wrap(probe, text, small, tile_w) for text in labels]
        cap_h = line * max(len(c) for c in captions) + pad
        cells = [(i % cols * (tile_w + pad), i // cols * (tile_h + cap_h + pad), tiles[i], captions[i], None)
                 for i in range(len(tiles))]
        body_w = cols * (tile_w + pad)
        body_h = -(-len(tiles) // cols) * (tile_h + cap_h + pad)
    else:
        cols = min(columns, per_row_label)
        groups = [labels[i] for i in range(0, len(labels), per_row_label)]
        label_w = int(min(200, max(probe.textlength(text, font=small) for text in groups))) + 3 * pad
        rows_per_group = -(-per_row_label // cols)
        block_h = rows_per_group * (tile_h + pad) + pad
        cells = []
        for g, text in enumerate(groups):
            for j in range(per_row_label):
                i = g * per_row_label + j
                cells.append((label_w + j % cols * (tile_w + pad), g * block_h + j // cols * (tile_h + pad),
                              tiles[i], None, wrap(probe, text, small, label_w - 2 * pad, 4) if j == 0 else None))
        body_w, body_h = label_w + cols * (tile_w + pad), len(groups) * block_h
    width = max(body_w, 260)
    title_lines = wrap(probe, title, title_font, width - 2 * pad, 4)
    top = len(title_lines) * (line + 3) + 2 * pad
    grid = Image.new("RGB", (width + pad, top + body_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, text in enumerate(title_lines):
        draw.text((pad, pad + k * (line + 3)), text, fill="black", font=title_font)
    for x, y, tile, caption, row_label in cells:
        grid.paste(tile, (x + pad, top + y))
        for k, text in enumerate(caption or []):
            draw.text((x + pad, top + y + tile_h + 2 + k * line), text, fill="black", font=small)
        for k, text in enumerate(row_label or []):
            draw.text((pad, top + y + k * line), text, fill="black", font=small)
    return grid


def grid_title(args: argparse.Namespace) -> str:
    guide = "no guidance" if args.guidance == "none" else f"{args.guidance} scale {args.guide[1]:g}" \
        if args.guide[1] is not None else args.guidance
    spacing = f" ({args.spacing} spacing)" if args.spacing else ""
    return f"{args.model} | {guide} | {args.scheduler} {args.steps} steps{spacing} | seed {args.seed}"


@one_line_warnings("diffguide-sample")
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads, [args.model])
    try:
        images, conds = sample(args)
        labels = [f"class {c}" if isinstance(c, int) else str(c) for c in conds]
        grid = labelled_grid(images, labels, args.num_images, grid_title(args))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
    except (ValueError, TypeError, OSError, FloatingPointError) as err:
        raise SystemExit(f"diffguide-sample: error: {err}") from None
    print(f"wrote {out} ({len(images)} images, {textwrap.shorten(grid_title(args), 120)})", file=sys.stderr)


if __name__ == "__main__":
    main()
