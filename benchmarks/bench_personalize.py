"""Benchmark zeroth-order (ZOODiP) vs backprop textual inversion -> the ``personalize`` section of BENCHMARKS.md.

    python benchmarks/bench_personalize.py                       # memory + time + quality on digits-t2i
    python benchmarks/bench_personalize.py --sd15-shaped         # + memory/time on a random SD-1.5-shaped pipeline
    python benchmarks/bench_personalize.py --no-write --quality-steps 50 --samples 16

Memory: every configuration runs in its own subprocess (one thread). Reported per child: the whole-process
peak RSS (``getrusage`` max RSS, loading included), the RSS once the pipeline is loaded (quantized, token
added, images encoded), and the peak RSS while training (the kernel's high-water mark ``VmHWM``, reset through
``/proc/self/clear_refs`` after loading); "method memory" = training peak - loaded RSS.

Quality: one class of digits plays the user's concept. ``--num-images`` images of that class (train split)
(test split, unseen in training) are written as PNGs, the token ``<s1>`` (initialized from "digit") is learned from them with each method, and
the float pipeline generates ``--samples`` images of "a handwritten digit <s1>" per embedding. Scored against
the target class: accuracy of the digits classifier, mean cosine similarity of classifier features and of
digits-clip image features to the training images (a CLIP-I analogue), and digits-clip similarity to the
class caption (a CLIP-T analogue). References: the initializer embedding (no personalization) and the class
word itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKEN, INITIALIZER = "<s1>", "digit"
PROMPT = "a handwritten digit {}"


# ----------------------------------------------------------------------------------------- children
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def sd15_shaped_pipeline(seed: int = 0, image_size: int = 64):
    """A random-weight pipeline with Stable Diffusion 1.5's UNet, VAE, CLIP ViT-L/14 text encoder and its
    49,408-token BPE vocabulary (built from open_clip's bundled merges) — for memory, not for pictures."""
    import gzip

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77,
                              bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                              unk_token="<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                                pad_token_id=49407, hidden_act="quick_gelu"))
    unet = UNet2DConditionModel(sample_size=image_size // 8, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=image_size)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


SD15_TEMPLATES, SD15_INITIALIZER = ("a photo of a {}",), "dog"


def sd15_images(num_images: int):
    """Random 64x64 RGB images in [-1, 1] (memory and time only)."""
    import torch

    return torch.rand(num_images, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def target_images(digit: int, num_images: int, seed: int):
    """``num_images`` test-split images of ``digit`` (16x16, [-1, 1]; the t2i model never saw them), chosen with ``seed``."""
    import torch

    from diffguide.tasks.digits import load_digits_tensors

    images, labels = load_digits_tensors("test", 16)
    pool = torch.nonzero(labels == digit).flatten()
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:num_images]]
    return images[pick]


def run_child(spec: dict) -> dict:
    """Load, build the trainer, reset the RSS high-water mark, run ``spec['steps']`` steps; report memory/time."""
    import resource

    import torch

    from diffguide.tasks.digits import CAPTION_TEMPLATES
    from diffguide.tasks.personalize import PersonalizeConfig, TextualInversion
    from diffguide.tasks.quantize import release_freed_memory

    torch.set_num_threads(1)
    start = time.perf_counter()
    if spec["model"] == "none":                       # the libraries alone: the floor of every row
        import diffusers, optimum.quanto, transformers  # noqa: F401,E401
        from diffusers import StableDiffusionPipeline  # noqa: F401  (lazy modules the rows load too)
        from transformers import CLIPTextModel  # noqa: F401

        release_freed_memory()
        return {"rss_imports_mib": _status_kib("VmRSS") / 1024}
    if spec["model"] == "save-sd15-shaped":           # write the float checkpoint folder the sd15 rows load
        sd15_shaped_pipeline().save_pretrained(spec["folder"])
        return {}
    if spec["model"] == "save-int8":                  # the saved int8 folder the "saved" rows load
        from diffguide.tasks.quantize import load_int8_pipeline, save_int8_pipeline

        save_int8_pipeline(load_int8_pipeline(spec["source"]), spec["folder"])
        return {}
    if spec.get("paired"):
        return run_paired(spec)
    from diffguide.tasks import zoo

    if spec.get("sd15"):
        images = sd15_images(spec["num_images"])
        templates, initializer = SD15_TEMPLATES, SD15_INITIALIZER
    else:
        images = target_images(spec["digit"], spec["num_images"], spec["seed"])
        templates, initializer = digit_templates(CAPTION_TEMPLATES), INITIALIZER
    # "layers": TextualInversion loads the checkpoint itself (int8 layer by layer, or float);
    # "saved": the int8 folder written by save_int8_pipeline, loaded straight into int8;
    # "whole": a float pipeline loaded in full, which TextualInversion then quantizes whole
    if spec.get("load") == "saved":
        from diffguide.tasks.quantize import load_saved_int8_pipeline

        pipe = load_saved_int8_pipeline(spec["saved"])
    else:
        pipe = spec["model"] if spec.get("load") == "layers" else zoo.load(spec["model"])
    trainer = TextualInversion(pipe, images, TOKEN, initializer, child_config(spec, templates))
    import gc

    gc.collect()
    release_freed_memory()
    load_seconds = time.perf_counter() - start
    rss_loaded = _status_kib("VmRSS")
    peak_loading = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # the reset below clears it too
    Path("/proc/self/clear_refs").write_text("5")     # reset VmHWM (and ru_maxrss) to the current RSS
    trainer.step()                                    # first step (optimizer state, lazy inits): memory, not time
    times = []
    for _ in range(spec["steps"]):
        tick = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - tick)
    peak_training = _status_kib("VmHWM")
    peak_process = max(peak_loading, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    tensor_peak = max(_tensor_peak_bytes(trainer.step) for _ in range(spec.get("profiled_steps", 2)))
    from diffguide.tasks.quantize import weight_report

    weights = sum(weight_report(getattr(trainer.pipe, n)).bytes for n in ("unet", "vae", "text_encoder"))
    scratch = getattr(trainer, "int8_forward", None)
    return {"dequant_buffer_mib": (scratch.nbytes if scratch else 0) / 2 ** 20, "peak_process_mib": peak_process / 1024,
            "rss_loaded_mib": rss_loaded / 1024, "peak_training_mib": peak_training / 1024,
            "seconds_per_step": median(times), "load_seconds": load_seconds,
            "weights_mib": weights / 2 ** 20, "tensor_peak_mib": tensor_peak / 2 ** 20}


def child_config(spec: dict, templates: tuple[str, ...]):
    from diffguide.tasks.personalize import PersonalizeConfig

    return PersonalizeConfig(method=spec["method"], quantize=spec["quantize"], steps=spec["steps"],
                             templates=templates, flip_prob=0.0, seed=spec["seed"], tau=spec["tau"],
                             batch_directions=spec.get("batched", False))


def load_average() -> float:
    """The 1-minute load average (2 cores here: above 2 the steps wait for a core)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_paired(spec: dict) -> dict:
    """Time per step of ZO (int8 layer by layer, batched directions), the same ZO run through quanto's own
    dequantization (:class:`tasks.int8_forward.SharedDequantBuffer` off: two fresh float copies of every weight per
    pass) and backprop (float) side by side: the trainers in this one process, one untimed step each, then
    ``spec['steps']`` rounds of one step each in rotating order, so that all see the same machine load; ratios are
    medians of the per-round ratios. Also each step's minor page faults (new pages the kernel zeroes and maps)."""
    import resource

    import torch

    from diffguide.tasks.int8_forward import SharedDequantBuffer
    from diffguide.tasks.personalize import TextualInversion

    torch.set_num_threads(1)
    images = sd15_images(spec["num_images"])
    trainers = {}
    for name, method in (("zo", "zo"), ("zo_quanto", "zo"), ("backprop", "backprop")):
        method_spec = {**spec, "method": method, "quantize": method == "zo", "batched": method == "zo"}
        trainers[name] = TextualInversion(spec["model"], images, TOKEN, SD15_INITIALIZER,
                                          child_config(method_spec, SD15_TEMPLATES))
        if name == "zo_quanto":
            trainers[name].int8_forward = SharedDequantBuffer()          # no layers: quanto's own forward
        trainers[name].step()
    names = list(trainers)
    times, faults, loads = {name: [] for name in names}, {name: [] for name in names}, []
    minor_faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt    # pages the kernel handed out
    for round_ in range(spec["steps"]):
        loads.append(load_average())
        for name in names[round_ % 3:] + names[:round_ % 3]:
            tick, faulted = time.perf_counter(), minor_faults()
            trainers[name].step()
            times[name].append(time.perf_counter() - tick)
            faults[name].append(minor_faults() - faulted)
    if not torch.equal(trainers["zo"].embedding, trainers["zo_quanto"].embedding):
        raise RuntimeError("the shared dequantization buffer changed the trained embedding")
    ratios = [zo / bp for zo, bp in zip(times["zo"], times["backprop"])]
    quanto_ratios = [zo / bp for zo, bp in zip(times["zo_quanto"], times["backprop"])]
    speedups = [q / zo for q, zo in zip(times["zo_quanto"], times["zo"])]
    return {"zo_seconds": times["zo"], "zo_quanto_seconds": times["zo_quanto"],
            "backprop_seconds": times["backprop"], "ratios": ratios, "median_ratio": median(ratios),
            "quanto_ratios": quanto_ratios, "median_quanto_ratio": median(quanto_ratios),
            "median_speedup": median(speedups), "load_average": loads,
            "minor_faults_per_step": {name: median(counts) for name, counts in faults.items()}}


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def _tensor_peak_bytes(step) -> int:
    """Peak of the bytes of tensors allocated and not yet freed during ``step()`` (torch profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    total = peak = 0
    for event in events:
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def digit_templates(caption_templates) -> tuple[str, ...]:
    """The digits captions with the class word replaced by ``{}`` (templates naming the numeral are dropped)."""
    return tuple(t.replace("{word}", "{}") for t in caption_templates if "{word}" in t)


def measure(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_cli(model: str, method: str, steps: int, images: Path, out: Path, sd15: bool,
                batched: bool = False, quantized: Path | None = None) -> dict:
    """Run ``diffguide-personalize`` as a user does, in its own process with one thread; its own peak RSS
    (``os.wait4`` rusage of that child, loading included) and wall time. ``quantized``: train from that saved
    int8 folder (``--quantized``) instead of the float checkpoint ``model``."""
    source = ["--quantized", str(quantized)] if quantized else ["--model", model]
    command = [sys.executable, "-m", "diffguide.scripts.personalize", str(images), *source, "--token", TOKEN,
               "--initializer-token", SD15_INITIALIZER if sd15 else INITIALIZER, "--out", str(out),
               "--method", method, "--steps", str(steps), "--threads", "1", "--no-progress"]
    command += ["--template", SD15_TEMPLATES[0], "--flip-prob", "0"] if sd15 else []
    command += ["--batch-directions"] if batched else []
    tick = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return {"peak_process_mib": usage.ru_maxrss / 1024, "wall_seconds": time.perf_counter() - tick}


def save_rgb_pngs(images, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array, mode="RGB").save(folder / f"{i:02d}.png")


# ------------------------------------------------------------------------------------------ quality
def quality(args: argparse.Namespace) -> list[dict]:
    import torch

    from diffguide.tasks import zoo
    from diffguide.tasks.digits import CAPTION_TEMPLATES, DIGIT_WORDS
    from diffguide.tasks.personalize import (PersonalizeConfig, TextualInversion, expected_image_format, load_image_folder,
                                   save_learned_embedding)

    classifier = zoo.load(args.classifier)
    clip = None if args.clip == "none" else zoo.load(args.clip)
    templates = digit_templates(CAPTION_TEMPLATES)
    rows = []
    for digit in args.digits:
        folder = Path(tempfile.mkdtemp(prefix=f"digit{digit}-"))
        save_pngs(target_images(digit, args.num_images, args.seed), folder)
        pipe = zoo.load(args.model)
        targets = load_image_folder(folder, *expected_image_format(pipe))
        with torch.no_grad():
            target_feats = torch.nn.functional.normalize(classifier.features(targets), dim=-1)
            if clip is not None:
                target_clip = clip.image_features(targets)
                caption_clip = clip.text_features([PROMPT.format(DIGIT_WORDS[digit])])
        embeddings, seconds = {}, {}
        for method, step_list, lr in (("zo", args.quality_steps_zo, args.lr_zo),
                                      ("backprop", args.quality_steps, args.lr_bp)):
            trainer = TextualInversion(args.model, targets, TOKEN, INITIALIZER,       # int8 rows: layer by layer
                                       PersonalizeConfig(method=method, steps=max(step_list), learning_rate=lr,
                                                         flip_prob=0.0, templates=templates, seed=args.seed,
                                                         tau=args.tau, save_every=max(step_list)))
            if method == "zo":
                embeddings["none (initializer)"] = trainer.embedding
            tick = time.perf_counter()

            def snapshot(step: int, loss: float, method=method, trainer=trainer, tick=tick) -> None:
                if step in step_list:
                    name = f"{method} ({step} steps)"
                    embeddings[name], seconds[name] = trainer.embedding, time.perf_counter() - tick

            trainer.train(folder / f"run-{method}", progress=not args.no_progress, callback=snapshot)
        for name, vector in [*embeddings.items(), (f"class word '{DIGIT_WORDS[digit]}'", None)]:
            fresh = zoo.load(args.model)
            fresh.set_progress_bar_config(disable=True)
            if vector is None:
                prompt = PROMPT.format(DIGIT_WORDS[digit])
            else:
                path = save_learned_embedding(folder / "eval.safetensors", TOKEN, vector)
                fresh.load_textual_inversion(str(path), token=TOKEN)
                prompt = PROMPT.format(TOKEN)
            generated = fresh([prompt] * args.samples, num_inference_steps=25, guidance_scale=args.guidance_scale,
                              generator=torch.Generator().manual_seed(args.seed), output_type="pt").images * 2 - 1
            with torch.no_grad():
                feats = torch.nn.functional.normalize(classifier.features(generated), dim=-1)
                gen_clip = clip.image_features(generated) if clip is not None else None
                nan = float("nan")
                rows.append({"digit": digit, "embedding": name,
                             "accuracy": (classifier.predict(generated) == digit).float().mean().item(),
                             "classifier_sim": (feats @ target_feats.T).mean().item(),
                             "clip_i": (gen_clip @ target_clip.T).mean().item() if clip is not None else nan,
                             "clip_t": (gen_clip @ caption_clip.T).mean().item() if clip is not None else nan,
                             "train_seconds": seconds.get(name)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def save_pngs(images, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = ((image[0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        Image.fromarray(array, mode="L").save(folder / f"{i:02d}.png")


# ----------------------------------------------------------------------------------------- markdown
def memory_table(results: list[tuple[str, str, dict]], floor: float) -> str:
    lines = ["| pipeline | method | weights MiB | peak RSS, whole process MiB | RSS loaded MiB | peak RSS training MiB "
             "| training peak above libraries MiB | training peak above loaded MiB | tensor peak per step MiB "
             "| s / step | load s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, label, r in results:
        lines.append(f"| {Path(model).name} | {label} | {r['weights_mib']:.1f} | {r['peak_process_mib']:.0f} | "
                     f"{r['rss_loaded_mib']:.0f} | {r['peak_training_mib']:.0f} | "
                     f"{r['peak_training_mib'] - floor:.0f} | {r['peak_training_mib'] - r['rss_loaded_mib']:.1f} | "
                     f"{r['tensor_peak_mib']:.2f} | {r['seconds_per_step']:.3f} | {r['load_seconds']:.1f} |")
    return "\n".join(lines)


def buffer_sizes(results: list[tuple[str, str, dict]]) -> str:
    """The size of the shared dequantization buffer of each model's int8 ZO rows, e.g. "118.1 MiB on `x`"."""
    sizes = {}
    for model, _, r in results:
        sizes[Path(model).name] = max(sizes.get(Path(model).name, 0.0), r.get("dequant_buffer_mib", 0.0))
    return ", ".join(f"{mib:.1f} MiB on `{name}`" for name, mib in sizes.items())


def ratio_lines(results: list[tuple[str, str, dict]], floor: float) -> list[str]:
    out = []
    for model in dict.fromkeys(m for m, _, _ in results):
        by = {label: r for m, label, r in results if m == model}
        bp = by.get("backprop, float")
        for label in ("ZO, int8 layer by layer", "ZO, int8 layer by layer, batched directions",
                      "ZO, int8 saved folder, batched directions"):
            if label in by and bp:
                out.append(f"- `{Path(model).name}`, {label} / backprop float: whole-process peak RSS "
                           f"{by[label]['peak_process_mib'] / bp['peak_process_mib']:.2f}, training peak above the "
                           f"libraries {(by[label]['peak_training_mib'] - floor) / (bp['peak_training_mib'] - floor):.2f}, "
                           f"time per step {by[label]['seconds_per_step'] / bp['seconds_per_step']:.2f}")
        zo = by.get("ZO, int8")
        if not zo or not bp:
            continue
        out.append(f"- `{Path(model).name}`, ZO int8 (quantized whole) / backprop float: whole-process peak RSS "
                   f"{zo['peak_process_mib'] / bp['peak_process_mib']:.2f}, training peak RSS "
                   f"{zo['peak_training_mib'] / bp['peak_training_mib']:.2f}, training peak above the libraries "
                   f"{(zo['peak_training_mib'] - floor) / (bp['peak_training_mib'] - floor):.2f}, weights "
                   f"{zo['weights_mib'] / bp['weights_mib']:.2f}, weights + tensor peak per step "
                   f"{(zo['weights_mib'] + zo['tensor_peak_mib']) / (bp['weights_mib'] + bp['tensor_peak_mib']):.2f}, "
                   f"tensor peak per step {zo['tensor_peak_mib'] / bp['tensor_peak_mib']:.2f}, "
                   f"time per step {zo['seconds_per_step'] / bp['seconds_per_step']:.2f}")
    return out


QUALITY_HEADING = "### Quality: a held-out digit class as the new concept"
KEPT_NOTE = ("Kept from the previous run of this script (not recomputed): the int8 pipeline loaded layer by layer, "
             "and the one loaded from a saved int8 folder, train the bit-identical embedding of the one quantized "
             "whole (same seed; `tests/test_int8_loading.py`), so these numbers hold for them.")


def kept_quality_section(text: str | None = None) -> str:
    """The quality heading, its description and its table as BENCHMARKS.md (or ``text``) holds them, with the
    note that they are kept; earlier notes and the reading paragraph are left out (the script writes them)."""
    from common import BENCHMARKS

    text = BENCHMARKS.read_text() if text is None else text
    if QUALITY_HEADING not in text:
        raise SystemExit("--keep-quality: BENCHMARKS.md has no quality subsection to keep")
    body = text[text.index(QUALITY_HEADING) + len(QUALITY_HEADING):].split("<!-- personalize:end -->")[0]
    body = body.split("\n### ")[0]                                   # up to the next subsection
    paragraphs = [b.strip() for b in body.split("\n\n") if b.strip()]
    description = [b for b in paragraphs if b.startswith("Digits ")]
    tables = [b for b in paragraphs if b.startswith("| embedding ")]
    if len(description) != 1 or len(tables) != 1:
        raise SystemExit("--keep-quality: the quality subsection lacks its description or its table")
    return "\n\n".join([QUALITY_HEADING, KEPT_NOTE, description[0], tables[0]])


def cli_table(results: list[tuple[str, str, dict]]) -> str:
    lines = ["| pipeline | method | peak RSS, whole process MiB | wall s |", "|---|---|---|---|"]
    for model, label, r in results:
        lines.append(f"| {Path(model).name} | {label} | {r['peak_process_mib']:.0f} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def cli_ratio_lines(results: list[tuple[str, str, dict]]) -> list[str]:
    out = []
    for model in dict.fromkeys(m for m, _, _ in results):
        by = {label: r for m, label, r in results if m == model}
        bp = by.get("backprop, float")
        for label, how in (("ZO, int8 layer by layer", "int8 (layer by layer from the float folder, `--model`)"),
                           ("ZO, int8 saved folder", "int8 (from the saved int8 folder, `--quantized`)")):
            if by.get(label) and bp:
                out.append(f"- `{Path(model).name}` command line, whole-process peak RSS ZO {how} / backprop float: "
                           f"**{by[label]['peak_process_mib'] / bp['peak_process_mib']:.2f}** (goal <= 0.45)")
    return out


def paired_lines(paired: dict, name: str) -> list[str]:
    loads = paired["load_average"]
    pairs = lambda key: ", ".join(f"{r:.2f}" for r in paired[key])
    faults = paired["minor_faults_per_step"]
    return [f"- `{name}`, side by side in one process ({len(paired['ratios'])} rounds of one timed step each, "
            f"rotating order): time per step ZO int8 batched directions / backprop float, median of the per-round "
            f"ratios **{paired['median_ratio']:.2f}** (goal <= 2; rounds {pairs('ratios')}); ZO "
            f"{median(paired['zo_seconds']):.1f} s, backprop {median(paired['backprop_seconds']):.1f} s per step "
            f"(medians); 1-minute load average {min(loads):.1f}..{max(loads):.1f} on 2 cores",
            f"- the same ZO run with quanto's own dequantization instead of the shared buffer "
            f"(`SharedDequantBuffer` off; bit-identical embedding, checked in the run): "
            f"{median(paired['zo_quanto_seconds']):.1f} s per step, {paired['median_quanto_ratio']:.2f}x backprop's "
            f"(rounds {pairs('quanto_ratios')}); the buffer makes a ZO step {paired['median_speedup']:.2f}x faster. "
            f"Minor page faults per step (new pages the kernel zeroes and maps, `getrusage`; medians): ZO "
            f"{faults['zo'] / 1e3:.0f} k with the buffer, {faults['zo_quanto'] / 1e3:.0f} k without, backprop "
            f"{faults['backprop'] / 1e3:.0f} k"]


def reading(results, cli_results, paired, floor, loads: tuple[float, float]) -> str:
    """The section's conclusion, from the numbers above."""
    parts = []
    for model in dict.fromkeys(m for m, _, _ in cli_results):
        by = {label: r for m, label, r in cli_results if m == model}
        bp = by.get("backprop, float")
        ratios = {label: by[label]["peak_process_mib"] / bp["peak_process_mib"]
                  for label in ("ZO, int8 layer by layer", "ZO, int8 saved folder") if bp and label in by}
        if ratios:
            parts.append(f"run as a user runs it on `{Path(model).name}`, ZO's whole process peaks at "
                         + " and ".join(f"{ratio:.2f} ({'from the float' if 'layer' in label else 'from the saved int8'} "
                                        "folder)" for label, ratio in ratios.items())
                         + " of backprop's (goal <= 0.45)")
    for model in dict.fromkeys(m for m, _, _ in results):
        by = {label: r for m, label, r in results if m == model}
        bp, zo = by.get("backprop, float"), by.get("ZO, int8 layer by layer, batched directions")
        if bp and zo and floor is not None:
            parts.append(f"the training peak above the libraries is "
                         f"{(zo['peak_training_mib'] - floor) / (bp['peak_training_mib'] - floor):.2f} of backprop's "
                         f"on `{Path(model).name}` (goal <= 1/3)")
    if paired:
        parts.append(f"time per step with batched directions is {paired['median_ratio']:.2f}x backprop's measured "
                     f"side by side (goal <= 2)")
    during = (f", {min(paired['load_average']):.1f}..{max(paired['load_average']):.1f} during the paired steps"
              if paired else "")
    conditions = (f"The run was made on the shared 2-core machine beside other work (1-minute load average "
                  f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end{during}; the run itself keeps one core "
                  "busy): absolute times are indicative, the side-by-side ratio is the one to read.")
    text = "; ".join(parts)
    return ("Reading: " + text[:1].upper() + text[1:] + ". " if parts else "Reading: ") + conditions


def quality_table(rows: list[dict]) -> str:
    import statistics

    rows = [{**r, "embedding": "the class word" if r["embedding"].startswith("class word") else r["embedding"]}
            for r in rows]
    names = list(dict.fromkeys(r["embedding"] for r in rows))
    with_clip = not any(math.isnan(r["clip_i"]) for r in rows)
    columns = [("accuracy", "classifier accuracy"), ("classifier_sim", "classifier-feature sim")]
    columns += [("clip_i", "CLIP-I (digits-clip)"), ("clip_t", "CLIP-T (digits-clip)")] if with_clip else []
    lines = ["| embedding | " + " | ".join(title for _, title in columns) + " | training s |",
             "|---|" + "---|" * (len(columns) + 1)]
    for name in names:
        sel = [r for r in rows if r["embedding"] == name]
        mean = lambda key: statistics.fmean(r[key] for r in sel)
        train = f"{mean('train_seconds'):.0f}" if sel[0]["train_seconds"] is not None else "-"
        lines.append(f"| {name} | " + " | ".join(f"{mean(key):.3f}" for key, _ in columns) + f" | {train} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", default="digits-t2i")
    p.add_argument("--classifier", default="digits-classifier")
    p.add_argument("--clip", default="digits-clip")
    p.add_argument("--memory-steps", type=int, default=20, help="steps per memory/time child")
    p.add_argument("--sd15-shaped", action="store_true", help="also measure a random SD-1.5-shaped pipeline")
    p.add_argument("--sd15-steps", type=int, default=4, help="timed steps per sd15-shaped row and command line")
    p.add_argument("--paired-steps", type=int, default=5,
                   help="sd15-shaped: rounds of ZO / ZO without the shared buffer / backprop steps timed side by "
                        "side in one process (0: none)")
    p.add_argument("--sd15-only", action="store_true", help="no memory rows for --model (only sd15-shaped)")
    p.add_argument("--sd15-rows", nargs="+", default=None, metavar="LABEL",
                   help="in-process sd15-shaped rows to run (default: ZO int8 quantized whole and layer by layer, "
                        "batched or not, backprop float)")
    p.add_argument("--cli-batch-directions", action="store_true",
                   help="run the command-line ZO rows with --batch-directions")
    p.add_argument("--digits", type=int, nargs="+", default=[2, 5, 7], help="classes used as the user's concept")
    p.add_argument("--num-images", type=int, default=5)
    p.add_argument("--quality-steps", type=int, nargs="+", default=[400], help="backprop step counts to score")
    p.add_argument("--quality-steps-zo", type=int, nargs="+", default=[400, 1200], help="ZO step counts to score")
    p.add_argument("--lr-zo", type=float, default=None)
    p.add_argument("--lr-bp", type=float, default=None)
    p.add_argument("--tau", type=int, default=128)
    p.add_argument("--samples", type=int, default=64, help="generated images per embedding and digit")
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--quality-from", type=Path, default=None,
                   help="reuse the quality rows an earlier run printed to stderr instead of recomputing them")
    p.add_argument("--keep-quality", action="store_true",
                   help="keep the quality subsection already in BENCHMARKS.md instead of recomputing it (the "
                        "layer-by-layer int8 load trains a bit-identical embedding: tests/test_int8_loading.py)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    p.add_argument("--note", default="", help="a sentence added to the section's header")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    import torch

    torch.set_num_threads(1)
    results, cli_results = [], []
    # label, method, int8, batched directions, load ("whole": float pipeline quantized whole, as before;
    # "layers": the checkpoint loaded by TextualInversion, int8 layer by layer)
    configs = [("ZO, int8", "zo", True, False, "whole"), ("backprop, float", "backprop", False, False, "whole"),
               ("ZO, int8, batched directions", "zo", True, True, "whole"), ("ZO, float", "zo", False, False, "whole"),
               ("backprop, int8", "backprop", True, False, "whole"),
               ("ZO, int8 layer by layer", "zo", True, False, "layers"),
               ("ZO, int8 layer by layer, batched directions", "zo", True, True, "layers"),
               ("ZO, int8 saved folder, batched directions", "zo", True, True, "saved")]
    sd15_configs = [c for c in (configs[i] for i in (0, 1, 5, 6, 7))
                    if args.sd15_rows is None or c[0] in args.sd15_rows]
    loads = [load_average()]
    paired = None
    floor = None
    work = Path(tempfile.mkdtemp(prefix="bench-personalize-"))
    if not args.skip_memory:
        floor = measure({"model": "none"})["rss_imports_mib"]
        models = [] if args.sd15_only else [(args.model, args.memory_steps, configs, False)]
        if args.sd15_shaped:
            sd15_folder = work / "sd15-shaped"
            measure({"model": "save-sd15-shaped", "folder": str(sd15_folder)})
            models.append((str(sd15_folder), args.sd15_steps, sd15_configs, True))
        for model, steps, model_configs, sd15 in models:
            saved = work / f"int8-{Path(model).name}"
            measure({"model": "save-int8", "source": model, "folder": str(saved)})
            images = work / f"images-{Path(model).name}"
            if sd15:
                save_rgb_pngs(sd15_images(args.num_images), images)
            else:
                save_pngs(target_images(args.digits[0], args.num_images, args.seed), images)
            for method, batched in (("zo", args.cli_batch_directions), ("backprop", False)):   # as a user runs it
                label = "ZO, int8 layer by layer" if method == "zo" else "backprop, float"
                out = work / f"cli-{Path(model).name}-{method}"
                cli_results.append((model, label, measure_cli(model, method, steps, images, out, sd15, batched)))
                print(model, "cli", label, json.dumps(cli_results[-1][2]), file=sys.stderr, flush=True)
            out = work / f"cli-{Path(model).name}-saved"
            cli_results.append((model, "ZO, int8 saved folder", measure_cli(model, "zo", steps, images, out, sd15,
                                                                             args.cli_batch_directions, saved)))
            print(model, "cli saved", json.dumps(cli_results[-1][2]), file=sys.stderr, flush=True)
            for label, method, quantized, batched, load in model_configs:
                spec = {"model": model, "method": method, "quantize": quantized, "steps": steps, "batched": batched,
                        "load": load, "saved": str(saved), "sd15": sd15, "profiled_steps": 1 if sd15 else 2,
                        "digit": args.digits[0], "num_images": args.num_images, "seed": args.seed, "tau": args.tau}
                results.append((model, label, measure(spec)))
                print(model, label, json.dumps(results[-1][2]), file=sys.stderr, flush=True)
            if sd15 and args.paired_steps:
                paired = measure({"paired": True, "model": model, "steps": args.paired_steps, "seed": args.seed,
                                  "tau": args.tau, "num_images": args.num_images})
                print(model, "paired", json.dumps(paired), file=sys.stderr, flush=True)
            shutil.rmtree(saved)
        if args.sd15_shaped:
            shutil.rmtree(sd15_folder)
    if args.quality_from:                     # rows printed (one JSON per line) by an earlier run
        lines = Path(args.quality_from).read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.startswith('{"digit"')]
    else:
        rows = [] if args.skip_quality or args.keep_quality else quality(args)      # kept: not recomputed

    md = ["## Personalization without backpropagation (`benchmarks/bench_personalize.py`)\n\n"
          "Written by `benchmarks/bench_personalize.py`: textual inversion of one new token, zeroth-order (ZOODiP: "
          "int8 weights, RGE n=2, mu=1e-3, Subspace Gradient, PUTS 500..899, ZO-Adam) vs diffusers' backprop recipe "
          "(float weights, AdamW, uniform timesteps); batch 1, one CPU thread per run, on a shared 2-core machine "
          f"(times are indicative). Model `{args.model}`, classifier `{args.classifier}`, CLIP `{args.clip}`."
          + (f" {args.note}" if args.note else "")]
    if results:
        md += ["", "### Memory and time per step", "",
               f"Each row is one subprocess: load, add `{TOKEN}`, encode the images, then "
               f"{args.memory_steps} timed steps ({args.sd15_steps} for `sd15-shaped`) after a first, untimed one. "
               "*Peak RSS, whole process* is `getrusage` max RSS including loading (and, for int8 rows quantized "
               "whole, the float weights before quantization: pipelines are loaded from float checkpoints); *RSS loaded* is taken "
               "once the pipeline is loaded (and quantized), the token added and the images encoded; *peak RSS "
               "training* is the kernel high-water mark reset at that point, so it covers all the steps, the first "
               "one (optimizer state) included. *Above libraries* subtracts the RSS of a process that only imports "
               f"torch, diffusers (StableDiffusionPipeline), transformers (CLIPTextModel), optimum-quanto and this package's "
               f"personalization module ({floor or 0:.0f} MiB). *Tensor peak per step* is exact and free of allocator noise: the largest net bytes of "
               "tensors allocated during one step (torch profiler memory events; activations, gradients, optimizer "
               "updates, transient dequantized weights), max over 2 steps. Int8 ZO rows dequantize every weight into "
               "one float buffer of the largest weight (`tasks.int8_forward.SharedDequantBuffer`, "
               f"{buffer_sizes(results)}), "
               "made in the first step and kept: it is in the RSS columns, not in the tensor peak of the later steps. "
               "s / step is the median; *load s* the time to load, add the token and encode the images. Rows marked "
               "*layer by layer* load the float checkpoint with `tasks.quantize.load_int8_pipeline` (each Linear/Conv2d "
               "quantized as soon as its tensors are read); *saved folder* rows load the int8 folder written once by "
               "`tasks.quantize.save_int8_pipeline` with `load_saved_int8_pipeline` (no float weights); the others "
               "load the float pipeline in full and quantize it whole.", "", memory_table(results, floor), "",
               *ratio_lines(results, floor), *(paired_lines(paired, "sd15-shaped") if paired else [])]
    if cli_results:
        md += ["", "### The command line, as a user runs it", "",
               f"`diffguide-personalize IMAGES --model FOLDER --method zo|backprop --steps N --threads 1"
               f"{' (--batch-directions for zo)' if args.cli_batch_directions else ''}` from the "
               f"float checkpoint folder, each in its own process ({args.num_images} images, {args.memory_steps} steps "
               f"on `{Path(args.model).name}`, {args.sd15_steps} on `sd15-shaped`, saved by `save_pretrained`), and "
               "the ZO row *saved folder* with `--quantized INT8_FOLDER` instead of `--model` (the folder written once "
               "by `--save-quantized`): peak RSS of that process (`os.wait4` rusage, loading, training and saving "
               "included) and wall time.", "",
               cli_table(cli_results), "", *cli_ratio_lines(cli_results)]
    if args.keep_quality:
        md += ["", kept_quality_section()]
    elif rows:
        md += ["", "### Quality: a held-out digit class as the new concept", "",
               f"Digits {args.digits}: {args.num_images} training images each, prompt `{PROMPT.format(TOKEN)}`, "
               f"{args.samples} samples per embedding (DDIM 25 steps, CFG {args.guidance_scale}) from the *float* "
               "pipeline after `load_textual_inversion`; mean over the digits. Similarities are mean cosines to the "
               "training images (classifier features" + (", digits-clip image features) and to the class caption "
               "(digits-clip text)." if args.clip != "none" else ").") + " *training s* is the wall time to reach "
               "that step.", "", quality_table(rows)]
    loads.append(load_average())
    if results or cli_results:
        md += ["", reading(results, cli_results, paired, floor, (loads[0], loads[-1]))]
    text = "\n".join(md)
    if args.no_write:
        print(text)
    else:
        from common import write_section

        write_section("personalize", text)
        print("wrote the personalize section of BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
