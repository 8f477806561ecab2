"""Response bodies for image prompt items, in the JSON of Aleph Alpha's API.

An image item of an explanation scores rectangles of the image, with coordinates in 0..1 of the
whole image as sent (``ImagePromptItemExplanation.from_json`` / ``ImageScore.from_json`` of the
official ``aleph-alpha-client``). Nothing here imports the rest of the server, so that
:mod:`atman.server.schemas` can add :class:`ImageExplanationItem` to its explanation items.

Example::

    >>> ImageExplanationItem(type="image", scores=[ImageScore(
    ...     rect=ImageRect(left=0.0, top=0.5, width=0.5, height=0.5), score=1.0)]).model_dump()["scores"][0]["rect"]
    {'left': 0.0, 'top': 0.5, 'width': 0.5, 'height': 0.5}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ImageRect(BaseModel):
    """A rectangle of an image: top-left corner and size, all in 0..1 of the image's width and height."""

    left: float
    top: float
    width: float
    height: float


class ImageScore(BaseModel):
    """The score of one rectangle (a tile of image tokens)."""

    rect: ImageRect
    score: float


class ImageExplanationItem(BaseModel):
    """The scores of an image prompt item's tiles."""

    type: Literal["image"]
    scores: list[ImageScore]
