"""Captions of the command lines' pictures draw non-ASCII characters with glyphs, not the missing-glyph box."""

import numpy as np
from PIL import Image, ImageDraw

from diffguide.scripts._cli import font


def render(text: str, size: int = 20) -> np.ndarray:
    image = Image.new("L", (2 * size * len(text), 2 * size), 0)
    ImageDraw.Draw(image).text((2, 2), text, fill=255, font=font(size))
    return np.asarray(image)


def test_non_ascii_captions_render_glyphs():
    missing = render("\U0010FFFD")                      # a private-use code point no font has: the box
    assert missing.any()
    for char in "üë✓éß→":
        glyph = render(char)
        assert glyph.any() and not np.array_equal(glyph, missing), char
    assert not np.array_equal(render("ü"), render("u"))    # the umlaut is drawn, not dropped
