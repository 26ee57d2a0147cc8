"""Build guides by name, for command lines and config files: ``build_guide("apg", 4.0, eta=0.0)``."""

from __future__ import annotations

import math
from typing import Any

from .adaptive import AdaptiveGuidance
from .apg import APG
from .base import Guidance
from .cfg import CFG
from .cfg_zero_star import CFGZeroStar
from .cfgpp import CFGPlusPlus
from .interval import GuidanceInterval
from .rectified_cfgpp import RectifiedCFGPlusPlus
from .rescale import CFGRescale

# name -> (class, name of the constructor argument that is "the scale" of the method)
GUIDES: dict[str, tuple[type[Guidance], str]] = {
    "cfg": (CFG, "scale"),
    "cfgpp": (CFGPlusPlus, "lam"),
    "apg": (APG, "scale"),
    "cfg-rescale": (CFGRescale, "scale"),
    "cfg-zero-star": (CFGZeroStar, "scale"),
    "ag": (AdaptiveGuidance, "scale"),
    "rcfgpp": (RectifiedCFGPlusPlus, "scale"),
}
INTERVAL_KEYS = ("sigma_lo", "sigma_hi")


def build_guide(name: str, scale: float | None = None, **params: Any) -> Guidance:
    """Construct guide ``name`` with its main scale (``lam`` for CFG++) and keyword hyper-parameters.

    ``sigma_lo`` / ``sigma_hi`` wrap the guide in :class:`GuidanceInterval`.
    """
    if name not in GUIDES:
        raise ValueError(f"unknown guide {name!r}; known: {', '.join(GUIDES)}")
    cls, scale_arg = GUIDES[name]
    interval = {key: params.pop(key) for key in INTERVAL_KEYS if key in params}
    if scale is not None:
        if scale_arg in params:
            raise ValueError(f"{name}: give the scale once, either as scale or as {scale_arg}=")
        params[scale_arg] = scale
    try:
        guide = cls(**params)
    except TypeError as err:
        raise TypeError(f"{name}: {err}") from None
    if interval:
        guide = GuidanceInterval(guide, interval.get("sigma_lo", 0.0), interval.get("sigma_hi", math.inf))
    return guide


def _number(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_guide_spec(spec: str) -> tuple[str, list[float] | None, dict[str, Any]]:
    """Parse ``NAME[@S1,S2,...][:KEY=VALUE,...]`` into ``(name, scales or None, params)``.

    Example: ``"apg@1,2,4:eta=0,norm_threshold=2"`` -> ``("apg", [1.0, 2.0, 4.0], {"eta": 0, "norm_threshold": 2})``.
    """
    head, _, tail = spec.partition(":")
    name, _, scale_text = head.partition("@")
    name = name.strip()
    if name not in GUIDES:
        raise ValueError(f"unknown guide {name!r} in {spec!r}; known: {', '.join(GUIDES)}")
    scales = None
    if scale_text:
        try:
            scales = [float(s) for s in scale_text.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"scales in {spec!r} must be numbers separated by commas") from None
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in tail.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"guide parameter {item!r} in {spec!r} must look like key=value")
        params[key.strip()] = _number(value.strip())
    return name, scales, params
