"""Deprecated module name: :mod:`diffguide.guidance.modular` (our guides inside Modular Diffusers)."""

import warnings

from .modular import (CALL_ONLY, FLOW_SCHEDULERS, LATENT_NAMES, DiffguideGuider,  # noqa: F401
                      as_diffusers_guider)

warnings.warn("diffguide.guidance.diffusers_guider is deprecated; import from diffguide.guidance.modular",
              DeprecationWarning, stacklevel=2)
