"""The cached engine against the naive one as a user runs them: whole processes, model load included.

    python benchmarks/explain_process.py --reps 2 --json benchmarks/results/cpu-explain-process.json
    python benchmarks/explain_process.py --trees /tmp/atman-b26aeaa . --reps 2   # an older tree beside

Two invented-fact prompts of about 300 tokens (18 fact sentences and a question, seeds 9001 and
9002, used by no other benchmark or test) go into one request file, explained at token level;
``atman explain --input FILE --engine naive`` and the same with the default engine run one after the
other, A B A B, ``--reps`` rounds, for every tree in ``--trees`` (``PYTHONPATH`` and the working
directory at the tree, so each imports its own ``atman``). Each run is timed from outside (wall
seconds, and the CPU seconds of the child from the operating system); the ratio naive / default is
taken round by round and its median reported. The load average before each run and the largest
difference between the two engines' scores are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEEDS = (9001, 9002)
FACTS = 18


def requests() -> list[dict]:
    """The two prompts (with the answer of their question as the target), at token level."""
    from atman.evaluate.context_qa import make_examples

    out = []
    for seed in SEEDS:
        example = make_examples(1, seed=seed, facts=FACTS)[0]
        out.append({"prompt": example.prompt, "target": example.target, "granularity": "token"})
    return out


def scores(path: Path) -> list[float]:
    values = []
    for line in path.read_text(encoding="utf-8").splitlines():
        result = json.loads(line)
        for explanation in result["explanations"]:
            values.extend(item["score"] for item in explanation["items"])
    return values


def run(tree: Path, request_file: Path, output: Path, engine: str) -> dict:
    command = [sys.executable, "-m", "atman", "explain", "--input", str(request_file), "-o", str(output),
               "--engine", engine]
    env = dict(os.environ, PYTHONPATH=str(tree))
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} in {tree} failed:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"engine": engine, "wall": wall, "cpu": cpu, "load_before": load}


def label(tree: Path) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "atman"], cwd=tree,
                           capture_output=True, text=True).stdout.strip()
    return f"{commit}{'+changes' if dirty else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=Path, nargs="+", default=[Path(".")])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    work = Path(tempfile.mkdtemp(prefix="atman-explain-process-"))
    request_file = work / "requests.jsonl"
    lines = requests()
    request_file.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    from atman import load_model

    tokenizer = load_model().tokenizer
    lengths = [len(tokenizer(r["prompt"] + r["target"])["input_ids"]) for r in lines]
    labels = [label(t) for t in trees]
    print(f"prompts of {lengths} tokens (prompt and target); trees {labels}", flush=True)
    runs: dict[str, list[dict]] = {lab: [] for lab in labels}
    differences: dict[str, float] = {}
    for _ in range(args.reps):
        for tree, lab in zip(trees, labels, strict=True):
            pair = {}
            for engine in ("naive", "cached"):
                output = work / f"{lab}-{engine}.jsonl"
                pair[engine] = run(tree, request_file, output, engine)
                print(f"  {lab:<16} {engine:<7} wall {pair[engine]['wall']:7.1f} s  cpu {pair[engine]['cpu']:7.1f} s"
                      f"  load {pair[engine]['load_before']:.1f}", flush=True)
            a, b = scores(work / f"{lab}-naive.jsonl"), scores(work / f"{lab}-cached.jsonl")
            differences[lab] = max(abs(x - y) for x, y in zip(a, b, strict=True))
            runs[lab].append({"naive": pair["naive"], "cached": pair["cached"],
                              "wall_ratio": pair["naive"]["wall"] / pair["cached"]["wall"],
                              "cpu_ratio": pair["naive"]["cpu"] / pair["cached"]["cpu"]})
    summary = {lab: {"naive_over_default_wall": statistics.median(r["wall_ratio"] for r in rs),
                     "naive_over_default_cpu": statistics.median(r["cpu_ratio"] for r in rs),
                     "default_wall": statistics.median(r["cached"]["wall"] for r in rs),
                     "naive_wall": statistics.median(r["naive"]["wall"] for r in rs),
                     "largest_score_difference": differences[lab]} for lab, rs in runs.items()}
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "prompt_tokens": lengths,
              "requests": lines, "runs": runs, "summary": summary}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print("\n| tree | naive (s) | default (s) | naive / default, wall | naive / default, CPU "
          "| largest score difference |")
    print("|---|---|---|---|---|---|")
    for lab, s in summary.items():
        print(f"| {lab} | {s['naive_wall']:.1f} | {s['default_wall']:.1f} | {s['naive_over_default_wall']:.2f}x | "
              f"{s['naive_over_default_cpu']:.2f}x | {s['largest_score_difference']:.1e} |")


if __name__ == "__main__":
    main()
