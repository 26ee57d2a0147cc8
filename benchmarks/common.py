"""What every benchmark shares: writing its section of BENCHMARKS.md, saving its figure."""

from __future__ import annotations

import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery section below is written by the script named in it; rerun the script to refresh it.\n"


def write_section(name: str, markdown: str, path: Path = BENCHMARKS) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended if missing)."""
    if not re.fullmatch(r"[a-z0-9_-]+", name):
        raise ValueError(f"section name must be lowercase letters, digits, '-' or '_', got {name!r}")
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def save_figure(fig, path: Path) -> None:
    """Lay out, save (100 dpi, parent folders made) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
