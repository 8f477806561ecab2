"""How precisely the server honours --timeout and a client's disconnection: the time between checks.

    python benchmarks/cancel_latency.py --tokens 512 2048 --checks 4

A running explanation is stopped at its next check, which the explainer makes between batches of
perturbations. This times, with the explainer the server uses (automatic batch size), the gaps
between consecutive checks of a token-level explanation (the server's --max-units 256 units) of
prompts of the given lengths, and stops after --checks checks. The largest gap is how far past a
limit a request can run. Prints one JSON line per length.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from atman import Explainer, load_model
from atman.units import encode, prompt_units

MAX_UNITS = 256


class Enough(Exception):
    """Stop the explanation once enough checks were timed."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--checks", type=int, default=4)
    args = parser.parse_args()
    lm = load_model(args.model)
    explainer = Explainer(lm)
    for length in args.tokens:
        words = " ".join(f"item{i}" for i in range(length))
        ids = lm.tokenizer(words, add_special_tokens=False)["input_ids"][: length - 2]
        prompt = lm.tokenizer.decode(ids)
        encoded = encode(lm.tokenizer, prompt, " item")
        units = prompt_units(encoded, "token")[-MAX_UNITS:]
        multipliers = explainer.multipliers(encoded, units, 0.1, None)
        stamps = [time.perf_counter()]
        rows: list[int] = []

        def check(done: int, total: int, stamps: list[float] = stamps, rows: list[int] = rows) -> None:
            stamps.append(time.perf_counter())
            rows.append(done)
            if len(rows) >= args.checks:
                raise Enough

        try:
            explainer.losses(encoded, multipliers, progress=check)
        except Enough:
            pass
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        print(json.dumps({"tokens": len(encoded.input_ids), "units": len(units), "rows_at_checks": rows,
                          "gaps_s": [round(g, 2) for g in gaps], "largest_gap_s": round(max(gaps), 2),
                          "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
