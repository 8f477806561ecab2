"""The AtMan paper's OpenImages metric: how well a relevance grid covers an object's mask.

With x the relevance grid (negative relevance clipped to 0) and y the object's mask resized to the
grid (the share of each patch the object covers):

* precision = sum(x * y) / sum(x): how much of the relevance lies on the object;
* recall = sum(x / max(x) * y) / sum(y): how much of the object is marked relevant.

Example::

    >>> mask = np.zeros((4, 4), bool); mask[:2, :2] = True
    >>> grid = np.array([[1.0, 0.0], [0.0, 0.0]])
    >>> precision_recall(grid, mask_to_grid(mask, 2, 2))
    (1.0, 1.0)
"""

from __future__ import annotations

import numpy as np


def mask_to_grid(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The share of each of ``rows`` x ``cols`` equal cells of ``mask`` (H x W, bool) that is True."""
    height, width = mask.shape
    if height % rows or width % cols:
        raise ValueError(f"a {height}x{width} mask does not divide into {rows}x{cols} cells")
    return mask.reshape(rows, height // rows, cols, width // cols).mean(axis=(1, 3))


def precision_recall(relevance: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Precision and recall of ``relevance`` (any real grid) against ``target`` (grid of 0-1 shares)."""
    x = np.clip(np.asarray(relevance, dtype=np.float64), 0.0, None)
    y = np.asarray(target, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"relevance grid {x.shape} and target grid {y.shape} differ")
    if x.sum() <= 0 or y.sum() <= 0:
        return 0.0, 0.0
    return float((x * y).sum() / x.sum()), float((x / x.max() * y).sum() / y.sum())
