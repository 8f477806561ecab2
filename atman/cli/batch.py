"""Batch files on the command line: ``--input FILE.jsonl`` of ``atman explain`` and ``atman cite``.

The contract itself (fields, validation, ``line``/``id`` on every result, error objects) is
:mod:`atman.batch`, shared with the Ray path; this module writes the results to the output as they
come, drives the progress bar, and turns the outcome into the exit code.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..batch import LINE_FIELDS, RequestError, parse_line, read_object, result_line, run_lines, split_lines
from .shared import open_output, progress, warn_small_budget

__all__ = ["LINE_FIELDS", "RequestError", "read_object", "run_batch", "run_requests", "split_lines"]


def run_requests(handle: Callable[[str], dict[str, Any]], lines: list[str], args: argparse.Namespace) -> int:
    """``handle(line) -> result`` for every non-blank line, written to ``args.output`` (or stdout) as each
    is done; returns the exit code."""
    with open_output(args.output) as out, progress("batch", args.quiet, total=len(lines)) as tick:
        def write(result: dict[str, Any]) -> None:
            out.write(result_line(result) + "\n")
            out.flush()

        summary = run_lines(handle, lines, write, fail_fast=args.fail_fast, progress=tick)
    return summary.exit_code()


def run_batch(explainer: Any, lines: list[str], args: argparse.Namespace,
              media: Callable[[str], dict[str, Any]] | None = None) -> int:
    """``atman explain --input``: text lines explained with AtMan (or ``--method``); with ``media``, lines
    with a ``pair``, ``classify`` or ``image`` field go to it instead. ``explainer`` may be a function
    that loads it, called on the first text line."""
    from ..batch import explain_request
    from .media import media_kind

    warned = False
    method = getattr(args, "method", "atman")
    loaded: list[Any] = []

    def text_explainer() -> Any:
        if not loaded:
            loaded.append(explainer() if callable(explainer) and not hasattr(explainer, "explain") else explainer)
        return loaded[0]

    def explain(line: str) -> dict[str, Any]:
        nonlocal warned
        if media is not None and media_kind(line) is not None:
            if method != "atman":
                raise RequestError(f"--method {method} explains text prompts; this line is a media request")
            return media(line)
        request = parse_line(line)
        current = text_explainer()
        if not warned:
            warned = warn_small_budget(current, request["prompt"] + (request.get("target") or ""))
        return explain_request(current, request, method).to_dict()

    return run_requests(explain, lines, args)
