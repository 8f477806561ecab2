"""Steering check on invented-fact context QA: a control on the sentence that states the answer.

    python benchmarks/steering_qa.py --n 20 --factors 0 0.1 0.5 1 2 5

For each factor, a text control with that factor covers the evidence sentence (the one stating the
answer), and, separately, one other fact sentence (a distractor). Prints the mean log-probability of
the answer and the share of greedy completions that start with it. Suppressing the evidence should
lower both; amplifying it should raise the log-probability; controls on a distractor should matter less.
"""

from __future__ import annotations

import argparse
import json
import time

from atman import load_model
from atman.evaluate.context_qa import make_examples
from atman.steering import Steerer, TextControl


def _distractor(ex) -> tuple[int, int]:
    """The first fact sentence of the context that is not the evidence (sentences end with '. ')."""
    first_end = ex.prompt.index(". ") + 1
    if ex.evidence_start > 0:
        return 0, first_end
    return first_end + 1, ex.prompt.index(". ", first_end + 1) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--factors", type=float, nargs="+", default=[0.0, 0.1, 0.5, 1.0, 2.0, 5.0])
    parser.add_argument("--mode", default="log-additive", choices=("log-additive", "multiplicative"))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    lm = load_model(args.model)
    steerer = Steerer(lm, mode=args.mode)
    examples = make_examples(args.n, seed=args.seed)
    rows = []
    start = time.perf_counter()
    for factor in args.factors:
        for where in ("evidence", "distractor"):
            logprob = hits = 0.0
            for ex in examples:
                if where == "evidence":
                    span = (ex.evidence_start, ex.evidence_end)
                else:
                    span = _distractor(ex)
                control = TextControl(span[0], span[1] - span[0], factor)
                logprob += float(steerer.score(ex.prompt, ex.target, [control]).log_probs.sum())
                n_tokens = len(lm.tokenizer(ex.target, add_special_tokens=False)["input_ids"])
                text = steerer.generate(ex.prompt, [control], max_new_tokens=n_tokens).text
                hits += text.startswith(ex.target)
            rows.append({"factor": factor, "control_on": where, "n": len(examples),
                         "mean_answer_logprob": round(logprob / len(examples), 3),
                         "greedy_answer_rate": hits / len(examples)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"model {lm.name}, mode {args.mode}, {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"model": lm.name, "mode": args.mode, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
