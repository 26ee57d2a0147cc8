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
