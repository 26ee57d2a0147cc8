"""The names of the digit inverse problems and their solvers, without torch (the command line reads them before
it imports anything heavy); ``tasks.inverse`` builds and solves them."""

from __future__ import annotations

from typing import Any

DIGIT_SHAPE = (1, 16, 16)

# name -> (operator name, options): the digit benchmark tasks (16x16 images)
TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "inpaint_box": ("inpaint_box", {"box_size": (8, 8), "margin": 2}),
    "inpaint_random": ("inpaint_random", {"missing_fraction": 0.7}),
    "sr4": ("sr_avg", {"factor": 4}),
    "sr4_bicubic": ("sr_bicubic", {"factor": 4}),
    "deblur_gauss": ("blur_gauss", {"kernel_size": 9, "std": 2.0}),
    "deblur_motion": ("blur_motion", {"kernel_size": 9, "intensity": 0.5}),
    "phase_retrieval": ("phase_retrieval", {"oversample": 2.0}),
    "heat": ("heat", {"num_steps": 5, "stride": 2}),
}

PIXEL_SOLVERS = ("dps", "dps_likelihood", "mcg", "enkg", "ddrm", "ddnm", "diffpir", "pigdm", "daps", "reddiff", "pinv")
LATENT_SOLVERS = ("latent_dps", "psld", "p2l")
DERIVATIVE_FREE_SOLVERS = ("enkg", "pinv")  # the others differentiate through the operator: no black boxes
LINEAR_SOLVERS = ("mcg", "ddrm", "ddnm", "diffpir", "pigdm", "pinv")  # need a linear operator (adjoint, pinv, ...)
