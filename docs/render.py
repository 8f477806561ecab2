"""Tables in README.md and docs/*.md, rendered from the committed results files that hold their numbers.

A rendered table sits between two markers in a Markdown file; the first names its renderer and the
results file it reads (or several, comma-separated: the renderer then gets a list)::

    <!-- table: steering benchmarks/results/steering-qa-smollm2.json -->
    | factor | ... |
    <!-- /table -->

A block indented inside a list item is rendered with the same indentation.

Commands (from the repository's root)::

    python docs/render.py            # rewrite every marked table from its results file
    python docs/render.py --check    # exit 1 and name every table that differs (tests/test_docs_sync.py)

A renderer is a function in :data:`RENDERERS`: it takes the parsed results file (JSON, or a list of
records for ``.jsonl``) and returns the table's Markdown lines. A number in the docs that no results
file backs is not a table here: it is removed, or written as an estimate and said to be one.

The evaluation reports under docs/results/ (``<name>.md`` beside the ``<name>.json`` that ``atman evaluate``
wrote) are rendered from their .json the same way, by the command's own report writer.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(?P<indent>^[ \t]*)(?P<open><!-- table: (?P<name>[\w-]+) (?P<path>\S+) -->\n)(?P<body>.*?)"
                   r"(?P<close>[ \t]*<!-- /table -->)", re.S | re.M)
Renderer = Callable[[object], list[str]]


LOG_SECTION = re.compile(r"^=== (?P<name>\S+) \(limit")
LOG_MODEL = re.compile(r"^model (?P<model>.+?) \((?P<millions>\d+)M parameters")
LOG_ROW = re.compile(r"^\s*(?P<tokens>\d+) tokens\s+(?P<method>\S+)\s+(?P<seconds>[\d.]+) s \(n=(?P<runs>\d+)\)\s+"
                     r"(?P<mib>[\d.]+) MiB")


def _log(text: str) -> dict:
    """A ``benchmarks/gpu.sh`` log: per section (one speed.py run with its time slot), the model and every
    row the run printed before its slot ended (times as printed, to the hundredth of a second)."""
    sections: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if match := LOG_SECTION.match(line):
            current = sections.setdefault(match["name"], {"model": None, "millions": None, "rows": []})
        elif current is not None and (match := LOG_MODEL.match(line)):
            current["model"], current["millions"] = match["model"], int(match["millions"])
        elif current is not None and (match := LOG_ROW.match(line)):
            current["rows"].append({"tokens": int(match["tokens"]), "method": match["method"],
                                    "seconds": float(match["seconds"]), "runs": int(match["runs"]),
                                    "peak_bytes": float(match["mib"]) * 2**20, "from_log": True})
    return {"log": sections}


def _load(path: Path) -> object:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix == ".log":
        return _log(text)
    return json.loads(text)


def _pct(value: float) -> str:
    return f"{round(100 * value)} %"


def _share(value: float) -> str:
    """A share to 0.1 % (97.5 %, 100 %)."""
    return f"{100 * value:.1f}".removesuffix(".0") + " %"


def steering(data: dict) -> list[str]:
    """benchmarks/steering_qa.py: mean log p(answer) and greedy accuracy per factor and controlled sentence."""
    rows = data["rows"]
    lines = ["| factor | control on | mean log p(answer) | greedy answer correct |", "|---|---|---|---|"]
    for place in ("evidence", "distractor"):
        for row in sorted((r for r in rows if r["control_on"] == place), key=lambda r: r["factor"]):
            if row["factor"] == 1.0:
                if place == "evidence":
                    lines.append(f"| 1 (no change) | either | {row['mean_answer_logprob']:.2f} | "
                                 f"{_pct(row['greedy_answer_rate'])} |")
                continue
            where = "evidence sentence" if place == "evidence" else "a distractor sentence"
            lines.append(f"| {row['factor']:g} | {where} | {row['mean_answer_logprob']:.2f} | "
                         f"{_pct(row['greedy_answer_rate'])} |")
    return lines


def cancellation(data: dict) -> list[str]:
    """benchmarks/cancel_latency.py: the first check and the largest gap between checks, per prompt length."""
    lines = ["| prompt tokens | passes | first check after | largest gap |", "|---|---|---|---|"]
    for run in data["runs"]:
        passes = "whole (checks between batches only)" if run["piece_tokens"] is None \
            else f"pieces of {run['piece_tokens']}"
        lines.append(f"| {run['tokens']} | {passes} | {run['first_check_s']:.1f} s | {run['largest_gap_s']:.1f} s |")
    return lines


def server_latency(data: dict) -> list[str]:
    """benchmarks/server_latency.py: median time of each request through HTTP and in-process."""
    lines = ["| request | through HTTP | in-process | difference |", "|---|---|---|---|"]
    for row in data["rows"]:
        lines.append(f"| {row['request']} | {row['http_ms']:.0f} ms | {row['direct_ms']:.0f} ms | "
                     f"{row['overhead_ms']:+.0f} ms |")
    return lines


def tour(data: dict) -> list[str]:
    """benchmarks/tour.py: each command of the README's tour, whole process, with the load it ran under."""
    lines = ["| tour line (its comment above) | command | seconds | load average at its start |", "|---|---|---|---|"]
    for row in data["rows"]:
        words = row["command"].split()
        # the command's first words and its options, enough to find the line in the tour above
        short = " ".join(words[:2] + [w for w in words[2:] if w.startswith("--")][:3])
        # whole: a comment may cover several commands ("...; which image tiles made a caption"), and a cut one
        # named only the first of them
        lines.append(f"| {row['comment']} | `{short}` | {row['seconds']:.0f} | {row['load_average_at_start']:.1f} |")
    return lines


