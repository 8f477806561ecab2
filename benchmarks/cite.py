"""Citation benchmark: every method scored with ContextCite's own metrics on long invented-fact contexts.

For each generated context (40-120 sentence sources, 1,000-4,000 tokens) every method gives one score
per source for the reference response; our code then measures, for every method alike, the top-1/3/5
log-probability drop, the LDS over 32 held-out ablations (keep probability 0.5, seeds disjoint from
ContextCite's training masks), whether an evidence sentence is ranked first, the token-forwards and
the time. Methods run one after another on the same machine, so the time ratios against
ContextCite-32 are side by side. Needs ``pip install -e ".[cite]"``.

    OMP_NUM_THREADS=1 python benchmarks/cite.py --contexts 4 --sources 40 --out docs/results/cite-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from atman import load_model
from atman.baselines.contextcite import contextcite_scores
from atman.evaluate.citation import (
    HoldOut,
    ResponseScorer,
    atman_spans,
    attention_weights,
    layout,
    leave_one_out,
    readout_refine,
    readout_suppression,
    readout_surrogate,
    run_method,
    score_method,
)
from atman.evaluate.cite_data import invented_examples, squad_examples

METRICS = ("top1_drop", "top3_drop", "top5_drop", "lds", "evidence_first")
REFERENCE = "contextcite-32"


def methods(lm, task, scorer) -> dict:
    """Name -> a call returning one score per source."""
    return {
        "contextcite-32": lambda: contextcite_scores(lm, task, 32),
        "leave-one-out": lambda: leave_one_out(scorer),
        "attention": lambda: attention_weights(lm, task),
        "atman-spans": lambda: atman_spans(lm, task),
        "atman-spans-removed": lambda: atman_spans(lm, task, multiplier=0.0),
        "readout-0.1": lambda: readout_suppression(lm, task, multiplier=0.1),
        "readout-removed": lambda: readout_suppression(lm, task, multiplier=0.0),
        "readout-multiplicative-0.1": lambda: readout_suppression(lm, task, multiplier=0.1, mode="multiplicative"),
        "readout-refine": lambda: readout_refine(lm, task),
        "readout-refine-share-0.9": lambda: readout_refine(lm, task, share=0.9),
        "readout-refine-4-share-0.9": lambda: readout_refine(lm, task, block=4, share=0.9),
        "readout-surrogate-32": lambda: readout_surrogate(lm, task, 32),
        "readout-surrogate-64": lambda: readout_surrogate(lm, task, 64),
        "readout-surrogate-64+singles": lambda: readout_surrogate(lm, task, 64, with_singles=True),
        "contextcite-64": lambda: contextcite_scores(lm, task, 64),
    }


def bootstrap(values: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % bootstrap interval of the mean over the contexts."""
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


def format_table(table: dict) -> str:
    def cell(value) -> str:
        mean, lo, hi = value
        return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"

    lines = ["| method | top-1 drop | top-3 drop | top-5 drop | LDS | evidence first | token-forwards | "
             "tokens vs CC-32 | CPU time vs CC-32 | wall time vs CC-32 |", "|---" * 10 + "|"]
    for name, e in table.items():
        lines.append(f"| {name} | {cell(e['top1_drop'])} | {cell(e['top3_drop'])} | {cell(e['top5_drop'])} | "
                     f"{cell(e['lds'])} | {e['evidence_first'][0]:.2f} | {e['token_forwards']:.0f} | "
                     f"{e['token_ratio'][0]:.2f}x | {e['cpu_ratio'][0]:.2f}x | {e['time_ratio'][0]:.2f}x |")
    return "\n".join(lines)


def format_sizes(sizes: list[dict]) -> str:
    lines = ["| context | kind | sources | tokens (prompt + response) | response tokens |", "|---" * 5 + "|"]
    lines += [f"| {s['context']} | {s['kind']} | {s['sources']} | {s['tokens']} | {s['response_tokens']} |"
              for s in sizes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, default=4, help="generated contexts (kinds in turn)")
    parser.add_argument("--sources", type=int, default=40, help="sentence sources per context (40-120)")
    parser.add_argument("--seed", type=int, default=100, help="seed of the first context")
    parser.add_argument("--squad", type=int, default=0, help="also run this many SQuAD excerpt questions")
    parser.add_argument("--holdout", type=int, default=32, help="held-out ablations for LDS")
    parser.add_argument("--only", help="comma-separated method names to run (default: all)")
    parser.add_argument("--out", type=Path, help="JSON file for the records and the table")
    parser.add_argument("--report", type=Path, help="only print the table and sizes of a JSON file this wrote")
    args = parser.parse_args(argv)
    if args.report:
        data = json.loads(args.report.read_text())
        print(format_sizes(data["sizes"]))
        print(format_table(summarise(data["records"])))
        return 0
    if args.out is None:
        parser.error("--out is required")

    lm = load_model()
    examples = invented_examples(args.contexts, seed=args.seed, n_sources=args.sources)
    examples += squad_examples(args.squad) if args.squad else []
    records, sizes = [], []
    started = time.time()
    for index, ex in enumerate(examples):
        task = ex.task
        tokens = len(layout(lm.tokenizer, task).input_ids)
        sizes.append({"context": index, "kind": ex.kind, "seed": ex.seed, "sources": len(ex.sources),
                      "tokens": tokens, "response_tokens": len(ResponseScorer(lm, task).response_ids)})
        print(f"context {index}: {ex.kind}, {len(ex.sources)} sources, {tokens} tokens", file=sys.stderr)
        scorer = ResponseScorer(lm, task)
        holdout = HoldOut.measure(scorer, args.holdout)
        chosen = methods(lm, task, scorer)
        if args.only:
            chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
        for name, call in chosen.items():
            run = score_method(run_method(name, lm, call), scorer, holdout, ex.evidence)
            records.append({"context": index, "kind": ex.kind, "method": name, "token_forwards": run.token_forwards,
                            "seconds": run.seconds, "cpu_seconds": run.cpu_seconds, **run.metrics,
                            "scores": run.scores.round(4).tolist()})
            print(f"  {name}: {run.token_forwards} token-forwards, {run.seconds:.1f} s, {run.cpu_seconds:.1f} s CPU, "
                  + ", ".join(f"{k} {v:.2f}" for k, v in run.metrics.items()), file=sys.stderr)
            # written after every method, so that a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"model": lm.name, "command": " ".join(sys.argv), "sizes": sizes,
                                            "table": summarise(records), "records": records,
                                            "minutes": (time.time() - started) / 60}, indent=1))
    print(format_table(summarise(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
