"""What a model load must prove: every file there and every tensor in its place (never random weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DamagedModelError(ValueError):
    """A model folder with a missing, unreadable or truncated file, or weights that do not fit the model (the
    message names the file or the tensors)."""


def check_loaded_weights(where: Path | str, missing: Any = (), unexpected: Any = (), mismatched: Any = ()) -> None:
    """Raise ``DamagedModelError`` naming the tensors when loading left any parameter of the model unset
    (``missing``: it would keep its random initialisation), found tensors the model has no place for
    (``unexpected``: e.g. renamed by another library version) or of the wrong shape (``mismatched``)."""
    problems = []
    for what, keys in (("missing (would stay randomly initialised)", missing),
                       ("unexpected (the model has no such tensor)", unexpected),
                       ("of the wrong shape", [k[0] if isinstance(k, tuple) else k for k in mismatched])):
        names = sorted(str(k) for k in keys)
        if names:
            problems.append(f"{what}: {', '.join(names[:8])}" + (f" and {len(names) - 8} more" if len(names) > 8 else ""))
    if problems:
        raise DamagedModelError(f"{where}: the weights do not fit the model; tensors {'; '.join(problems)}")
