"""Deprecated module name: :mod:`diffguide.guidance.guider_apply` (diffusers' guiders through ``apply``)."""

import warnings

from .guider_apply import GuiderCombiner, check_guider, is_diffusers_guider  # noqa: F401

warnings.warn("diffguide.guidance.diffusers_guiders is deprecated; import from diffguide.guidance.guider_apply",
              DeprecationWarning, stacklevel=2)