def cli_startup(data: dict) -> list[str]:
    """benchmarks/cli_startup.py: median wall time of each command in a fresh interpreter."""
    lines = ["| command | median (s) | vs. the old CLI's imports |", "|---|---|---|"]
    heavy = data["median_s"]["the old CLI's imports"]
    for name, seconds in data["median_s"].items():
        lines.append(f"| `{name}` | {seconds:.2f} | {seconds / heavy:.3f} |")
    return lines


def inseq_steps(data: dict) -> list[str]:
    """benchmarks/inseq_steps.py: one continuation explained three ways, times and ratios to inseq's atman."""
    names = {"inseq-atman": 'inseq, `"atman"` method (one call for the whole continuation)',
             "per-step-atman": "one AtMan explanation per generated token (what inseq does for a per-step method)",
             "inseq-occlusion": 'inseq\'s own `"occlusion"` (a different score)'}
    lines = ["| way | time (s) | vs. inseq's atman |", "|---|---|---|"]
    for key, seconds in data["best_s"].items():
        lines.append(f"| {names.get(key, key)} | {seconds:.1f} | {data['vs_inseq_atman'][key]:.1f}x |")
    return lines


REFINE_HEADER = ("refine: calls / token-forwards | token level: calls / token-forwards | "
                 "refine / token level (token-forwards) | (time) | top-10 agreement |")


def _refine_cells(run: dict, seconds: bool = False) -> str:
    """One refine run against token level, from its prompt tokens on (``seconds``: both times beside the
    time share)."""
    r, t = run["refine"], run["token"]
    time = f"{run['cost_share_time']:.3f}" + (f" ({r['seconds']:.2f} s / {t['seconds']:.2f} s)" if seconds else "")
    return (f"{run['prompt_tokens']:,} | {r['forward_calls']} / {r['token_forwards']:,} | "
            f"{t['forward_calls']} / {t['token_forwards']:,} | {run['cost_share_token_forwards']:.3f} | {time} | "
            f"{_pct(run['top10_agreement'])} |")


def refine_cost(runs: list[dict]) -> list[str]:
    """benchmarks/refine.py --full: refine against token level, one row per results file."""
    lines = [f"| prompt tokens | {REFINE_HEADER}", "|---" * 6 + "|"]
    return lines + [f"| {_refine_cells(run)}" for run in sorted(runs, key=lambda r: r["prompt_tokens"])]


def refine_contexts(data: dict) -> list[str]:
    """benchmarks/refine.py --full --contexts N: refine against token level, one row per context."""
    lines = [f"| context (seed) | prompt tokens | {REFINE_HEADER}", "|---" * 7 + "|"]
    return lines + [f"| {run['seed']} | {_refine_cells(run, seconds=True)}" for run in data["runs"]]


def refine_bounds(data: dict) -> list[str]:
    """benchmarks/refine.py --bounds-only: the cost model's shares of token level (nothing run)."""
    lines = [f"| prompt tokens | sentences | sentence pass alone | {data['refine_top']} earliest sentences refined | "
             f"{data['rows'][0]['random_draws']['draws']} random choices: mean / max |", "|---|---|---|---|---|"]
    for row in data["rows"]:
        draws = row["random_draws"]
        lines.append(f"| {row['prompt_tokens']:,} | {row['sentences']} | {row['sentence_pass_share']:.3f} | "
                     f"{row['share']:.3f} | {draws['mean_share']:.3f} / {draws['max_share']:.3f} |")
    return lines


def qa_check(data: dict) -> list[str]:
    """benchmarks/qa_check.py: sentence top-1, token top-1 in the evidence and the sentence margin per setting."""
    lines = ["| conceptual suppression | sentence top-1 | token top-1 in evidence | mean sentence margin |",
             "|---|---|---|---|"]
    for row in data["rows"]:
        setting = "off (`kappa=None`)" if row["kappa"] is None else f"on, `kappa={row['kappa']:g}`"
        lines.append(f"| {setting} | {_pct(row['sentence_top1'])} | {_pct(row['token_top1_in_evidence'])} | "
                     f"{row['mean_sentence_margin']:.2f} |")
    return lines


def evaluate_time(data: dict) -> list[str]:
    """``atman evaluate``'s own report: the whole command's time, the load it ran under, seconds per method."""
    env, load = data["environment"], data["load_average"]
    lines = ["| what | seconds |", "|---|---|",
             f"| the whole command (Python, imports and the model's load included) | {data['process_seconds']:.0f} |",
             f"| explaining (all methods) | {data['seconds']:.0f} |"]
    for name, entry in sorted(data["method_seconds"].items(), key=lambda item: -item[1]["seconds"]):
        lines.append(f"| `{name}` ({entry['explanations']} explanations) | {entry['seconds']:.1f} |")
    lines.append(f"| (torch {env['torch']}, {env['threads']} threads; load average {load['start'][0]:.1f} at the "
                 f"start, {load['end'][0]:.1f} at the end) | |")
    return lines


