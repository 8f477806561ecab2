"""AtMan through inseq: one token-level explanation against a loop of one explanation per generated token.

inseq's own perturbation methods attribute each generated token in turn. The ``"atman"`` method of
``atman.integrations.inseq`` instead runs one explanation with ``target_granularity="token"``,
which scores every prefix token for every generated token in one batched set of forward passes.
This script measures, side by side in one process on the embedded SmolLM2:

- ``inseq-atman``: ``inseq.load_model(model, "atman").attribute(...)``;
- ``per-step-atman``: what a per-step loop would run, one complete-target AtMan explanation per
  generated token (prompt + tokens generated so far as the prompt, token level), and the largest
  difference of its scores from ``inseq-atman`` (the two compute the same quantity);
- ``inseq-occlusion``: inseq's own forward-only perturbation method (Captum's occlusion, one
  token at a time), for reference: it measures something else, at the same token granularity.

    python benchmarks/inseq_steps.py --new-tokens 16 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import atman
import atman.integrations.inseq  # noqa: F401  registers "atman" with inseq

PROMPT = ("Doran Vesk repairs clocks in Lindhaven. Mira sails to Olvereth every spring. "
          "Tomas bakes bread in Quillmere. Where does Doran work, and what does he do? Answer:")


def main() -> None:
    import inseq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate and explain")
    parser.add_argument("--reps", type=int, default=2, help="repetitions; the best time counts")
    parser.add_argument("--skip-occlusion", action="store_true", help="leave inseq's occlusion out")
    parser.add_argument("--json", help="also write the times, the ratios and the machine's load to this file")
    args = parser.parse_args()

    lm = atman.load_model()
    explainer = atman.Explainer(lm)
    ids = explainer.generate(PROMPT, max_new_tokens=args.new_tokens)
    continuation = lm.tokenizer.decode(ids)
    full = PROMPT + continuation
    n_prompt = len(lm.tokenizer(PROMPT)["input_ids"])
    print(f"prompt {n_prompt} tokens, continuation {len(ids)} tokens: {continuation!r}", flush=True)

    model = inseq.load_model(lm.model, "atman", tokenizer=lm.tokenizer)

    def inseq_atman() -> torch.Tensor:
        return model.attribute(PROMPT, full, show_progress=False).sequence_attributions[0].target_attributions

    def per_step() -> torch.Tensor:
        out = torch.full((n_prompt + len(ids), len(ids)), float("nan"))
        for step in range(len(ids)):
            prefix = PROMPT + lm.tokenizer.decode(ids[:step])
            token = lm.tokenizer.decode(ids[step:step + 1])
            exp = explainer.explain(prefix, token, granularity="token")
            out[:n_prompt + step, step] = torch.tensor(exp.explanations[0].scores)
        return out

    def occlusion() -> torch.Tensor:
        occ = inseq.load_model(lm.model, "occlusion", tokenizer=lm.tokenizer)
        out = occ.attribute(PROMPT, full, show_progress=False)
        return out.sequence_attributions[0].target_attributions

    runs = {"inseq-atman": inseq_atman, "per-step-atman": per_step}
    if not args.skip_occlusion:
        runs["inseq-occlusion"] = occlusion
    best: dict[str, float] = {}
    results: dict[str, torch.Tensor] = {}
    for _ in range(args.reps):
        for name, run in runs.items():  # interleaved, so that load changes hit every method alike
            start = time.perf_counter()
            results[name] = run()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
            print(f"  {name}: {time.perf_counter() - start:.2f} s", flush=True)
    reference = best["inseq-atman"]
    for name, seconds in best.items():
        print(f"{name:16s} {seconds:8.2f} s   {seconds / reference:6.2f}x inseq-atman")
    a, b = results["inseq-atman"], results["per-step-atman"]
    both = ~(a.isnan() | b.isnan())
    largest = float((a[both] - b[both]).abs().max())
    print(f"largest |inseq-atman - per-step-atman| over {int(both.sum())} scores: {largest:.2e}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"prompt_tokens": n_prompt, "new_tokens": len(ids), "reps": args.reps,
                       "threads": torch.get_num_threads(), "load_average_at_end": round(os.getloadavg()[0], 2),
                       "best_s": {k: round(v, 2) for k, v in best.items()},
                       "vs_inseq_atman": {k: round(v / reference, 2) for k, v in best.items()},
                       "largest_difference": largest}, out, indent=1)
            out.write("\n")


if __name__ == "__main__":
    main()
