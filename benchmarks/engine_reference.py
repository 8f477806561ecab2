"""The engine against a pinned reference commit's stored numbers: a regression shows up in review.

    python benchmarks/engine_reference.py                 # this tree against the stored numbers
    python benchmarks/engine_reference.py --record        # measure the references beside this tree, store them

The stored numbers are in ``benchmarks/results/engine-reference.json``. Each case (token and
sentence level at 64-512 tokens, the naive engine, readout citation of 120 sources) was measured
with ``--record`` in the pinned reference commit's tree and in the tree of the day, side by side in
one run (A B A B, :mod:`engine_compare`'s workers, one torch thread each), together with a plain
forward pass of the same model at each length. A plain pass is pure transformers and torch, the
same in every tree, so ``case CPU seconds / plain CPU seconds`` says how fast the engine is in
units of the machine it ran on: that is what is stored and compared, not seconds.

Without ``--record`` only this tree runs (every case ``--reps`` times, plain passes beside); each
case prints its normalised cost, the reference's, their ratio, and ``slower`` where this tree costs
more than ``--tolerance`` (default 10 %) over the reference. The references: commit b26aeaa
(2026-11-26, the engine of docs/performance.md's main table) for explanations, and 981674a (the
shared-prefix attention that made readout citation 0.68x cheaper) for citation, which b26aeaa lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from engine_compare import cases, machine, run_cases, start_workers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STORED = HERE / "results" / "engine-reference.json"
REFERENCE = "b26aeaa"
CITE_REFERENCE = "981674a"
LENGTHS = [64, 128, 256, 512]
# (level, lengths, engines): token level where it runs in minutes, sentence level at every length
EXPLAIN = [("token", [64, 128, 256], ["cached"]), ("token", [64, 128], ["naive"]),
           ("sentence", [256, 512], ["cached"])]
CITE_SOURCES = 120
# the plain pass that normalises a citation case (its context is 2,759 tokens; any fixed length will do)
CITE_PLAIN = 512
PLAIN_REPEAT = 5


def worktree(commit: str) -> Path:
    """A checkout of ``commit`` under /tmp (made with ``git worktree add`` when missing)."""
    path = Path("/tmp") / f"atman-{commit}"
    if not (path / "atman").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def requests(prompter) -> list[tuple[str, dict]]:
    out = cases(prompter, LENGTHS, [], [], [], plain=PLAIN_REPEAT)
    for level, lengths, engines in EXPLAIN:
        out += cases(prompter, lengths, [level], engines, [])
    return out


def cite_requests(prompter) -> list[tuple[str, dict]]:
    return cases(prompter, [], [], [], [CITE_SOURCES])


def normalised(done: list[dict], label: str) -> dict[str, dict]:
    """Per case of tree ``label``: median CPU seconds, the plain pass's, and their ratio."""
    plain = {}
    for case in done:
        if case["name"].startswith("plain:") and case["runs"].get(label):
            length = int(case["name"].split(":")[1])
            plain[length] = statistics.median(r["cpu"] for r in case["runs"][label]) / PLAIN_REPEAT
    out = {}
    for case in done:
        runs = case["runs"].get(label)
        if case["name"].startswith("plain:") or not runs:
            continue
        length = CITE_PLAIN if case["name"].startswith("cite:") else int(case["name"].split(":")[1].split("/")[0])
        cpu = statistics.median(r["cpu"] for r in runs)
        out[case["name"]] = {"cpu": cpu, "plain_cpu": plain[length], "in_plain_passes": cpu / plain[length],
                             "token_forwards": runs[0].get("token_forwards"),
                             "forward_calls": runs[0].get("forward_calls"), "runs": len(runs)}
    return out


def side_by_side(done: list[dict], reference: str, current: str) -> dict[str, float]:
    """Per case: current CPU / reference CPU, round by round (the rounds ran back to back), median."""
    out = {}
    for case in done:
        ref, cur = case["runs"].get(reference), case["runs"].get(current)
        if ref and cur:
            out[case["name"]] = statistics.median(c["cpu"] / r["cpu"] for c, r in zip(cur, ref, strict=False))
    return out


def record(reps: int) -> None:
    stored = {"command": " ".join(["python", "benchmarks/engine_reference.py", *sys.argv[1:]]), **machine(),
              "references": {}}
    for commit, make in ((REFERENCE, requests), (CITE_REFERENCE, cite_requests)):
        workers = start_workers([worktree(commit), ROOT])
        reference, current = (w.label for w in workers)
        print(f"reference {reference} beside {current}", flush=True)
        todo = make(workers[-1])
        if make is cite_requests:
            todo = cases(workers[-1], [CITE_PLAIN], [], [], [], plain=PLAIN_REPEAT) + todo
        done = run_cases(workers, todo, reps)
        for worker in workers:
            worker.close()
        stored["references"][commit] = {
            "tree": reference, "beside": current, "cases": normalised(done, reference),
            "beside_cases": normalised(done, current),
            "beside_over_reference_cpu": side_by_side(done, reference, current),
            "load": [case["load_before"][0] for case in done] + [done[-1]["load_after"][0]],
        }
        STORED.write_text(json.dumps(stored, indent=1))
    print(f"wrote {STORED}")


def check(reps: int, tolerance: float) -> int:
    stored = json.loads(STORED.read_text())
    workers = start_workers([ROOT])
    label = workers[0].label
    todo = requests(workers[0]) + cite_requests(workers[0])
    done = run_cases(workers, todo, reps)
    workers[0].close()
    now = normalised(done, label)
    print(f"\nthis tree: {label}; stored: {STORED.relative_to(ROOT)} ({stored['started']}); load "
          f"{os.getloadavg()[0]:.1f} now")
    print("\n| case | reference | reference (plain passes) | this tree (plain passes) | this / reference | |")
    print("|---|---|---|---|---|---|")
    slower = 0
    for name, entry in now.items():
        commit = CITE_REFERENCE if name.startswith("cite:") else REFERENCE
        ref = stored["references"][commit]["cases"].get(name)
        if ref is None:
            print(f"| {name} | {commit} | — | {entry['in_plain_passes']:.1f} | — | not stored |")
            continue
        ratio = entry["in_plain_passes"] / ref["in_plain_passes"]
        flag = "slower" if ratio > 1 + tolerance else ""
        slower += bool(flag)
        print(f"| {name} | {commit} | {ref['in_plain_passes']:.1f} | {entry['in_plain_passes']:.1f} | "
              f"{ratio:.3f} | {flag} |")
    result = HERE / "results" / "engine-reference-check.json"
    result.write_text(json.dumps({"command": " ".join(sys.argv), **machine(), "tree": label, "cases": now,
                                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    print(f"\n{slower} case(s) slower than the reference by more than {tolerance:.0%}; wrote {result}")
    return 1 if slower else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="measure the references beside this tree and store")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.10)
    args = parser.parse_args()
    # one thread: CPU seconds are then nearly independent of what else the machine runs
    os.environ["OMP_NUM_THREADS"] = "1"
    if args.record:
        record(args.reps)
        return
    sys.exit(check(args.reps, args.tolerance))


if __name__ == "__main__":
    main()