def evaluate_total(data: dict) -> list[str]:
    """``atman evaluate``'s own report in one sentence: the whole command's time and its load."""
    minutes, seconds = divmod(round(data["process_seconds"]), 60)
    return [f"`atman evaluate --quick` took {minutes} min {seconds} s in all ({data['seconds']:.0f} s of them "
            f"explaining; {data['environment']['threads']} torch threads, load average "
            f"{data['load_average']['start'][0]:.1f} at its start), by its own report."]


def ig_convergence(data: dict) -> list[str]:
    """benchmarks/ig_convergence.py: completeness of Integrated Gradients per prompt, baseline and steps."""
    lines = ["| prompt (target) | baseline | steps | sum of attributions | f(input) - f(baseline) | relative gap |",
             "|---|---|---|---|---|---|"]
    for row in data["rows"]:
        lines.append(f"| {row['prompt']} (`{row['target'].strip()}`) | {row['baseline']} | {row['steps']} | "
                     f"{row['sum']:.1f} | {row['difference']:.1f} | {row['relative_gap']:.2f} |")
    return lines


def shared_prefix(data: dict) -> list[str]:
    """benchmarks/shared_prefix.py: CPU seconds of both settings, run in turn in one process."""
    runs = data["cpu_seconds"]
    lines = ["| prefix | CPU seconds (each run) | best vs best |", "|---|---|---|",
             f"| joined to every row (before) | {', '.join(f'{v:.1f}' for v in runs['joined per row'])} | 1.00x |",
             f"| one copy per call, rows side by side | {', '.join(f'{v:.1f}' for v in runs['shared'])} | "
             f"**{data['shared_vs_joined']:.2f}x** |"]
    return lines


def _common_methods(records: list[dict]) -> list[str]:
    """The methods that ran on every context of the records, in the order they first appear."""
    contexts: dict[str, set] = {}
    for r in records:
        contexts.setdefault(r["method"], set()).add(r["context"])
    every = max(len(c) for c in contexts.values())
    return [m for m, c in contexts.items() if len(c) == every]


def cite_real(data: dict) -> list[str]:
    """benchmarks/cite_real.py: every method that ran on all the file's contexts, with paired differences
    to the first of ContextCite-64, AT2 and AttnLRP that ran."""
    from atman.evaluate.cite_real import render, summarise

    records = data["records"]
    names = _common_methods(records)
    reference = next((name for name in ("contextcite-64", "at2", "attnlrp") if name in names), None)
    table = summarise(records, names, paired_with=reference)
    return render(table, loo="attribot-loo" in names, paired_with=reference).splitlines()


def cite_real_reliance(files: dict | list[dict]) -> list[str]:
    """benchmarks/cite_real.py: hit@1 per context beside how much the response rests on one gold sentence
    alone (leave-one-out); the first file must hold ``attribot-loo``, later files add the methods they ran
    on the same contexts (a method already shown is taken from the first file that has it)."""
    from atman.evaluate.cite_real import PLAIN, reliance
    from atman.evaluate.real_docs import real_documents

    files = files if isinstance(files, list) else [files]
    seen: set[tuple[str, str]] = set()
    records, methods = [], []
    for data in files:
        common = _common_methods(data["records"])
        for r in data["records"]:
            if (r["context"], r["method"]) not in seen and r["method"] in common:
                seen.add((r["context"], r["method"]))
                records.append(r)
        methods += [m for m in common if m not in methods and m != PLAIN]
    gold = {d.name: list(d.evidence) for d in real_documents()}
    return reliance(records, gold, methods)


def at2_training(data: dict) -> list[str]:
    """benchmarks/train_at2.py: how the shipped AT2 estimator was trained (its .json beside the weights)."""
    return ["| what | value |", "|---|---|",
            f"| training contexts (development split) | {len(data['contexts'])} |",
            f"| random ablations per context | {data['masks']} |",
            f"| estimator weights (one per attention head) | {len(data['weights'])} |",
            f"| iterations, learning rate | {data['iterations']:,}, {data['learning_rate']:g} |",
            f"| CPU time: collecting the ablations / in all | {data['collect_cpu_seconds']:,.0f} s / "
            f"{data['total_cpu_seconds']:,.0f} s |",
            f"| wall time (one torch thread, beside another run) | {data['wall_seconds'] / 60:.1f} min |"]


def _tree(label: str) -> str:
    return label.split(" ")[0]


