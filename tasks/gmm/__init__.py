"""Exact Gaussian mixtures, by role: the mixture maths (:mod:`.mixture`), reference densities to judge samples
against (:mod:`.reference`) and stand-in networks with exact outputs (:mod:`.networks`). Every public name is
importable from ``diffguide.tasks.gmm``."""

from .mixture import ComponentPosterior, Coefficient, GaussianMixture, gaussian_geometric_mean
from .networks import ClassConditionalGMM, FlowMatchingGMM
from .reference import (GridDensity, SlicedWasserstein, annealed_grid, geometric_grid, grid_density,
                        sliced_wasserstein)

__all__ = [
    "ClassConditionalGMM",
    "FlowMatchingGMM",
    "ComponentPosterior",
    "GaussianMixture",
    "GridDensity",
    "SlicedWasserstein",
    "annealed_grid",
    "gaussian_geometric_mean",
    "geometric_grid",
    "grid_density",
    "sliced_wasserstein",
]


def __getattr__(name: str):
    if name == "Level":  # the former name of Coefficient, which clashed with samplers.Level
        import warnings

        warnings.warn("diffguide.tasks.gmm.Level is deprecated; use diffguide.tasks.gmm.Coefficient (a sampler's "
                      "noise level is diffguide.samplers.Level)", DeprecationWarning, stacklevel=2)
        return Coefficient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
