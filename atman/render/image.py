"""Image heat overlays: the scores of an explanation's image items painted over the image.

Orange is evidence for the target, blue evidence against it (:mod:`atman.render.palette`, as in
the text views); the colour scale is symmetric around 0 and ends at the largest ``|score|`` over
all items of the explanation, so images and text share one scale.

Example::

    >>> overlay = render_overlay(exp, image)          # a PIL image the size of ``image``
    >>> overlay.save("explanation-image1.png")
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .palette import AGAINST_RGB, FOR_RGB, max_abs_score

if TYPE_CHECKING:
    from ..explanation import Explanation, ImageItem

HEAT_ALPHA = 0.6


def image_items(explanation: Explanation, image: int = 0, target: int = 0) -> list[ImageItem]:
    """The image items of image ``image`` in the ``target``-th target explanation."""
    return [item for item in explanation.explanations[target].items
            if item.kind == "image" and item.image == image]


def heat(explanation: Explanation, size: tuple[int, int], image: int = 0, target: int = 0) -> np.ndarray:
    """Scores of image ``image`` at pixel resolution ``size`` = (width, height); 0 where no item lies."""
    width, height = size
    out = np.zeros((height, width))
    for item in image_items(explanation, image, target):
        top, left = round(item.top * height), round(item.left * width)
        bottom, right = round((item.top + item.height) * height), round((item.left + item.width) * width)
        out[top:bottom, left:right] = item.score
    return out


def render_overlay(explanation: Explanation, image: Image.Image, index: int = 0, target: int = 0,
                   alpha: float = HEAT_ALPHA) -> Image.Image:
    """``image`` (the ``index``-th image of the input) with the relevance heat blended over it."""
    base = image.convert("RGB")
    values = heat(explanation, base.size, index, target)
    scale = max_abs_score(explanation.explanations[target].items) or 1.0
    signed = np.clip(values / scale, -1.0, 1.0)[..., None]
    colours = np.where(signed >= 0, np.array(FOR_RGB) / 255.0, np.array(AGAINST_RGB) / 255.0)
    # a pixel of score 0 keeps the image; the colour's weight grows with |score|
    weight = alpha * np.abs(signed)
    pixels = np.asarray(base, dtype=np.float64) / 255.0
    blended = (1.0 - weight) * pixels + weight * colours
    return Image.fromarray((blended * 255.0).round().astype(np.uint8))


def save_overlays(explanation: Explanation, images: list[Image.Image], path: str | Path, target: int = 0,
                  scale: int = 1) -> list[Path]:
    """Write one overlay PNG per image next to ``path``: ``<stem>-image<N>.png``; returns the paths.

    ``scale`` enlarges small images (nearest neighbour) so that tiles stay visible.
    """
    path = Path(path)
    written = []
    for index, image in enumerate(images):
        overlay = render_overlay(explanation, image, index, target)
        if scale > 1:
            overlay = overlay.resize((overlay.width * scale, overlay.height * scale), Image.Resampling.NEAREST)
        out = path.with_name(f"{path.stem}-image{index + 1}.png")
        overlay.save(out)
        written.append(out)
    return written


def overlay_data_uri(explanation: Explanation, image: Image.Image, index: int = 0, target: int = 0) -> str:
    """The overlay as a ``data:image/png;base64,...`` URI for HTML."""
    buffer = io.BytesIO()
    overlay = render_overlay(explanation, image, index, target)
    if max(overlay.size) < 256:
        factor = max(1, 256 // max(overlay.size))
        overlay = overlay.resize((overlay.width * factor, overlay.height * factor), Image.Resampling.NEAREST)
    overlay.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
