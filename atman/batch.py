"""The JSON-lines batch contract: one request per line in, one result (or error object) per line out.

It is shared by ``atman explain --input`` (run here, in one process) and by the Ray path
(:mod:`atman.distributed`, the same lines spread over workers). A line is a JSON object with the fields
of :data:`LINE_FIELDS` (``prompt`` required); its result is the explanation's JSON
(:meth:`atman.Explanation.to_dict`) plus ``"line"`` (the 1-based line number in the input) and, when
the request had one, its ``"id"``. A line that cannot be explained yields ``{"error": "...", "line": N}``
(plus ``"id"``), and the other lines still run. Empty lines are skipped (no output line).

It is one module because reading, checking, running and writing lines are one contract that the
local and the Ray paths share, resume included: a reader checking that no line is lost or repeated
needs them together.

The input is read as bytes and cut at ``\\n``; each line is decoded (UTF-8) and parsed on its own, so a
line that is not UTF-8, or JSON nested too deeply to parse, is that line's error object, not the end
of the batch. An output file is written so that a killed run can be resumed (:func:`read_results`,
:func:`open_results`): its finished lines are kept, a line cut off mid-write is dropped and redone.

Example::

    >>> from atman.batch import run_batch, split_lines
    >>> results = []
    >>> lines = split_lines('{"prompt": "Ada lives in Oslo. Ada lives in", "target": " Oslo"}\\n{"prompt": 1}\\n')
    >>> summary = run_batch(Explainer(load_model()), lines, results.append)  # doctest: +SKIP
    >>> summary.failed, results[1]  # doctest: +SKIP
    (1, {'error': "field 'prompt' has the wrong type (int)", 'line': 2})
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .defaults import CONCEPTUAL_KAPPA, FACTOR_RENAMED
from .errors import AtmanError

if TYPE_CHECKING:
    from .explainer import Explainer
    from .explanation import Explanation

# one line of a batch: text, or the raw bytes of a file (decoded line by line, see decode_line)
Line = str | bytes
UTF8_BOM = b"\xef\xbb\xbf"

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
    (the first is ``first_error``), ``stopped`` true when ``fail_fast`` ended the run at a failed line;
    ``answered`` results written by this run, ``kept`` results kept from an earlier run (``--resume``),
    ``retried`` requests run again after their worker was lost (Ray).

        >>> BatchSummary(requests=3, failed=1, answered=3).wrote("out.jsonl")
        'wrote 3 results (1 error) to out.jsonl'
    """

    requests: int
    failed: int
    stopped: bool = False
    first_error: dict[str, Any] | None = None
    answered: int = 0
    kept: int = 0
    retried: int = 0

    def wrote(self, output: str | os.PathLike) -> str:
        """What the batch wrote where, in one line: ``wrote 5 results (1 error, 2 kept) to out.jsonl``."""
        results = self.answered + self.kept
        notes = [f"{self.failed} error{'s' * (self.failed != 1)}"] if self.failed else []
        if self.kept:
            notes.append(f"{self.kept} kept from the earlier run")
        if self.retried:
            notes.append(f"{self.retried} retried after a lost worker")
        details = f" ({', '.join(notes)})" if notes else ""
        return f"wrote {results} result{'s' * (results != 1)}{details} to {output}"

    def exit_code(self, output: str | os.PathLike | None = None, quiet: bool = False) -> int:
        """The command line's exit code for this batch, with its one-line message on stderr: 0 every line
        answered, 1 some lines failed (their error objects are in the output), 2 ``fail_fast`` stopped.
        With an ``output`` file (and not ``quiet``), first the line of :meth:`wrote`."""
        if output is not None and not quiet:
            print(f"atman: {self.wrote(output)}", file=sys.stderr)
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


def split_lines(text: str | bytes) -> list[Any]:
    """The lines of a JSON-lines text, or of a file's bytes (then a list of bytes, each line decoded
    later by :func:`decode_line`): a leading BOM and ``\\r`` line ends removed.

    Lines are split at ``\\n`` only: ``str.splitlines`` would also split at U+2028 and friends, which
    ``json.dumps(ensure_ascii=False)`` writes unescaped inside strings.

        >>> split_lines('\\ufeff{"prompt": "a"}\\r\\n{"prompt": "b\\u2028c"}\\n')
        ['{"prompt": "a"}', '{"prompt": "b\\u2028c"}']
        >>> split_lines(b'{"prompt": "a"}\\n\\xff\\n')
        [b'{"prompt": "a"}', b'\\xff']
    """
    if isinstance(text, bytes):
        data = text[len(UTF8_BOM):] if text.startswith(UTF8_BOM) else text
        lines: list[Any] = [line.rstrip(b"\r") for line in data.split(b"\n")]
    else:
        lines = [line.rstrip("\r") for line in text.lstrip("\ufeff").split("\n")]
    if lines and not lines[-1]:
        lines.pop()
    return lines


