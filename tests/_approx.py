"""Nested numbers compared within a tolerance (pytest.approx compares flat sequences only)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def close(got: Any, expected: Any, abs: float = 1e-12, rel: float = 1e-6) -> bool:  # noqa: A002
    """Whether ``got`` has ``expected``'s nesting of sequences and each number is within tolerance."""
    if isinstance(expected, Sequence) and not isinstance(expected, str):
        return (isinstance(got, Sequence) and not isinstance(got, str) and len(got) == len(expected)
                and all(close(g, e, abs, rel) for g, e in zip(got, expected, strict=True)))
    return math.isclose(got, expected, abs_tol=abs, rel_tol=rel)
