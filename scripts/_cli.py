"""Checks shared by the command lines, run before any model is loaded: numbers, devices, output paths, model
folders, image files, guide specs. Each failure is one ``argparse`` error line naming the option, the bad
value and what is allowed (exit code 2).

This module imports neither torch nor diffusers at import time: ``--help`` and the checks that read only
arguments, files and configs answer at once; checks that need torch import it when they run."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and appends ``(default: ...)`` to every option's help that does not
    already say its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def number(kind: type = int, low: float | None = None, high: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type``: a finite ``int`` / ``float`` in ``[low, high]``."""
    what = "an integer" if kind is int else "a finite number"
    bounds = (f" in {low:g}..{high:g}" if low is not None and high is not None else
              f" >= {low:g}" if low is not None else f" <= {high:g}" if high is not None else "")

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}; give {what}{bounds}") from None
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; give {what}{bounds}")
        return value

    convert.__name__ = kind.__name__
    return convert


TINY_THREADS = 1   # torch threads for the shipped models: one is fastest for them (BENCHMARKS.md, startup)


def is_shipped(name: str | Path) -> bool:
    """``name`` is a shipped model: its name, or a folder inside the package's zoo."""
    from diffguide.tasks import zoo

    if str(name) in zoo.MODELS:
        return True
    try:
        return Path(name).expanduser().resolve().is_relative_to(zoo.ZOO_DIR)
    except (OSError, ValueError):
        return False


def set_threads(threads: int | None, models: list[str | Path] | tuple = ()) -> None:
    """``torch.set_num_threads(threads)`` when given; else ``TINY_THREADS`` when the run uses only shipped tiny
    models (``models`` non-empty, each ``is_shipped``): torch's default of one thread per core ran them 12-15x
    slower on a busy 2-core machine (BENCHMARKS.md, startup). Otherwise torch's default."""
    if threads is None and models and all(is_shipped(m) for m in models):
        threads = TINY_THREADS
    if threads:
        import torch

        torch.set_num_threads(threads)


DEVICE = re.compile(r"(cpu|cuda|mps)(:\d+)?")


def device_name(text: str) -> str:
    """An argparse ``type`` checking a device's spelling without torch (``check_device`` checks it exists)."""
    if DEVICE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda, cuda:N or mps")
    return text


def check_device(parser: argparse.ArgumentParser, text: str | None) -> str:
    """The device to use: ``text`` if this machine has it, else a usage error; ``None``: cuda if available.

    The spelling is checked without torch (and ``cpu`` needs no more); cuda / mps availability imports torch."""
    match = DEVICE.fullmatch(text) if text is not None else None
    if text is not None and match is None:
        parser.error(f"argument --device: {text!r} is not a device; use cpu, cuda, cuda:N or mps")
    if text is not None and match.group(1) == "cpu":
        return text
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(text)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            parser.error(f"argument --device: {text!r} needs a CUDA GPU and this machine has none; use --device cpu")
        if device.index is not None and device.index >= count:
            parser.error(f"argument --device: {text!r} does not exist; this machine has cuda:0..cuda:{count - 1}")
    elif not torch.backends.mps.is_available():
        parser.error(f"argument --device: {text!r} is not available on this machine; use --device cpu")
    return text