def read_requests(path: str | os.PathLike) -> list[bytes]:
    """The lines of a JSON-lines request file as bytes (``-`` reads stdin); :class:`AtmanError` naming the
    file if it cannot be read. Nothing is decoded here: a line that is not UTF-8 fails on its own.

        >>> read_requests("requests.jsonl")[:1]  # doctest: +SKIP
        [b'{"prompt": "Ada lives in", "target": " Oslo"}']
    """
    if str(path) == "-":
        binary = getattr(sys.stdin, "buffer", None)
        if binary is None:  # a text stream put in place of stdin (e.g. io.StringIO)
            return split_lines(sys.stdin.read().encode("utf-8", "surrogatepass"))
        return split_lines(binary.read())
    try:
        return split_lines(Path(path).read_bytes())
    except OSError as exc:
        raise AtmanError(f"cannot read {path}: {exc.strerror or exc}") from None


def decode_line(line: Line) -> str:
    """A line as text: bytes decoded as UTF-8, :class:`RequestError` saying where if they are not.

        >>> decode_line(b'{"prompt": "caf\\xc3\\xa9"}')
        '{"prompt": "café"}'
        >>> decode_line(b'{"prompt": "\\xff"}')
        Traceback (most recent call last):
        ...
        atman.batch.RequestError: not valid UTF-8: byte 0xff at byte 13 of the line
    """
    if isinstance(line, str):
        return line
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"not valid UTF-8: byte 0x{line[exc.start]:02x} at byte {exc.start + 1} of the line") \
            from None