def engine_compare(data: dict) -> list[str]:
    """benchmarks/engine_compare.py: median CPU seconds of every case per source tree, against the first
    tree, and the cached engine's speed-up over the naive one in each tree (round by round)."""
    trees = data["trees"]
    lines = ["| case | " + " | ".join(f"`{_tree(t)}` CPU s (vs `{_tree(trees[0])}`)" for t in trees) + " |",
             "|---|" + "---|" * len(trees)]
    for row in data["summary"]:
        if "skipped" in row:
            continue
        cells = [f"{row['trees'][t]['cpu']:.1f} ({row['trees'][t]['cpu_vs_first']:.2f}x)" for t in trees]
        lines.append(f"| {row['case']} | " + " | ".join(cells) + " |")
    gains: dict[str, dict[str, float]] = {}
    for g in data["speedups"]:
        gains.setdefault(g["case"], {})[g["tree"]] = g["cpu"]
    for case, by_tree in gains.items():
        lines.append(f"| **{case}: naive / cached CPU** | "
                     + " | ".join(f"**{by_tree[t]:.2f}x**" if t in by_tree else "—" for t in trees) + " |")
    return lines


def engine_reference(data: dict) -> list[str]:
    """benchmarks/engine_reference.py --record: each case in plain forward passes of CPU time, in the pinned
    reference tree and in the tree beside it, and their CPU ratio round by round."""
    lines = ["| case | reference | reference (plain passes) | beside (plain passes) | beside / reference (CPU, "
             "round by round) |", "|---|---|---|---|---|"]
    for commit, ref in data["references"].items():
        for name, entry in ref["cases"].items():
            beside = ref["beside_cases"].get(name)
            ratio = ref["beside_over_reference_cpu"].get(name)
            beside_cell = "—" if beside is None else f"{beside['in_plain_passes']:.1f}"
            ratio_cell = "—" if ratio is None else f"{ratio:.3f}"
            lines.append(f"| {name} | `{commit}` | {entry['in_plain_passes']:.1f} | {beside_cell} | {ratio_cell} |")
    lines.append(f"| (beside: `{_tree(next(iter(data['references'].values()))['beside'])}`; "
                 f"{data.get('machine', 'machine not recorded')}) | | | | |")
    return lines


def explain_process(data: dict) -> list[str]:
    """benchmarks/explain_process.py: whole ``atman explain --input`` processes (model load included), the
    naive engine against the default one, A B A B; ratios taken round by round."""
    lines = ["| tree | prompt tokens | rounds | naive (s) | default (s) | naive / default, wall | "
             "naive / default, CPU | largest score difference |", "|---|---|---|---|---|---|---|---|"]
    tokens = " and ".join(str(n) for n in data["prompt_tokens"])
    for label, s in data["summary"].items():
        loads = [run[e]["load_before"] for run in data["runs"][label] for e in ("naive", "cached")]
        lines.append(f"| `{label}` | {tokens} | {len(data['runs'][label])} | {s['naive_wall']:.1f} | "
                     f"{s['default_wall']:.1f} | {s['naive_over_default_wall']:.2f}x | "
                     f"**{s['naive_over_default_cpu']:.2f}x** | {s['largest_score_difference']:.1e} |")
    lines.append(f"| ({data['machine']}, {data['date']}; load average before the runs "
                 f"{min(loads):.1f}-{max(loads):.1f}) | | | | | | | |")
    return lines


def cite_real_contexts(data: dict) -> list[str]:
    """benchmarks/cite_real.py: the contexts of a results file (set, size, evidence position)."""
    lines = ["| context | sources | tokens | evidence |", "|---|---|---|---|"]
    seen = {}
    for r in data["records"]:
        seen.setdefault(r["context"], r)
    for name, r in seen.items():
        lines.append(f"| `{name}` | {r['sources']} | {r['tokens']} | {r['position']} |")
    return lines