def check_writable(parser: argparse.ArgumentParser, option: str, path: str | Path, folder: bool = False) -> Path:
    """``path`` (a file, or a folder if ``folder``) can be created or overwritten: its nearest existing
    ancestor is a folder in which a file can be made (probed with a temporary file, so it holds for root too)."""
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        parser.error(f"argument {option}: {str(path)!r} is a {'file' if folder else 'folder'}; "
                     f"give a {'folder' if folder else 'file'} path")
    if path.exists() and not folder and not os.access(path, os.W_OK):
        parser.error(f"argument {option}: {str(path)!r} exists and cannot be overwritten")
    ancestor = path if folder and path.exists() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        parser.error(f"argument {option}: cannot write {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        parser.error(f"argument {option}: cannot write {str(path)!r}: {str(ancestor)!r}: {err.strerror}")
    return path


def check_image(parser: argparse.ArgumentParser, option: str, path: str | Path) -> tuple[int, int]:
    """``path`` is a readable, complete image file; returns its ``(width, height)``."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        parser.error(f"argument {option}: no image file at {str(path)!r}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        parser.error(f"argument {option}: {str(path)!r} is not a readable image (PNG, JPEG, ...): {err}")


@dataclass
class PipelineInfo:
    """What a pipeline folder's configs say, read without loading a weight."""

    kind: str                          # "class" (ClassConditionalPipeline), "text" (has a tokenizer) or "other"
    latent: bool                       # has a VAE
    num_classes: int | None            # real classes of a class-conditional UNet (null label excluded)
    image_shape: tuple[int, int, int]  # (C, H, W) of the images it makes
    scheduler: dict[str, Any] | None   # its scheduler config
    pipeline_class: str | None = None  # model_index's _class_name


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def check_pipeline(parser: argparse.ArgumentParser, option: str, name: str) -> PipelineInfo | None:
    """A shipped pipeline name or a local pipeline folder, read from its configs (``None`` for a hub id, which
    only loading can check)."""
    from diffguide.tasks import zoo

    pipelines = [m for m in zoo.list_models() if (zoo.model_path(m) / "model_index.json").is_file()]
    if name in zoo.list_models():
        folder = zoo.model_path(name)
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    elif name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/")):
        return None
    else:
        parser.error(f"argument {option}: {name!r} is neither a shipped model ({', '.join(pipelines)}), "
                     "a local pipeline folder nor a hub id")
    index = _json(folder / "model_index.json")
    if not index:
        parser.error(f"argument {option}: {name!r} is not a diffusion pipeline (no model_index.json); "
                     f"shipped pipelines: {', '.join(pipelines)}")
    unet, vae = _json(folder / "unet" / "config.json"), _json(folder / "vae" / "config.json")
    has = lambda key: isinstance(index.get(key), list) and index[key][0] is not None
    kind = ("class" if index.get("_class_name") == "ClassConditionalPipeline" else
            "text" if has("tokenizer") else "other")
    classes = unet.get("num_class_embeds")
    source = vae if has("vae") else unet
    size = source.get("sample_size", 0)
    height, width = (size, size) if isinstance(size, int) else size
    scheduler = next(iter(sorted((folder / "scheduler").glob("*.json"))), None)
    return PipelineInfo(kind=kind, latent=has("vae"), num_classes=classes - 1 if classes else None,
                        image_shape=(source.get("in_channels", 0), height, width),
                        scheduler=_json(scheduler) if scheduler else None, pipeline_class=index.get("_class_name"))


def pipeline_image_format(folder: Path) -> tuple[int, str] | None:
    """``(size, PIL mode)`` of the images a text-to-image pipeline folder trains on, from its configs (as
    ``tasks.personalize.expected_image_format`` reads them from the loaded pipeline): the UNet's sample size
    times the VAE's scale factor ``2 ** (len(block_out_channels) - 1)``, "L" or "RGB" by the VAE's input
    channels; ``None`` when the configs do not say (loading will)."""
    unet, vae = _json(Path(folder) / "unet" / "config.json"), _json(Path(folder) / "vae" / "config.json")
    mode = {1: "L", 3: "RGB"}.get(vae.get("in_channels"))
    size = unet.get("sample_size")
    if mode is None or not isinstance(size, int) or not vae.get("block_out_channels"):
        return None
    return size * 2 ** (len(vae["block_out_channels"]) - 1), mode


def wrong_images(folder: Path, size: int, mode: str, extensions) -> list[str]:
    """``"name (WxH MODE)"`` of each image file of ``folder`` (by extension) that is not ``size x size`` in
    ``mode``, or ``"name (unreadable)"``; reads only the files' headers."""
    from PIL import Image, UnidentifiedImageError

    wrong = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in extensions):
        try:
            with Image.open(path) as image:
                found = (image.size, image.mode)
        except (UnidentifiedImageError, OSError):
            wrong.append(f"{path.name} (unreadable)")
            continue
        if found != ((size, size), mode):
            wrong.append(f"{path.name} ({found[0][0]}x{found[0][1]} {found[1]})")
    return wrong


