"""Inverse-problem solvers against exact posteriors (Gaussian mixtures) and on held-out digits.

Parts (``--parts``):

* ``gmm`` — DPS, MCG and EnKG samples against the exact posterior (G5) of a Gaussian-mixture prior under
  ``y = A x0 + n``, in 2-D and 8-D, with the exact MMSE denoiser as the network. Step scales are picked on a
  validation measurement from a small grid, then scored on fresh test measurements: sliced W2 (exact
  quantiles, 128 directions), error of the mean, mode-mass error, gradient and forward-model calls per sample.
* ``digits`` — PSNR / SSIM of reconstructions of held-out digits (box inpainting, 4x super-resolution,
  Gaussian deblurring) with the ``digits-class`` prior run unconditionally (null class).
* ``p2l`` — P2L against latent DPS and PSLD on the latent ``digits-t2i`` pipeline.

Writes the ``inverse`` section of BENCHMARKS.md (every part present in the cache file is reported).

    python benchmarks/bench_inverse.py                       # all parts
    python benchmarks/bench_inverse.py --parts gmm --quick   # fewer particles and measurements
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from diffguide.guidance import DPS, MCG, EnKG
from diffguide.samplers import plan_from_scheduler, sample_inverse
from diffguide.samplers.inverse import NoCorrection, Transition
from common import write_section
from diffguide.tasks.gmm import GaussianMixture, SlicedWasserstein
from diffguide.tasks.operators import MatrixOperator, random_matrix

F64 = torch.float64
CACHE = Path(__file__).resolve().parent.parent / "outputs" / "bench_inverse.json"  # per-part results, reused


# ------------------------------------------------------------------------------------------------------ GMM
def mixture_2d() -> GaussianMixture:
    covs = torch.tensor([[[0.25, 0.0], [0.0, 0.25]], [[0.5, 0.2], [0.2, 0.3]], [[0.2, -0.05], [-0.05, 0.4]]],
                        dtype=F64)
    return GaussianMixture(torch.tensor([0.3, 0.5, 0.2], dtype=F64),
                           torch.tensor([[-2.0, 0.5], [2.0, -1.0], [0.0, 2.0]], dtype=F64), covs)


def mixture_8d(generator: torch.Generator) -> GaussianMixture:
    """25 components at ``(i, j, i, j, ...)`` for ``i, j in {-2..2}``, scaled by 2, unit-variance/4 covariances and
    random weights: the MCGdiff/FPS benchmark mixture, shrunk to unit-scale data."""
    grid = torch.tensor([(i, j) for i in range(-2, 3) for j in range(-2, 3)], dtype=F64)
    means = 2.0 * grid.repeat(1, 4)
    weights = torch.rand(25, generator=generator, dtype=F64) + 0.2
    return GaussianMixture.isotropic(weights, means, 0.25)


GMM_PROBLEMS: dict[str, dict] = {
    "2-D, A 1x2": {"dim": 2, "rows": 1, "sigma_y": 0.3},
    "8-D, A 2x8": {"dim": 8, "rows": 2, "sigma_y": 0.3},
}


def gmm_problem(name: str, seed: int) -> tuple[GaussianMixture, MatrixOperator]:
    spec = GMM_PROBLEMS[name]
    g = torch.Generator().manual_seed(seed)
    prior = mixture_2d() if spec["dim"] == 2 else mixture_8d(g)
    matrix = random_matrix(spec["rows"], spec["dim"], g)
    return prior, MatrixOperator(matrix, sigma_y=spec["sigma_y"])


class ExactLikelihoodScore(NoCorrection):
    """Reference solver: the exact likelihood score (G6) with the Bayes (Tweedie) weight. Only discretisation
    and Monte-Carlo error remain — the floor every approximate solver is compared with."""

    needs_grad = False
    default_eta = 1.0

    def __init__(self, prior: GaussianMixture, matrix: torch.Tensor, y: torch.Tensor, noise_var: float) -> None:
        super().__init__()
        self.prior, self.matrix, self.y, self.noise_var = prior, matrix, y, noise_var

    def correct(self, t: Transition) -> torch.Tensor:
        score = self.prior.likelihood_score_t(t.x, t.level.alpha, t.level.sigma, self.matrix, self.y, self.noise_var)
        return t.x_next + t.x0_weight * float(t.level.sigma**2 / t.level.alpha) * score


def gmm_errors(samples: torch.Tensor, posterior: GaussianMixture, sliced: SlicedWasserstein) -> dict[str, float]:
    masses = posterior.responsibilities(samples).mean(0)
    return {"sw2": float(sliced(samples)), "mean": float((samples.mean(0) - posterior.mean()).norm()),
            "mass": float(0.5 * (masses - posterior.weights).abs().sum())}


ENKG_GRID = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 4.0]
GMM_SOLVERS: dict[str, tuple[Callable, list[float]]] = {
    # name -> (factory(operator, y, scale, particles), scale grid; [] = no tuning)
    "DPS, Bayes weight (normalize='likelihood')": (lambda op, y, s, n: DPS(op, y, s, normalize="likelihood"), [1.0]),
    "DPS, code step (scale * grad ||r||)": (lambda op, y, s, n: DPS(op, y, s), [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]),
    "MCG (scale * grad ||r|| + projection)": (lambda op, y, s, n: MCG(op, y, s), [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]),
    "EnKG, one ensemble (J = all particles)": (lambda op, y, s, n: EnKG(op, y, s), ENKG_GRID),
    "EnKG, ensembles of J = 100": (lambda op, y, s, n: EnKG(op, y, s, ensemble_size=100), ENKG_GRID),
}


def run_gmm(args) -> dict:
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=True,
                              clip_sample=False)
    plan = plan_from_scheduler(scheduler, args.gmm_steps)
    n = args.particles
    results: dict = {"steps": args.gmm_steps, "particles": n, "measurements": args.measurements, "problems": {}}
    for problem in GMM_PROBLEMS:
        prior, op = gmm_problem(problem, args.seed)
        denoise = lambda x, level, prior=prior: prior.denoise(x, level.alpha, level.sigma)

        def measurement(seed: int):
            g = torch.Generator().manual_seed(seed)
            y = op.measure(prior.sample(1, g), g)
            posterior = prior.condition(op.matrix, y[0], op.sigma_y**2)
            sliced = SlicedWasserstein(posterior, 128, torch.Generator().manual_seed(seed + 7))
            return y, posterior, sliced

        def run(factory, y, scale, seed):
            solver = factory(op, y, scale, n) if scale is not None else factory
            g = torch.Generator().manual_seed(seed)
            out = sample_inverse(denoise, torch.randn(n, prior.dim, generator=g, dtype=F64), plan, solver,
                                 generator=g, disable=True)
            return out, solver.stats.per_sample(n)

        rows: dict = {}
        val_y, val_post, val_sliced = measurement(args.seed + 1000)
        tests = [measurement(args.seed + 1 + k) for k in range(args.measurements)]
        floor = [gmm_errors(post.sample(n, torch.Generator().manual_seed(5)), post, sl) for _, post, sl in tests]
        rows["exact posterior draws (Monte-Carlo floor)"] = {"scale": "-", "errors": floor, "calls": {
            "denoiser_calls": 0, "gradient_calls": 0, "forward_model_calls": 0}}
        prior_rows = []
        for k, (y, post, sl) in enumerate(tests):
            out, calls = run(NoCorrection(), y, None, 100 + k)
            prior_rows.append(gmm_errors(out, post, sl))
        rows["prior samples (no measurement)"] = {"scale": "-", "errors": prior_rows, "calls": calls}
        exact_rows = []
        for k, (y, post, sl) in enumerate(tests):
            solver = ExactLikelihoodScore(prior, op.matrix, y[0], op.sigma_y**2)
            out, calls = run(solver, y, None, 200 + k)
            exact_rows.append(gmm_errors(out, post, sl))
        rows["exact likelihood score (G6), same sampler"] = {"scale": "-", "errors": exact_rows, "calls": calls}
        for name, (factory, grid) in GMM_SOLVERS.items():
            tuning = {}
            for scale in tqdm(grid, desc=f"{problem}: tune {name[:24]}", disable=len(grid) == 1):
                try:
                    out, _ = run(factory, val_y, scale, 300)
                    tuning[scale] = gmm_errors(out, val_post, val_sliced)["sw2"]
                except FloatingPointError:
                    tuning[scale] = math.inf
            best = min(tuning, key=tuning.__getitem__)
            errs = []
            for k, (y, post, sl) in enumerate(tests):
                out, calls = run(factory, y, best, 400 + k)
                errs.append(gmm_errors(out, post, sl))
            rows[name] = {"scale": best, "errors": errs, "calls": calls, "tuning": tuning}
            print(f"{problem} | {name}: scale {best}, sw2 {sum(e['sw2'] for e in errs) / len(errs):.3f}", flush=True)
        results["problems"][problem] = rows
    return results


def _mean_sd(values: list[float]) -> str:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1))
    return f"{m:.3f} ± {sd:.3f}" if len(values) > 1 else f"{m:.3f}"


def _avg(row: dict, key: str) -> float:
    return sum(e[key] for e in row["errors"]) / len(row["errors"])


def gmm_summary(res: dict) -> list[str]:
    lines = []
    for problem, rows in res["problems"].items():
        dps = rows["DPS, code step (scale * grad ||r||)"]
        enkg_name = min((n for n in rows if n.startswith("EnKG")), key=lambda n: _avg(rows[n], "sw2"))
        enkg = rows[enkg_name]
        mcg = rows["MCG (scale * grad ||r|| + projection)"]
        lines.append(f"- {problem}: best EnKG ({enkg_name.split(', ', 1)[1]}) sliced W2 {_avg(enkg, 'sw2'):.3f} vs DPS "
                     f"{_avg(dps, 'sw2'):.3f} and MCG {_avg(mcg, 'sw2'):.3f}, with no gradients and "
                     f"{enkg['calls']['denoiser_calls'] / dps['calls']['denoiser_calls']:.0f}x DPS's denoiser calls.")
    return lines


def gmm_markdown(res: dict) -> str:
    lines = [
        f"### Exact Gaussian-mixture posteriors ({res['particles']} particles, {res['steps']} DDIM steps of the "
        f"linear-beta DDPM schedule, {res['measurements']} test measurements)",
        "",
        "Prior: exact MMSE denoiser of the mixture; `y = A x0 + n`, `A` a random matrix with singular values in "
        "[0.5, 1.5), `sigma_y = 0.3`. Each solver's scale is the best of its grid on a separate validation "
        "measurement (sliced W2). Errors against the exact posterior (G5), mean ± sd over test measurements: "
        "sliced W2 (128 directions, exact quantiles), norm of the mean error, mode-mass total variation. Calls are "
        "per sample: gradient = backward passes through the denoiser, forward = evaluations of `A`.",
    ]
    for problem, rows in res["problems"].items():
        lines += ["", f"**{problem}**", "",
                  "| solver | scale | sliced W2 | mean error | mode mass (TV) | denoiser calls | gradient calls "
                  "| forward calls |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            errs = row["errors"]
            lines.append(f"| {name} | {row['scale']} | {_mean_sd([e['sw2'] for e in errs])} | "
                         f"{_mean_sd([e['mean'] for e in errs])} | {_mean_sd([e['mass'] for e in errs])} | "
                         f"{row['calls'].get('denoiser_calls', 0):.0f} | {row['calls']['gradient_calls']:.0f} | "
                         f"{row['calls']['forward_model_calls']:.0f} |")
    lines += ["", "Summary (mean over test measurements):", "", *gmm_summary(res)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ digits
DIGIT_TASKS = {  # row label -> (task, sigma_y; None = --sigma-y)
    "inpaint_box": ("inpaint_box", None),
    "inpaint_box, noiseless": ("inpaint_box", 0.0),
    "sr4": ("sr4", None),
    "deblur_gauss": ("deblur_gauss", None),
}
DIGIT_SOLVERS: dict[str, dict] = {
    # name -> solver, scale grid, particles per image, extra options
    "DPS": {"solver": "dps", "grid": [0.3, 1.0, 3.0, 10.0], "particles": 1, "options": {}},
    "MCG": {"solver": "mcg", "grid": [0.3, 1.0, 3.0, 10.0], "particles": 1, "options": {}},
    "EnKG (J = 32, no gradients)": {"solver": "enkg", "grid": [0.25, 0.5, 1.0, 2.0, 4.0], "particles": 32,
                                    "steps": 50, "options": {"max_ode_steps": 5}},
    "EnKG (J = 128, no gradients)": {"solver": "enkg", "scale_from": "EnKG (J = 32, no gradients)", "particles": 128,
                                     "steps": 50, "images": 4, "options": {"max_ode_steps": 5}},
}


def validation_digits(count: int) -> torch.Tensor:
    """Tuning images from the digits *train* split (the test split is kept for the scores)."""
    from diffguide.tasks.digits import load_digits_tensors

    images, _ = load_digits_tensors("train", size=16)
    return images[:count]


def _summary(values: torch.Tensor) -> dict:
    values = values.double()
    se = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "se": se, "values": values.tolist()}


def _paired_gap(row: dict, base: dict, num_images: int, particles: int = 1) -> str:
    """``mean ± se`` over the first ``num_images`` images of ``row``'s PSNR (particle mean) minus ``base``'s."""
    values, reference = row["psnr"].get("values"), base["psnr"].get("values")
    if values is None or reference is None:
        return "n/a"
    per_image = torch.tensor(values[: num_images * particles]).view(num_images, particles).mean(1)
    gaps = per_image - torch.tensor(reference[:num_images])
    se = float(gaps.std() / math.sqrt(num_images)) if num_images > 1 else 0.0
    return f"{float(gaps.mean()):+.2f} ± {se:.2f} dB"


def run_digits(args, cached: dict | None = None) -> dict:
    from diffguide.tasks import inverse, zoo

    pipe = zoo.load("digits-class")
    pipe.unet.requires_grad_(False)
    truth = inverse.held_out_digits(list(range(args.images)))
    val = validation_digits(args.val_images)
    out: dict = {"steps": args.digit_steps, "images": args.images, "sigma_y": args.sigma_y, "tasks": {}}
    for label in args.digit_tasks:
        task, sigma_y = DIGIT_TASKS[label]
        op = inverse.make_task(task, args.sigma_y if sigma_y is None else sigma_y, seed=args.seed)
        y = op.measure(truth, torch.Generator().manual_seed(args.seed + 1))
        y_val = op.measure(val, torch.Generator().manual_seed(args.seed + 2))
        rows: dict = dict((cached or {}).get("tasks", {}).get(label, {}))
        if op.is_linear:
            rec, _ = inverse.solve_pixel(pipe, op, y, "pinv")
            sc = inverse.scores(rec, truth)
            rows["A^+ y (pseudo-inverse)"] = {"scale": "-", "psnr": _summary(sc["psnr"]), "ssim": _summary(sc["ssim"]),
                                             "calls": {}, "seconds": 0.0}
        for name, spec in DIGIT_SOLVERS.items():
            if name not in args.digit_solvers:
                continue
            particles = spec["particles"]
            steps = spec.get("steps", args.digit_steps) if not args.quick else args.digit_steps
            n_val = 2 if particles > 1 else len(val)
            n_test = min(spec.get("images", args.enkg_images), len(truth)) if particles > 1 else len(truth)
            tuning = {}
            grid = [rows[spec["scale_from"]]["scale"]] if "scale_from" in spec else spec["grid"]
            for scale in tqdm(grid, desc=f"{label}: tune {name}", disable=len(grid) == 1):
                if len(grid) == 1:
                    tuning[scale] = math.nan
                    break
                try:
                    rec, _ = inverse.solve_pixel(pipe, op, y_val[:n_val], spec["solver"], steps=steps,
                                                 seed=args.seed, scale=scale, particles=particles, **spec["options"])
                    target = val[:n_val].repeat_interleave(particles, 0)
                    tuning[scale] = float(inverse.scores(rec, target)["psnr"].mean())
                except FloatingPointError:
                    tuning[scale] = -math.inf
            best = max(tuning, key=tuning.__getitem__)
            start = time.time()
            rec, stats = inverse.solve_pixel(pipe, op, y[:n_test], spec["solver"], steps=steps,
                                             seed=args.seed + 3, scale=best, particles=particles, progress=True,
                                             **spec["options"])
            sc = inverse.scores(rec, truth[:n_test].repeat_interleave(particles, 0))
            rows[name] = {"scale": best, "psnr": _summary(sc["psnr"]), "ssim": _summary(sc["ssim"]),
                          "calls": stats.per_sample(rec.shape[0]), "seconds": (time.time() - start) / n_test,
                          "tuning": tuning, "images": n_test, "steps": steps}
            print(f"{label} | {name}: scale {best}, PSNR {rows[name]['psnr']['mean']:.2f}", flush=True)
        out["tasks"][label] = rows
    return out


def digits_summary(res: dict) -> list[str]:
    """Each solver's PSNR minus DPS's on the same images (EnKG runs score only the first few images)."""
    lines = []
    for task, rows in res["tasks"].items():
        if "DPS" not in rows:
            continue
        parts = []
        for name, row in rows.items():
            if name == "DPS" or name.startswith("A^+"):
                continue
            images = row.get("images", res["images"])
            particles = len(row["psnr"].get("values", [])) // images if row["psnr"].get("values") else 1
            short = name.split(" (")[0] + (f" J={particles}" if particles > 1 else "")
            parts.append(f"{short} {_paired_gap(row, rows['DPS'], images, particles)} ({images} images)")
        lines.append(f"- {task}: " + ", ".join(parts) + ".")
    return lines


def digits_markdown(res: dict) -> str:
    lines = [
        f"### Held-out digits, `digits-class` prior run unconditionally (`sigma_y = {res['sigma_y']}` on [-1, 1])",
        "",
        "Box inpainting (8x8 hole; also without noise, MCG's setting), 4x super-resolution (average pooling to "
        "4x4), Gaussian deblurring (9x9, std 2, circular). PSNR (dB) / SSIM on [0, 1], mean ± standard error over "
        "images (EnKG: over all particles of its images). Scales picked from each solver's grid by PSNR on "
        "train-split digits (the J = 128 rows reuse the J = 32 scale). DPS and MCG: DDPM-ancestral steps, one "
        "sample per image; EnKG: PF-ODE steps, one ensemble per image, at most 5 inner ODE steps. MCG projects "
        "with the pseudo-inverse, whose spectral cut-off (1e-3) lets the noise of a blurred measurement through "
        "amplified (`A^+ y` alone scores the same). Calls per sample.",
        "",
        "| task | solver | steps | scale | images | PSNR | SSIM | denoiser calls | gradient calls | forward calls "
        "| s / image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, rows in res["tasks"].items():
        for name, row in rows.items():
            calls = row["calls"]
            lines.append(
                f"| {task} | {name} | {row.get('steps', '-')} | {row['scale']} | {row.get('images', res['images'])} | "
                f"{row['psnr']['mean']:.2f} ± {row['psnr']['se']:.2f} | "
                f"{row['ssim']['mean']:.3f} ± {row['ssim']['se']:.3f} | "
                f"{calls.get('denoiser_calls', 0):.0f} | {calls.get('gradient_calls', 0):.0f} | "
                f"{calls.get('forward_model_calls', 0):.0f} | {row['seconds']:.1f} |")
    lines += ["", "PSNR minus DPS's PSNR on the same images (mean ± standard error of the per-image differences):",
              "", *digits_summary(res)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ P2L
P2L_TASKS = ["inpaint_box", "sr4", "deblur_gauss"]


def run_p2l(args) -> dict:
    from diffguide.tasks import inverse, zoo

    pipe = zoo.load("digits-t2i")
    pipe.set_progress_bar_config(disable=True)
    truth = inverse.held_out_digits(list(range(args.images)))
    val = validation_digits(args.val_images)
    out: dict = {"steps": args.latent_steps, "images": args.images, "sigma_y": args.sigma_y, "tasks": {}}

    def score(op, y, target, solver, scale, **options):
        rec, stats = inverse.solve_latent(pipe, op, y, solver, steps=args.latent_steps, seed=args.seed, scale=scale,
                                          **options)
        return inverse.scores(rec, target), stats

    for task in P2L_TASKS:
        op = inverse.make_task(task, args.sigma_y, seed=args.seed)
        y = op.measure(truth, torch.Generator().manual_seed(args.seed + 1))
        y_val = op.measure(val, torch.Generator().manual_seed(args.seed + 2))
        tuning = {s: float(score(op, y_val, val, "latent_dps", s)[0]["psnr"].mean()) for s in
                  tqdm([0.3, 1.0, 3.0, 10.0], desc=f"{task}: tune latent DPS")}
        scale = max(tuning, key=tuning.__getitem__)
        p2l_grid = [{"prompt_steps": k, "prompt_lr": 1e-2, "project_every": every, "prox_weight": weight}
                    for k in (1, 3) for every, weight in ((0, None), (10, None), (5, 0.1))]
        p2l_tuning = {json.dumps(o): float(score(op, y_val, val, "p2l", scale, **o)[0]["psnr"].mean())
                      for o in tqdm(p2l_grid, desc=f"{task}: tune P2L")}
        best = json.loads(max(p2l_tuning, key=p2l_tuning.__getitem__))
        label = ", ".join(f"{k}={v}" for k, v in best.items() if v is not None)
        runs = {"latent DPS": ("latent_dps", {}), "PSLD (gluing 0.1)": ("psld", {"gluing": 0.1})}
        if best["project_every"] and best["prompt_steps"]:
            runs["P2L, projection only"] = ("p2l", {**best, "prompt_steps": 0})
            runs["P2L, prompt tuning only"] = ("p2l", {**best, "project_every": 0, "prox_weight": None})
        runs[f"P2L ({label})"] = ("p2l", best)
        rows: dict = {}
        for name, (solver, options) in runs.items():
            start = time.time()
            sc, stats = score(op, y, truth, solver, scale, **options)
            rows[name] = {"scale": scale, "psnr": _summary(sc["psnr"]), "ssim": _summary(sc["ssim"]),
                          "calls": stats.per_sample(len(truth)), "seconds": (time.time() - start) / len(truth)}
            print(f"{task} | {name}: PSNR {rows[name]['psnr']['mean']:.2f}", flush=True)
        out["tasks"][task] = {"rows": rows, "dps_tuning": tuning, "p2l_tuning": p2l_tuning}
    return out


def p2l_markdown(res: dict) -> str:
    lines = [
        f"### P2L vs latent DPS / PSLD on the latent `digits-t2i` pipeline ({res['steps']} DDIM steps, "
        f"`sigma_y = {res['sigma_y']}`, {res['images']} held-out digits)",
        "",
        "Null-prompt conditioning; the latent DPS step scale is tuned on train-split digits and shared by all rows; "
        "P2L's prompt steps per diffusion step (1 or 3, Adam lr 1e-2) and projection (none, `E(D(z0))` every 10 "
        "steps, proximal `lambda = 0.1` every 5 steps) are picked from that 6-point grid the same way. All rows run "
        "DDIM with eta = 0. "
        "Calls per sample (gradient calls include the prompt-tuning backward passes).",
        "",
        "| task | solver | scale | PSNR | SSIM | denoiser calls | gradient calls | s / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, entry in res["tasks"].items():
        for name, row in entry["rows"].items():
            calls = row["calls"]
            lines.append(f"| {task} | {name} | {row['scale']} | {row['psnr']['mean']:.2f} ± {row['psnr']['se']:.2f} | "
                         f"{row['ssim']['mean']:.3f} ± {row['ssim']['se']:.3f} | {calls['denoiser_calls']:.0f} | "
                         f"{calls['gradient_calls']:.0f} | {row['seconds']:.1f} |")
    lines += ["", "P2L's PSNR minus the baselines' on the same images and initial noise (mean ± standard error):", ""]
    for task, entry in res["tasks"].items():
        rows = entry["rows"]
        full = rows[[name for name in rows if name.startswith("P2L (")][0]]
        n = res["images"]
        lines.append(f"- {task}: {_paired_gap(full, rows['latent DPS'], n)} vs latent DPS, "
                     f"{_paired_gap(full, rows['PSLD (gluing 0.1)'], n)} vs PSLD.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="*", default=["gmm", "digits", "p2l"], choices=["gmm", "digits", "p2l"],
                        help="parts to run (none: only rewrite the section from the cached results)")
    parser.add_argument("--particles", type=int, default=2000)
    parser.add_argument("--gmm-steps", type=int, default=100)
    parser.add_argument("--measurements", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=32, help="held-out digits per task")
    parser.add_argument("--enkg-images", type=int, default=8, help="held-out digits for EnKG (32 particles each)")
    parser.add_argument("--val-images", type=int, default=8, help="train-split digits for tuning")
    parser.add_argument("--digit-steps", type=int, default=100)
    parser.add_argument("--latent-steps", type=int, default=100)
    parser.add_argument("--sigma-y", type=float, default=0.05)
    parser.add_argument("--digit-tasks", nargs="+", default=list(DIGIT_TASKS), choices=list(DIGIT_TASKS))
    parser.add_argument("--digit-solvers", nargs="+", default=list(DIGIT_SOLVERS), choices=list(DIGIT_SOLVERS),
                        help="rerun only these solvers (other cached rows are kept)")
    parser.add_argument("--quick", action="store_true", help="500 particles, 1 measurement (smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print the markdown instead of writing it")
    args = parser.parse_args(argv)
    if args.quick:
        args.particles, args.measurements, args.images, args.enkg_images, args.val_images = 500, 1, 4, 2, 2
        args.digit_steps = args.latent_steps = 20
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    for part in args.parts:
        start = time.time()
        result = run_digits(args, cache.get("digits")) if part == "digits" else \
            {"gmm": run_gmm, "p2l": run_p2l}[part](args)
        result["seconds"] = time.time() - start
        if not args.quick:                               # re-read: other runs may have written meanwhile
            cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
        partial = set(args.digit_tasks) != set(DIGIT_TASKS) or set(args.digit_solvers) != set(DIGIT_SOLVERS)
        if part == "digits" and "digits" in cache and partial:
            merged = cache["digits"]                     # refresh only the tasks and rows that were run
            merged["tasks"].update(result["tasks"])
            merged["seconds"] = merged.get("seconds", 0) + result["seconds"]
            result = merged
        cache[part] = result
        if not args.quick:
            CACHE.parent.mkdir(exist_ok=True)
            CACHE.write_text(json.dumps(cache, indent=1, default=str))
    sections = ["## Inverse problems (`benchmarks/bench_inverse.py`)"]
    for part, render in (("gmm", gmm_markdown), ("digits", digits_markdown), ("p2l", p2l_markdown)):
        if part in cache:
            sections.append(render(cache[part]) + f"\n\n({cache[part]['seconds'] / 60:.0f} min on 2 CPU cores.)")
    markdown = "\n\n".join(sections)
    if args.no_write or args.quick:
        print(markdown)
    else:
        write_section("inverse", markdown)


if __name__ == "__main__":
    main()
