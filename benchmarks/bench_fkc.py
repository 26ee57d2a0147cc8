"""Feynman-Kac correctors: error to exact targets vs particles and steps, FKC against the unweighted sampler at
equal NFE (same drift, same network calls, no weights), the time-step bias of the test configurations, and
classifier checks on ``digits-class`` (product of two classes; CFG-FKC vs CFG).

The Gaussian-mixture parts use the exact noise prediction of ``tasks.gmm`` as the network and DDIM plans of a
DDPM linear schedule (VP, beta 0.1..20), as ``tests/test_fkc.py`` does. Monte-Carlo errors come from
independent particle systems run side by side (``num_groups``). Writes the ``fkc`` section of BENCHMARKS.md.

    OMP_NUM_THREADS=1 python benchmarks/bench_fkc.py                  # about half an hour on 2 shared cores
    OMP_NUM_THREADS=1 python benchmarks/bench_fkc.py --quick --no-write
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler

from diffguide.guidance import FKCAnneal, FKCCFG, FKCDenoiser, FKCGuidance, FKCProduct
from diffguide.samplers import SMCResult, diffusers_model_fn, plan_from_scheduler, sample_smc
from common import write_section
from diffguide.tasks.gmm import ClassConditionalGMM, GaussianMixture, GridDensity, annealed_grid, geometric_grid

F64 = torch.float64
SCHEDULER = DDIMScheduler(clip_sample=False, set_alpha_to_one=True)


def mixture_1d(weights, means, variances) -> GaussianMixture:
    return GaussianMixture.isotropic(torch.tensor(weights, dtype=F64), torch.tensor(means, dtype=F64)[:, None],
                                     torch.tensor(variances, dtype=F64))


# the 1-D mixtures of the reference notes' check (Sec. 9.6) and of tests/test_fkc.py
A = mixture_1d([0.3, 0.7], [-2.0, 2.0], [0.25, 0.25])
B = mixture_1d([0.5, 0.5], [-1.0, 3.0], [0.5, 0.5])
U = mixture_1d([0.5, 0.5], [-2.0, 2.0], [1.0, 1.0])
C = mixture_1d([0.2, 0.8], [-2.0, 2.0], [0.25, 0.25])
WIDTHS = mixture_1d([0.5, 0.5], [-2.0, 2.0], [0.1, 1.0])          # unequal widths: annealing moves mass
Q1, Q2 = mixture_1d([0.3, 0.7], [-2.0, 2.0], [0.25, 0.25]), mixture_1d([0.6, 0.4], [-1.0, 2.5], [0.8, 0.1])
C2, U2 = mixture_1d([0.5, 0.5], [-2.0, 2.0], [0.1, 0.5]), mixture_1d([0.5, 0.5], [-2.0, 2.0], [1.0, 1.0])


def exact_eps(mixture: GaussianMixture) -> Callable:
    """``(x_t, t, cond) -> E[eps | x_t]`` at integer timesteps of ``SCHEDULER`` (tasks.gmm)."""
    return ClassConditionalGMM([mixture], SCHEDULER.alphas_cumprod, sample_shape=(1, mixture.dim, 1)).eps


@dataclass
class Case:
    name: str
    guide: FKCGuidance
    experts: list[GaussianMixture]
    truth: GaussianMixture | GridDensity
    noise: float
    masses_of: GaussianMixture  # whose responsibilities define the mode masses

    def denoiser(self) -> FKCDenoiser:
        return FKCDenoiser([exact_eps(m) for m in self.experts], self.guide, [None] * len(self.experts))


def notes_cases(noise: float) -> list[Case]:
    return [
        Case("anneal beta=3 (A)", FKCAnneal(3.0), [A], annealed_grid(A, 3.0), noise, A),
        Case("product A*B", FKCProduct(), [A, B], A.product(B), noise, A.product(B)),
        Case("CFG w=2 (C, U)", FKCCFG(2.0), [C, U], geometric_grid(C, U, 2.0), noise, C),
        Case("CFG w=1.5 (C, U)", FKCCFG(1.5), [C, U], geometric_grid(C, U, 1.5), noise, C),
    ]


def test_cases() -> list[Case]:
    """The configurations of tests/test_fkc.py (500 steps there)."""
    return [
        Case("anneal beta=2, unequal widths", FKCAnneal(2.0), [WIDTHS], annealed_grid(WIDTHS, 2.0), 2.0, WIDTHS),
        Case("CFG w=2, unequal widths", FKCCFG(2.0), [C2, U2], geometric_grid(C2, U2, 2.0), 1.0, C2),
        Case("product (Q1, Q2)", FKCProduct(), [Q1, Q2], Q1.product(Q2), 2.0, Q1.product(Q2)),
    ]


# ------------------------------------------------------------------------------------------------------------
# running and scoring
# ------------------------------------------------------------------------------------------------------------
def run(den: FKCDenoiser, weighted: bool, groups: int, particles: int, steps: int, noise: float, seed: int,
        dim: int = 1) -> SMCResult:
    def plain(x, level):
        return den(x, level).x0

    plain.init_noise_sigma = den.init_noise_sigma
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups * particles, dim, generator=g, dtype=F64)
    return sample_smc(den if weighted else plain, x, plan_from_scheduler(SCHEDULER, steps), num_groups=groups,
                      noise=noise, generator=g, disable=True)


def truth_stats(case: Case) -> torch.Tensor:
    """[mean, variance, mode masses] of the exact target."""
    masses = case.truth.weights if isinstance(case.truth, GaussianMixture) else case.truth.mode_masses(case.masses_of)
    return torch.cat([case.truth.mean(), case.truth.cov().flatten(), masses])


def group_stats(result: SMCResult, masses_of: GaussianMixture) -> torch.Tensor:
    groups, n = result.log_weights.shape
    x = result.x.reshape(groups, n, -1)
    out = []
    for g in range(groups):
        w = result.weights[g]
        mean = w @ x[g]
        cov = (w[:, None] * (x[g] - mean)).T @ (x[g] - mean)
        out.append(torch.cat([mean, cov.flatten(), w @ masses_of.responsibilities(x[g])]))
    return torch.stack(out)


def cdf_box(truth: GaussianMixture | GridDensity) -> tuple[Callable, float, float]:
    if isinstance(truth, GridDensity):
        h = float(truth.spacing[0])
        return truth.cdf, float(truth.points[0, 0]) - h, float(truth.points[-1, 0]) + h
    std = truth.covs[:, 0, 0].sqrt()
    return truth.cdf, float((truth.means[:, 0] - 12 * std).min()), float((truth.means[:, 0] + 12 * std).max())


def wasserstein_1(x: torch.Tensor, w: torch.Tensor, truth: GaussianMixture | GridDensity) -> float:
    """``W1 = int |F_samples - F_truth|`` for weighted 1-D samples, on a 20001-point grid."""
    cdf, lo, hi = cdf_box(truth)
    z = torch.linspace(lo, hi, 20001, dtype=F64)
    order = x.flatten().argsort()
    cum = torch.cat([w.new_zeros(1), w.flatten()[order].cumsum(0)])
    f_samples = cum[torch.searchsorted(x.flatten()[order].contiguous(), z, right=True)]
    return float((f_samples - cdf(z)).abs().sum() * (z[1] - z[0]))


def exact_draws(truth: GaussianMixture | GridDensity, n: int, generator: torch.Generator) -> torch.Tensor:
    if isinstance(truth, GaussianMixture):
        return truth.sample(n, generator)
    cells = torch.multinomial(truth.probs, n, replacement=True, generator=generator)
    jitter = torch.rand(n, 1, generator=generator, dtype=F64) - 0.5
    return truth.points[cells] + jitter * truth.spacing


def fmt(value: float, se: float | None = None, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if se is None else f"{value:.{digits}f} ± {se:.{digits}f}"


# ------------------------------------------------------------------------------------------------------------
# part 1: the reference notes' 1-D table (Sec. 9.6)
# ------------------------------------------------------------------------------------------------------------
def notes_table(groups: int, particles: int, steps: int) -> str:
    rows = ["| target | noise | sampler | mean (truth) | variance (truth) | P(x>0) (truth) | resamplings |",
            "|---|---|---|---|---|---|---|"]
    for noise in (1.0, 2.0):
        for case in notes_cases(noise):
            cdf, _, _ = cdf_box(case.truth)
            positive = 1 - float(cdf(torch.zeros(1, dtype=F64)))
            truth = [float(case.truth.mean()[0]), float(case.truth.cov()[0, 0]), positive]
            for weighted in (True, False):
                t0 = time.time()
                result = run(case.denoiser(), weighted, groups, particles, steps, noise, seed=1)
                x, w = result.x.reshape(groups, particles), result.weights
                mean = (w * x).sum(1)
                stats = torch.stack([mean, (w * (x - mean[:, None]) ** 2).sum(1), (w * (x > 0)).sum(1)], 1)
                est, se = stats.mean(0), stats.std(0) / math.sqrt(groups)
                cells = " | ".join(f"{fmt(float(e), float(s))} ({t:.3f})" for e, s, t in zip(est, se, truth))
                rows.append(f"| {case.name} | {noise:g} | {'FKC' if weighted else 'unweighted'} | {cells} | "
                            f"{result.num_resampling_events / groups:.0f} |")
                print(rows[-1], f"[{time.time() - t0:.0f}s]", flush=True)
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------------------
# part 2: W1 error vs particles and steps, FKC vs unweighted at equal NFE
# ------------------------------------------------------------------------------------------------------------
def budget_table(particle_counts: list[int], step_counts: list[int], replicates: int) -> tuple[str, list[float]]:
    rows = ["| target | particles | steps | NFE / particle | W1 FKC | W1 unweighted | ratio | W1 exact draws |",
            "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for case in test_cases():
        experts = len(case.experts)
        for particles in particle_counts:
            g = torch.Generator().manual_seed(0)
            iid = sum(wasserstein_1(exact_draws(case.truth, particles, g), torch.full((particles,), 1 / particles,
                                    dtype=F64), case.truth) for _ in range(replicates)) / replicates
            for steps in step_counts:
                t0 = time.time()
                errs = []
                for weighted in (True, False):
                    result = run(case.denoiser(), weighted, replicates, particles, steps, case.noise, seed=2)
                    x = result.x.reshape(replicates, particles)
                    errs.append(sum(wasserstein_1(x[r], result.weights[r], case.truth)
                                    for r in range(replicates)) / replicates)
                ratios.append(errs[0] / errs[1])
                rows.append(f"| {case.name} | {particles} | {steps} | {steps * experts} | {errs[0]:.4f} | "
                            f"{errs[1]:.4f} | {ratios[-1]:.2f} | {iid:.4f} |")
                print(rows[-1], f"[{time.time() - t0:.0f}s]", flush=True)
    return "\n".join(rows), ratios


# ------------------------------------------------------------------------------------------------------------
# part 3: time-step bias of the test configurations
# ------------------------------------------------------------------------------------------------------------
def bias_table(groups: int, particles: int) -> str:
    class_0 = GaussianMixture.isotropic(torch.tensor([0.4, 0.6], dtype=F64),
                                        torch.tensor([[-1.5, 0.0], [1.5, 1.0]], dtype=F64),
                                        torch.tensor([0.3, 0.3], dtype=F64))
    class_1 = GaussianMixture.isotropic(torch.tensor([0.5, 0.5], dtype=F64),
                                        torch.tensor([[-1.0, 1.5], [1.0, -1.0]], dtype=F64),
                                        torch.tensor([0.5, 0.5], dtype=F64))
    gmm = ClassConditionalGMM([class_0, class_1], SCHEDULER.alphas_cumprod, sample_shape=(1, 2, 1))
    product = class_0.product(class_1)
    rows = ["| test target | steps | statistic | estimate - truth | stated bias tolerance |", "|---|---|---|---|---|"]
    configs = [(case, case.denoiser(), 500, 1) for case in test_cases()]
    labels = [torch.full((groups * particles,), label) for label in (0, 1)]
    two_d = Case("2-D product of two classes", FKCProduct(), [class_0, class_1], product, 2.0, product)
    configs.append((two_d, FKCDenoiser(gmm.eps, FKCProduct(), labels), 250, 2))
    for case, den, steps, dim in configs:
        t0 = time.time()
        result = run(den, True, groups, particles, steps, case.noise, seed=3, dim=dim)
        stats = group_stats(result, case.masses_of)
        est, se, truth = stats.mean(0), stats.std(0) / math.sqrt(groups), truth_stats(case)
        std = case.truth.cov().diagonal().sqrt()
        tol = torch.cat([0.02 * std, 0.05 * (std[:, None] * std[None, :]).flatten(),
                         torch.full((len(truth) - dim - dim * dim,), 0.01)])
        names = ([f"mean[{i}]" for i in range(dim)] + [f"cov[{i}{j}]" for i in range(dim) for j in range(dim)]
                 + [f"mass[{k}]" for k in range(len(truth) - dim - dim * dim)])
        for name, e, s, t, b in zip(names, est, se, truth, tol):
            rows.append(f"| {case.name} | {steps} | {name} | {fmt(float(e - t), float(s), 4)} | {float(b):.4f} |")
        print(f"{case.name}: {time.time() - t0:.0f}s", flush=True)
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------------------
# part 4: digits-class
# ------------------------------------------------------------------------------------------------------------
def mean_se(values: torch.Tensor) -> str:
    return fmt(float(values.mean()), float(values.std() / math.sqrt(len(values))))


def classify(classifier, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(classifier(images.clamp(-1, 1).float()), dim=-1)


SAMPLERS = {  # name -> (weighted, sample_smc options)
    "FKC": (True, {"ess_threshold": 0.5}),
    "FKC (every step, clamp 1)": (True, {"ess_threshold": 1.0, "clamp": 1.0}),  # the official image settings
    "unweighted": (False, {}),
}


def digits_images(den: FKCDenoiser, sampler: str, particles: int, plan, seed: int) -> tuple[torch.Tensor, float]:
    """One image per group of ``particles`` (drawn by weight) for FKC, every particle for the unweighted
    sampler; and the resampling events per group."""
    weighted, options = SAMPLERS[sampler]
    n = den.conds[0].shape[0]
    x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    result = sample_smc(den if weighted else _unweighted(den), x, plan, num_groups=n // particles,
                        generator=torch.Generator().manual_seed(seed + 1), disable=True, **options)
    images = result.select(torch.Generator().manual_seed(seed + 2)) if weighted else result.x
    return images, result.num_resampling_events / (n // particles)


def digits_tables(images_per_pair: int, images_per_label: int, particles: int, steps: int,
                  pairs: list[tuple[int, int]], scale: float) -> str:
    from diffguide.tasks import zoo

    pipe, classifier = zoo.load("digits-class"), zoo.load("digits-classifier")
    model_fn = diffusers_model_fn(pipe.unet)
    plan = plan_from_scheduler(pipe.scheduler, steps)
    out = [f"Product of two classes (`FKCProduct`, `digits-class`, {steps} DDPM steps, {particles} particles per "
           "FKC image; the unweighted sampler has the same drift and keeps every particle as an image, so it spends "
           "the same NFE on more images). `digits-classifier` on the images: top-1 in the pair, both classes in "
           "the top-2, mean min(p_a, p_b).", "",
           "| pair | sampler | images | top-1 in pair | both in top-2 | mean min(p_a, p_b) | resamplings / image |",
           "|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        n = images_per_pair * particles
        den = FKCDenoiser(model_fn, FKCProduct(), [torch.full((n,), a), torch.full((n,), b)])
        for sampler in SAMPLERS:
            t0 = time.time()
            images, events = digits_images(den, sampler, particles, plan, seed=10 * a + b)
            p = classify(classifier, images)
            top2 = p.topk(2, dim=-1).indices
            either = ((p.argmax(-1) == a) | (p.argmax(-1) == b)).float().mean()
            both = ((top2 == a).any(-1) & (top2 == b).any(-1)).float().mean()
            out.append(f"| {a}, {b} | {sampler} | {len(images)} | {either:.2f} | {both:.2f} | "
                       f"{mean_se(torch.minimum(p[:, a], p[:, b]))} | {events:.1f} |")
            print(out[-1], f"[{time.time() - t0:.0f}s]", flush=True)
    out += ["", f"CFG-FKC (`FKCCFG({scale:g})`, target p_c^w p_u^(1-w)) vs CFG (the same drift, unweighted), labels "
            f"0-9, {steps} DDPM steps, {particles} particles per FKC image. Classifier accuracy, mean p(label | "
            "image) and mean log p(label | image).", "",
            "| sampler | images | accuracy | mean p(label) | mean log p(label) | resamplings / image |",
            "|---|---|---|---|---|---|"]
    labels = torch.arange(10).repeat_interleave(images_per_label * particles)
    den = FKCDenoiser(model_fn, FKCCFG(scale), [labels, torch.full_like(labels, pipe.null_class_label)])
    for sampler in SAMPLERS:
        t0 = time.time()
        images, events = digits_images(den, sampler, particles, plan, seed=7)
        image_labels = labels[::particles] if SAMPLERS[sampler][0] else labels
        p = classify(classifier, images).gather(1, image_labels[:, None]).squeeze(1)
        acc = (classify(classifier, images).argmax(-1) == image_labels).float().mean()
        out.append(f"| {'CFG' if sampler == 'unweighted' else sampler} | {len(images)} | {acc:.3f} | "
                   f"{mean_se(p)} | {mean_se(p.log())} | {events:.1f} |")
        print(out[-1], f"[{time.time() - t0:.0f}s]", flush=True)
    return "\n".join(out)


def _unweighted(den: FKCDenoiser):
    def plain(x, level):
        return den(x, level).x0

    plain.init_noise_sigma = den.init_noise_sigma
    return plain


DIGITS_READING = (
    "Reading: the digits checks see the targets only through a classifier that is already near-certain on these "
    "samples, and on them FKC does not beat the unweighted sampler: for the product of two classes the unweighted "
    "images score a higher mean min(p_a, p_b) than adaptively resampled FKC in every pair, "
    "and CFG-FKC and CFG give the same accuracy and p(label). Neither statistic is the target density, so these rows "
    "check that FKC runs on a trained network (finite weights, resampling counts, one image per group); the evidence "
    "that the weights correct the sampled distribution is the exact-target tables above.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10x fewer particles and steps (a smoke run)")
    parser.add_argument("--parts", default="notes,budget,bias,digits", help="comma-separated subset")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    q = 10 if args.quick else 1
    sections = ["## Feynman-Kac correctors (`benchmarks/bench_fkc.py`)\n\n"
                "Written by `benchmarks/bench_fkc.py`. Exact Gaussian-mixture networks (`tasks.gmm`), DDIM plans of "
                "the DDPM linear schedule; \"unweighted\" is the same sampler (drift, noise, network calls) without "
                "weights, so every comparison is at equal NFE. ± is the Monte-Carlo standard error over "
                "independent particle systems (digits: over images). 1-D mixtures as (weights; means; variances): "
                "A (0.3, 0.7; -2, 2; 0.25), B (0.5, 0.5; -1, 3; 0.5), C (0.2, 0.8; -2, 2; 0.25), U (0.5, 0.5; -2, 2; "
                "1); the test configurations anneal (0.5, 0.5; -2, 2; 0.1, 1) with beta 2, CFG w = 2 of "
                "(0.5, 0.5; -2, 2; 0.1, 0.5) over U, product of Q1 = A and Q2 (0.6, 0.4; -1, 2.5; 0.8, 0.1). \"noise\" "
                "is `sample_smc`'s SDE noise (1: DDPM's reverse SDE, 2: plus a Langevin step)."]
    ratios: list[float] = []
    if "notes" in parts:
        sections += ["", f"### 1-D reference mixtures: 10 x {5000 // q} particles, {1000 // q} steps", "",
                     notes_table(10, 5000 // q, 1000 // q)]
    if "budget" in parts:
        table, ratios = budget_table([1000 // q, 10000 // q, 50000 // q], [100 // q, 300 // q, 1000 // q], 2)
        best = ratios[2::3]
        sections += ["", "### W1 to the exact target vs particles and steps (mean of 2 systems)", "", table, "",
                     f"Goal FKC error <= 1/3 of the unweighted sampler's: met in {sum(r <= 1 / 3 for r in ratios)} "
                     f"of {len(ratios)} settings; at {1000 // q} steps in {sum(r <= 1 / 3 for r in best)} of "
                     f"{len(best)}."]
    if "bias" in parts:
        sections += ["", f"### Bias of the test configurations: 10 x {10000 // q} particles", "",
                     bias_table(10, 10000 // q)]
    if "digits" in parts:
        sections += ["", "### digits-class", "",
                     digits_tables(32 // (16 if args.quick else 1), 8 // (8 if args.quick else 1), 8,
                                   30 // (3 if args.quick else 1), [(1, 7), (4, 9), (3, 8), (5, 6)], 3.0),
                     "", DIGITS_READING]
    markdown = "\n".join(sections)
    print(markdown)
    if not args.no_write:
        write_section("fkc", markdown)


if __name__ == "__main__":
    main()
