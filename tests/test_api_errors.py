"""Python API mistakes end in a ValueError / TypeError that says what is wrong: two parametrised tables.

1. Every guide and solver class of ``diffguide.guidance``: each constructor parameter annotated as a number, an
   int, a bool or a str is fed wrong values, and the error must name the parameter (sequence parameters have
   rows of their own in the second table). A new class fails
   ``test_every_guide_class_has_a_row`` until its required arguments are added to ``REQUIRED``.
2. Other public calls (samplers' guided denoiser, the pipeline, the zoo, the metrics), one row per mistake.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

from diffguide import guidance
from diffguide.guidance.base import Guidance
from diffguide.guidance.fkc import FKCGuidance
from diffguide.guidance.measurement import MeasurementSolver
from diffguide.samplers import sample_ddim
from diffguide.samplers.base import Level
from diffguide.tasks import zoo
from diffguide.tasks.classifier import DigitClassifier
from diffguide.tasks.metrics import DigitFeatures, ImageMetrics
from diffguide.tasks.operators import MatrixOperator, random_matrix
from guide_models import class_pipe, gmm_problem


def identity(x, *args):
    return x


def operator():
    return MatrixOperator(random_matrix(2, 4, torch.Generator().manual_seed(0)), sigma_y=0.05)


# class name -> its required arguments (valid values)
REQUIRED = {
    "AdaptiveGuidance": dict, "APG": dict, "CFG": dict, "CFGPlusPlus": dict, "CFGRescale": dict,
    "CFGZeroStar": dict, "LinearAG": dict, "RectifiedCFGPlusPlus": dict,
    "Autoguidance": lambda: {"guide_model": identity},
    "DynamicCFG": lambda: {"evaluators": [identity]},
    "GFCG": lambda: {"classifier": identity},
    "GuidanceInterval": lambda: {"guide": guidance.CFG(2.0)},
    "NormRescale": lambda: {"guide": guidance.CFG(2.0)},
    "DPS": lambda: {"operator": operator(), "y": torch.zeros(1, 2)},
    "MCG": lambda: {"operator": operator(), "y": torch.zeros(1, 2)},
    "EnKG": lambda: {"operator": operator(), "y": torch.zeros(1, 2)},
    "DDRM": lambda: {"operator": operator(), "y": torch.zeros(1, 2)},
    "DDNM": lambda: {"operator": operator(), "y": torch.zeros(1, 2)},
    "DiffPIR": lambda: {"operator": operator(), "y": torch.zeros(1, 2)},
    "PiGDM": lambda: {"operator": operator(), "y": torch.zeros(1, 2)},
    "DAPS": lambda: {"operator": operator(), "y": torch.zeros(1, 2)},
    "REDDiff": lambda: {"operator": operator(), "y": torch.zeros(1, 2)},
    "PSLD": lambda: {"operator": operator(), "y": torch.zeros(1, 2), "decode": identity, "encode": identity},
    "P2L": lambda: {"operator": operator(), "y": torch.zeros(1, 2), "model_fn": identity,
                    "embedding": torch.zeros(1, 4, 5), "decode": identity, "encode": identity},
    "FKCAnneal": lambda: {"beta": 2.0}, "FKCProduct": dict, "FKCCFG": lambda: {"scale": 2.0},
    "ImageCFG": dict,
}
BASES = (Guidance, FKCGuidance, MeasurementSolver)
KNOWN_GAPS: dict = {}  # (class, parameter, value) -> reason, for a refusal not yet made


def guide_classes() -> dict[str, type]:
    return {name: obj for name in dir(guidance) if isinstance(obj := getattr(guidance, name), type)
            and issubclass(obj, BASES) and obj not in BASES}


def bad_values(annotation: str) -> list:
    """Wrong values for a parameter of this annotation ([] for parameters the table does not probe)."""
    kinds = set(re.findall(r"\b(float|int|bool|str)\b", annotation)) if "[" not in annotation else set()
    values = []
    if kinds & {"float", "int"}:
        values += ["x", True] + ([] if "None" in annotation else [None])
        values += [float("nan")] if "float" in kinds else [2.5]
    elif kinds == {"bool"}:
        values += ["yes", None, 1]
    elif kinds == {"str"}:
        values += ["no-such-option", 3]
    return values


def constructor_cases():
    for name, cls in sorted(guide_classes().items()):
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.name == "self" or not isinstance(param.annotation, str):
                continue
            for value in bad_values(param.annotation):
                marks = ([pytest.mark.xfail(reason=KNOWN_GAPS[(name, param.name, value)])]
                         if (name, param.name, value) in KNOWN_GAPS else [])
                yield pytest.param(name, param.name, value, id=f"{name}-{param.name}={value!r}", marks=marks)


def test_every_guide_class_has_a_row():
    assert set(guide_classes()) == set(REQUIRED), "add the new class's required arguments to REQUIRED"
    for name, cls in guide_classes().items():
        cls(**REQUIRED[name]())                                  # the required arguments are valid


@pytest.mark.parametrize("name,param,value", list(constructor_cases()))
def test_guide_parameter_errors_name_the_parameter(name, param, value):
    cls = guide_classes()[name]
    with pytest.raises((TypeError, ValueError), match=re.escape(param)):
        cls(**{**REQUIRED[name](), param: value})


# ------------------------------------------------------------------------------------------- other calls
def run_guided(labels, null, batch=4):
    gmm, plan, _, _, x = gmm_problem(batch=batch, steps=2)
    sample_ddim(guidance.GuidedDenoiser(gmm.eps, guidance.CFG(2.0), labels, null), x, plan, disable=True)


def run_fkc(second_labels, batch=4):
    gmm, plan, labels, _, x = gmm_problem(batch=batch, steps=2)
    model = guidance.FKCDenoiser(gmm.eps, guidance.FKCProduct(), [labels, second_labels])
    model(x, Level(plan.timesteps[0], plan.alpha(0).to(x), plan.sigma_vp(0).to(x), 0, 2))


def run_pipe(**kwargs):
    class_pipe()(**{"class_labels": [1, 2], "num_inference_steps": 2, "output_type": "pt", **kwargs})


def accuracy_metrics():
    return ImageMetrics(["accuracy"], classifier=DigitClassifier(channels=(4, 8), feature_dim=8))


def metrics_update(labels):
    accuracy_metrics().update(torch.rand(4, 1, 16, 16), labels=labels)


def fid_compute_before_update():
    classifier = DigitClassifier(channels=(4, 8), feature_dim=8)
    metrics = ImageMetrics(["fid"], feature=DigitFeatures(classifier))
    metrics.update_real(torch.rand(4, 1, 16, 16))
    metrics.compute()


def construct(name, **bad):
    return lambda: getattr(guidance, name)(**{**REQUIRED[name](), **bad})


CALLS = {
    # id: (call, exception, message)
    "linear-ag-replace-none": (construct("LinearAG", replace=None), TypeError, r"replace must be"),
    "linear-ag-replace-float-index": (construct("LinearAG", replace=[1.5]), TypeError, r"int step indices"),
    "dynamic-candidates-number": (construct("DynamicCFG", candidates=2.0), TypeError, r"candidates must be"),
    "dynamic-candidates-text": (construct("DynamicCFG", candidates=["x"]), TypeError, r"candidates\[0\]"),
    "dynamic-weights-text": (construct("DynamicCFG", weights="x"), TypeError, r"weights must be"),
    "dynamic-weights-item": (construct("DynamicCFG", weights=["x"]), TypeError, r"weights\[0\]"),
    "enkg-window-number": (construct("EnKG", window=0.1), TypeError, r"window must be a pair"),
    "enkg-window-text": (construct("EnKG", window=("a", 0.1)), TypeError, r"window must be a pair"),
    "gfcg-labels-text": (construct("GFCG", labels="x"), TypeError, r"labels must be"),
    "gfcg-labels-float": (construct("GFCG", labels=[0.5]), TypeError, r"labels must be"),
    "gfcg-class-conds-list": (construct("GFCG", class_conds=[1]), TypeError, r"class_conds must be"),
    "dps-clip-text": (construct("DPS", clip_x0="-1,1"), TypeError, r"clip_x0 must be"),
    "fkc-product-exponents-text": (construct("FKCProduct", exponents="x"), ValueError, r"exponents must be"),
    "denoiser-fewer-labels-than-samples": (lambda: run_guided(torch.arange(3), torch.full((4,), 10)), ValueError,
                                           r"cond has 3 rows .* x has 4 samples"),
    "denoiser-more-null-labels": (lambda: run_guided(torch.arange(4), torch.full((6,), 10)), ValueError,
                                  r"uncond has 6 rows .* x has 4 samples"),
    "denoiser-scalar-label": (lambda: run_guided(torch.tensor(3), torch.full((4,), 10)), ValueError,
                              r"cond has a 0-d tensor rows"),
    "fkc-denoiser-labels-for-other-batch": (lambda: run_fkc(torch.arange(3)), ValueError,
                                            r"condition of expert 1 has 3 rows .* x has 4 samples"),
    "pipeline-generators-for-other-batch": (lambda: run_pipe(generator=[torch.Generator()] * 3), ValueError,
                                            r"list of generators of length 3"),
    "pipeline-latents-for-other-batch": (lambda: run_pipe(latents=torch.randn(3, 1, 8, 8)), ValueError,
                                         r"latents must have shape \(2, 1, 8, 8\)"),
    "pipeline-label-out-of-range": (lambda: run_pipe(class_labels=[1, 11]), ValueError, r"class label 11"),
    "pipeline-guidance-scale-text": (lambda: run_pipe(guidance_scale="2"), TypeError, r"guidance_scale must be"),
    "pipeline-eta-nan": (lambda: run_pipe(eta=float("nan")), TypeError, r"eta must be a finite"),
    "zoo-none": (lambda: zoo.load(None), TypeError, r"model must be a name .* got NoneType"),
    "zoo-empty": (lambda: zoo.load(""), ValueError, r"model name is empty"),
    "zoo-blank": (lambda: zoo.load("  "), ValueError, r"model name is empty"),
    "zoo-unknown": (lambda: zoo.load("no-such-model"), ValueError, r"known models: digits-class"),
    "zoo-offline-repo-id": (lambda: zoo.load("nobody/no-such-repo"), ValueError, r"cannot be fetched"),
    "metrics-label-too-large": (lambda: metrics_update([0, 1, 2, 12]), ValueError, r"lie in 0\.\.9, got \[12\]"),
    "metrics-label-negative": (lambda: metrics_update([0, -1, 2, 3]), ValueError, r"lie in 0\.\.9, got \[-1\]"),
    "metrics-float-labels": (lambda: metrics_update([0.5, 1, 2, 3]), TypeError, r"labels must be int class indices"),
    "metrics-text-labels": (lambda: metrics_update(["a", 1, 2, 3]), TypeError, r"labels must be int class indices"),
    "metrics-label-count": (lambda: metrics_update([0, 1]), ValueError, r"4 images and 2 labels"),
    "metrics-compute-before-update": (lambda: accuracy_metrics().compute(), ValueError, r"compute\(\) before update"),
    "metrics-fid-compute-before-update": (fid_compute_before_update, ValueError, r"compute\(\) before update"),
    "metrics-compute-after-reset": (lambda: (lambda m: (m.update(torch.rand(2, 1, 16, 16), labels=[1, 2]), m.reset(),
                                                        m.compute()))(accuracy_metrics()), ValueError,
                                    r"compute\(\) before update"),
}


@pytest.mark.parametrize("call,error,message", list(CALLS.values()), ids=list(CALLS))
def test_api_mistakes_raise_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_valid_calls_still_work():
    """The checks above do not refuse what is right: a guided run, labels in range, compute after update."""
    gmm, plan, labels, null, x = gmm_problem(batch=4, steps=2)
    out = sample_ddim(guidance.GuidedDenoiser(gmm.eps, guidance.CFG(2.0), labels, null), x, plan, disable=True)
    assert out.shape == x.shape and torch.isfinite(out).all()
    metrics = accuracy_metrics()
    metrics.update(torch.rand(4, 1, 16, 16), labels=torch.tensor([0, 9, 3, 3]))
    assert 0 <= metrics.compute()["accuracy"] <= 1
    assert guidance.APG(momentum=-0.5).momentum == -0.5
    assert math.isinf(guidance.GuidanceInterval(guidance.CFG()).sigma_hi)
    assert guidance.LinearAG(replace=range(2, 5)).replace == [2, 3, 4]
    assert guidance.GFCG(identity, labels=[1, 2]).labels.tolist() == [1, 2]
