"""Image grids through ``torchvision.utils.make_grid`` equal a few-line numpy tiling."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffguide.scripts import figure_guides, sample


@pytest.mark.parametrize("mode, count, cols", [("L", 7, 3), ("RGB", 5, 2), ("L", 2, 4), ("RGB", 8, 8)])
def test_sample_grid_tiles_row_major(mode, count, cols):
    rng = np.random.default_rng(0)
    shape = (5, 6) if mode == "L" else (5, 6, 3)
    pixels = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
    rows = -(-count // cols)
    expected = np.zeros((rows * 5, cols * 6, *shape[2:]), dtype=np.uint8)   # black where no image is
    for i, p in enumerate(pixels):
        expected[i // cols * 5:(i // cols + 1) * 5, i % cols * 6:(i % cols + 1) * 6] = p
    grid = sample.make_grid([Image.fromarray(p, mode) for p in pixels], cols)
    assert grid.mode == mode and np.array_equal(np.asarray(grid), expected)


def test_figure_tile_puts_white_gaps_between_cells_only():
    grid = np.random.default_rng(1).integers(0, 200, (3, 4, 8, 9), dtype=np.uint8)
    out = figure_guides.tile(grid, gap=2)
    assert out.shape == (3 * 10 - 2, 4 * 11 - 2)
    for r in range(3):
        for c in range(4):
            assert np.array_equal(out[r * 10:r * 10 + 8, c * 11:c * 11 + 9], grid[r, c])
    assert (out[8:10].min(), out[:, 9:11].min()) == (255, 255)
