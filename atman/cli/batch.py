"""Batch files on the command line: ``--input FILE.jsonl`` of ``atman explain`` and ``atman cite``.

The contract itself (fields, validation, ``line``/``id`` on every result, error objects, reading the
input as bytes line by line, resumable output files) is :mod:`atman.batch`, shared with the Ray path;
this module writes the results to the output as they come (``--resume``: after the results an earlier
run left there), drives the progress bar, says what it wrote where, and turns the outcome into the exit
code.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..batch import (
    LINE_FIELDS,
    Line,
    RequestError,
    load_json,
    open_results,
    parse_line,
    read_object,
    read_requests,
    read_results,
    result_line,
    run_lines,
    split_lines,
)
from .shared import UsageError, progress, warn_small_budget

__all__ = ["LINE_FIELDS", "RequestError", "check_resume", "read_object", "read_requests", "run_batch",
           "run_requests", "split_lines"]


def check_resume(args: argparse.Namespace) -> None:
    """``--resume`` needs the output file it resumes (checked before a model loads)."""
    if getattr(args, "resume", False) and args.output is None:
        raise UsageError("--resume needs an output file (-o): it keeps the results already there")


def run_requests(handle: Callable[[str], dict[str, Any]], lines: Sequence[Line], args: argparse.Namespace) -> int:
    """``handle(line) -> result`` for every non-blank line, written to ``args.output`` (or stdout) as each
    is done; with ``args.resume``, the lines that already have an explained result in ``args.output`` are
    kept and not run. Returns the exit code (after one line on stderr saying what was written where)."""
    check_resume(args)
    kept = read_results(args.output, lines) if getattr(args, "resume", False) else {}
    with _writer(args.output, kept) as write, progress("batch", args.quiet, total=len(lines)) as tick:
        summary = run_lines(handle, lines, write, fail_fast=args.fail_fast, progress=tick, kept=kept)
    return summary.exit_code(args.output, args.quiet)


@contextlib.contextmanager
def _writer(output: Path | None, kept: dict[int, dict[str, Any]]) -> Iterator[Callable[[dict[str, Any]], None]]:
    if output is not None:
        with open_results(output, kept) as write:
            yield write
        return

    def write(result: dict[str, Any]) -> None:
        sys.stdout.write(result_line(result) + "\n")
        sys.stdout.flush()

    yield write


def run_batch(explainer: Any, lines: Sequence[Line], args: argparse.Namespace,
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
        load_json(line)  # a line that is no JSON at all fails here, with the batch's message for it
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
