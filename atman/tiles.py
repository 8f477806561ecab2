"""Image units: tiles of an image's patch grid, and the way back from scored tiles to a relevance grid.

A vision transformer sees an image as a grid of patch tokens (``rows`` x ``cols``). A tile is a block
of ``tile_rows`` x ``tile_cols`` patches that AtMan suppresses together. Named granularities follow
Aleph Alpha's API: ``token`` = every patch, ``word`` = 2x2 blocks, ``sentence`` = 4x4 blocks,
``paragraph`` = the whole image; an explicit block size is given as ``(tile_rows, tile_cols)`` or an
int. Tiles at the right and bottom edges may be smaller when the grid does not divide evenly.

Example::

    >>> [t.cells for t in grid_tiles(ImageGrid(rows=2, cols=3), "word")]
    [(0, 1, 3, 4), (2, 5)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import GranularityError

IMAGE_GRANULARITIES: dict[str, int | None] = {"token": 1, "word": 2, "sentence": 4, "paragraph": None}


@dataclass(frozen=True)
class TilesPerSide:
    """Cut the grid into about ``count`` tiles per side, whatever its size (Aleph Alpha's API explains a
    12 x 12 image grid as 6 x 6 "word" and 3 x 3 "sentence" tiles: the same share of the image on any grid).

    >>> tile_shape(ImageGrid(24, 24), TilesPerSide(6)), tile_shape(ImageGrid(6, 6), TilesPerSide(3))
    ((4, 4), (2, 2))
    """

    count: int

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise GranularityError(f"tiles per side must be a positive integer, got {self.count!r}")


TileSpec = str | int | tuple[int, int] | TilesPerSide


@dataclass(frozen=True)
class ImageGrid:
    """The patch grid of one image: ``rows`` x ``cols`` patch tokens, row-major."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise GranularityError(f"an image grid needs at least one patch, got {self.rows} x {self.cols}")


@dataclass(frozen=True)
class Tile:
    """A block of patches: row-major ``cells`` of the grid and its rectangle in 0-1 image coordinates."""

    cells: tuple[int, ...]
    left: float
    top: float
    width: float
    height: float


def tile_shape(grid: ImageGrid, granularity: TileSpec = "token") -> tuple[int, int]:
    """``(tile_rows, tile_cols)`` of a named granularity, an explicit size or a :class:`TilesPerSide` on ``grid``."""
    if isinstance(granularity, TilesPerSide):
        return max(1, round(grid.rows / granularity.count)), max(1, round(grid.cols / granularity.count))
    if isinstance(granularity, str):
        if granularity not in IMAGE_GRANULARITIES:
            raise GranularityError(
                f"unknown image granularity {granularity!r}; choose one of {', '.join(IMAGE_GRANULARITIES)} "
                "or give a tile size"
            )
        side = IMAGE_GRANULARITIES[granularity]
        return (grid.rows, grid.cols) if side is None else (side, side)
    shape = (granularity, granularity) if isinstance(granularity, int) else tuple(granularity)
    if len(shape) != 2 or not all(isinstance(v, int) and v >= 1 for v in shape):
        raise GranularityError(f"an image tile size must be one or two positive integers, got {granularity!r}")
    return int(shape[0]), int(shape[1])


def grid_tiles(grid: ImageGrid, granularity: TileSpec = "token") -> list[Tile]:
    """The tiles covering ``grid``, row by row."""
    tile_rows, tile_cols = tile_shape(grid, granularity)
    tiles = []
    for r0 in range(0, grid.rows, tile_rows):
        for c0 in range(0, grid.cols, tile_cols):
            r1, c1 = min(r0 + tile_rows, grid.rows), min(c0 + tile_cols, grid.cols)
            cells = tuple(r * grid.cols + c for r in range(r0, r1) for c in range(c0, c1))
            tiles.append(Tile(cells, c0 / grid.cols, r0 / grid.rows, (c1 - c0) / grid.cols, (r1 - r0) / grid.rows))
    return tiles


def relevance_grid(items: Sequence, image: int, grid: ImageGrid) -> np.ndarray:
    """A ``rows`` x ``cols`` array holding, for every patch, the score of the image item covering it.

    ``items`` may mix text and image items; only image items of image ``image`` are used. Patches
    covered by no item are 0.

    Example::

        >>> from atman.explanation import ImageItem
        >>> relevance_grid([ImageItem(0, 0.5, 0.0, 0.5, 1.0, 2.0)], 0, ImageGrid(1, 2)).tolist()
        [[0.0, 2.0]]
    """
    out = np.zeros((grid.rows, grid.cols))
    for item in items:
        if getattr(item, "kind", None) != "image" or item.image != image:
            continue
        r0, c0 = round(item.top * grid.rows), round(item.left * grid.cols)
        r1, c1 = round((item.top + item.height) * grid.rows), round((item.left + item.width) * grid.cols)
        out[r0:r1, c0:c1] = item.score
    return out
