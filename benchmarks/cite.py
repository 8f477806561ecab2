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
from atman.evaluate.cite_tables import format_sizes, format_table, summarise


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
        print("\n".join(format_sizes(data["sizes"])))
        print("\n".join(format_table(summarise(data["records"]))))
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
    print("\n".join(format_table(summarise(records))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
