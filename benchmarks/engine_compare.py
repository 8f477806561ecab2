"""The engine of two (or more) source trees side by side in one run: A B A B, on the same prompts.

    git worktree add /tmp/atman-b26aeaa b26aeaa
    OMP_NUM_THREADS=1 python benchmarks/engine_compare.py --trees /tmp/atman-b26aeaa . \\
        --lengths 64 128 256 512 --levels token sentence --cite 120 --reps 2 \\
        --json benchmarks/results/cpu-engine-b26aeaa-vs-now.json

Each tree gets a worker process of its own (``PYTHONPATH`` at the tree, so it imports that tree's
``atman``) that loads the model once and then waits for work. The driver hands every case to the
workers in turn, one at a time, ``--reps`` rounds (A B A B ...), so the trees share the machine's
state and its drift; only one worker computes at any moment. A case is

  token:N, sentence:N   ``Explainer(lm, engine=E).explain(prompt, " Lindhaven", granularity=...)`` on
                        an invented-fact prompt of exactly N tokens (benchmarks/speed.py's prompts),
                        for each engine of ``--engines``
  plain:N               ``--plain-repeat`` plain forward passes of the N-token prompt and the target (logits
                        at every position): pure transformers and torch, the same in every tree, to tell
                        a slower machine from a slower engine
  cite:S                readout suppression of every source of the S-sentence invented citation
                        context (``atman.evaluate.citation.readout_logprobs``; trees without it skip it)

Every measurement records wall seconds and the worker's CPU seconds (all its threads), the engine's
forward calls and token-forwards where the tree counts them, and a checksum of the scores; the
summary gives, per case, the median of each tree and each tree's ratio to the first tree, and, per
tree, the cached engine's speed-up over the naive one measured in the same round. The load average
of the machine before and after each case goes into the results file: on a shared machine, read the
ratios, not the seconds, and prefer CPU seconds with one thread (``OMP_NUM_THREADS=1``).
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
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = " Lindhaven"


# ---------------------------------------------------------------- worker (runs inside one tree)

def _worker() -> None:
    """Load the model, then answer one JSON request per line on stdin with one JSON line on stdout."""
    import torch

    import atman
    from atman import Explainer, load_model

    sys.path.insert(0, str(HERE))
    from speed import build_prompt

    lm = load_model()
    explainers: dict[str, object] = {}
    reply = {"atman": str(Path(atman.__file__).resolve().parent.parent), "threads": torch.get_num_threads()}
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        kind = request["kind"]
        if kind == "prompt":
            print(json.dumps({"prompt": build_prompt(lm.tokenizer, request["length"])}), flush=True)
            continue
        if kind == "plain":
            ids = torch.tensor([lm.tokenizer(request["prompt"] + TARGET)["input_ids"]])
            repeat = int(request.get("repeat", 5))

            def call(ids=ids, repeat=repeat):
                with torch.no_grad():
                    for _ in range(repeat):
                        logits = lm.model(input_ids=ids, use_cache=False).logits
                return [float(logits[0, -1].float().abs().sum())]

            engine = None
        elif kind == "cite":
            try:
                import numpy as np

                from atman.evaluate.citation import readout_logprobs
                from atman.evaluate.cite_data import invented_example
            except ImportError as exc:
                print(json.dumps({"unsupported": str(exc)}), flush=True)
                continue
            task = invented_example(request["seed"], n_sources=request["sources"]).task
            n = len(task.sources)
            rows = np.ones((n + 1, n), dtype=np.float32)
            rows[np.arange(1, n + 1), np.arange(n)] = 0.0

            def call(task=task, rows=rows):
                return np.asarray(readout_logprobs(lm, task, rows), dtype=np.float64).ravel().tolist()

            engine = None
        else:
            name = request["engine"]
            if name not in explainers:
                explainers[name] = Explainer(lm, engine=name)
            explainer = explainers[name]
            engine = getattr(explainer, "engine", None)
            engine = engine if hasattr(engine, "forward_calls") else None

            def call(explainer=explainer, request=request, kind=kind):
                exp = explainer.explain(request["prompt"], TARGET, granularity=kind)
                scores = exp.explanations[0].scores
                return [float(s) for s in (scores() if callable(scores) else scores)]

        calls = engine.forward_calls if engine is not None else None
        forwards = engine.token_forwards if engine is not None else None
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu, wall = time.process_time(), time.perf_counter()
        scores = call()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = resource.getrusage(resource.RUSAGE_SELF)
        result = {"wall": wall, "cpu": cpu, "user": after.ru_utime - usage.ru_utime,
                  "system": after.ru_stime - usage.ru_stime, "minor_faults": after.ru_minflt - usage.ru_minflt,
                  "involuntary_switches": after.ru_nivcsw - usage.ru_nivcsw,
                  "voluntary_switches": after.ru_nvcsw - usage.ru_nvcsw, "scores": scores}
        if engine is not None:
            result["forward_calls"] = engine.forward_calls - calls
            result["token_forwards"] = engine.token_forwards - forwards
        print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- driver

class Worker:
    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.label = _label(tree)
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], cwd=tree,
                                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self.read()
        if Path(self.info["atman"]) != tree.resolve():
            raise SystemExit(f"worker for {tree} imported atman from {self.info['atman']}")

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"worker for {self.tree} ended")
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def _label(tree: Path) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "atman"], cwd=tree,
                           capture_output=True, text=True).stdout.strip()
    return f"{commit}{'+changes' if dirty else ''} ({tree})"


def _max_difference(a: list[float], b: list[float]) -> float | None:
    if len(a) != len(b):
        return None
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def summarise(cases: list[dict], labels: list[str]) -> list[dict]:
    """Per case: each tree's median wall and CPU seconds and its ratio to the first tree's."""
    out = []
    for case in cases:
        if any(not case["runs"].get(label) for label in labels):
            out.append({"case": case["name"], "skipped": {k: v for k, v in case.get("unsupported", {}).items()}})
            continue
        row = {"case": case["name"], "trees": {}}
        first = case["runs"][labels[0]]
        for label in labels:
            runs = case["runs"][label]
            wall = statistics.median(r["wall"] for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            # ratios round by round (the same round of every tree ran back to back)
            wall_ratios = [r["wall"] / f["wall"] for r, f in zip(runs, first, strict=False)]
            cpu_ratios = [r["cpu"] / f["cpu"] for r, f in zip(runs, first, strict=False)]
            row["trees"][label] = {
                "wall": wall, "cpu": cpu,
                "wall_vs_first": statistics.median(wall_ratios), "cpu_vs_first": statistics.median(cpu_ratios),
                "forward_calls": runs[0].get("forward_calls"), "token_forwards": runs[0].get("token_forwards"),
                "max_score_difference_vs_first": _max_difference(runs[0]["scores"], first[0]["scores"]),
            }
        out.append(row)
    return out


def speedups(cases: list[dict], labels: list[str]) -> list[dict]:
    """Per tree and prompt: naive time / cached time, round by round, median."""
    by_name = {c["name"]: c for c in cases}
    out = []
    for case in cases:
        if not case["name"].endswith("/cached"):
            continue
        naive = by_name.get(case["name"][: -len("cached")] + "naive")
        if naive is None:
            continue
        for label in labels:
            cached_runs, naive_runs = case["runs"].get(label), naive["runs"].get(label)
            if not cached_runs or not naive_runs:
                continue
            out.append({
                "case": case["name"][: -len("/cached")], "tree": label,
                "wall": statistics.median(n["wall"] / c["wall"] for n, c in zip(naive_runs, cached_runs, strict=False)),
                "cpu": statistics.median(n["cpu"] / c["cpu"] for n, c in zip(naive_runs, cached_runs, strict=False)),
            })
    return out


def print_summary(summary: list[dict], gains: list[dict], labels: list[str]) -> None:
    print("\n| case | tree | wall (s) | CPU (s) | wall / first tree | CPU / first tree | calls | token-forwards "
          "| largest score difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in summary:
        if "skipped" in row:
            print(f"| {row['case']} | skipped: {row['skipped']} |")
            continue
        for label in labels:
            t = row["trees"][label]
            diff = t["max_score_difference_vs_first"]
            print(f"| {row['case']} | {label.split(' ')[0]} | {t['wall']:.2f} | {t['cpu']:.2f} | "
                  f"{t['wall_vs_first']:.3f} | {t['cpu_vs_first']:.3f} | {t['forward_calls'] or '—'} | "
                  f"{t['token_forwards'] or '—'} | {'—' if diff is None else f'{diff:.1e}'} |")
    if gains:
        print("\n| prompt | tree | naive / cached (wall) | naive / cached (CPU) |")
        print("|---|---|---|---|")
        for g in gains:
            print(f"| {g['case']} | {g['tree'].split(' ')[0]} | {g['wall']:.2f}x | {g['cpu']:.2f}x |")


def start_workers(trees: list[Path]) -> list[Worker]:
    """One worker per tree, labelled by its commit (numbered if two trees share one)."""
    workers = [Worker(t.resolve()) for t in trees]
    labels = [w.label for w in workers]
    if len(set(labels)) != len(labels):
        for i, worker in enumerate(workers):
            worker.label = f"{worker.label} #{i}"
    return workers


def cases(prompter: Worker, lengths: list[int], levels: list[str], engines: list[str], cite: list[int],
          cite_seed: int = 200, plain: int = 0) -> list[tuple[str, dict]]:
    """(name, request) of every case; ``prompter`` builds the prompts (the same text for every tree)."""
    out = []
    for length in lengths:
        prompt = prompter.ask({"kind": "prompt", "length": length})["prompt"]
        if plain:
            out.append((f"plain:{length}", {"kind": "plain", "prompt": prompt, "repeat": plain}))
        for level in levels:
            for engine in engines:
                out.append((f"{level}:{length}/{engine}", {"kind": level, "engine": engine, "prompt": prompt}))
    for sources in cite:
        out.append((f"cite:{sources}", {"kind": "cite", "sources": sources, "seed": cite_seed}))
    return out


def run_cases(workers: list[Worker], requests: list[tuple[str, dict]], reps: int,
              on_case: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every case, ``reps`` rounds, each round every tree in turn; ``on_case`` gets the cases done so far."""
    done = []
    for name, request in requests:
        case = {"name": name, "runs": {w.label: [] for w in workers}, "load_before": os.getloadavg()}
        for _ in range(reps):
            for worker in workers:
                result = worker.ask(request)
                if "unsupported" in result:
                    case.setdefault("unsupported", {})[worker.label] = result["unsupported"]
                    continue
                result["load"] = os.getloadavg()[0]
                case["runs"][worker.label].append(result)
                print(f"  {name:<22} {worker.label.split(' ')[0]:<16} wall {result['wall']:8.2f} s  "
                      f"cpu {result['cpu']:8.2f} s  (system {result['system']:.2f} s, "
                      f"{result['minor_faults']} faults)  load {result['load']:.1f}", flush=True)
        case["load_after"] = os.getloadavg()
        done.append(case)
        if on_case is not None:
            on_case(done)
    return done


