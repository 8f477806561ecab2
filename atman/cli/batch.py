"""Batch files of ``atman explain --input``: one JSON request per line in, one JSON object per line out.

Every output object carries ``line`` (the 1-based input line it answers) and, when the request had
one, its ``id``; blank input lines are skipped, so these, not the output position, tie an answer to
its request.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from ..errors import AtmanError
from .shared import (
    CONCEPTUAL_KAPPA,
    RENAMED_FIELD,
    SUPPRESSION_FIELD,
    UsageError,
    open_output,
    progress,
    renamed_factor,
    warn_small_budget,
)

# fields a batch line may set, with the type each must have
LINE_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str, int, type(None)),
    "prompt": (str,),
    "target": (str, type(None)),
    "granularity": (str,),
    "target_granularity": (str,),
    "delimiter": (str, type(None)),
    "spans": (list,),
    SUPPRESSION_FIELD: (int, float),
    "kappa": (int, float, type(None)),
    "conceptual": (bool,),
    "mode": (str,),
    "chat": (bool,),
    "system": (str, type(None)),
    "max_new_tokens": (int,),
    "postprocessing": (str,),
    "normalize": (bool,),
    "refine_from": (str,),
    "refine_top": (int,),
    "refine_share": (int, float, type(None)),
}
# fields that are not options of Explainer.explain
NOT_OPTIONS = ("id", "conceptual")


def normalise_request(request: dict[str, Any]) -> dict[str, Any]:
    """A request in the CLI/JSON vocabulary as keyword arguments of :meth:`atman.Explainer.explain`.

    >>> normalise_request({"prompt": "Ada lives in", "target": " Oslo", "conceptual": True})["kappa"]
    0.7
    """
    out = {k: v for k, v in request.items() if v is not None and k not in NOT_OPTIONS}
    if "target" in request:
        out["target"] = request["target"]
    granularity = request.get("granularity") or "auto"
    if request.get("delimiter") and granularity not in ("auto", "delimiter"):
        raise UsageError(f"a delimiter only applies to granularity 'delimiter', not {granularity!r}")
    if request.get("spans") and granularity not in ("auto", "spans"):
        raise UsageError(f"spans only apply to granularity 'spans', not {granularity!r}")
    if "spans" in out:
        spans = out["spans"]
        if not all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s) for s in spans):
            raise UsageError("spans must be a list of [start, end] pairs of integers")
        out["spans"] = [tuple(s) for s in spans]
    if request.get("conceptual") is False or ("kappa" in request and request["kappa"] is None):
        out["kappa"] = None
    elif "kappa" not in out:
        out["kappa"] = CONCEPTUAL_KAPPA if request.get("conceptual") else "default"
    return out


def parse_line(line: str) -> tuple[Any, dict[str, Any]]:
    """One batch line: its ``id`` (None when absent) and the explainer's keyword arguments."""
    request = read_object(line, LINE_FIELDS, ("prompt",))
    request.setdefault("target", None)
    return request.get("id"), normalise_request(request)


def line_id(line: str) -> Any:
    """The ``id`` of a line that could not be parsed as a request, when it still has a readable one."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    found = value.get("id") if isinstance(value, dict) else None
    return found if isinstance(found, (str, int)) and not isinstance(found, bool) else None


def split_lines(text: str) -> list[str]:
    """JSON lines, split at ``\\n`` only.

    ``str.splitlines`` would also split at U+2028 and friends, which ``json.dumps(ensure_ascii=False)``
    writes unescaped inside strings.
    """
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and not lines[-1]:
        lines.pop()
    return lines


def run_batch(explainer: Any, lines: list[str], args: argparse.Namespace) -> int:
    """Explain every non-blank line; exit code 0, 1 (some lines failed) or 2 (``--fail-fast`` stopped)."""
    warned = False

    def explain(line: str) -> tuple[Any, dict[str, Any]]:
        nonlocal warned
        request_id, request = parse_line(line)
        if not warned:
            warned = warn_small_budget(explainer, request["prompt"] + (request.get("target") or ""))
        return request_id, explainer.explain(**request).to_dict()

    return run_lines(lines, explain, args)


def run_lines(lines: list[str], run_one: Callable[[str], tuple[Any, dict[str, Any]]],
              args: argparse.Namespace) -> int:
    """``run_one(line) -> (id, result)`` for every non-blank line, one JSON object per line out (with
    ``line`` and ``id``; a line that fails gives ``{"line", "id", "error"}`` and the others still run).
    Exit code 0, 1 (some lines failed) or 2 (``--fail-fast`` stopped at a failed line)."""
    failed = 0
    with open_output(args.output) as out, progress("batch", args.quiet, total=len(lines)) as tick:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            request_id = None
            try:
                request_id, answer = run_one(line)
                result = {"line": number, **({"id": request_id} if request_id is not None else {}), **answer}
            except Exception as exc:  # one bad line never costs the others their results
                failed += 1
                message = str(exc) if isinstance(exc, AtmanError) else f"{type(exc).__name__}: {exc}"
                request_id = request_id if request_id is not None else line_id(line)
                result = {"line": number, **({"id": request_id} if request_id is not None else {}),
                          "error": message}
                if args.fail_fast:
                    out.write(json.dumps(result, ensure_ascii=False) + "\n")
                    print(f"atman: error on line {number}: {exc}", file=sys.stderr)
                    return 2
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
            tick(number, len(lines))
    if failed:
        print(f"atman: {failed} of {sum(bool(x.strip()) for x in lines)} lines failed", file=sys.stderr)
        return 1
    return 0


def read_object(line: str, fields: dict[str, tuple[type, ...]], required: tuple[str, ...]) -> dict[str, Any]:
    """One batch line as a JSON object whose fields are among ``fields`` (name -> allowed types)."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise UsageError("each line must be a JSON object")
    if RENAMED_FIELD in request:
        raise renamed_factor(f"field {RENAMED_FIELD}")
    unknown = sorted(set(request) - set(fields))
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(unknown)}; known: {', '.join(fields)}")
    for name, value in request.items():
        if not isinstance(value, fields[name]) or (isinstance(value, bool) and bool not in fields[name]):
            raise UsageError(f"field {name!r} has the wrong type ({type(value).__name__})")
    missing = [name for name in required if name not in request]
    if missing:
        raise UsageError(f"missing field: {', '.join(missing)}")
    return request