def image_relevance(data: dict) -> list[str]:
    """benchmarks/image_relevance.py: mean precision and recall (%) of each method's relevance grids."""
    what = {"vlm": "targets, both objects of each two-object scene", "vit": "scenes"}[data["task"]]
    lines = [f"| method ({data['cases']} held-out {what}, multiplier {data['multiplier']:g}"
             + (f", kappa {data['kappa']:g}" if data.get("kappa") is not None else "") + ") | precision | recall |",
             "|---|---|---|"]
    for key, name in (("atman", "AtMan"), ("ig", "Integrated Gradients"), ("random", "random")):
        lines.append(f"| {name} | {data[key]['mean_precision']:.1f} | {data[key]['mean_recall']:.1f} |")
    return lines


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def speed(data: dict) -> list[str]:
    """benchmarks/speed.py: time and peak memory of every method per prompt length, against a plain forward
    and the naive engine (the CPU-time column only when the run recorded it)."""
    rows = data["rows"]
    cpu = any("cpu_vs_atman-naive" in row for row in rows)
    lines = ["| tokens | method | time (s) | runs | peak memory (MiB) | time / plain | time / naive | "
             + ("CPU / naive | " if cpu else "") + "memory / plain | memory / naive |",
             "|---" * (10 if cpu else 9) + "|"]
    for row in rows:
        time = "out of memory" if row.get("out_of_memory") else _fmt(row["seconds"], "{:.2f}")
        peak = row["peak_bytes"] and row["peak_bytes"] / 2**20
        cells = [str(row["tokens"]), row["method"], time, str(row["runs"]), _fmt(peak, "{:.1f}"),
                 _fmt(row.get("time_vs_plain"), "{:.1f}x"), _fmt(row.get("time_vs_atman-naive"), "{:.2f}x")]
        if cpu:
            cells.append(_fmt(row.get("cpu_vs_atman-naive"), "{:.2f}x"))
        cells += [_fmt(row.get("memory_vs_plain"), "{:.2f}x"), _fmt(row.get("memory_vs_atman-naive"), "{:.2f}x")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


RELEASE_LABELS = {"plain": "plain", "atman-lean-kept": "atman-lean, freed memory kept (before)",
                  "atman-lean": "atman-lean (now)", "atman": "atman, default budget (now)"}


def release_memory(data: dict) -> list[str]:
    """benchmarks/speed.py with ``atman-lean-kept``: the lean setting with and without handing freed memory
    back, beside a plain forward and the default budget (memory / plain in bold where it is at most 1.0x)."""
    lines = ["| tokens | method | time (s) | peak memory (MiB) | memory / plain |", "|---|---|---|---|---|"]
    for row in data["rows"]:
        ratio = f"{row['memory_vs_plain']:.2f}x"
        if row["method"] != "plain" and row["memory_vs_plain"] < 1.15 and "kept" not in row["method"]:
            ratio = f"**{ratio}**"
        lines.append(f"| {row['tokens']} | {RELEASE_LABELS.get(row['method'], row['method'])} | "
                     f"{row['seconds']:.2f} | {row['peak_bytes'] / 2**20:.1f} | {ratio} |")
    return lines


def vlm_speed(data: dict) -> list[str]:
    """benchmarks/vlm_speed.py: the vision-language path with full inputs per row against the engine."""
    full, engine = data["token_forwards"]["full-inputs"], data["token_forwards"]["engine"]
    seconds = data["seconds"]
    return ["| path | language-model token-forwards | time |", "|---|---|---|",
            f"| full inputs for every row (before) | {full:,} | {seconds['full-inputs']:.2f} s |",
            f"| engine: vision tower once, prefix reuse (now) | {engine:,} "
            f"({data['token_forward_ratio_engine_vs_full_inputs']:.2f}x) | {seconds['engine']:.2f} s "
            f"({data['time_ratio_engine_vs_full_inputs']:.2f}x) |"]


def _gpu_runs(files: list[dict]) -> list[dict]:
    """The runs of a GPU scaling session: each log section, its rows taken from the JSON the run wrote
    when it got that far (full precision), else from the log (the slot ended before the JSON)."""
    logs = [f["log"] for f in files if "log" in f]
    jsons = [f for f in files if "rows" in f]
    runs = []
    for sections in logs:
        for name, section in sections.items():
            if not section["rows"]:
                continue
            keys = {(r["tokens"], r["method"]) for r in section["rows"]}
            written = next((j for j in jsons if j["model"] == section["model"]
                            and {(r["tokens"], r["method"]) for r in j["rows"]} <= keys), None)
            rows = {(r["tokens"], r["method"]): r for r in section["rows"]}
            parameters = None
            if written:
                rows.update({(r["tokens"], r["method"]): r for r in written["rows"]})
                parameters = written.get("parameters")
            runs.append({"name": name, "model": section["model"], "parameters": parameters,
                         "millions": section["millions"], "rows": list(rows.values())})
    return sorted(runs, key=lambda run: run["millions"] or 0)


def _seconds(row: dict) -> str:
    value = row["seconds"]
    return f"{value:.2f}" if row.get("from_log") or value >= 1 else f"{value:.3f}"


MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M", "llama-1b": "Llama-3.2-1B",
               "llama-8b": "Llama-3.1-8B"}


def gpu_token(files: list[dict]) -> list[str]:
    """benchmarks/gpu.sh scaling: token level per model shape, at the longest length where the naive and
    the cached engine both ran; rows from the run's JSON, or from its log (times to 0.01 s) where the
    slot ended first."""
    lines = ["| model | tokens | method | time (s) | runs | peak growth (MiB) | time / naive | memory / plain |",
             "|---|---|---|---|---|---|---|---|"]
    for run in _gpu_runs(files):
        by_length: dict[int, dict[str, dict]] = {}
        for row in run["rows"]:
            by_length.setdefault(row["tokens"], {})[row["method"]] = row
        lengths = [n for n, rows in by_length.items() if {"atman", "atman-naive", "plain"} <= rows.keys()]
        if not lengths:
            continue
        tokens = max(lengths)
        rows = by_length[tokens]
        naive, plain = rows["atman-naive"]["seconds"], rows["plain"]["peak_bytes"]
        label = MODEL_NAMES.get(run["model"].split(" ")[0], run["model"])
        for method, row in rows.items():
            if method == "atman-sentence":
                continue
            ratio = row["seconds"] / naive
            speed = (f"{ratio:.3f}x" if ratio < 0.1 else f"{ratio:.2f}x") + \
                (f" ({1 / ratio:.2g}x faster)" if method == "atman" else "")
            memory = row["peak_bytes"] / plain
            memory_cell = f"{memory:.0f}x" if memory >= 10 else f"{memory:.2f}x"
            lines.append(f"| {label} | {tokens if label else ''} | {method} | {_seconds(row)} | {row['runs']} | "
                         f"{row['peak_bytes'] / 2**20:,.1f} | {'' if method == 'plain' else speed} | {memory_cell} |")
            label = ""
    return lines


