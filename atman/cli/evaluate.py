"""``atman evaluate``: the plausibility and faithfulness suite for one model and a set of methods."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from ..distributed.evaluate import add_evaluate_options, runner_from_args
from ..errors import AtmanError
from .shared import DTYPES, add_placement_options, check_writable, load_options

DEFAULT_OUTPUT = Path("atman-evaluation")


def add_parser(subparsers) -> None:
    """Add the ``evaluate`` sub-command (called by :mod:`atman.cli`)."""
    parser = subparsers.add_parser(
        "evaluate", help="compare AtMan with baseline methods (plausibility and faithfulness)",
        description="Run every method on invented-fact QA, the SQuAD excerpt and Python texts; write a "
                    "markdown and a JSON report.")
    parser.add_argument("--model", "-m", default=None,
                        help="hub id, model directory, .gguf file, 'smollm2' (default) or 'gemma3-270m'")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps or auto")
    add_placement_options(parser)
    parser.add_argument("--methods", default=None,
                        help="comma-separated method specs, options after a colon joined by '+', e.g. "
                             "'atman,atman:multiplier=0.5+mode=multiplicative,occlusion' "
                             "(default: atman and every baseline, atman.evaluate.suite.DEFAULT_METHODS)")
    parser.add_argument("--ablations", action="store_true",
                        help="evaluate AtMan's variants instead (multiplier, mode, kappa; "
                             "atman.evaluate.suite.ABLATION_METHODS)")
    parser.add_argument("--quick", action="store_true",
                        help="one example of each dataset, integrated gradients with 4 steps (a smoke test, for CI)")
    parser.add_argument("--qa", type=int, help="number of invented-fact QA examples")
    parser.add_argument("--squad", type=int, help="number of SQuAD examples (at most 5)")
    parser.add_argument("--texts", type=int, help="number of Python texts for faithfulness")
    parser.add_argument("--granularities", help="comma-separated plausibility granularities (default sentence,token)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "-o", type=Path, default=DEFAULT_OUTPUT, help="directory for the reports")
    parser.add_argument("--name", default="evaluation", help="file name stem of the reports")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="RECORDS.jsonl",
                        help="write the report from the record logs of earlier runs instead of running: a method's "
                             "records come from the last log holding it; only examples every method finished count")
    add_evaluate_options(parser)
    parser.set_defaults(handler=run)


QUICK_IG = "integrated-gradients:steps=4"


def methods(args: argparse.Namespace) -> list[str]:
    """The method specs that ``--methods``, ``--ablations`` and ``--quick`` ask for."""
    from ..evaluate.suite import ABLATION_METHODS, DEFAULT_METHODS

    if args.methods and args.ablations:
        raise AtmanError("give --methods or --ablations, not both")
    if args.ablations:
        return list(ABLATION_METHODS)
    if not args.methods:
        if args.quick:  # IG's 32 steps were half of a quick run's time on a CPU
            return [QUICK_IG if spec == "integrated-gradients" else spec for spec in DEFAULT_METHODS]
        return list(DEFAULT_METHODS)
    # '+' joins a method's options on the command line, where ',' separates methods
    return [spec.strip().replace("+", ",") for spec in args.methods.split(",") if spec.strip()]


def run(args: argparse.Namespace) -> int:
    """Run the suite (or merge record logs) and write the reports."""
    load_at_start = os.getloadavg()
    # OpenMP threads that wait for work by spinning take the cores from each other (and from every other
    # process) on a machine with more runnable threads than cores: a quick run took 3x as long. They are
    # told to sleep instead, unless the caller says otherwise; read when torch loads, which is below
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    check_writable(args.output, directory=True)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..baselines import parse_spec
    from ..models import load_model

    try:
        from ..evaluate.report import write_report
        from ..evaluate.suite import SuiteConfig, run_suite
    except ImportError as exc:
        raise AtmanError(f"atman evaluate needs the evaluate extra (pip install 'atman[evaluate]'): {exc}") from None

    chosen = methods(args)
    for spec in chosen:
        parse_spec(spec)
    config = SuiteConfig.quick() if args.quick else SuiteConfig()
    for name in ("qa", "squad", "texts"):
        value = getattr(args, name)
        if value is not None:
            if value < 0:
                raise AtmanError(f"--{name} must not be negative")
            setattr(config, name, value)
    if config.squad > 5:
        raise AtmanError("--squad: the SQuAD excerpt holds 5 questions")
    if args.granularities:
        grans = tuple(g.strip() for g in args.granularities.split(",") if g.strip())
        allowed = ("token", "word", "sentence")
        if not grans or any(g not in allowed for g in grans):
            raise AtmanError(f"--granularities takes a comma-separated subset of {', '.join(allowed)}")
        config.qa_granularities = config.squad_granularities = grans
    config.seed = args.seed
    runner = runner_from_args(args)
    lm = load_model(args.model, **load_options(args))
    if args.merge:
        return _merge(args, lm, config, write_report)
    command = "atman " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    args.output.mkdir(parents=True, exist_ok=True)
    log_path = args.output / f"{args.name}.records.jsonl"
    from ..evaluate.suite import environment

    # the log's first line says what made its records (a report merged from it later names that machine)
    log_path.write_text(json.dumps({"environment": environment()}) + "\n", encoding="utf-8")

    def keep(record: dict) -> None:
        # records as they come: a long run stopped early still leaves its measurements
        with log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    if args.quiet:
        result = run_suite(lm, chosen, config, on_record=keep, runner=runner)
    elif not sys.stderr.isatty():
        # a log file gets one line per explanation instead of a redrawn bar
        def log(done: int, total: int, what: str, seconds_left: float | None) -> None:
            print(f"{done}/{total} {what} ({time_left(seconds_left)})", file=sys.stderr, flush=True)

        result = run_suite(lm, chosen, config, progress=log, on_record=keep, runner=runner)
    else:
        columns = (TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[left]}"))
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task("loading examples", total=None, left="")

            def progress(done: int, total: int, what: str, seconds_left: float | None) -> None:
                bar.update(task, completed=done, total=total, description=what, left=time_left(seconds_left))

            result = run_suite(lm, chosen, config, progress=progress, on_record=keep, runner=runner)
    import psutil

    # the whole command, from the start of the process (Python, imports and the model's load included)
    result["process_seconds"] = round(time.time() - psutil.Process().create_time(), 1)
    result["load_average"] = {"start": list(load_at_start), "end": list(os.getloadavg())}
    md, js = write_report(result, args.output, command=command, stem=args.name)
    if not args.quiet:
        print(method_table(result), file=sys.stderr)
        print(f"wrote {md} and {js} ({result['process_seconds']:.0f} s in all, {result['seconds']:.0f} s "
              "of them explaining)", file=sys.stderr)
    return 0


def time_left(seconds: float | None) -> str:
    """The progress bar's estimate in words.

    >>> time_left(None), time_left(42.4), time_left(125)
    ('estimating the time left', 'about 42 s left', 'about 2 min 5 s left')
    """
    if seconds is None:
        return "estimating the time left"
    seconds = round(seconds)
    minutes, rest = divmod(seconds, 60)
    return f"about {minutes} min {rest} s left" if minutes else f"about {rest} s left"


def method_table(result: dict) -> str:
    """Seconds per method, largest first, for the end of a run."""
    rows = sorted(result["method_seconds"].items(), key=lambda item: -item[1]["seconds"])
    total = sum(entry["seconds"] for _, entry in rows) or 1.0
    width = max([len(name) for name, _ in rows] + [6])
    lines = [f"{'method':<{width}}  explanations  seconds  share"]
    for name, entry in rows:
        lines.append(f"{name:<{width}}  {entry['explanations']:>12}  {entry['seconds']:>7.1f}  "
                     f"{entry['seconds'] / total:>5.0%}")
    return "\n".join(lines)


def _merge(args, lm, config, write_report) -> int:
    from dataclasses import asdict

    from ..baselines import BaselineUnavailableError, get_method
    from ..evaluate.suite import merge_records, merged_environment, split_log, summarize_records

    logs, environments = [], []
    for path in args.merge:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            found, records = split_log(json.loads(line) for line in lines if line.strip())
        except (OSError, json.JSONDecodeError) as exc:
            raise AtmanError(f"cannot read the record log {path}: {exc}") from None
        logs.append(records)
        environments += found
    records = merge_records(logs)
    if not records:
        raise AtmanError("the record logs share no example that every method finished")
    merged = list(dict.fromkeys(r["method"] for r in records))
    unavailable = {}
    for spec in methods(args):
        try:
            get_method(spec, lm)
        except BaselineUnavailableError as exc:
            unavailable[spec] = str(exc)
    counts = {name: len({r["example"] for r in records if r["dataset"] == name}) for name in ("qa", "squad", "texts")}
    config.qa, config.squad, config.texts = counts["qa"], counts["squad"], counts["texts"]
    result = {
        "model": lm.name, "methods": merged, "unavailable": unavailable, "config": asdict(config),
        # the machine that made the records, not the one merging them
        "environment": merged_environment(environments),
        "seconds": round(sum(r["seconds"] for r in records), 1), "merged_from": [str(p) for p in args.merge],
        "records": records, "summary": summarize_records(records, seed=config.seed),
    }
    command = "atman " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    md, js = write_report(result, args.output, command=command, stem=args.name)
    if not args.quiet:
        print(f"wrote {md} and {js}", file=sys.stderr)
    return 0
