"""The package's import graph, read from its source: no module imports another module's ``_private`` names, and
no import circle (imports inside functions included: a lazy import only hides a circle)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(importlib.util.find_spec("diffguide").origin).resolve().parent  # read, not imported
SKIP = {"tests", "benchmarks", "notebooks", "docs", ".pkg", "build", "dist"}


def modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the installed package."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if set(parts) & SKIP or any(part.startswith(".") for part in parts):
            continue
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        found[".".join(("diffguide", *parts))] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None]]:
    """``(module, imported name or None)`` for every package-internal import in ``path``: ``from M import n`` is
    an import of module ``M.n`` when that is a module, else of the name ``n`` of ``M``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names if alias.name.startswith("diffguide")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if not source.startswith("diffguide"):
                continue
            for alias in node.names:
                target = f"{source}.{alias.name}"
                out.append((target, None) if target in known else (source, alias.name))
    return out


def test_the_walk_sees_the_package():
    known = modules()
    assert {"diffguide.guidance.hook", "diffguide.guidance.layouts", "diffguide.samplers.schedule",
            "diffguide.tasks.gmm"} <= set(known)
    edges = {target for name, path in known.items() for target, _ in imports(name, path, known)}
    assert "diffguide.guidance.layouts" in edges and "diffguide.samplers.schedule" in edges


def test_no_module_imports_another_modules_private_names():
    known = modules()
    private = sorted(f"{name} imports {what} from {source}" for name, path in known.items()
                     for source, what in imports(name, path, known)
                     if what is not None and what.startswith("_") and not what.startswith("__") and source != name)
    assert private == []


def test_no_import_circle():
    known = modules()
    graph = {name: sorted({target for target, _ in imports(name, path, known) if target in known and target != name})
             for name, path in known.items()}
    # a package's __init__ may import its own submodules; a submodule importing its package's __init__ back is
    # the circle. Depth-first search with colours; report the first cycle found.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("old, new, name", [
    ("diffguide.guidance.diffusers_guider", "diffguide.guidance.modular", "as_diffusers_guider"),
    ("diffguide.guidance.diffusers_guiders", "diffguide.guidance.guider_apply", "is_diffusers_guider"),
])
def test_renamed_modules_still_import_with_a_deprecation_warning(old, new, name):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_renamed_names_still_import_with_a_deprecation_warning():
    from diffguide.guidance import hook
    from diffguide.samplers.schedule import is_flow
    from diffguide.tasks import gmm

    with pytest.warns(DeprecationWarning, match="Coefficient"):
        assert gmm.Level is gmm.Coefficient
    with pytest.warns(DeprecationWarning, match="is_flow"):
        assert hook.is_flow_scheduler(type("FlowMatchX", (), {"config": {}})()) == is_flow(
            type("FlowMatchX", (), {"config": {}})()) is True