def gpu_memory(files: list[dict]) -> list[str]:
    """benchmarks/gpu.sh scaling, the memory run (Llama-3.1-8B shape, AtMan at sentence level): peak growth
    per method and prompt length, against a plain forward, and the total with the bfloat16 weights."""
    methods = [("plain", "plain forward"), ("atman-sentence", "AtMan (default budget)"),
               ("captum-gxa", "Captum gradient × activation"), ("captum-ig16", "Captum integrated gradients, 16 steps")]
    run = next(r for r in _gpu_runs(files) if r["name"].endswith("-memory"))
    weights = run["parameters"] * 2
    lines = ["| prompt tokens | " + " | ".join(label for _, label in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for tokens in sorted({r["tokens"] for r in run["rows"]}):
        rows = {r["method"]: r for r in run["rows"] if r["tokens"] == tokens}
        cells = []
        for method, _ in methods:
            if method not in rows:
                cells.append("not reached")
                continue
            peak = rows[method]["peak_bytes"]
            cells.append(f"{peak / 2**20:,.0f} ({peak / rows['plain']['peak_bytes']:.1f}x) / "
                         f"{(weights + peak) / 2**30:.1f} GiB")
        lines.append(f"| {tokens:,} | " + " | ".join(cells) + " |")
    return lines


def ray_throughput(data: dict) -> list[str]:
    """benchmarks/ray_throughput.py: the local batch against Ray with 1 and 2 workers."""
    sec, steady = data["seconds"], data["steady_requests_per_s"]

    def overhead(value: float) -> str:
        return f"overhead {100 * value:+.1f} %"

    return ["| run | end to end (s) | steady (requests/s) | vs local, end to end | vs local, steady |",
            "|---|---|---|---|---|",
            f"| local batch (`atman explain --input`), 1 thread | {sec['local']:.1f} | {steady['local']:.3f} | "
            "1.00x | 1.00x |",
            f"| `--ray --workers 1 --threads-per-worker 1` | {sec['ray_1_worker']:.1f} | "
            f"{steady['ray_1_worker']:.3f} | "
            f"{overhead(data['ray_overhead'])} | {overhead(data['ray_overhead_steady'])} |",
            f"| `--ray --workers 2 --threads-per-worker 1` | {sec['ray_2_workers']:.1f} | "
            f"{steady['ray_2_workers']:.3f} | 2 vs 1 worker: {data['scaling_2_vs_1']:.2f}x | "
            f"2 vs 1 worker: {data['scaling_2_vs_1_steady']:.2f}x |"]


def ray_scaling(data: dict) -> list[str]:
    """benchmarks/ray_scaling.py --report: every run, then the 2-vs-1-worker ratios (its own format)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ray_scaling", ROOT / "benchmarks" / "ray_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.format_table(data).splitlines()


DATA_NAMES = {"qa": "QA", "squad": "SQuAD", "texts": "texts"}
METHOD_NAMES = {"atman": "AtMan", "integrated-gradients": "IG", "input-x-gradient": "input × grad",
                "saliency": "saliency", "feature-ablation": "feature abl.", "attention-rollout": "rollout",
                "chefer": "Chefer", "occlusion": "occlusion", "random": "random", "attnlrp": "AttnLRP"}


def _metric(data: dict, dataset: str, gran: str, method: str, metric: str) -> float | None:
    """The mean of one metric of one method in a report's summary, or None where it was not measured."""
    kind = "faithfulness" if metric in ("aopc_morf", "aopc_lerf", "abpc", "insertion") else "plausibility"
    cell = data["summary"][kind].get(dataset, {}).get(gran, {}).get(method, {}).get(metric)
    return None if cell is None else cell["mean"]


def _value(metric: str, value: float | None, faithfulness: str = "{:.1f}") -> str:
    """A summary cell: top-1 as a share (to 0.1 %), deletion-curve areas in nats, the rest to 3 digits."""
    if value is None:
        return "—"
    if metric == "top1":
        return _share(value)
    return faithfulness.format(value) if metric in ("abpc", "aopc_morf") else f"{value:.3f}"


BASELINE_ROWS = [("qa", "sentence", "ap"), ("qa", "sentence", "top1"), ("qa", "token", "ap"), ("qa", "token", "top1"),
                 ("qa", "token", "recall"), ("squad", "sentence", "ap"), ("qa", "sentence", "abpc"),
                 ("squad", "sentence", "abpc")]


def baseline_summary(data: dict) -> list[str]:
    """``atman evaluate``'s report (its .json): the headline metrics of every method side by side, the
    highest of each row in bold (every metric here is higher-is-better)."""
    from atman.evaluate.report import LABELS

    methods = [m for m in data["methods"] if m not in data.get("unavailable", {})]
    lines = ["| data, units | metric | " + " | ".join(METHOD_NAMES.get(m, m) for m in methods) + " |",
             "|---" * (len(methods) + 2) + "|"]
    for dataset, gran, metric in BASELINE_ROWS:
        values = [_metric(data, dataset, gran, m, metric) for m in methods]
        if all(v is None for v in values):
            continue
        best = max(v for v in values if v is not None)
        cells = [f"**{_value(metric, v)}**" if v == best else _value(metric, v) for v in values]
        lines.append(f"| {DATA_NAMES[dataset]}, {gran}s | {LABELS[metric]} | " + " | ".join(cells) + " |")
    return lines


def _variant(method: str) -> str:
    """An ablation's method name in words (``atman:multiplier=0.0`` -> 'multiplier 0 (removal)')."""
    if method == "atman":
        return "default (multiplier 0.1, log-additive)"
    key, _, value = method.partition(":")[2].partition("=")
    if key == "multiplier":
        return f"multiplier {float(value):g}" + (" (removal)" if float(value) == 0 else "")
    if key == "kappa":
        return f"conceptual, kappa {value}"
    return value if key == "mode" else method


VARIANT_COLUMNS = [
    ("QA sentences AP / top-1", [("qa", "sentence", "ap"), ("qa", "sentence", "top1")]),
    ("QA tokens AP / precision / recall",
     [("qa", "token", "ap"), ("qa", "token", "precision"), ("qa", "token", "recall")]),
    ("SQuAD sentences AP", [("squad", "sentence", "ap")]),
    ("QA ABPC", [("qa", "sentence", "abpc")]),
    ("Python texts ABPC", [("texts", "sentence", "abpc")]),
]


def variant_summary(data: dict) -> list[str]:
    """``atman evaluate --ablations`` (or a run of AtMan's settings): each variant's headline metrics, the
    columns the run measured."""
    methods = data["methods"]
    columns = [(label, cells) for label, cells in VARIANT_COLUMNS
               if any(_metric(data, *cell[:2], m, cell[2]) is not None for m in methods for cell in cells)]
    lines = ["| variant | " + " | ".join(label for label, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method in methods:
        row = [" / ".join(_value(c[2], _metric(data, c[0], c[1], method, c[2]), "{:.2f}") for c in cells)
               for _, cells in columns]
        lines.append(f"| {_variant(method)} | " + " | ".join(row) + " |")
    return lines


def paired_summary(data: dict) -> list[str]:
    """``atman evaluate`` with AtMan and one other method: both means and the paired difference (95 %
    bootstrap interval of the per-example difference) with its verdict, for every headline metric."""
    from atman.evaluate.report import HEADLINE, LABELS, verdict

    other = next(m for m in data["methods"] if m != "atman")
    name = METHOD_NAMES.get(other, other)
    lines = [f"| data, units | metric | AtMan | {name} | AtMan − {name} (paired) |", "|---|---|---|---|---|"]
    for kind, datasets in data["paired"].items():
        for dataset, grans in datasets.items():
            for gran, methods in grans.items():
                for metric in HEADLINE[kind]:
                    if metric not in methods.get(other, {}):
                        continue
                    d = methods[other][metric]
                    digits = "{:.2f}" if kind == "faithfulness" else "{:.3f}"
                    lines.append(f"| {DATA_NAMES[dataset]}, {gran}s | {LABELS[metric]} | "
                                 f"{_value(metric, _metric(data, dataset, gran, 'atman', metric), '{:.2f}')} | "
                                 f"{_value(metric, _metric(data, dataset, gran, other, metric), '{:.2f}')} | "
                                 f"{digits.format(d['mean'])} [{digits.format(d['low'])}, {digits.format(d['high'])}], "
                                 f"{verdict(d, metric)} |")
    return lines


def _files(data: dict | list[dict]) -> list[dict]:
    return data if isinstance(data, list) else [data]


def cite_sizes(data: dict) -> list[str]:
    """benchmarks/cite.py: the contexts of a results file."""
    from atman.evaluate.cite_tables import format_sizes

    return format_sizes(data["sizes"])


def cite_table(data: dict | list[dict]) -> list[str]:
    """benchmarks/cite.py: every method's means and intervals over the contexts and its cost ratios to
    ContextCite-32 (several files of the same methods on other contexts: their records together)."""
    from atman.evaluate.cite_tables import format_table, merged_records, summarise

    return format_table(summarise(merged_records(_files(data))))


def cite_runs(data: dict | list[dict]) -> list[str]:
    """benchmarks/cite.py: one block of rows per results file (a run with its own ContextCite-32)."""
    from atman.evaluate.cite_tables import format_runs

    return format_runs(_files(data))


def cite_per_context(data: dict) -> list[str]:
    """benchmarks/cite.py: per-source readout with the attention removed minus ContextCite, per context."""
    from atman.evaluate.cite_tables import format_per_context

    references = tuple(m for m in ("contextcite-32", "contextcite-64") if m in data["table"])
    return format_per_context(data, "readout-removed", references)


FIXTURES = {  # what each trained fixture is (the figures come from its training.json)
    "heldout_caption_accuracy": (
        "`tests/fixtures/tiny-llava-scenes`", "`LlavaForConditionalGeneration`: CLIP vision tower (2 layers, 8 px "
        "patches, 6 x 6 grid) + projector + Llama (2 layers)", "caption \"This is a picture of a red circle and a "
        "blue square\" (1-2 objects, named left to right)", "captions exact"),
    "heldout_accuracy": (
        "`tests/fixtures/tiny-vit-scenes`", "`ViTForImageClassification` (3 layers, 6 x 6 grid)",
        "the coloured shape among two grey distractors (9 classes)", "scenes"),
}


def trained_fixtures(files: list[dict]) -> list[str]:
    """benchmarks/train_tiny_llava.py and train_tiny_vit.py: each fixture's training.json (beside its weights)."""
    lines = ["| fixture | architecture | task | parameters | training | held-out accuracy |", "|---" * 6 + "|"]
    for data in files:
        key = next(k for k in FIXTURES if k in data)
        fixture, architecture, task, unit = FIXTURES[key]
        cpu = f"{data['train_cpu_seconds']:,} s CPU, " if "train_cpu_seconds" in data else ""
        wall = data.get("train_wall_seconds", data.get("train_seconds"))
        held = data.get("heldout_examples")
        accuracy = _share(data[key]) + (f" of {held:,} {unit}" if held else "")
        lines.append(f"| {fixture} | {architecture} | {task} | {data['parameters']:,} | {data['steps']:,} steps of "
                     f"{data['batch_size']}: {cpu}{wall:,} s wall | {accuracy} |")
    return lines


def evaluation_report(data: dict) -> list[str]:
    """``atman evaluate``'s report (its .json), as the command wrote its .md, headings one level down and
    without the title: the section of a document that quotes it."""
    from atman.evaluate.report import render_markdown  # scipy: loaded only when a document quotes a report

    lines = render_markdown(data, command=data.get("command")).splitlines()[2:]
    while lines and not lines[-1]:
        lines.pop()
    return ["#" + line if line.startswith("## ") else line for line in lines]


RENDERERS: dict[str, Renderer] = {
    "steering": steering, "cancellation": cancellation, "server-latency": server_latency, "tour": tour,
    "cli-startup": cli_startup, "inseq-steps": inseq_steps, "cite-real": cite_real,
    "cite-real-contexts": cite_real_contexts, "cite-real-reliance": cite_real_reliance, "refine-cost": refine_cost,
    "refine-bounds": refine_bounds,
    "refine-contexts": refine_contexts,
    "qa-check": qa_check, "evaluate-time": evaluate_time,
    "shared-prefix": shared_prefix, "evaluate-total": evaluate_total,
    "ig-convergence": ig_convergence, "at2-training": at2_training,
    "engine-compare": engine_compare, "engine-reference": engine_reference,
    "explain-process": explain_process, "image-relevance": image_relevance,
    "evaluation-report": evaluation_report, "speed": speed, "release-memory": release_memory,
    "vlm-speed": vlm_speed, "gpu-token": gpu_token, "gpu-memory": gpu_memory, "ray-throughput": ray_throughput,
    "ray-scaling": ray_scaling, "baseline-summary": baseline_summary, "variant-summary": variant_summary,
    "paired-summary": paired_summary, "cite-sizes": cite_sizes, "cite-table": cite_table, "cite-runs": cite_runs,
    "cite-per-context": cite_per_context, "trained-fixtures": trained_fixtures,
}


def render_text(text: str, root: Path = ROOT) -> str:
    """``text`` with every marked table rendered from its results file."""
    def one(match: re.Match) -> str:
        name, path = match["name"], match["path"]
        if name not in RENDERERS:
            raise KeyError(f"no renderer {name!r} (known: {', '.join(sorted(RENDERERS))})")
        files = [_load(root / one) for one in path.split(",")]
        lines = RENDERERS[name](files if len(files) > 1 else files[0])
        indent = match["indent"]  # a table inside a list item keeps the item's indentation
        return indent + match["open"] + "".join(f"{indent}{line}\n" for line in lines) + match["close"]

    return BLOCK.sub(one, text)


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def reports(root: Path = ROOT) -> dict[Path, str]:
    """Every evaluation report under docs/results/ (a .md beside its .json) and what its .json renders."""
    from atman.evaluate.report import render_markdown

    out = {}
    for md in sorted((root / "docs" / "results").glob("*.md")):
        if (js := md.with_suffix(".json")).exists():
            data = _load(js)
            out[md] = render_markdown(data, command=data.get("command"))
    return out


def stale(root: Path = ROOT) -> list[str]:
    """The files whose marked tables differ from what their results files render, and the evaluation
    reports that differ from what their .json renders."""
    return [str(path.relative_to(root)) for path in documents(root)
            if render_text(text := path.read_text(encoding="utf-8"), root) != text] + \
        [str(md.relative_to(root)) for md, text in reports(root).items() if md.read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="name the files whose tables differ; change nothing")
    args = parser.parse_args(argv)
    if args.check:
        files = stale()
        for name in files:
            print(f"{name}: a table differs from its results file (python docs/render.py rewrites it)")
        return 1 if files else 0
    for path in documents():
        text = path.read_text(encoding="utf-8")
        rendered = render_text(text)
        if rendered != text:
            path.write_text(rendered, encoding="utf-8")
            print(f"rendered the tables of {path.relative_to(ROOT)}")
    for md, text in reports().items():
        if md.read_text(encoding="utf-8") != text:
            md.write_text(text, encoding="utf-8")
            print(f"rendered the report {md.relative_to(ROOT)} from its .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
