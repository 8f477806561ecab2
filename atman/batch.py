"""The JSON-lines batch contract: one request per line in, one result (or error object) per line out.

It is shared by ``atman explain --input`` (run here, in one process) and by the Ray path
(:mod:`atman.distributed`, the same lines spread over workers). A line is a JSON object with the fields
of :data:`LINE_FIELDS` (``prompt`` required); its result is the explanation's JSON
(:meth:`atman.Explanation.to_dict`) plus ``"line"`` (the 1-based line number in the input) and, when
the request had one, its ``"id"``. A line that cannot be explained yields ``{"error": "...", "line": N}``
(plus ``"id"``), and the other lines still run. Empty lines are skipped (no output line).

Example::

    >>> from atman.batch import run_batch, split_lines
    >>> results = []
    >>> lines = split_lines('{"prompt": "Ada lives in Oslo. Ada lives in", "target": " Oslo"}\\n{"prompt": 1}\\n')
    >>> summary = run_batch(Explainer(load_model()), lines, results.append)  # doctest: +SKIP
    >>> summary.failed, results[1]  # doctest: +SKIP
    (1, {'error': "field 'prompt' has the wrong type (int)", 'line': 2})
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .defaults import CONCEPTUAL_KAPPA, FACTOR_RENAMED
from .errors import AtmanError

if TYPE_CHECKING:
    from .explainer import Explainer
    from .explanation import Explanation

# fields a batch line may set, with the type each must have; ``id`` is echoed in the result, not explained
LINE_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str, int),
    "prompt": (str,),
    "target": (str, type(None)),
    "granularity": (str,),
    "target_granularity": (str,),
    "delimiter": (str, type(None)),
    "spans": (list,),
    "multiplier": (int, float),
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


class RequestError(AtmanError):
    """A request (a batch line, or the options that make one) that does not fit the contract."""


@dataclass(frozen=True)
class BatchSummary:
    """What :func:`run_batch` did: ``requests`` non-empty lines seen, ``failed`` of them error objects
    (the first is ``first_error``), ``stopped`` true when ``fail_fast`` ended the run at a failed line."""

    requests: int
    failed: int
    stopped: bool = False
    first_error: dict[str, Any] | None = None

    def exit_code(self) -> int:
        """The command line's exit code for this batch, with its one-line message on stderr: 0 every line
        answered, 1 some lines failed (their error objects are in the output), 2 ``fail_fast`` stopped."""
        if self.stopped:
            first = self.first_error or {}
            print(f"atman: error on line {first.get('line')}: {first.get('error')}", file=sys.stderr)
            return 2
        if self.failed:
            print(f"atman: {self.failed} of {self.requests} lines failed", file=sys.stderr)
            return 1
        return 0


def result_line(result: Any) -> str:
    """One result as a line of JSON: UTF-8 text as it is, except that a string holding a lone UTF-16
    surrogate (valid in a JSON input line as ``"\\ud800"``, not encodable as UTF-8) is written
    escaped, so that it cannot stop the output of a batch.

        >>> result_line({"id": "\\ud800", "text": "é"})
        '{"id": "\\\\ud800", "text": "\\\\u00e9"}'
        >>> result_line({"text": "é"})
        '{"text": "é"}'
    """
    text = json.dumps(result, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(result)
    return text


def split_lines(text: str) -> list[str]:
    """The lines of a JSON-lines text (a leading BOM and ``\\r`` line ends removed).

    Lines are split at ``\\n`` only: ``str.splitlines`` would also split at U+2028 and friends, which
    ``json.dumps(ensure_ascii=False)`` writes unescaped inside strings.

        >>> split_lines('\\ufeff{"prompt": "a"}\\r\\n{"prompt": "b\\u2028c"}\\n')
        ['{"prompt": "a"}', '{"prompt": "b\\u2028c"}']
    """
    lines = [line.rstrip("\r") for line in text.lstrip("\ufeff").split("\n")]
    if lines and not lines[-1]:
        lines.pop()
    return lines


def normalise_request(request: dict[str, Any]) -> dict[str, Any]:
    """Turn a request in the CLI/JSON vocabulary into keyword arguments of :meth:`Explainer.explain`.

        >>> normalise_request({"prompt": "a b", "target": None, "conceptual": True})
        {'prompt': 'a b', 'target': None, 'kappa': 0.7}
    """
    out = {k: v for k, v in request.items() if v is not None and k not in ("conceptual", "id")}
    if "target" in request:
        out["target"] = request["target"]
    granularity = request.get("granularity") or "auto"
    if request.get("delimiter") and granularity not in ("auto", "delimiter"):
        raise RequestError(f"a delimiter only applies to granularity 'delimiter', not {granularity!r}")
    if request.get("spans") and granularity not in ("auto", "spans"):
        raise RequestError(f"spans only apply to granularity 'spans', not {granularity!r}")
    if "spans" in out:
        spans = out["spans"]
        if not all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s) for s in spans):
            raise RequestError("spans must be a list of [start, end] pairs of integers")
        out["spans"] = [tuple(s) for s in spans]
    if request.get("conceptual") is False or ("kappa" in request and request["kappa"] is None):
        out["kappa"] = None
    elif "kappa" not in out:
        out["kappa"] = CONCEPTUAL_KAPPA if request.get("conceptual") else "default"
    return out


def read_object(line: str, fields: dict[str, tuple[type, ...]], required: Sequence[str]) -> dict[str, Any]:
    """One batch line as a JSON object whose fields are among ``fields`` (name -> allowed types) and
    include ``required``; :class:`RequestError` naming what is wrong otherwise. The old, inverted
    ``factor`` field is refused with the explanation of its replacement.

        >>> read_object('{"question": "Why?"}', {"question": (str,)}, ("question",))
        {'question': 'Why?'}
    """
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RequestError(f"not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError("each line must be a JSON object")
    if "factor" in request:
        raise RequestError(f"field factor: {FACTOR_RENAMED.replace('`', '')}")
    unknown = sorted(set(request) - set(fields))
    if unknown:
        raise RequestError(f"unknown field(s): {', '.join(unknown)}; known: {', '.join(fields)}")
    missing = [name for name in required if name not in request]
    if missing:
        raise RequestError(f"missing field: {', '.join(missing)}")
    for name, value in request.items():
        if not isinstance(value, fields[name]) or (isinstance(value, bool) and bool not in fields[name]):
            raise RequestError(f"field {name!r} has the wrong type ({type(value).__name__})")
    return request


def parse_line(line: str) -> dict[str, Any]:
    """One batch line -> keyword arguments of :meth:`Explainer.explain`; :class:`RequestError` if it is bad.

        >>> parse_line('{"prompt": "Ada lives in", "target": " Oslo", "granularity": "word"}')
        {'prompt': 'Ada lives in', 'target': ' Oslo', 'granularity': 'word', 'kappa': 'default'}
    """
    request = read_object(line, LINE_FIELDS, ("prompt",))
    request.setdefault("target", None)
    return normalise_request(request)


def request_id(line: str) -> str | int | None:
    """The ``id`` field of a line, if it is a JSON object with a string or integer id (else None)."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError:
        return None
    value = request.get("id") if isinstance(request, dict) else None
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def error_result(error: BaseException | str, line: int, request_id: str | int | None = None) -> dict[str, Any]:
    """The error object of a line that could not be explained.

        >>> error_result(RequestError("missing field: prompt"), 3, "q7")
        {'error': 'missing field: prompt', 'line': 3, 'id': 'q7'}
    """
    if isinstance(error, str) or isinstance(error, AtmanError):
        message = str(error)
    else:
        message = f"{type(error).__name__}: {error}"
    out: dict[str, Any] = {"error": message, "line": line}
    if request_id is not None:
        out["id"] = request_id
    return out


