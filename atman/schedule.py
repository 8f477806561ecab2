"""Batch scheduling of the cached engine: which rows run together in one forward pass.

A batch recomputes every row from its earliest first damped position, so rows of similar start belong
together; :func:`batch_groups` finds the split into batches of the least total cost that fits the
engine's budgets. Nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Callable

# fixed cost of one forward call, in token-forwards (measured: ~60 ms of a 1.7 ms/token CPU pass)
CPU_CALL_OVERHEAD = 32
GPU_CALL_OVERHEAD = 1024
MAX_GROUP_ROWS = 512


def batch_groups(
    starts: list[int], length: int, fits: Callable[[int, int], bool], overhead: int = CPU_CALL_OVERHEAD
) -> list[list[int]]:
    """Rows in batches of similar first damped position, at the least total cost.

    A batch recomputes every row from its earliest start, so a batch of ``k`` rows whose earliest
    start is ``s`` costs ``overhead + k * (length - s)`` token-forwards; ``overhead`` is the fixed
    cost of one forward call in token-forwards. Sorted by start, the best split into consecutive
    batches that ``fits(rows, earliest start)`` allows is found by dynamic programming.

    >>> batch_groups([5, 1, 4], 6, lambda rows, start: rows <= 2, overhead=10)
    [[0, 2], [1]]
    """
    order = sorted(range(len(starts)), key=lambda r: -starts[r])
    begin = [min(starts[r], length - 1) for r in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n
    size = [0] * (n + 1)
    for j in range(1, n + 1):
        suffix = length - begin[j - 1]
        # the largest batch ending at row j that fits (fits is monotone in the number of rows)
        low, high = 1, min(j, MAX_GROUP_ROWS)
        while low < high:
            mid = (low + high + 1) // 2
            if fits(mid, begin[j - 1]):
                low = mid
            else:
                high = mid - 1
        for k in range(1, low + 1):
            cost = best[j - k] + overhead + k * suffix
            if cost < best[j]:
                best[j], size[j] = cost, k
    groups = []
    j = n
    while j > 0:
        groups.append(order[j - size[j]:j])
        j -= size[j]
    return groups[::-1]
