"""Coarse to fine on a long context: cost and agreement of `granularity="refine"` vs token level.

    python benchmarks/refine.py --tokens 1000 --full --json benchmarks/results/cpu-smollm2-refine-1000.json
    python benchmarks/refine.py --tokens 2000 --full --contexts 5 --device cuda --json gpu-refine-2000.json
    python benchmarks/refine.py --bounds-only --lengths 500,1000,2000,4000 \\
        --json benchmarks/results/refine-bounds.json

Builds a context of invented fact sentences (about --tokens prompt tokens; one of them answers the
closing question), then explains the answer

  refine       sentences first, then tokens inside the --top most relevant sentences
  token        every prompt token (only with --full: about L^2/2 token-forwards)

and reports, side by side in one process: wall time, forward calls and token-forwards (tokens run
through the model, summed over batch rows: the cost model of docs/method.md), the refined cost as
a share of token level, and the agreement of the top-10 tokens (the share of token level's ten
highest-scoring prompt tokens that are also among the refined explanation's ten highest tokens).
Without --full, token level's cost is given by its lower bound L + sum over tokens of (L - p).
With --bounds-only nothing is run: it prints the cost model's lower bounds of both (for refine, in
the worst case that the --top earliest sentences are the ones refined), a model-free upper limit on
the share refine costs at that length.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from atman import Explainer, load_model
from atman.evaluate.context_qa import make_examples
from atman.units import encode, prompt_units


class Meter:
    """Counts the forward calls and token-forwards the explainer's engine runs inside the block."""

    def __init__(self, explainer: Explainer) -> None:
        self.engine = explainer.engine
        self.calls = 0
        self.token_forwards = 0

    def __enter__(self) -> Meter:
        self._start = (self.engine.forward_calls, self.engine.token_forwards)
        return self

    def __exit__(self, *exc) -> None:
        self.calls = self.engine.forward_calls - self._start[0]
        self.token_forwards = self.engine.token_forwards - self._start[1]


def long_example(tokenizer, tokens: int, seed: int):
    """A context-QA example whose prompt has about ``tokens`` tokens."""
    facts = 8
    while True:
        example = make_examples(1, seed=seed, facts=facts)[0]
        length = len(tokenizer(example.prompt)["input_ids"])
        if length >= tokens or facts > 2000:
            return example, length
        facts = max(facts + 1, int(facts * tokens / length))


def bounds(tokenizer, tokens: int, seed: int, top: int, draws: int = 200) -> dict:
    """Lower bounds of token level and of refine: in the worst case (the ``top`` earliest sentences
    refined), for the sentence pass alone, and over ``draws`` random choices of the ``top`` refined
    sentences (mean and maximum share; NumPy's generator seeded with ``seed``)."""
    example, length = long_example(tokenizer, tokens, seed)
    encoded = encode(tokenizer, example.prompt, example.target)
    total = len(encoded.input_ids)

    def cost(units) -> int:
        return total + sum(total - unit.positions[0] for unit in units)

    token_units = prompt_units(encoded, "token")
    sentences = prompt_units(encoded, "sentence")

    def refined(chosen) -> int:
        inside = {p for s in chosen for p in s.positions}
        return cost(sentences) + cost([unit for unit in token_units if unit.positions[0] in inside])

    token_level = cost(token_units)
    rng = np.random.default_rng(seed)
    shares = [refined([sentences[i] for i in rng.choice(len(sentences), size=min(top, len(sentences)),
                                                          replace=False)]) / token_level for _ in range(draws)]
    return {"prompt_tokens": length, "sentences": len(sentences), "token_level_bound": token_level,
            "refine_worst_case_bound": refined(sentences[:top]), "share": refined(sentences[:top]) / token_level,
            "sentence_pass_share": cost(sentences) / token_level,
            "random_draws": {"draws": draws, "mean_share": float(np.mean(shares)), "max_share": float(np.max(shares))}}


def top_tokens(items, k: int = 10) -> list[int]:
    """Start offsets of the ``k`` highest-scoring prompt tokens among ``items``."""
    tokens = [item for item in items if item.kind == "prompt"]
    return [item.start for item in sorted(tokens, key=lambda i: i.score, reverse=True)[:k]]


