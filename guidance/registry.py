"""Build guides by name, for command lines and configuration files."""

from __future__ import annotations

import inspect
from typing import Any

from .apg import APG
from .base import Guidance
from .cfg import CFG
from .cfg_zero_star import CFGZeroStar
from .cfgpp import CFGPlusPlus
from .rescale import CFGRescale

GUIDES: dict[str, type[Guidance]] = {
    "cfg": CFG,
    "cfgpp": CFGPlusPlus,
    "apg": APG,
    "rescale": CFGRescale,
    "cfg-zero-star": CFGZeroStar,
}


def register(name: str, cls: type[Guidance]) -> None:
    """Make ``cls`` available to :func:`make_guide` under ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Guidance)):
        raise TypeError(f"{cls!r} is not a guidance.Guidance subclass")
    GUIDES[name] = cls


def parse_params(text: str | None) -> dict[str, Any]:
    """``"scale=3,eta=0"`` -> ``{"scale": 3.0, "eta": 0.0}`` (numbers become floats/ints, the rest stays text)."""
    params: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"guidance parameters must look like 'name=value,name=value', got {item!r}")
        value = value.strip()
        try:
            params[key.strip()] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            params[key.strip()] = value
    return params


def make_guide(name: str, **params: Any) -> Guidance:
    """``make_guide("apg", scale=5, eta=0)``; unknown names or parameters raise ValueError listing what exists."""
    if name not in GUIDES:
        raise ValueError(f"unknown guidance {name!r}; known: {', '.join(sorted(GUIDES))}")
    cls = GUIDES[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(f"{name} does not take {sorted(unknown)}; it takes {allowed}")
    return cls(**params)
