"""The docstring examples that need no model run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["atman.budget", "atman.engine", "atman.tiles", "atman.units", "atman.evaluate.metrics",
           "atman.render.palette", "atman.render.titles"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0 or name == "atman.units"