def machine() -> dict:
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trees", type=Path, nargs="+", default=[Path(".")],
                        help="source trees (the first is the reference of the ratios)")
    parser.add_argument("--lengths", type=int, nargs="*", default=[64, 128, 256, 512])
    parser.add_argument("--levels", nargs="*", default=["token", "sentence"], choices=["token", "sentence"])
    parser.add_argument("--engines", nargs="+", default=["cached"], choices=["cached", "naive"])
    parser.add_argument("--cite", type=int, nargs="*", default=[], metavar="SOURCES",
                        help="readout citation of every source of an invented context of this many sentences")
    parser.add_argument("--cite-seed", type=int, default=200)
    parser.add_argument("--plain-repeat", type=int, default=0,
                        help="with N > 0, a plain:LENGTH case of N plain forward passes at every length")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every measurement here (rewritten after each case)")
    args = parser.parse_args()
    if args.worker:
        _worker()
        return
    workers = start_workers(args.trees)
    labels = [w.label for w in workers]
    print("trees:", *labels, sep="\n  ", flush=True)
    requests = cases(workers[-1], args.lengths, args.levels, args.engines, args.cite, args.cite_seed,
                     args.plain_repeat)
    meta = {"command": " ".join(sys.argv), **machine(), "threads": {w.label: w.info["threads"] for w in workers}}

    def write(done: list[dict]) -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**meta, "trees": labels, "cases": done,
                                             "summary": summarise(done, labels),
                                             "speedups": speedups(done, labels)}, indent=1))

    done = run_cases(workers, requests, args.reps, write)
    for worker in workers:
        worker.close()
    print_summary(summarise(done, labels), speedups(done, labels), labels)


if __name__ == "__main__":
    main()