def load_model(option: str, name: str, device: str | None = None):
    """``zoo.load(name)``; a failure (a hub id not cached offline, a damaged folder) becomes a ``ValueError``
    naming ``option``."""
    from diffguide.tasks import zoo

    try:
        return zoo.load(name, device=device)
    except Exception as err:      # noqa: BLE001 - any loading failure is reported as one line
        raise ValueError(f"{option} {name}: cannot load it: {err}") from err


MAX_START_SIGNAL = 0.1    # largest alpha_bar(t) of the first timestep: above it, pure noise is not a valid x_t
MIN_START_SIGNAL = 1e-5   # smallest for an epsilon model: its x0 error grows as 1 / sqrt(alpha_bar)


def start_problem(scheduler, steps: int, x0_check: bool = True) -> str | None:
    """Why the plan of ``steps`` steps cannot start from pure noise, or ``None`` if it can.

    Sampling starts from pure noise, which is a valid x_t only where alpha_bar(t) <= MAX_START_SIGNAL (one DDIM
    step of leading spacing sits at t = 1 and would return the noise as the image); and an epsilon model's
    x0 estimate sqrt(1 / alpha_bar) (x - sqrt(1 - alpha_bar) eps) is unusable where alpha_bar < MIN_START_SIGNAL.
    """
    import torch

    from ..samplers.schedule import ScheduleReader

    scheduler.set_timesteps(steps)
    reader = ScheduleReader(scheduler)
    first_level = reader.level(scheduler.timesteps[0], 0, "cpu", torch.float64)
    if reader.flow:  # flow matching: the first level must be pure noise (s = 1)
        s = float(first_level.sigma)
        return None if s >= 1 - 1e-6 else f"starts at s = {s:.3g} (not noise, s = 1)"
    first = int(round(float(scheduler.timesteps[0])))
    alpha_bar = float(first_level.alpha) ** 2
    if alpha_bar > MAX_START_SIGNAL:
        return f"starts at t = {first} (alpha_bar {alpha_bar:.2g} > {MAX_START_SIGNAL}: not noise)"
    if x0_check and alpha_bar < MIN_START_SIGNAL and scheduler.config.prediction_type == "epsilon":
        return (f"starts at t = {first} (alpha_bar {alpha_bar:.2g} < {MIN_START_SIGNAL}: an epsilon model "
                "cannot estimate x0 there)")
    return None


def fewest_steps(scheduler, steps: int, x0_check: bool = True) -> int | None:
    """The fewest steps above ``steps`` (searched up to ``max(50, 2 steps)``) whose plan starts from noise."""
    return next((n for n in range(steps + 1, max(50, 2 * steps))
                 if start_problem(scheduler, n, x0_check) is None), None)


def check_start(parser: argparse.ArgumentParser, config: dict[str, Any] | None, steps: int, model: str) -> None:
    """A usage error when ``steps`` steps of the model's own scheduler (``config``) start where pure noise is not
    a valid x_t (alpha_bar > MAX_START_SIGNAL), e.g. one DDIM step of leading spacing at t = 1."""
    if not config or "_class_name" not in config:
        return
    import diffusers

    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    problem = start_problem(scheduler, steps, x0_check=False)
    if problem is not None:
        fewest = fewest_steps(scheduler, steps, x0_check=False)
        spacing = scheduler.config.get("timestep_spacing", "flow")
        parser.error(f"argument --steps: {steps} steps of {model}'s {config['_class_name']} "
                     f"({spacing} spacing) cannot sample it: the plan {problem}"
                     + (f"; use --steps {fewest} or more" if fewest else ""))


def check_guide_name(parser: argparse.ArgumentParser, option: str, spec: str) -> None:
    """A usage error, before torch is imported, when the guide spec's name is not a known guide (the rest of the
    spec is checked by ``check_guide``)."""
    name = spec.partition(":")[0].partition("@")[0].strip()
    if name not in GUIDE_KEYS:
        parser.error(f"argument {option}: unknown guide {name!r} in {spec!r}; known: {', '.join(GUIDE_KEYS)}")


