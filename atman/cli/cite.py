"""``atman cite``: the sources in a context that each sentence of a response rests on.

Mirrors :meth:`atman.Citer.cite`. The context comes as text (``--context``), files
(``--context-file``, repeatable: each file's paragraphs are passages titled by the file name) or a
JSONL of passages (``--passages``: one ``{"text", "id", "title"}`` per line); or a chat transcript
(``--messages chat.json``: OpenAI messages, or ``{"messages", "documents", "tools"}``), mirroring
:meth:`atman.Citer.cite_messages`. ``--input`` runs a batch of citation requests, one JSON object per
line (with ``messages`` in place of ``context`` and ``question`` for a transcript).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

from .batch import read_object, read_requests, run_requests, split_lines
from .shared import (
    UsageError,
    add_model_options,
    check_writable,
    count,
    finite_float,
    load_options,
    memory_budget,
    progress,
    quiet_libraries,
    read_text,
    said_written,
    status,
    strip_final_newline,
    write_file,
)

FORMATS = ("text", "json", "html")
SOURCE_LEVELS = ("message", "passage", "sentence", "token")
METHODS = ("readout", "atman")
# fields of a batch line, with the types each may have
CITE_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str, int, type(None)),
    "context": (str, list),
    "question": (str,),
    "response": (str, type(None)),
    "sources": (str,),
    "spans": (list,),
    "chat": (bool,),
    "system": (str, type(None)),
    "max_new_tokens": (int,),
    "refine": (bool, type(None)),
    "group_size": (int,),
    "refine_share": (int, float),
    "messages": (list,),
    "documents": (list,),
    "tools": (list,),
    "roles": (list,),
}
# what a transcript request may carry besides its messages (a context request: the rest)
TRANSCRIPT_FIELDS = ("id", "messages", "documents", "tools", "roles", "sources", "spans", "max_new_tokens",
                     "refine", "group_size", "refine_share")
REFINE_CHOICES = {"auto": None, "on": True, "off": False}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``cite`` sub-command."""
    cite = sub.add_parser("cite", help="the sources in a context that each sentence of a response rests on")
    cite.add_argument("--question", "-Q", help="the question the response answers")
    cite.add_argument("--context", help="the context as text (passages separated by blank lines)")
    cite.add_argument("--context-file", type=Path, action="append", default=[], metavar="FILE",
                      help="a context file (repeatable): its paragraphs are passages titled by the file name")
    cite.add_argument("--passages", type=Path, metavar="FILE.jsonl",
                      help="passages, one JSON object per line: {\"text\": ..., \"id\": ..., \"title\": ...}")
    cite.add_argument("--messages", type=Path, metavar="CHAT.json",
                      help="a chat transcript: OpenAI messages (a list), or {\"messages\", \"documents\", \"tools\"}; "
                           "its last assistant message is explained (absent: the model answers first)")
    cite.add_argument("--roles", help="transcript: the roles whose messages are sources, comma-separated (default all: "
                                      "system, developer, user, assistant, tool, reasoning, document)")
    cite.add_argument("--response", "-r", help="the response to explain (default: the model answers first)")
    cite.add_argument("--response-file", type=Path, help="read the response from this file")
    cite.add_argument("--sources", "-s", default="sentence", choices=SOURCE_LEVELS,
                      help="the units of the context that are suppressed one at a time (message: transcripts only)")
    cite.add_argument("--span", action="append", metavar="START:END", dest="spans",
                      help="a character span of the response to explain (repeatable; default: its sentences)")
    cite.add_argument("--method", default="readout", choices=METHODS,
                      help="readout: only the question and response lose the source (default, cheap); atman: every "
                           "later position loses it (the paper's AtMan)")
    cite.add_argument("--multiplier", type=finite_float, default=0.0,
                      help="attention multiplier of a suppressed source (default 0: removed)")
    cite.add_argument("--refine", default="auto", choices=sorted(REFINE_CHOICES),
                      help="coarse to fine: score runs of --group-size sources first, then the sources of the "
                           "top runs alone (auto: above 100 sources)")
    cite.add_argument("--group-size", type=count, default=8, help="sources per run in the coarse stage")
    cite.add_argument("--refine-share", type=finite_float, default=0.99,
                      help="refine the fewest top runs that hold this share of the positive total")
    cite.add_argument("--top", type=count, default=3, help="sources shown per response span (text and HTML)")
    cite.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the model's chat template")
    cite.add_argument("--system", help="system message (chat template)")
    cite.add_argument("--max-new-tokens", type=count, default=128, help="length of a generated response")
    cite.add_argument("--input", type=Path, metavar="FILE.jsonl",
                      help="batch: one citation request per line ({\"context\", \"question\", \"response\", ...})")
    cite.add_argument("--fail-fast", action="store_true", help="batch: stop at the first bad line")
    add_model_options(cite)
    cite.add_argument("--format", "-f", choices=FORMATS,
                         help="text, json or html (default: from the -o file's extension, .json or .html; else text)")
    cite.add_argument("--output", "-o", type=Path, help="write the result here instead of stdout")
    cite.add_argument("--quiet", "-q", action="store_true", help="no progress bar or status messages")
    cite.set_defaults(handler=cite_command)


