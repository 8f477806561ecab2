"""How well Integrated Gradients' path integral converges on SmolLM2, from two baselines.

    OMP_NUM_THREADS=1 python benchmarks/ig_convergence.py --json benchmarks/results/ig-convergence-smollm2.json

For the evaluation suite's first invented-fact QA prompts (``atman.evaluate.context_qa``, 3 facts, seed 0)
and their answers as targets, Integrated Gradients as ``atman.baselines`` runs it
(Captum, Gauss-Legendre points, only the explainable prompt positions moving) from the padding token's
embedding (the method's baseline) and from the all-zero embedding, at several step counts. Completeness
says the attributions sum to f(input) - f(baseline), f = log p(target); the gap between the two is
Captum's convergence delta. Prints and writes, per prompt, baseline and step count: the sum, the
difference it should equal and the gap relative to that difference.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from atman import load_model
from atman.baselines.gradient import IntegratedGradients
from atman.evaluate.context_qa import make_examples
from atman.units import encode


def measure(method: IntegratedGradients, encoded) -> dict:
    """Sum of the attributions, f(input) - f(baseline) and their gap for one call."""
    check = method.completeness(encoded)
    return {"baseline": method.baseline_token, "steps": method.steps, **check,
            "relative_gap": abs(check["sum"] - check["difference"]) / abs(check["difference"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", default="16,32,48,64")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model()
    rows = []
    for k, example in enumerate(make_examples(args.prompts, seed=0, facts=3)):
        target = example.target
        encoded = encode(lm.tokenizer, example.prompt, target)
        for steps in (int(v) for v in args.steps.split(",")):
            for baseline in ("token", "zeros"):
                method = IntegratedGradients(lm, steps=steps, baseline=baseline)
                row = {"prompt": k, "target": target, **measure(method, encoded)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": lm.name, "machine": platform.machine(),
                                         "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