def check_guide(parser: argparse.ArgumentParser, option: str, spec: str, default_scales=(None,)):
    """``(name, scales, params)`` of a guide spec whose guide can be built at each of its ``@`` scales, or at
    each of ``default_scales`` (a list, or a callable of the guide name giving one) if it has none."""
    from diffguide import guidance

    try:
        name, scales, params = guidance.parse_guide_spec(spec)
        for value in scales or (default_scales(name) if callable(default_scales) else default_scales):
            guidance.build_guide(name, value, **params)
    except (ValueError, TypeError) as err:
        message = str(err)
        parser.error(f"argument {option}: {message}" if repr(spec) in message
                     else f"argument {option}: {spec!r}: {message}")
    return name, scales, params


def check_guide_fits(parser: argparse.ArgumentParser, option: str, spec: str, info: PipelineInfo | None,
                     model: str) -> None:
    """A usage error when the guide of ``spec`` cannot run on the model's pipeline at all (guides that evaluate
    the network at other noise levels need a rectified-flow pipeline whose network time apply can move)."""
    from diffguide import guidance
    from diffguide.guidance.families import other_level_pipelines

    if info is None:  # a hub id: only loading tells its class
        return
    name, scales, params = guidance.parse_guide_spec(spec)
    guide = guidance.build_guide(name, (scales or [None])[0], **params)
    served = other_level_pipelines()
    if guide.evaluates_other_levels and info.pipeline_class not in served:
        parser.error(f"argument {option}: {spec!r}: {type(guide).__name__} evaluates the network at other noise "
                     f"levels, which runs on the rectified-flow pipelines {', '.join(served)}; {model} is a "
                     f"{info.pipeline_class}")


# The keyword hyper-parameters of each guide of ``guidance.registry.GUIDES`` (its ``guide_keys``), written out so
# that ``--help`` needs no torch; tests/test_startup.py checks this table against the registry (and prints the
# table to paste here when a guide or a key is added).
GUIDE_KEYS: dict[str, tuple[str, ...]] = {
    "cfg": ("scale", "sigma_lo", "sigma_hi"),
    "cfgpp": ("lam", "sigma_lo", "sigma_hi"),
    "apg": ("scale", "eta", "norm_threshold", "momentum", "sigma_lo", "sigma_hi"),
    "cfg-rescale": ("scale", "phi", "sigma_lo", "sigma_hi"),
    "cfg-zero-star": ("scale", "zero_init_steps", "arithmetic", "sigma_lo", "sigma_hi"),
    "ag": ("scale", "threshold", "space", "sigma_lo", "sigma_hi"),
    "rcfgpp": ("scale", "plan", "predictor_fraction", "gamma", "corrector_time", "predictor_noise", "generator",
               "sigma_lo", "sigma_hi"),
}


def guides_epilog() -> str:
    """The guide names and their keys, for ``--help``."""
    lines = [f"  {name:<15} {', '.join(keys)}" for name, keys in GUIDE_KEYS.items()]
    return "guides (NAME) and their keys (KEY=VALUE):\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------- user warnings
def one_line_warnings(prog: str) -> Callable:
    """Decorate a command line's ``main``: while it runs, a warning prints as one line ``prog: warning: ...``
    (no source line, no file name; categories other than ``UserWarning`` are named). The library itself
    leaves Python's warning format alone."""

    def format_warning(message, category, filename, lineno, line=None) -> str:
        kind = "" if category is UserWarning else f" ({category.__name__})"
        return f"{prog}: warning{kind}: {' '.join(str(message).split())}\n"

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> Any:
            previous, warnings.formatwarning = warnings.formatwarning, format_warning
            try:
                return main(*args, **kwargs)
            finally:
                warnings.formatwarning = previous

        return run

    return decorate


# ---------------------------------------------------------------------------------------- captions
@functools.lru_cache(maxsize=None)
def font(size: int):
    """DejaVu Sans at ``size`` px, the font matplotlib ships in its package data: it has Latin, Greek and Cyrillic
    letters, arrows and check marks (PIL's built-in font draws every non-ASCII character as a box). The file is
    taken from ``matplotlib.get_data_path()``; ``matplotlib.font_manager`` would scan the system's fonts first."""
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")), size)


def wrap(draw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` pixels; the last kept line ends with '...' if cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 3)] + "..."
    return lines or [""]
