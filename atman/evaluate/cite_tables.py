"""The citation benchmark's summaries and tables, from the records ``benchmarks/cite.py`` writes.

A record is one method on one context: its metrics (top-1/3/5 drop, LDS, evidence first), its
token-forwards and its wall and CPU seconds. The summary gives, per method, the mean and the 95 %
bootstrap interval over the contexts of each metric, and the mean of the per-context cost ratios to
ContextCite-32 run on the same context in the same run. numpy only: docs/render.py renders the docs'
tables with it.
"""

from __future__ import annotations

import numpy as np

METRICS = ("top1_drop", "top3_drop", "top5_drop", "lds", "evidence_first")
REFERENCE = "contextcite-32"


def bootstrap(values: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % bootstrap interval of the mean over the contexts.

    >>> bootstrap([1.0, 1.0, 1.0])
    (1.0, 1.0, 1.0)
    """
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(rounds, len(data)))].mean(axis=1)
    return float(data.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(records: list[dict]) -> dict:
    """Per method: bootstrap mean/interval of each metric, and mean ratios of cost to ContextCite-32's."""
    names = list(dict.fromkeys(r["method"] for r in records))
    reference = {r["context"]: r for r in records if r["method"] == REFERENCE}
    table = {}
    for name in names:
        rows = [r for r in records if r["method"] == name]
        entry = {m: bootstrap([r[m] for r in rows]) for m in METRICS if all(m in r for r in rows)}
        paired = [r for r in rows if r["context"] in reference]
        if paired:
            entry["time_ratio"] = bootstrap([r["seconds"] / reference[r["context"]]["seconds"] for r in paired])
            entry["cpu_ratio"] = bootstrap([r["cpu_seconds"] / reference[r["context"]]["cpu_seconds"]
                                            for r in paired])
            entry["token_ratio"] = bootstrap([r["token_forwards"] / reference[r["context"]]["token_forwards"]
                                              for r in paired])
        entry["token_forwards"] = float(np.mean([r["token_forwards"] for r in rows]))
        entry["seconds"] = float(np.mean([r["seconds"] for r in rows]))
        entry["contexts"] = len(rows)
        table[name] = entry
    return table


def merged_records(files: list[dict]) -> list[dict]:
    """The records of several results files of the same methods on different contexts, each context named
    by its seed (every file numbers its own contexts from 0), in the files' order."""
    out = []
    for data in files:
        seeds = {size["context"]: size["seed"] for size in data["sizes"]}
        out += [dict(record, context=seeds[record["context"]]) for record in data["records"]]
    return out


def format_table(table: dict) -> list[str]:
    """Every method's means with their intervals and its cost ratios, as Markdown lines."""
    def cell(value) -> str:
        mean, lo, hi = value
        return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"

    lines = ["| method | top-1 drop | top-3 drop | top-5 drop | LDS | evidence first | token-forwards | "
             "tokens vs CC-32 | CPU time vs CC-32 | wall time vs CC-32 |", "|---" * 10 + "|"]
    for name, e in table.items():
        lines.append(f"| {name} | {cell(e['top1_drop'])} | {cell(e['top3_drop'])} | {cell(e['top5_drop'])} | "
                     f"{cell(e['lds'])} | {e['evidence_first'][0]:.2f} | {e['token_forwards']:.0f} | "
                     f"{e['token_ratio'][0]:.2f}x | {e['cpu_ratio'][0]:.2f}x | {e['time_ratio'][0]:.2f}x |")
    return lines


def format_sizes(sizes: list[dict]) -> list[str]:
    """The contexts of a run (kind, sources, tokens), as Markdown lines."""
    lines = ["| context | kind | sources | tokens (prompt + response) | response tokens |", "|---" * 5 + "|"]
    lines += [f"| {s['context']} | {s['kind']} | {s['sources']} | {s['tokens']} | {s['response_tokens']} |"
              for s in sizes]
    return lines


def _run_label(sizes: list[dict]) -> str:
    if len(sizes) == 1:
        s = sizes[0]
        return f"seed {s['seed']}, {s['kind']}, {s['sources']} sources, {s['tokens']:,} tokens"
    seeds = [s["seed"] for s in sizes]
    span = f"{min(seeds)}-{max(seeds)}" if seeds == list(range(min(seeds), max(seeds) + 1)) else \
        ", ".join(map(str, seeds))
    kinds = list(dict.fromkeys(s["kind"] for s in sizes))
    if kinds == ["squad"]:
        return f"SQuAD questions {span}"
    return f"seeds {span} ({', '.join(kinds)})"


def format_runs(files: list[dict]) -> list[str]:
    """Several runs, each with its own ContextCite-32: per run its contexts in words and each method's
    means (over the run's contexts) and cost ratios to that run's ContextCite-32."""
    lines = ["| run | method | top-1 drop | top-3 drop | top-5 drop | LDS | token-forwards | tokens vs CC-32 | "
             "CPU time vs CC-32 |", "|---" * 9 + "|"]
    for data in files:
        label = _run_label(data["sizes"])
        for name, e in summarise(data["records"]).items():
            lines.append(f"| {label} | {name} | {e['top1_drop'][0]:.2f} | {e['top3_drop'][0]:.2f} | "
                         f"{e['top5_drop'][0]:.2f} | {e['lds'][0]:.2f} | {e['token_forwards']:,.0f} | "
                         f"{e['token_ratio'][0]:.2f}x | {e['cpu_ratio'][0]:.2f}x |")
            label = ""
    return lines


def _signed(value: float) -> str:
    if value == 0:
        return "0"
    return "0.00" if abs(value) < 0.005 else f"{value:+.2f}"


def format_per_context(data: dict, method: str, references: tuple[str, ...]) -> list[str]:
    """``method`` minus each reference, context by context (``a / b / c``), for the drops and LDS."""
    metrics = ("top1_drop", "top3_drop", "top5_drop", "lds")
    by = {(r["method"], r["context"]): r for r in data["records"]}
    contexts = [s["context"] for s in data["sizes"]]
    lines = ["| | top-1 drop | top-3 drop | top-5 drop | LDS |", "|---|---|---|---|---|"]
    for reference in references:
        cells = [" / ".join(_signed(by[method, c][m] - by[reference, c][m]) for c in contexts) for m in metrics]
        label = reference.replace("contextcite-", "ContextCite-")
        lines.append(f"| vs {label} | " + " | ".join(cells) + " |")
    return lines
