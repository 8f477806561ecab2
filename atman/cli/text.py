"""``atman explain`` (text prompts, batches, comparison methods) and ``atman demo``.

``atman explain`` mirrors :meth:`atman.Explainer.explain`; with ``--image``, ``--pair`` or
``--classify`` it hands over to :mod:`atman.cli.media`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..batch import explain_request, normalise_request
from ..defaults import MODES
from ..distributed import add_batch_options, run_cli_batch, wants_ray
from ..explanation import POSTPROCESSING
from ..units import GRANULARITIES, TARGET_GRANULARITIES
from . import media
from .batch import check_resume, read_requests, run_batch
from .shared import (
    UsageError,
    add_model_options,
    add_suppression_option,
    check_writable,
    count,
    finite_float,
    load_explainer,
    progress,
    read_prompt,
    suppression,
    warn_small_budget,
    write_explanation,
    write_file,
)

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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``explain`` and ``demo`` sub-commands."""
    explain = sub.add_parser("explain", help="explain a target continuation of a prompt")
    explain.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file, --input or stdin)")
    explain.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    explain.add_argument("--target", "-t", help="the continuation to explain (default: the model's greedy one)")
    explain.add_argument("--input", type=Path, metavar="FILE.jsonl",
                         help="batch: one JSON request per line (- reads stdin), one JSON result per line out")
    explain.add_argument("--fail-fast", action="store_true", help="batch: stop at the first bad line")
    add_model_options(explain)
    explain.add_argument("--granularity", "-g", default="auto", choices=GRANULARITIES)
    explain.add_argument("--delimiter", help="split the prompt at this string (sets --granularity delimiter)")
    explain.add_argument("--span", action="append", metavar="START:END", dest="spans",
                         help="explicit character span of the prompt as a unit (repeatable)")
    explain.add_argument("--refine-from", default="sentence", choices=("sentence", "paragraph", "word"),
                         help="--granularity refine: the coarse granularity explained first")
    explain.add_argument("--refine-top", type=count, default=3,
                         help="--granularity refine: how many coarse units to refine to tokens")
    explain.add_argument("--refine-share", type=finite_float, metavar="S",
                         help="--granularity refine: refine only the fewest top units holding S (0-1] of the "
                              "positive relevance (at most --refine-top)")
    explain.add_argument("--target-granularity", default="complete", choices=TARGET_GRANULARITIES)
    add_suppression_option(explain)
    explain.add_argument("--conceptual", action="store_true",
                         help="switch conceptual suppression on (threshold 0.7 unless --kappa)")
    explain.add_argument("--kappa", type=finite_float,
                         help="switch conceptual suppression on with this similarity threshold")
    explain.add_argument("--no-conceptual", action="store_true", help="conceptual suppression off (the default)")
    explain.add_argument("--mode", choices=MODES, help="log-additive (default) or multiplicative")
    explain.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    explain.add_argument("--system", help="system message for --chat")
    explain.add_argument("--max-new-tokens", type=count, default=32,
                         help="length of the generated target when none is given")
    explain.add_argument("--postprocessing", default="none", choices=POSTPROCESSING)
    explain.add_argument("--normalize", action="store_true", help="scale scores to [0, 1] per target")
    explain.add_argument("--format", "-f", choices=FORMATS,
                         help="text, json or html (default: from the -o file's extension, .json or .html; else text)")
    explain.add_argument("--output", "-o", type=Path, help="write the result here instead of stdout")
    explain.add_argument("--quiet", "-q", action="store_true", help="no progress bar or status messages")
    explain.add_argument("--method", default="atman",
                         help="attribution method: atman (default) or a baseline for comparison, e.g. "
                              "integrated-gradients, occlusion, chefer (see atman.baselines.METHODS)")
    media.add_explain_options(explain)
    add_batch_options(explain)
    explain.set_defaults(handler=explain_command)

    demo = sub.add_parser("demo", help="explain a built-in example and write an HTML report")
    add_model_options(demo)
    demo.add_argument("--output", "-o", type=Path, default=Path("atman-demo.html"))
    demo.add_argument("--quiet", "-q", action="store_true")
    demo.set_defaults(handler=demo_command)