def run_one(explainer: Explainer, lm, tokens: int, seed: int, top: int, full: bool) -> dict:
    example, length = long_example(lm.tokenizer, tokens, seed)
    encoded = encode(lm.tokenizer, example.prompt, example.target)
    total = len(encoded.input_ids)
    token_units = prompt_units(encoded, "token")
    bound = total + sum(total - unit.positions[0] for unit in token_units)
    print(f"seed {seed}: prompt {length} tokens, {len(token_units)} token units, target {example.target!r}",
          flush=True)
    results: dict = {"seed": seed, "prompt_tokens": length, "sequence_tokens": total, "target": example.target,
                     "refine_top": top, "token_level_lower_bound_token_forwards": bound}
    with Meter(explainer) as meter:
        start = time.perf_counter()
        refined = explainer.explain(example.prompt, example.target, granularity="refine", refine_top=top)
        _sync(lm.device)
        seconds = time.perf_counter() - start
    items = refined.explanations[0].items
    sentences = [i for i in items if not i.refined and i.kind == "prompt"]
    refined_tokens = [i for i in items if i.refined]
    evidence_refined = any(example.evidence_start <= i.start < example.evidence_end for i in refined_tokens)
    results["refine"] = {"seconds": seconds, "forward_calls": meter.calls, "token_forwards": meter.token_forwards,
                         "coarse_units": len(sentences) + top, "refined_tokens": len(refined_tokens),
                         "evidence_sentence_refined": evidence_refined}
    print(f"  refine: {seconds:.2f} s, {meter.calls} calls, {meter.token_forwards} token-forwards "
          f"({meter.token_forwards / bound:.3f} of token level's lower bound {bound}); "
          f"evidence sentence refined: {evidence_refined}", flush=True)
    if full:
        with Meter(explainer) as meter:
            start = time.perf_counter()
            token_level = explainer.explain(example.prompt, example.target, granularity="token")
            _sync(lm.device)
            full_seconds = time.perf_counter() - start
        reference = top_tokens(token_level.explanations[0].items)
        got = top_tokens(refined_tokens)
        agreement = len(set(reference) & set(got)) / len(reference)
        results["token"] = {"seconds": full_seconds, "forward_calls": meter.calls,
                            "token_forwards": meter.token_forwards}
        results["cost_share_time"] = seconds / full_seconds
        results["cost_share_token_forwards"] = results["refine"]["token_forwards"] / meter.token_forwards
        results["top10_agreement"] = agreement
        results["top10_token_level_in_evidence"] = sum(
            example.evidence_start <= s < example.evidence_end for s in reference) / len(reference)
        print(f"  token: {full_seconds:.2f} s, {meter.calls} calls, {meter.token_forwards} token-forwards", flush=True)
        print(f"  refine / token: time {results['cost_share_time']:.3f}, token-forwards "
              f"{results['cost_share_token_forwards']:.3f}; top-10 agreement {agreement:.0%}", flush=True)
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--top", type=int, default=3, help="sentences refined to tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contexts", type=int, default=1,
                        help="how many contexts to measure (seeds --seed, --seed+1, ...)")
    parser.add_argument("--full", action="store_true", help="also run token level (slow: ~L^2/2 token-forwards)")
    parser.add_argument("--bounds-only", action="store_true", help="run nothing; print the cost model's bounds")
    parser.add_argument("--lengths", help="with --bounds-only: comma-separated prompt lengths (default --tokens)")
    parser.add_argument("--draws", type=int, default=200, help="with --bounds-only: random choices of the refined "
                                                              "sentences")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.bounds_only:
        lengths = [int(v) for v in args.lengths.split(",")] if args.lengths else [args.tokens]
        rows = [bounds(lm.tokenizer, n, args.seed, args.top, args.draws) for n in lengths]
        out = {"model": lm.name, "seed": args.seed, "refine_top": args.top, "rows": rows}
        print(json.dumps(out, indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1) + "\n")
        return
    explainer = Explainer(lm)
    machine = (f"{platform.machine()}, {psutil.cpu_count()} cores, "
               f"{round(psutil.virtual_memory().total / 2**30)} GiB RAM, torch {torch.__version__}")
    if lm.device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(lm.device)}; host {machine}"
        explainer.explain("A short warm-up.", " It", granularity="token")  # CUDA start-up outside the timings
    print(f"model {lm.name} ({args.dtype}) on {lm.device}; {machine}", flush=True)
    runs = []
    for seed in range(args.seed, args.seed + args.contexts):
        runs.append(run_one(explainer, lm, args.tokens, seed, args.top, args.full))
        results = summarize(runs, {"model": lm.name, "machine": machine, "device": str(lm.device),
                                   "dtype": args.dtype})
        if args.json:  # after every context, so that an interrupted run keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    if len(runs) > 1:
        print(json.dumps(results["summary"], indent=1))


def summarize(runs: list[dict], results: dict) -> dict:
    if len(runs) == 1:
        return {**results, **runs[0]}
    summary = {}
    for key in ("cost_share_token_forwards", "cost_share_time", "top10_agreement"):
        values = [run[key] for run in runs if key in run]
        if values:
            summary[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return {**results, "runs": runs, "summary": summary}


if __name__ == "__main__":
    main()
