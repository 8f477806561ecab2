"""Command line: ``atman explain`` mirrors :meth:`atman.Explainer.explain`; ``atman demo`` shows it off.

Exit codes: 0 success; 1 a batch finished but some of its lines failed (their error objects are in
the output); 2 bad input or options (a clear message on stderr, never a traceback); 3 an unexpected
internal error (one line on stderr; set ATMAN_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from .batch import explain_request, normalise_request, run_batch, split_lines
from .engine import ENGINES, FACTOR_RENAMED
from .errors import AtmanError
from .explanation import POSTPROCESSING, Explanation
from .manipulation import BACKENDS, MODES
from .units import GRANULARITIES, TARGET_GRANULARITIES

FORMATS = ("text", "json", "html")
DEMO_PROMPT = (
    "Welcome to the Varnholt archive.\n\n"
    "Tamsin Orrelby keeps bees on the island of Quellmark. "
    "Doran Vesk repairs clocks in the town of Lindhaven. "
    "The river Sorrow runs past the mill at Brackwater. "
    "Mirela Castaine teaches music in the village of Olvereth.\n\n"
    "Question: Where does Doran Vesk repair clocks?\n"
    "Answer: Doran Vesk repairs clocks in the town of"
)
DEMO_TARGET = " Lindhaven"
# modules that contribute further sub-commands through ``add_parser(subparsers)``
SUBCOMMAND_MODULES: tuple[str, ...] = ("atman.server.cli", "atman.evaluate.cli")


class UsageError(AtmanError):
    """Options that do not fit together."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atman",
        description="Explain which parts of a prompt made a transformer produce its output (AtMan).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    explain = sub.add_parser("explain", help="explain a target continuation of a prompt")
    explain.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file, --input or stdin)")
    explain.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    explain.add_argument("--target", "-t", help="the continuation to explain (default: the model's greedy one)")
    explain.add_argument("--input", type=Path, metavar="FILE.jsonl",
                         help="batch: one JSON request per line (- reads stdin), one JSON result per line out")
    explain.add_argument("--fail-fast", action="store_true", help="batch: stop at the first bad line")
    importlib.import_module("atman.distributed").add_batch_options(explain)
    _model_options(explain)
    explain.add_argument("--granularity", "-g", default="auto", choices=GRANULARITIES)
    explain.add_argument("--delimiter", help="split the prompt at this string (sets --granularity delimiter)")
    explain.add_argument("--span", action="append", metavar="START:END", dest="spans",
                         help="explicit character span of the prompt as a unit (repeatable)")
    explain.add_argument("--refine-from", default="sentence", choices=("sentence", "paragraph", "word"),
                         help="--granularity refine: the coarse granularity explained first")
    explain.add_argument("--refine-top", type=int, default=3,
                         help="--granularity refine: how many coarse units to refine to tokens")
    explain.add_argument("--refine-share", type=float, metavar="S",
                         help="--granularity refine: refine only the fewest top units holding S (0-1] of the "
                              "positive relevance (at most --refine-top)")
    explain.add_argument("--target-granularity", default="complete", choices=TARGET_GRANULARITIES)
    explain.add_argument("--multiplier", type=float,
                         help="attention multiplier of a suppressed unit: 0.1 (default) damps it to a tenth, 0 removes "
                              "it, 1 leaves it (the paper's suppression factor f is 1 - multiplier)")
    explain.add_argument("--factor", type=float, help=argparse.SUPPRESS)
    explain.add_argument("--conceptual", action="store_true",
                         help="switch conceptual suppression on (threshold 0.7 unless --kappa)")
    explain.add_argument("--kappa", type=float, help="switch conceptual suppression on with this similarity threshold")
    explain.add_argument("--no-conceptual", action="store_true", help="conceptual suppression off (the default)")
    explain.add_argument("--mode", choices=MODES, help="log-additive (default) or multiplicative")
    explain.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    explain.add_argument("--system", help="system message for --chat")
    explain.add_argument("--max-new-tokens", type=int, default=32,
                         help="length of the generated target when none is given")
    explain.add_argument("--postprocessing", default="none", choices=POSTPROCESSING)
    explain.add_argument("--normalize", action="store_true", help="scale scores to [0, 1] per target")
    explain.add_argument("--format", "-f", default="text", choices=FORMATS)
    explain.add_argument("--output", "-o", type=Path, help="write the result here instead of stdout")
    explain.add_argument("--quiet", "-q", action="store_true", help="no progress bar or status messages")
    explain.add_argument("--method", default="atman",
                         help="attribution method: atman (default) or a baseline for comparison, e.g. "
                              "integrated-gradients, occlusion, chefer (see atman.baselines.METHODS)")
    importlib.import_module("atman.modal_cli").add_explain_options(explain)

    demo = sub.add_parser("demo", help="explain a built-in example and write an HTML report")
    _model_options(demo)
    demo.add_argument("--output", "-o", type=Path, default=Path("atman-demo.html"))
    demo.add_argument("--quiet", "-q", action="store_true")
    for name in SUBCOMMAND_MODULES:
        # each module adds its sub-parser and sets ``handler`` (a function of the parsed args -> exit code)
        importlib.import_module(name).add_parser(sub)
    return parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None,
                        help="hub id, model directory, .gguf file, 'smollm2' (default) or 'gemma3-270m'")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--backend", default="sdpa", choices=BACKENDS, help="attention kernel for log-additive")
    parser.add_argument("--batch-size", type=int, help="perturbations per forward pass (default: automatic)")
    parser.add_argument("--max-memory", metavar="SIZE",
                        help="memory budget for a batch, e.g. 2GB (default: a quarter of free RAM; on GPU "
                             "a few plain forward passes)")
    parser.add_argument("--engine", default="cached", choices=ENGINES,
                        help="cached: reuse the unperturbed prefix (exact, faster); naive: full passes")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.command == "demo":
            return _demo(args)
        if getattr(args, "handler", None) is not None:
            return args.handler(args)
        return _explain(args)
    except AtmanError as exc:
        print(f"atman: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atman: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not an error of ours
        sys.stderr.close()
        return 0
    except Exception as exc:
        if os.environ.get("ATMAN_DEBUG"):
            raise
        print(f"atman: internal error: {type(exc).__name__}: {exc} (ATMAN_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 3


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load(args) -> Any:
    from .explainer import Explainer
    from .models import load_model

    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    with _status(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'}", args.quiet):
        lm = load_model(args.model, dtype=args.dtype, device=args.device)
    return Explainer(lm, backend=args.backend, batch_size=args.batch_size, engine=args.engine,
                     max_memory=args.max_memory)


def _explain(args) -> int:
    modal = importlib.import_module("atman.modal_cli")
    if modal.wanted(args):
        if args.method != "atman":
            raise UsageError("--image, --pair and --classify run AtMan; --method is for text prompts")
        return modal.explain(args)
    if args.input is not None:
        if args.prompt or args.prompt_file or args.target:
            raise UsageError("--input takes the prompts from the file; do not also give a prompt or --target")
        if args.format == "html":
            raise UsageError("--input writes JSON lines; --format html is for a single explanation")
        lines = split_lines(sys.stdin.read() if str(args.input) == "-" else _read_text(args.input))
        distributed = importlib.import_module("atman.distributed")
        if distributed.wants_ray(args):
            return distributed.run_cli_batch(args, lines)
        explainer = _load(args)
        return _batch(explainer, lines, args)
    request = _request_from_args(args)
    explainer = _load(args)
    if args.method != "atman":
        explanation = explain_request(explainer, request, args.method)
        _write(explanation, args.format, args.output)
        return 0
    with _progress("explaining", args.quiet) as progress:
        explanation = explainer.explain(progress=progress, **request)
    _write(explanation, args.format, args.output)
    return 0


def _request_from_args(args) -> dict[str, Any]:
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give the prompt either as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        prompt = _strip_final_newline(_read_text(args.prompt_file))
    elif args.prompt is not None:
        prompt = args.prompt
    elif not sys.stdin.isatty():
        prompt = _strip_final_newline(sys.stdin.read())
    else:
        raise UsageError("no prompt: give one as an argument, with --prompt-file, --input or on stdin")
    if args.factor is not None:
        raise UsageError(f"--factor: {FACTOR_RENAMED.replace('`', '').replace('pass multiplier', 'pass --multiplier')}")
    request = {"prompt": prompt, "target": args.target}
    for name in ("granularity", "target_granularity", "delimiter", "multiplier", "mode", "system",
                 "max_new_tokens", "postprocessing", "normalize", "chat", "refine_from", "refine_top",
                 "refine_share"):
        request[name] = getattr(args, name)
    if (args.kappa is not None or args.conceptual) and args.no_conceptual:
        raise UsageError("--kappa/--conceptual switch conceptual suppression on, --no-conceptual off: choose one")
    if args.kappa is not None:
        request["kappa"] = args.kappa
    if args.conceptual or args.no_conceptual:
        request["conceptual"] = args.conceptual
    if args.spans:
        request["spans"] = [_parse_span(text) for text in args.spans]
    return normalise_request(request)


def _strip_final_newline(text: str) -> str:
    """Files and pipes end with a newline the user did not mean as part of the prompt."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _parse_span(text: str) -> list[int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(f"--span must look like START:END (character offsets), got {text!r}") from None
    return [start, end]


def _batch(explainer, lines: list[str], args) -> int:
    with _open_output(args.output) as out, _progress("batch", args.quiet, total=len(lines)) as progress:
        def write(result: dict[str, Any]) -> None:
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()

        summary = run_batch(explainer, lines, write, method=args.method, fail_fast=args.fail_fast,
                            progress=progress)
    if summary.stopped:
        print(f"atman: error on line {summary.first_error['line']}: {summary.first_error['error']}", file=sys.stderr)
        return 2
    if summary.failed:
        print(f"atman: {summary.failed} of {summary.requests} lines failed", file=sys.stderr)
        return 1
    return 0


def _write(explanation: Explanation, fmt: str, output: Path | None) -> None:
    if fmt == "json":
        text = explanation.to_json(indent=1) + "\n"
    elif fmt == "html":
        from .render.html import render_html

        text = render_html(explanation)
    else:
        from rich.console import Console

        from .render.terminal import render_terminal

        if output is None:
            render_terminal(explanation)
            return
        console = Console(record=True, file=io.StringIO(), width=100)
        render_terminal(explanation, console)
        text = console.export_text()
    if output is None:
        sys.stdout.write(text)
    else:
        _write_file(output, text)


def _write_file(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


@contextlib.contextmanager
def _open_output(path: Path | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
        return
    try:
        handle = path.open("w", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    with handle:
        yield handle


def _interactive(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def _status(message: str, quiet: bool) -> Iterator[None]:
    if not _interactive(quiet):
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message + " ..."):
        yield


@contextlib.contextmanager
def _progress(description: str, quiet: bool, total: int | None = None):
    """A callback ``(done, total)`` that drives a rich progress bar on stderr, or does nothing."""
    if not _interactive(quiet):
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, all_: int) -> None:
            bar.update(task, completed=done, total=all_)

        yield update


def _demo(args) -> int:
    from rich.console import Console

    from .render.html import render_html
    from .render.terminal import render_terminal

    explainer = _load(args)
    console = Console()
    explanations = []
    for granularity in ("sentence", "word"):
        with _progress(f"explaining ({granularity})", args.quiet) as progress:
            explanation = explainer.explain(DEMO_PROMPT, DEMO_TARGET, granularity=granularity, progress=progress)
        render_terminal(explanation, console)
        explanations.append(explanation)
    _write_file(args.output, render_html(explanations[-1], title="atman demo: which words made the answer"))
    console.print(f"\nHTML report written to [bold]{args.output}[/bold]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
