"""Nested numbers compared as pytest.approx compares flat ones (its approx refuses nested sequences)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest


def close(got: Any, expected: Any, **tolerance: float) -> bool:
    """Whether ``got`` has ``expected``'s nesting of sequences and each innermost sequence or number equals
    ``pytest.approx(expected, **tolerance)`` (the same tolerances, the same meaning of ``abs`` and ``rel``)."""
    nested = (isinstance(expected, Sequence) and not isinstance(expected, str)
              and any(isinstance(e, Sequence) and not isinstance(e, str) for e in expected))
    if not nested:
        return got == pytest.approx(expected, **tolerance)
    return (isinstance(got, Sequence) and not isinstance(got, str) and len(got) == len(expected)
            and all(close(g, e, **tolerance) for g, e in zip(got, expected, strict=True)))
