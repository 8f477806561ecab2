"""Synthetic scenes for checking image explanations: coloured shapes at random places on a canvas.

Every scene knows each object's pixel mask, so the relevance grid of an explanation can be scored
against the object it should point at (the OpenImages protocol of the AtMan paper, with exact masks).

Example::

    >>> scene = make_scene(np.random.default_rng(0))
    >>> scene.caption()
    'This is a picture of a green square and a red circle'
    >>> scene.image.size, scene.objects[0].mask.shape
    ((48, 48), (48, 48))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230)}
SHAPES = ("circle", "square", "triangle")
CAPTION_PREFIX = "This is a picture of a"
CANVAS = 48
BACKGROUND = (235, 235, 235)
# grey distractors in the classifier's scenes (one coloured shape among them)
CLASSIFIER_CLUTTER = 2


@dataclass(frozen=True)
class SceneObject:
    """One shape: its colour, shape, bounding box (left, top, right, bottom) in pixels and pixel mask."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]
    mask: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """An RGB canvas and its objects, ordered left to right (the order the caption names them)."""

    image: Image.Image
    objects: tuple[SceneObject, ...]

    def caption(self) -> str:
        return CAPTION_PREFIX + " " + " and a ".join(obj.name for obj in self.objects)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)


def make_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    *,
    canvas: int = CANVAS,
    size: tuple[int, int] = (12, 18),
    clutter: int = 0,
) -> Scene:
    """A scene of ``n_objects`` (1 or 2 when None) distinct coloured shapes that do not overlap.

    ``clutter`` grey shapes (a little smaller) are drawn first as distractors; they have no name
    and no mask.
    """
    if n_objects is None:
        n_objects = int(rng.integers(1, 3))
    for _ in range(100):
        try:
            return _scene(rng, n_objects, canvas, size, clutter)
        except _NoRoom:
            continue
    raise ValueError(f"{n_objects} objects and {clutter} distractors of size {size} do not fit a {canvas}px canvas")


class _NoRoom(Exception):
    pass


def _scene(rng: np.random.Generator, n_objects: int, canvas: int, size: tuple[int, int], clutter: int) -> Scene:
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []

    def place(low: int = size[0], high: int = size[1]) -> tuple[int, int, int, int]:
        for _ in range(50):
            side = int(rng.integers(low, high + 1))
            left, top = (int(v) for v in rng.integers(0, canvas - side, size=2))
            box = (left, top, left + side - 1, top + side - 1)
            if all(box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1] for b in boxes):
                boxes.append(box)
                return box
        raise _NoRoom

    for _ in range(clutter):
        _draw(draw, SHAPES[int(rng.integers(len(SHAPES)))], place(size[0] - 4, size[1] - 4), (150, 150, 150))
    kinds: set[tuple[str, str]] = set()
    objects = []
    while len(objects) < n_objects:
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if (colour, shape) in kinds:
            continue
        kinds.add((colour, shape))
        box = place()
        layer = Image.new("L", (canvas, canvas), 0)
        _draw(ImageDraw.Draw(layer), shape, box, 255)
        _draw(draw, shape, box, COLOURS[colour])
        objects.append(SceneObject(colour, shape, box, np.asarray(layer) > 0))
    objects.sort(key=lambda obj: (obj.box[0], obj.box[1]))
    return Scene(image=image, objects=tuple(objects))