def load_json(text: str) -> Any:
    """``json.loads``, with :class:`RequestError` for text that is not JSON or is nested too deeply to
    parse (Python's parser recurses once per level: ``[[[...]]]`` 10,000 deep exceeds its stack).

        >>> load_json("[" * 10000 + "]" * 10000)
        Traceback (most recent call last):
        ...
        atman.batch.RequestError: not valid JSON: nested too deeply
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("not valid JSON: nested too deeply") from None


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
    request = load_json(line)
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


def request_id(line: Line) -> str | int | None:
    """The ``id`` field of a line, if it is a JSON object with a string or integer id (else None)."""
    try:
        request = load_json(decode_line(line))
    except RequestError:
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


def answer_line(handle: Callable[[str], dict[str, Any]], line: Line, number: int) -> dict[str, Any]:
    """``handle(line)``'s result with ``line`` (and the request's ``id``), or the line's error object
    (bytes are decoded first: a line that is not UTF-8 is an error object too)."""
    rid = request_id(line)
    try:
        result = handle(decode_line(line))
    except Exception as exc:  # one bad line never costs the others their results
        return error_result(exc, number, rid)
    result["line"] = number
    if rid is not None:
        result["id"] = rid
    return result


def run_lines(handle: Callable[[str], dict[str, Any]], lines: Sequence[Line], write: Callable[[dict[str, Any]], None],
              *, fail_fast: bool = False, progress: Callable[[int, int], None] | None = None,
              kept: Collection[int] = ()) -> BatchSummary:
    """:func:`run_batch` for any kind of request: ``handle(line)`` returns a line's result as a dict
    (or raises, which becomes the line's error object). The lines numbered in ``kept`` already have a
    result (an earlier run's) and are not run again."""
    requests = failed = answered = 0
    first_error = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        requests += 1
        if number in kept:
            continue
        result = answer_line(handle, line, number)
        write(result)
        answered += 1
        if "error" in result:
            failed += 1
            first_error = first_error or result
            if fail_fast:
                return BatchSummary(requests, failed, True, first_error, answered, len(kept))
        if progress is not None:
            progress(number, len(lines))
    return BatchSummary(requests, failed, False, first_error, answered, len(kept))


def run_line(explainer: Explainer, line: Line, number: int, method: str = "atman") -> dict[str, Any]:
    """The result of line ``number`` (1-based): the explanation's dict with ``line`` (and ``id``), or the
    line's error object. Never raises for a bad request: one bad line never costs the others.

        >>> run_line(explainer, '{"prompt": "Ada lives in", "target": " Oslo", "id": "a"}', 1)["id"]  # doctest: +SKIP
        'a'
    """
    return answer_line(lambda text: explain_request(explainer, parse_line(text), method).to_dict(), line, number)


def run_batch(explainer: Explainer, lines: Sequence[Line], write: Callable[[dict[str, Any]], None], *,
              method: str = "atman", fail_fast: bool = False,
              progress: Callable[[int, int], None] | None = None) -> BatchSummary:
    """Run every non-empty line in this process, in order, handing each result to ``write`` as it is done.

    ``fail_fast`` stops after the first error object (which is still written). ``progress(done, total)``
    is called after each line.

        >>> run_batch(explainer, ['{"prompt": "Ada lives in", "target": " Oslo"}', '{}'], print)  # doctest: +SKIP
        {'model': ..., 'line': 1}
        {'error': 'missing field: prompt', 'line': 2}
        BatchSummary(requests=2, failed=1, stopped=False, first_error={'error': 'missing field: prompt', 'line': 2}, \
answered=2, kept=0, retried=0)
    """
    return run_lines(lambda text: explain_request(explainer, parse_line(text), method).to_dict(), lines, write,
                     fail_fast=fail_fast, progress=progress)


def parse_result(line: bytes | str) -> dict[str, Any] | None:
    """One line of an output file as a result object, or None when it is not one: not UTF-8 or not a
    complete JSON object (a line cut off by a killed run, even inside a multi-byte character)."""
    try:
        result = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return result if isinstance(result, dict) else None


def read_results(path: str | os.PathLike, lines: Sequence[Line] | None = None) -> dict[int, dict[str, Any]]:
    """The explained results (not the error objects) of an output file, by line number: what a resumed
    run keeps. Lines that are not complete result objects (a run killed mid-write) are ignored; with the
    batch's input ``lines``, so is a result whose line is blank there or whose ``id`` differs from its
    request's (an output file of another input).

        >>> read_results("out.jsonl", read_requests("requests.jsonl"))  # doctest: +SKIP
        {1: {'model': 'SmolLM2-135M-Instruct', ..., 'line': 1}}
    """
    path = Path(path)
    kept: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return kept
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AtmanError(f"cannot read {path}: {exc.strerror or exc}") from None
    for text in split_lines(data):
        result = parse_result(text)
        if result is None or "error" in result:
            continue
        number = result.get("line")
        if not isinstance(number, int) or isinstance(number, bool):
            continue
        if lines is not None:
            if not 1 <= number <= len(lines) or not lines[number - 1].strip():
                continue
            if result.get("id") != request_id(lines[number - 1]):
                continue
        kept[number] = result
    return kept


def line_number(result: dict[str, Any]) -> float:
    """The ``line`` of a result, for sorting (infinite when it has none)."""
    number = result.get("line")
    return number if isinstance(number, int) and not isinstance(number, bool) else math.inf


def sort_results(path: str | os.PathLike) -> None:
    """Rewrite a results file in input order (by each object's ``line``), atomically. A line that is not
    a complete result object (a run killed mid-write) is dropped; of two results for one line the
    explained one (or else the later one) stays.

        >>> sort_results("results.jsonl")  # doctest: +SKIP
    """
    path = Path(path)
    by_line: dict[float, dict[str, Any]] = {}
    unnumbered = []
    for text in split_lines(path.read_bytes()):
        result = parse_result(text)
        if result is None:
            continue
        number = line_number(result)
        if number == math.inf:
            unnumbered.append(result)
        elif "error" not in result or "error" in by_line.get(number, {"error": None}):
            by_line[number] = result
    ordered = [by_line[n] for n in sorted(by_line)] + unnumbered
    replace_file(path, "".join(result_line(r) + "\n" for r in ordered))


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a scratch file beside it: a kill leaves the old or the new file."""
    scratch = path.with_name(path.name + ".writing")
    try:
        with scratch.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(scratch, path)
    except OSError as exc:
        raise AtmanError(f"cannot write {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def open_results(path: str | os.PathLike, kept: dict[int, dict[str, Any]] | None = None
                 ) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A writer of results into the file ``path``: the ``kept`` results of an earlier run first (the file is
    replaced by them at once, so a cut last line is gone and a kill now loses nothing), then each result
    appended and flushed as it comes; at the end the file is sorted by ``line`` if the results came out
    of order. A run killed at any point leaves every finished result in the file.

        >>> with open_results("out.jsonl", read_results("out.jsonl")) as write:  # doctest: +SKIP
        ...     write({"error": "missing field: prompt", "line": 2})
    """
    path = Path(path)
    kept = kept or {}
    if kept:
        replace_file(path, "".join(result_line(kept[n]) + "\n" for n in sorted(kept)))
    try:
        handle = path.open("a" if kept else "w", encoding="utf-8")
    except OSError as exc:
        raise AtmanError(f"cannot write {path}: {exc.strerror or exc}") from None
    last = max(kept, default=0)
    in_order = True

    def append(result: dict[str, Any]) -> None:
        nonlocal last, in_order
        handle.write(result_line(result) + "\n")
        handle.flush()
        number = line_number(result)
        in_order = in_order and number > last
        last = max(last, number)

    with handle:
        yield append
    if not in_order:
        sort_results(path)
