"""The ``atman`` command: ``explain`` and ``demo`` (text.py, media.py), ``cite``, ``serve`` and ``evaluate``.

Exit codes: 0 success; 1 a batch finished but some of its lines failed (their error objects are in
the output); 2 bad input or options (a clear message on stderr, never a traceback); 3 an unexpected
internal error (one line on stderr; set ATMAN_DEBUG=1 for the traceback); 130 interrupted.

Parsing imports nothing heavy: torch and transformers load only once a command runs, so ``--help``,
``--version`` and argument errors answer at once.

    >>> main(["--version"])  # doctest: +SKIP
    atman 0.1.0
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import AtmanError
from . import cite, evaluate, serve, text
from .batch import LINE_FIELDS
from .shared import UsageError

OK, SOME_LINES_FAILED, BAD_INPUT, INTERNAL_ERROR, INTERRUPTED = 0, 1, 2, 3, 130

__all__ = ["BAD_INPUT", "INTERNAL_ERROR", "INTERRUPTED", "LINE_FIELDS", "OK", "SOME_LINES_FAILED", "UsageError",
           "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command; each sets ``handler`` (parsed args -> exit code)."""
    parser = argparse.ArgumentParser(
        prog="atman",
        description="Explain which parts of a prompt made a transformer produce its output (AtMan).",
    )
    parser.add_argument("--version", action="version", version=f"atman {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    text.add_parsers(sub)
    cite.add_parser(sub)
    serve.add_parser(sub)
    evaluate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``atman`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        # the libraries' own bars too (a GGUF file's conversion, weights loading, downloads); read when
        # tqdm and huggingface_hub make a bar, which is after this
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if hasattr(args, "format") and args.format is None:
        # -o explanation.json writes JSON, -o report.html a page, unless --format says otherwise
        suffix = getattr(args, "output", None) and args.output.suffix.lower()
        args.format = {".json": "json", ".html": "html", ".htm": "html"}.get(suffix or "", "text")
    try:
        # a slip of an embedded model's name fails now, before torch and transformers load (seconds)
        from ..names import refuse_near_alias

        for name in [getattr(args, "model", None), *(getattr(args, "models", None) or [])]:
            refuse_near_alias(name, revision=getattr(args, "revision", None))
        return args.handler(args)
    except AtmanError as exc:
        print(f"atman: error: {exc}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print("atman: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not an error of ours
        sys.stderr.close()
        return OK
    except Exception as exc:
        if os.environ.get("ATMAN_DEBUG"):
            raise
        print(f"atman: internal error: {type(exc).__name__}: {exc} (ATMAN_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return INTERNAL_ERROR
