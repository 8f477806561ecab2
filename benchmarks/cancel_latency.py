"""How precisely the server honours --timeout and a client's disconnection: the time between checks.

    OMP_NUM_THREADS=1 python benchmarks/cancel_latency.py --tokens 512 2048 --checks 6 --check-interval 2 \
        --json benchmarks/results/cancel-latency-smollm2.json

A running explanation is stopped at its next check. This times the gaps between consecutive checks
of an explanation of 256 tokens spread evenly over prompts (the server's --max-units) of the given lengths,
and stops after --checks checks, twice: with whole passes (checks between batches only) and with the
engine's passes cut into pieces of what the model runs in --check-interval seconds at the device's
nominal speed, as ``atman serve`` does. The largest gap is how far past a limit a request can run. Prints one JSON
line per length and setting; ``--json`` writes them all, with the machine's load, to a results file
(docs/server.md renders its table from it: ``python docs/render.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from atman import Explainer, load_model
from atman.budget import piece_tokens_for
from atman.rows import Suppression
from atman.units import encode, prompt_units

MAX_UNITS = 256


class Enough(Exception):
    """Stop the explanation once enough checks were timed."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--checks", type=int, default=6)
    parser.add_argument("--check-interval", type=float, default=2.0, help="seconds, as atman serve's option")
    parser.add_argument("--json", help="write the runs and the machine's load to this results file")
    args = parser.parse_args()
    lm = load_model(args.model)
    pieces = piece_tokens_for(lm.model, args.check_interval)
    load_before = os.getloadavg()
    runs = [measure(lm, Explainer(lm, piece_tokens=piece_tokens), length, args.checks)
            for length in args.tokens for piece_tokens in (None, pieces)]
    if args.json:
        result = {"model": lm.name, "check_interval_s": args.check_interval, "checks": args.checks,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                             f"{torch.get_num_threads()} threads",
                  "load_average_before": [round(v, 2) for v in load_before],
                  "load_average_after": [round(v, 2) for v in os.getloadavg()], "runs": runs}
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=1)
            out.write("\n")


def measure(lm, explainer: Explainer, length: int, checks: int) -> dict:
    """Time the first ``checks`` gaps between checks of one explanation of a ``length``-token prompt."""
    words = " ".join(f"item{i}" for i in range(length))
    ids = lm.tokenizer(words, add_special_tokens=False)["input_ids"][: length - 2]
    prompt = lm.tokenizer.decode(ids)
    encoded = encode(lm.tokenizer, prompt, " item")
    tokens = prompt_units(encoded, "token")
    # units spread over the whole prompt, as sentences are: the first rows recompute nearly all of it
    units = tokens[:: max(1, len(tokens) // MAX_UNITS)][:MAX_UNITS]
    multipliers = explainer.rows(encoded, units, Suppression(multiplier=0.1, kappa=None))
    stamps = [time.perf_counter()]
    rows: list[int] = []

    def check(done: int, total: int, stamps: list[float] = stamps, rows: list[int] = rows) -> None:
        stamps.append(time.perf_counter())
        rows.append(done)
        if len(rows) >= checks:
            raise Enough

    try:
        explainer.losses(encoded, multipliers, progress=check)
    except Enough:
        pass
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    run = {"tokens": len(encoded.input_ids), "units": len(units), "piece_tokens": explainer.engine.piece_tokens,
           "rows_at_checks": rows, "gaps_s": [round(g, 2) for g in gaps], "first_check_s": round(gaps[0], 2),
           "largest_gap_s": round(max(gaps), 2), "threads": torch.get_num_threads()}
    print(json.dumps(run), flush=True)
    return run


if __name__ == "__main__":
    main()