def explain_request(explainer: Explainer, request: dict[str, Any], method: str = "atman") -> Explanation:
    """Explain one parsed request with AtMan (``method="atman"``) or a comparison method of
    :mod:`atman.baselines` (a spec such as ``"occlusion"`` or ``"integrated-gradients:steps=16"``).

    A comparison method explains the complete target of a plain prompt; without a target it explains
    the explainer's greedy continuation.

        >>> explain_request(explainer, parse_line('{"prompt": "Ada lives in", "target": " Oslo"}'),
        ...                 "occlusion").top(1)  # doctest: +SKIP
        [Item(kind='prompt', ...)]
    """
    if method == "atman":
        return explainer.explain(**request)
    from .baselines import get_method

    for name, default in (("chat", False), ("target_granularity", "complete")):
        if request.get(name, default) != default:
            raise RequestError(f"--method {method} explains the complete target of a plain prompt; "
                               f"{name.replace('_', '-')} is for AtMan only")
    if request.get("granularity") == "refine":
        raise RequestError("--granularity refine is for AtMan only")
    built = get_method(method, explainer.lm)
    target = request.get("target")
    if target is None:
        target = explainer.generate(request["prompt"], max_new_tokens=request.get("max_new_tokens", 32))
    return built.attribute(request["prompt"], target, granularity=request.get("granularity", "auto"),
                           delimiter=request.get("delimiter"), spans=request.get("spans"))