def context_from_args(args: argparse.Namespace) -> str | list[dict[str, Any]]:
    """The context of a single request: exactly one of --context, --context-file, --passages."""
    given = [name for name, value in (("--context", args.context), ("--context-file", args.context_file),
                                      ("--passages", args.passages)) if value]
    if len(given) != 1:
        raise UsageError("give the context with exactly one of --context, --context-file or --passages"
                         + (f" (got {', '.join(given)})" if given else ""))
    if args.context:
        return args.context
    if args.context_file:
        from ..citer import passages_from

        passages = []
        for path in args.context_file:
            for passage in passages_from(strip_final_newline(read_text(path))):
                passages.append({"text": passage.text, "title": path.name})
        return passages
    passages = []
    for number, line in enumerate(split_lines(read_text(args.passages)), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{args.passages} line {number}: not valid JSON: {exc}") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise UsageError(f"{args.passages} line {number}: each passage is an object with a \"text\" string")
        passages.append({k: item[k] for k in ("text", "id", "title") if k in item})
    return passages


def parse_span(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(f"--span must look like START:END (character offsets of the response), got {text!r}") from None
    return start, end


def cite_command(args: argparse.Namespace) -> int:
    """Run ``atman cite``: one request from the options, or a batch (``--input``)."""
    check_writable(args.output)
    if not 0.0 < args.refine_share <= 1.0:
        raise UsageError(f"--refine-share must lie in (0, 1], got {args.refine_share:g}")
    if args.group_size < 2:
        raise UsageError(f"--group-size must be at least 2, got {args.group_size}")
    budget = memory_budget(args.max_memory)
    if args.input is not None:
        if args.question or args.context or args.context_file or args.passages or args.response:
            raise UsageError("--input takes the requests from the file; do not also give a question or context")
        if args.format == "html":
            raise UsageError("--input writes JSON lines; --format html is for a single result")
        # bytes, line by line: a line that is not UTF-8 (or not JSON) is that line's error, not the batch's
        lines = read_requests(args.input)
        citer = load_citer(args, budget)
        return run_requests(lambda line: cite_line(citer, line), lines, args)
    if args.messages is not None:
        return cite_transcript(args, budget)
    if args.roles:
        raise UsageError("--roles chooses among a transcript's messages; give the transcript with --messages")
    if args.sources == "message":
        raise UsageError("--sources message needs a transcript (--messages); a context has passages, sentences "
                         "and tokens")
    if not args.question:
        raise UsageError("no question: give it with --question")
    context = context_from_args(args)
    if args.response is not None and args.response_file is not None:
        raise UsageError("give the response either with --response or with --response-file, not both")
    response = strip_final_newline(read_text(args.response_file)) if args.response_file else args.response
    spans = [parse_span(text) for text in args.spans] if args.spans else None
    citer = load_citer(args, budget)
    with progress("citing", args.quiet) as tick:
        result = citer.cite(context, args.question, response, sources=args.sources, spans=spans,
                            chat=False if args.no_chat else None, system=args.system,
                            max_new_tokens=args.max_new_tokens, refine=REFINE_CHOICES[args.refine],
                            group_size=args.group_size, refine_share=args.refine_share, progress=tick)
    write_citations(result, args.format, args.output, args.top, args.quiet)
    return 0


def transcript_from_file(path: Path) -> dict[str, Any]:
    """``--messages``: a JSON list of messages, or an object with ``messages`` (and ``documents``, ``tools``)."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise UsageError(f"{path}: give a list of messages or an object with a \"messages\" list")
    unknown = sorted(set(data) - {"messages", "documents", "tools"})
    if unknown:
        raise UsageError(f"{path}: unknown field(s) {', '.join(unknown)}; known: messages, documents, tools")
    return data


def cite_transcript(args: argparse.Namespace, budget: int | str | None) -> int:
    """``atman cite --messages chat.json``: the sources in a transcript of each sentence of its answer."""
    given = [name for name, value in (("--context", args.context), ("--context-file", args.context_file),
                                      ("--passages", args.passages), ("--question", args.question),
                                      ("--response", args.response), ("--response-file", args.response_file),
                                      ("--system", args.system), ("--no-chat", args.no_chat)) if value]
    if given:
        raise UsageError(f"--messages holds the whole chat; do not also give {', '.join(given)} (the answer to "
                         "explain is the transcript's last assistant message)")
    transcript = transcript_from_file(args.messages)
    roles = [r.strip() for r in args.roles.split(",") if r.strip()] if args.roles else None
    spans = [parse_span(text) for text in args.spans] if args.spans else None
    citer = load_citer(args, budget)
    with progress("citing", args.quiet) as tick:
        result = citer.cite_messages(transcript["messages"], documents=transcript.get("documents"),
                                     tools=transcript.get("tools"), sources=args.sources, roles=roles, spans=spans,
                                     max_new_tokens=args.max_new_tokens, refine=REFINE_CHOICES[args.refine],
                                     group_size=args.group_size, refine_share=args.refine_share, progress=tick)
    write_citations(result, args.format, args.output, args.top, args.quiet)
    return 0


def load_citer(args: argparse.Namespace, budget: int | str | None) -> Any:
    quiet_libraries()
    from ..citer import Citer
    from ..models import load_model

    with status(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'}", args.quiet):
        lm = load_model(args.model, **load_options(args))
    return Citer(lm, method=args.method, multiplier=args.multiplier, backend=args.backend,
                 batch_size=args.batch_size, max_memory=budget)


def cite_line(citer: Any, line: str) -> dict[str, Any]:
    """One batch line's citation result as a dict."""
    request = read_object(line, CITE_FIELDS, ())
    if "messages" not in request:
        missing = [name for name in ("context", "question") if name not in request]
        if missing:
            raise UsageError(f"missing field: {', '.join(missing)} (or messages, for a transcript)")
    spans = request.get("spans")
    if spans is not None and not all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s)
                                     for s in spans):
        raise UsageError("spans must be a list of [start, end] pairs of integers")
    if "messages" in request:
        extra = sorted(set(request) - set(TRANSCRIPT_FIELDS))
        if extra:
            raise UsageError(f"a transcript request (messages) does not take {', '.join(extra)}")
        return citer.cite_messages(
            request["messages"], documents=request.get("documents"), tools=request.get("tools"),
            sources=request.get("sources", "sentence"), roles=request.get("roles"),
            spans=[tuple(s) for s in spans] if spans is not None else None,
            max_new_tokens=request.get("max_new_tokens", 128), refine=request.get("refine"),
            group_size=request.get("group_size", 8), refine_share=request.get("refine_share", 0.99)).to_dict()
    for name in ("documents", "tools", "roles"):
        if name in request:
            raise UsageError(f"{name} belongs to a transcript request; give messages too")
    result = citer.cite(request["context"], request["question"], request.get("response"),
                        sources=request.get("sources", "sentence"),
                        spans=[tuple(s) for s in spans] if spans is not None else None,
                        chat=request.get("chat"), system=request.get("system"),
                        max_new_tokens=request.get("max_new_tokens", 128), refine=request.get("refine"),
                        group_size=request.get("group_size", 8), refine_share=request.get("refine_share", 0.99))
    return result.to_dict()


def write_citations(result: Any, fmt: str, output: Path | None, top: int, quiet: bool = False) -> None:
    """Citations as ``text`` (terminal table), ``json`` or ``html`` (hover a sentence to see its sources)."""
    if fmt == "json":
        text = result.to_json(indent=1) + "\n"
    elif fmt == "html":
        from ..render.citations import render_citations_html

        text = render_citations_html(result, top=top)
    else:
        from rich.console import Console

        from ..render.citations import render_citations_terminal

        if output is None:
            render_citations_terminal(result, top=top)
            return
        console = Console(record=True, file=io.StringIO(), width=120)
        render_citations_terminal(result, console, top=top)
        text = console.export_text()
    if output is None:
        sys.stdout.write(text)
    else:
        write_file(output, text)
        said_written(output, CITATIONS_WRITTEN[fmt], quiet)


# what each --format writes, for the line that names the file
CITATIONS_WRITTEN = {"json": "the citations as JSON", "html": "the citations as an HTML page (hover a sentence)",
                     "text": "the citations as text"}
