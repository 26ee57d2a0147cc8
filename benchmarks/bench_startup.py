"""Measure how soon the command lines answer, and torch's threads on the shipped tiny models; write the ``startup``
section of BENCHMARKS.md.

    python benchmarks/bench_startup.py                    # 5 interleaved rounds of every command
    python benchmarks/bench_startup.py --rounds 3 --no-write

Startup: each command is a fresh Python process (wall time), the commands interleaved round by round and the
median taken, reported as a ratio to ``python -c "import argparse"`` (the floor of any Python command line)
and to ``python -c "import diffusers"`` (what every command paid before it parsed its arguments).

Threads: in one process without ``OMP_NUM_THREADS``, one UNet forward of ``digits-class`` (the CFG batch of the
default ``diffguide-sample``: 20 rows) and a short sample (``diffguide-sample``'s loop, 10 images, 5 steps),
alternately with 1 thread and torch's default, median over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402


def cli(module: str, *argv: str) -> list[str]:
    """A command line as its console script runs it (``main()`` reading ``sys.argv``)."""
    return [sys.executable, "-c", f"from diffguide.scripts.{module} import main; main()", *argv]


def startup_commands(tmp: Path) -> dict[str, tuple[list[str], int]]:
    """name -> (argv, expected exit code)."""
    images = tmp / "images"
    images.mkdir(exist_ok=True)
    out = str(tmp / "out")
    return {
        'python -c "import argparse"': ([sys.executable, "-c", "import argparse"], 0),
        'python -c "import diffusers"': ([sys.executable, "-c", "import diffusers"], 0),
        'python -c "import diffguide"': ([sys.executable, "-c", "import diffguide"], 0),
        "diffguide-sample --help": (cli("sample", "--help"), 0),
        "diffguide-sample --class-labels 11": (cli("sample", "--class-labels", "11", "--out", out + ".png"), 2),
        "diffguide-evaluate --help": (cli("evaluate", "--help"), 0),
        "diffguide-evaluate --model digits-class --metrics clip_score": (
            cli("evaluate", "--model", "digits-class", "--metrics", "clip_score", "--out", out), 2),
        "diffguide-solve --help": (cli("solve", "--help"), 0),
        "diffguide-solve --model digits-t2i": (cli("solve", "--model", "digits-t2i", "--out", out + ".png"), 2),
        "diffguide-personalize --help": (cli("personalize", "--help"), 0),
        "diffguide-personalize ... --timesteps 0:5000": (
            cli("personalize", str(images), "--token", "<s1>", "--initializer-token", "digit", "--out", out,
                "--timesteps", "0:5000"), 2),
    }


def time_startup(rounds: int) -> dict[str, float]:
    """Median wall seconds of each command over ``rounds`` interleaved rounds."""
    with tempfile.TemporaryDirectory() as folder:
        commands = startup_commands(Path(folder))
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(rounds):
            for name, (argv, code) in commands.items():
                start = time.perf_counter()
                done = subprocess.run(argv, capture_output=True, text=True)
                times[name].append(time.perf_counter() - start)
                if done.returncode != code:
                    raise RuntimeError(f"{name}: exit {done.returncode}, expected {code}: {done.stderr[-500:]}")
    return {name: statistics.median(values) for name, values in times.items()}


SAMPLE_STEPS = 5
THREADS_SCRIPT = r"""
import json, statistics, sys, time
import torch
from diffguide.scripts import sample
from diffguide.tasks import zoo

rounds = int(sys.argv[1])
default = torch.get_num_threads()
pipe = zoo.load("digits-class")
x = torch.randn(20, 1, 16, 16)
labels = torch.arange(20) % 11
args = sample.parse_args(["--steps", sys.argv[2], "--no-progress", "--device", "cpu"])

def forward():
    with torch.no_grad():
        pipe.unet(x, 500, class_labels=labels)

def short_sample():
    sample.sample(args, pipe)

times = {(task, n): [] for task in ("forward", "sample") for n in (1, default)}
for task, run in (("forward", forward), ("sample", short_sample)):
    run()                                                   # warm-up
    for _ in range(rounds):
        for n in (1, default):
            torch.set_num_threads(n)
            start = time.perf_counter()
            for _ in range(5 if task == "forward" else 1):
                run()
            times[task, n].append((time.perf_counter() - start) / (5 if task == "forward" else 1))
print(json.dumps({"default": default, **{f"{task}:{n}": statistics.median(v) for (task, n), v in times.items()}}))
"""


def time_threads(rounds: int) -> dict:
    """Medians of the forward / short sample with 1 thread and torch's default (a process without
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, so torch picks its own default)."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(rounds), str(SAMPLE_STEPS)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(startup: dict[str, float], threads: dict, rounds: int, load: tuple[float, float]) -> str:
    floor, diffusers = startup['python -c "import argparse"'], startup['python -c "import diffusers"']
    rows = [f"| `{name}` | {seconds / floor:.1f}x | {seconds / diffusers:.2f}x |" for name, seconds in startup.items()]
    default = threads["default"]
    ratio = {task: threads[f"{task}:{default}"] / threads[f"{task}:1"] for task in ("forward", "sample")}
    thread_rows = [f"| one UNet forward of digits-class (20 rows) | 1.00 | {ratio['forward']:.2f} |",
                   f"| `diffguide-sample` loop, 10 images, {SAMPLE_STEPS} steps | 1.00 | {ratio['sample']:.2f} |"]
    return "\n".join([
        "## Startup and threads",
        "",
        f"Written by `benchmarks/bench_startup.py` ({rounds} interleaved rounds, medians; "
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at the start and {load[1]:.1f} at the end).",
        "",
        "Wall time of each command in a fresh process, as a ratio to a bare Python start and to importing",
        "diffusers (what every command paid before parsing its arguments). `--help` and the usage errors",
        "shown here run without importing torch, diffusers or transformers.",
        "",
        '| command | x `python -c "import argparse"` | x `python -c "import diffusers"` |',
        "|---|---|---|",
        *rows,
        "",
        f"Time with torch's default CPU threads ({default} here) relative to one thread, side by side in one "
        "process:",
        "",
        f"| work | 1 thread | {default} threads (torch's default) |",
        "|---|---|---|",
        *thread_rows,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are reported)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    startup = time_startup(args.rounds)
    threads = time_threads(args.rounds)
    text = markdown(startup, threads, args.rounds, (load_start, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section("startup", text)


if __name__ == "__main__":
    main()
