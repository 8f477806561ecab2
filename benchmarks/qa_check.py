"""Context-QA check: how often AtMan's top unit is the sentence stating the answer.

    python benchmarks/qa_check.py --n 20 --kappa none 0.7 --json benchmarks/results/qa-check-smollm2.json

Prints, per setting, the share of prompts whose top sentence (sentence granularity) is the
evidence sentence and whose top token (token granularity) lies inside it. Used to choose the
default of conceptual suppression (docs/defaults.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from atman import Explainer, load_model
from atman.evaluate.context_qa import hits, make_examples


def run(explainer: Explainer, examples, kappa, mode: str, multiplier: float) -> dict:
    sentence_hits = token_hits = 0
    margin = 0.0
    start = time.perf_counter()
    for ex in examples:
        exp = explainer.explain(ex.prompt, ex.target, granularity="sentence", kappa=kappa, mode=mode,
                                multiplier=multiplier)
        sentence_hits += hits(exp, ex)[1]
        scores = sorted((i.score for i in exp.explanations[0].items), reverse=True)
        margin += scores[0] - scores[1]
        exp = explainer.explain(ex.prompt, ex.target, granularity="token", kappa=kappa, mode=mode,
                                multiplier=multiplier)
        token_hits += hits(exp, ex)[0]
    n = len(examples)
    return {"kappa": kappa, "mode": mode, "multiplier": multiplier, "n": n, "sentence_top1": sentence_hits / n,
            "token_top1_in_evidence": token_hits / n, "mean_sentence_margin": margin / n,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--facts", type=int, default=4, help="fact sentences per prompt")
    parser.add_argument("--kappa", nargs="+", default=["none", "0.7"])
    parser.add_argument("--mode", nargs="+", default=["log-additive"])
    parser.add_argument("--multiplier", nargs="+", type=float, default=[0.1])
    parser.add_argument("--json", type=Path, help="also write every setting's row here")
    args = parser.parse_args()
    explainer = Explainer(load_model(args.model))
    examples = make_examples(args.n, seed=args.seed, facts=args.facts)
    print(f"model: {explainer.lm.name}; {args.n} prompts of {args.facts} facts, seed {args.seed}")
    print(f"{'kappa':>6} {'mode':>15} {'multiplier':>10} {'sentence top-1':>15} {'token top-1 in evidence':>24} "
          f"{'margin':>7} {'s':>6}")
    rows = []
    for mode in args.mode:
        for multiplier in args.multiplier:
            for kappa_text in args.kappa:
                kappa = None if kappa_text == "none" else float(kappa_text)
                row = run(explainer, examples, kappa, mode, multiplier)
                print(f"{kappa_text:>6} {mode:>15} {multiplier:>10} {row['sentence_top1']:>15.2%} "
                      f"{row['token_top1_in_evidence']:>24.2%} {row['mean_sentence_margin']:>7.2f} "
                      f"{row['seconds']:>6}")
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": explainer.lm.name, "n": args.n, "facts": args.facts, "seed": args.seed,
            "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
