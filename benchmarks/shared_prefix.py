"""Rows that share a long prefix: one copy of the prefix per attention call against one per row.

    OMP_NUM_THREADS=1 python benchmarks/shared_prefix.py --sources 120 --reps 2 \\
        --json benchmarks/results/cpu-smollm2-shared-prefix.json

Readout suppression of every source of an invented 120-sentence context (2,759 tokens with
SmolLM2): every row recomputes only the question and response, attending to the whole context.
With ``FOLD_SHARE = 0`` the cache joins the unperturbed prefix to every row (a copy per row, and
its grouped-query heads repeated), as the engine did before; with the default the queries of a
few rows lie side by side against one copy under a block mask. Both settings run in turn in one
process, ``--reps`` times each; prints the CPU seconds of each, their ratio and the largest
difference between the two settings' losses.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from atman import load_model, manipulation
from atman.evaluate.citation import layout, readout_logprobs
from atman.evaluate.cite_data import invented_example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=120)
    parser.add_argument("--seed", type=int, default=200)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the printed results here")
    args = parser.parse_args()
    lm = load_model()
    task = invented_example(args.seed, n_sources=args.sources).task
    n = len(task.sources)
    rows = np.ones((n + 1, n), dtype=np.float32)
    rows[np.arange(1, n + 1), np.arange(n)] = 0.0
    default = manipulation.FOLD_SHARE
    seconds: dict[str, list[float]] = {"joined per row": [], "shared": []}
    outputs = {}
    for _ in range(args.reps):
        for name, share in (("joined per row", 0), ("shared", default)):
            manipulation.FOLD_SHARE = share
            began = time.process_time()
            outputs[name] = readout_logprobs(lm, task, rows)
            seconds[name].append(time.process_time() - began)
    manipulation.FOLD_SHARE = default
    best = {name: min(values) for name, values in seconds.items()}
    difference = float(np.abs(outputs["shared"] - outputs["joined per row"]).max())
    result = {"sources": n, "tokens": len(layout(lm.tokenizer, task).input_ids), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "load_average": os.getloadavg(), "cpu_seconds": seconds,
              "shared_vs_joined": round(best["shared"] / best["joined per row"], 3),
              "max_abs_logprob_difference": difference}
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