def explain_command(args: argparse.Namespace) -> int:
    """``atman explain``: one explanation, a batch (``--input``) or, with media options, media.explain."""
    if media.wanted(args):
        if args.method != "atman":
            raise UsageError("--image, --pair and --classify run AtMan; --method is for text prompts")
        return media.explain(args)
    check_writable(args.output)
    if args.input is not None:
        if args.prompt or args.prompt_file or args.target:
            raise UsageError("--input takes the prompts from the file; do not also give a prompt or --target")
        if args.format == "html":
            raise UsageError("--input writes JSON lines; --format html is for a single explanation")
        check_resume(args)
        lines = read_requests(args.input)
        if wants_ray(args):
            return run_cli_batch(args, lines)
        base = Path(".") if str(args.input) == "-" else args.input.parent
        return run_batch(lambda: load_explainer(args), lines, args, media=media.MediaBatch(args, base))
    if args.resume:
        raise UsageError("--resume applies to --input batches")
    request = request_from_args(args)
    explainer = load_explainer(args)
    warn_small_budget(explainer, request["prompt"] + (request.get("target") or ""))
    if args.method != "atman":
        write_explanation(explain_request(explainer, request, args.method), args.format, args.output, args.quiet)
        return 0
    with progress("explaining", args.quiet) as tick:
        explanation = explainer.explain(progress=tick, **request)
    write_explanation(explanation, args.format, args.output, args.quiet)
    return 0


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :meth:`atman.Explainer.explain` that the options of ``atman explain`` ask for."""
    request: dict[str, Any] = {"prompt": read_prompt(args), "target": args.target}
    for name in ("granularity", "target_granularity", "delimiter", "mode", "system",
                 "max_new_tokens", "postprocessing", "normalize", "chat", "refine_from", "refine_top",
                 "refine_share"):
        request[name] = getattr(args, name)
    request.update(suppression(args))
    if (args.kappa is not None or args.conceptual) and args.no_conceptual:
        raise UsageError("--kappa/--conceptual switch conceptual suppression on, --no-conceptual off: choose one")
    if args.kappa is not None:
        request["kappa"] = args.kappa
    if args.conceptual or args.no_conceptual:
        request["conceptual"] = args.conceptual
    if args.spans:
        request["spans"] = [parse_span(text) for text in args.spans]
    return normalise_request(request)


def parse_span(text: str) -> list[int]:
    """``START:END`` as ``[start, end]``.

    >>> parse_span("3:9")
    [3, 9]
    """
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(f"--span must look like START:END (character offsets), got {text!r}") from None
    return [start, end]


def demo_command(args: argparse.Namespace) -> int:
    """``atman demo``: the built-in example by sentence, then the top sentence refined to tokens (coarse to
    fine: a few seconds after the model loads), and an HTML report of the refined explanation."""
    check_writable(args.output)
    explainer = load_explainer(args)
    from rich.console import Console

    from ..render.html import render_html
    from ..render.terminal import render_terminal

    console = Console()
    explanations = []
    steps = (("sentence", "1 of 2: which sentence made the answer"),
             ("refine", "2 of 2: the top sentence again, token by token (the other sentences stay whole)"))
    for granularity, heading in steps:
        with progress(f"explaining ({granularity})", args.quiet) as tick:
            explanation = explainer.explain(DEMO_PROMPT, DEMO_TARGET, granularity=granularity, refine_top=1,
                                            progress=tick)
        console.rule(heading, style="bold", characters="=")
        render_terminal(explanation, console)
        explanations.append(explanation)
    write_file(args.output, render_html(explanations[-1], title="atman demo: which parts made the answer"))
    console.print(f"\natman: wrote the token-level explanation as an HTML page to [bold]{args.output}[/bold]")
    return 0
