"""Build guides by name, for command lines and config files: ``build_guide("apg", 4.0, eta=0.0)``."""

from __future__ import annotations

import inspect
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


def build_guide(name: str, scale: float | None = None, /, **params: Any) -> Guidance:
    """Construct guide ``name`` with its main scale (``lam`` for CFG++) and keyword hyper-parameters.

    ``sigma_lo`` / ``sigma_hi`` wrap the guide in :class:`GuidanceInterval`. ``name`` and ``scale`` are
    positional, so a guide's own ``scale=`` keyword (from a spec ``cfg:scale=3``) is one of ``params``.
    """
    _check_keys(name, params)
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


def guide_keys(name: str) -> tuple[str, ...]:
    """The keyword hyper-parameters guide ``name`` takes (its constructor's, then ``sigma_lo`` / ``sigma_hi``)."""
    if name not in GUIDES:
        raise ValueError(f"unknown guide {name!r}; known: {', '.join(GUIDES)}")
    parameters = inspect.signature(GUIDES[name][0]).parameters.values()
    own = tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return own + INTERVAL_KEYS


def _check_keys(name: str, params: dict[str, Any]) -> None:
    allowed = guide_keys(name)
    unknown = [key for key in params if key not in allowed]
    if unknown:
        raise TypeError(f"guide {name!r} has no parameter {unknown[0]!r}; allowed: {', '.join(allowed)}")


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
    if "@" in head:
        items = [s.strip() for s in scale_text.split(",")]
        try:
            scales = [float(s) for s in items if s]
        except ValueError:
            scales = None
        if scales is None or "" in items or not all(math.isfinite(s) for s in scales):
            raise ValueError(f"scales in {spec!r} must be finite numbers separated by commas after '@', "
                             f"e.g. {name}@1,2,4 (or no '@' at all)")
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in tail.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"guide parameter {item!r} in {spec!r} must look like key=value")
        if key.strip() in params:
            raise ValueError(f"guide parameter {key.strip()!r} is given twice in {spec!r}")
        params[key.strip()] = _number(value.strip())
    _check_keys(name, params)
    return name, scales, params
