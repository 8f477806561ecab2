"""Markdown and JSON reports of an evaluation run, including paired comparisons against a reference method.

Example::

    >>> markdown = render_markdown(run_suite(load_model(), ["atman", "random"], SuiteConfig.quick()))
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .metrics import FAITHFULNESS, PLAUSIBILITY, summarize

LABELS = {"ap": "AP", "precision": "precision", "recall": "recall", "top1": "top-1",
          "aopc_morf": "AOPC MoRF ↑", "aopc_lerf": "AOPC LeRF ↓", "abpc": "ABPC ↑", "insertion": "insertion ↑"}
# direction in which a metric is better
LOWER_IS_BETTER = {"aopc_lerf"}
# the metrics compared pairwise against the reference
HEADLINE = {"plausibility": ("ap", "precision", "recall", "top1"), "faithfulness": ("abpc", "aopc_morf")}


def machine(environment: dict) -> str:
    """The machine a report's records were made on, in words.

    >>> machine({"torch": "2.11.0+cu130", "python": "3.12.3", "machine": "x86_64", "threads": 16})
    'torch 2.11.0+cu130, 16 threads, x86_64'
    >>> machine(dict.fromkeys(("torch", "python", "machine", "threads"), "not recorded"))
    'machine not recorded'
    """
    if all(environment.get(k, "not recorded") == "not recorded" for k in ("torch", "machine", "threads")):
        return "machine not recorded"
    return f"torch {environment['torch']}, {environment['threads']} threads, {environment['machine']}"


def paired(records: list[dict], reference: str, seed: int = 0) -> dict:
    """reference - method per example, summarised: {kind: {dataset: {gran: {method: {metric: summary}}}}}."""
    by_key: dict = defaultdict(dict)
    for r in records:
        by_key[(r["dataset"], r["granularity"], r["example"])][r["method"]] = r["metrics"]
    diffs: dict = defaultdict(list)
    for (dataset, gran, _), methods in by_key.items():
        base = methods.get(reference)
        if base is None:
            continue
        for method, metrics in methods.items():
            if method == reference:
                continue
            for metric, value in metrics.items():
                if metric in base:
                    diffs[(dataset, gran, method, metric)].append(base[metric] - value)
    out: dict = {"plausibility": {}, "faithfulness": {}}
    for (dataset, gran, method, metric), values in diffs.items():
        kind = "plausibility" if metric in PLAUSIBILITY else "faithfulness"
        out[kind].setdefault(dataset, {}).setdefault(gran, {}).setdefault(method, {})[metric] = summarize(
            values, seed=seed)
    return out


def verdict(diff: dict, metric: str) -> str:
    """'better', 'worse' or 'tie' for the reference, from the 95 % interval of the paired difference."""
    sign = -1 if metric in LOWER_IS_BETTER else 1
    low, high = sorted((sign * diff["low"], sign * diff["high"]))
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "tie"


def _cell(s: dict) -> str:
    return f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def render_markdown(result: dict, reference: str = "atman", command: str | None = None) -> str:
    """The report as markdown: settings, plausibility and faithfulness tables, paired comparisons."""
    lines = [f"# Evaluation of {result['model']}", ""]
    if command:
        lines += ["Command:", "", "```bash", command, "```", ""]
    cfg = result["config"]
    lines += [
        f"Methods: {', '.join(f'`{m}`' for m in result['methods'])}. "
        + (f"Merged from {', '.join(result['merged_from'])}; explanation time {result['seconds']:.0f} s "
           if result.get("merged_from") else f"Run time {result['seconds']:.0f} s ")
        + f"({machine(result['environment'])}).",
        f"Examples: {cfg['qa']} invented-fact QA ({cfg['qa_facts']} facts, seed {cfg['seed']}), "
        f"{cfg['squad']} SQuAD, {cfg['texts']} Python texts (target: greedy {cfg['max_new_tokens']} tokens)"
        + (f"; deletion curves at {', '.join(f'{f:g}' for f in cfg['fractions'])} of the units."
           if cfg.get("fractions") else "."),
        "Cells: mean [95 % percentile-bootstrap interval of the mean]; IQM = interquartile mean.",
        "",
    ]
    if result.get("process_seconds") is not None:
        load = result.get("load_average", {})
        lines += [f"The whole command took {result['process_seconds']:.0f} s (Python's start and the model's load "
                  "included)" + (f"; load average {load['start'][0]:.1f} at its start, {load['end'][0]:.1f} at its end"
                                 if load else "") + ".", ""]
    for method, reason in result.get("unavailable", {}).items():
        lines += [f"- `{method}` did not run: {reason}"]
    for example, reason in result.get("skipped", {}).items():
        lines += [f"- example `{example}` left out: {reason}"]
    if result.get("unavailable") or result.get("skipped"):
        lines.append("")
    summary = result["summary"]
    for dataset, grans in summary["plausibility"].items():
        for gran, methods in grans.items():
            lines += [f"## Plausibility: {dataset}, {gran} units", "",
                      "| method | AP | AP IQM | precision | precision IQM | recall | top-1 | s / explanation |",
                      "|---|---|---|---|---|---|---|---|"]
            for method, m in methods.items():
                seconds = summary["seconds"][dataset][gran][method]
                lines.append(f"| `{method}` | {_cell(m['ap'])} | {m['ap']['iqm']:.3f} | {_cell(m['precision'])} | "
                             f"{m['precision']['iqm']:.3f} | {_cell(m['recall'])} | {_cell(m['top1'])} | "
                             f"{seconds:.2f} |")
            lines.append("")
    for dataset, grans in summary["faithfulness"].items():
        for gran, methods in grans.items():
            lines += [f"## Faithfulness: {dataset}, {gran} units (log p(target) in nats)", "",
                      "| method | " + " | ".join(LABELS[k] for k in FAITHFULNESS) + " |",
                      "|---" * (len(FAITHFULNESS) + 1) + "|"]
            for method, m in methods.items():
                lines.append(f"| `{method}` | " + " | ".join(_cell(m[k]) for k in FAITHFULNESS) + " |")
            lines.append("")
    if result.get("method_seconds"):
        lines += time_table(result["method_seconds"]) + [""]
    comparisons = paired(result["records"], reference, seed=cfg["seed"])
    rows = []
    for kind, datasets in comparisons.items():
        for dataset, grans in datasets.items():
            for gran, methods in grans.items():
                for method, metrics in methods.items():
                    for metric in HEADLINE[kind]:
                        if metric in metrics:
                            d = metrics[metric]
                            rows.append(f"| {dataset} {gran} | {LABELS[metric]} | `{method}` | {_cell(d)} | "
                                        f"{verdict(d, metric)} |")
    if rows:
        lines += [f"## `{reference}` against each method (paired, per example)", "",
                  f"Difference `{reference}` − method; 'better'/'worse' when the 95 % interval excludes 0.", "",
                  "| data | metric | method | difference | verdict |", "|---|---|---|---|---|", *rows, ""]
    return "\n".join(lines)


def time_table(method_seconds: dict) -> list[str]:
    """The run's time per method (explanations and their seconds in all), largest first, as markdown.

    >>> time_table({"atman": {"explanations": 2, "seconds": 3.0}, "random": {"explanations": 2, "seconds": 1.0}})[-1]
    '| `random` | 2 | 1.0 | 0.50 | 25 % |'
    """
    total = sum(entry["seconds"] for entry in method_seconds.values()) or 1.0
    lines = ["## Time per method", "", "| method | explanations | seconds | s / explanation | share |",
             "|---|---|---|---|---|"]
    for method, entry in sorted(method_seconds.items(), key=lambda item: -item[1]["seconds"]):
        each = entry["seconds"] / max(entry["explanations"], 1)
        lines.append(f"| `{method}` | {entry['explanations']} | {entry['seconds']:.1f} | {each:.2f} | "
                     f"{round(100 * entry['seconds'] / total)} % |")
    return lines


def write_report(result: dict, directory: Path, reference: str = "atman", command: str | None = None,
                 stem: str = "evaluation") -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` into ``directory``; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    result = dict(result, command=command, paired=paired(result["records"], reference, seed=result["config"]["seed"]))
    md = directory / f"{stem}.md"
    js = directory / f"{stem}.json"
    md.write_text(render_markdown(result, reference, command), encoding="utf-8")
    js.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return md, js