def answer_line(handle: Callable[[str], dict[str, Any]], line: str, number: int) -> dict[str, Any]:
    """``handle(line)``'s result with ``line`` (and the request's ``id``), or the line's error object."""
    rid = request_id(line)
    try:
        result = handle(line)
    except Exception as exc:  # one bad line never costs the others their results
        return error_result(exc, number, rid)
    result["line"] = number
    if rid is not None:
        result["id"] = rid
    return result


def run_lines(handle: Callable[[str], dict[str, Any]], lines: Sequence[str], write: Callable[[dict[str, Any]], None],
              *, fail_fast: bool = False, progress: Callable[[int, int], None] | None = None) -> BatchSummary:
    """:func:`run_batch` for any kind of request: ``handle(line)`` returns a line's result as a dict
    (or raises, which becomes the line's error object)."""
    requests = failed = 0
    first_error = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        requests += 1
        result = answer_line(handle, line, number)
        write(result)
        if "error" in result:
            failed += 1
            first_error = first_error or result
            if fail_fast:
                return BatchSummary(requests, failed, True, first_error)
        if progress is not None:
            progress(number, len(lines))
    return BatchSummary(requests, failed, False, first_error)


def run_line(explainer: Explainer, line: str, number: int, method: str = "atman") -> dict[str, Any]:
    """The result of line ``number`` (1-based): the explanation's dict with ``line`` (and ``id``), or the
    line's error object. Never raises for a bad request: one bad line never costs the others.

        >>> run_line(explainer, '{"prompt": "Ada lives in", "target": " Oslo", "id": "a"}', 1)["id"]  # doctest: +SKIP
        'a'
    """
    return answer_line(lambda text: explain_request(explainer, parse_line(text), method).to_dict(), line, number)


def run_batch(explainer: Explainer, lines: Sequence[str], write: Callable[[dict[str, Any]], None], *,
              method: str = "atman", fail_fast: bool = False,
              progress: Callable[[int, int], None] | None = None) -> BatchSummary:
    """Run every non-empty line in this process, in order, handing each result to ``write`` as it is done.

    ``fail_fast`` stops after the first error object (which is still written). ``progress(done, total)``
    is called after each line.

        >>> run_batch(explainer, ['{"prompt": "Ada lives in", "target": " Oslo"}', '{}'], print)  # doctest: +SKIP
        {'model': ..., 'line': 1}
        {'error': 'missing field: prompt', 'line': 2}
        BatchSummary(requests=2, failed=1, stopped=False, first_error={'error': 'missing field: prompt', 'line': 2})
    """
    return run_lines(lambda text: explain_request(explainer, parse_line(text), method).to_dict(), lines, write,
                     fail_fast=fail_fast, progress=progress)
