"""The one colour scale of every view: terminal, HTML report, image overlays and the web page.

Orange is evidence for the target (hiding the unit makes the target less likely), blue is evidence
against it. Orange against blue stays distinct under the common colour-vision deficiencies (red-green
and blue-yellow) and in greyscale print, unlike the red/green pair; the two shades are the dark ends
of ColorBrewer's colour-blind-safe PuOr (orange) and RdBu (blue) ramps. A score's colour is its
sign's shade at opacity ``|score| / max |score| * MAX_ALPHA`` over a white background.

The web page cannot import Python: ``atman/server/static/style.css`` repeats these numbers as CSS
variables and its page repeats :data:`LEGEND`; a test holds them equal to this module.

>>> from atman.render.palette import FOR_RGB, LEGEND, rgba
>>> rgba(FOR_RGB, 0.5)
'rgba(230, 97, 1, 0.500)'
>>> LEGEND
'orange = evidence for the target, blue = evidence against it'
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..explanation import ImageItem, Item

FOR_RGB: tuple[int, int, int] = (230, 97, 1)  # #e66101
AGAINST_RGB: tuple[int, int, int] = (33, 102, 172)  # #2166ac
FOR_NAME = "orange"
AGAINST_NAME = "blue"
# Full-strength opacity stays below 1 so that black text stays readable on the strongest units.
MAX_ALPHA = 0.8
LEGEND = f"{FOR_NAME} = evidence for the target, {AGAINST_NAME} = evidence against it"


def rgba(rgb: tuple[int, int, int], alpha: float) -> str:
    """A CSS ``rgba()`` colour.

    >>> rgba(AGAINST_RGB, 0.25)
    'rgba(33, 102, 172, 0.250)'
    """
    return f"rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {alpha:.3f})"


def shade(score: float, strength: float) -> tuple[int, int, int, float]:
    """The colour of a unit as (red, green, blue, alpha): its sign's shade, ``strength`` (0 to 1) scaled.

    >>> shade(-2.0, 1.0)
    (33, 102, 172, 0.8)
    """
    rgb = FOR_RGB if score >= 0 else AGAINST_RGB
    return (*rgb, strength * MAX_ALPHA)


def blend(score: float, strength: float, base: tuple[int, int, int] = (255, 255, 255)) -> tuple[int, int, int]:
    """The opaque colour of :func:`shade` laid over ``base`` (for views without transparency).

    >>> blend(1.0, 0.0), blend(1.0, 1.0)
    ((255, 255, 255), (235, 129, 52))
    """
    *rgb, alpha = shade(score, strength)
    return tuple(round(b + (c - b) * alpha) for b, c in zip(base, rgb, strict=True))  # type: ignore[return-value]


def max_abs_score(items: Iterable[Item | ImageItem]) -> float:
    """The largest finite ``|score|`` of ``items`` (0.0 when there is none), the colour scale's end.

    >>> from atman.explanation import Item
    >>> max_abs_score([Item("prompt", "a", 0, 1, 0.5), Item("prompt", "b", 2, 1, -2.0)])
    2.0
    """
    finite = [abs(item.score) for item in items if math.isfinite(item.score)]
    return max(finite, default=0.0)
