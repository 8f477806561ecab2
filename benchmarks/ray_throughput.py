"""Throughput of batches on Ray: the local batch against 1 and 2 Ray workers (1 thread each), same requests.

    RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 python benchmarks/ray_throughput.py --requests 50 --cpus 2

Starts one local Ray with ``--cpus`` CPUs, then runs the same ``--requests`` invented-fact QA requests
(SmolLM2, sentence granularity) three ways, one after the other in this one run: the local batch of
``atman explain --input`` (:func:`atman.batch.run_batch`, one thread, model load included), and
:func:`atman.distributed.run_batch_on_ray` with 1 and with 2 workers of 1 thread each (actor start and
model load included). Prints the ratios, end to end and in the steady state (requests per second between
the first and the last result, i.e. without start-up and model loads), and writes JSON to ``--output``.
Every run's results are checked equal to the local batch's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import psutil
import ray
import torch

from atman import Explainer, load_model
from atman.batch import run_batch
from atman.distributed import WorkerConfig, run_batch_on_ray
from atman.evaluate.datasets import context_qa


def requests(n: int, granularity: str) -> list[str]:
    return [json.dumps({"prompt": ex.prompt, "target": ex.target, "granularity": granularity, "id": ex.id})
            for ex in context_qa(n, seed=1)]


def steady(stamps: list[float]) -> float:
    """Requests per second between the first and the last result (start-up and model loads left out)."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def local(lines: list[str]) -> tuple[float, float, list[float], list[dict]]:
    torch.set_num_threads(1)
    started = time.perf_counter()
    explainer = Explainer(load_model("smollm2"))
    loaded = time.perf_counter()
    results: list[dict] = []
    stamps: list[float] = []
    run_batch(explainer, lines, lambda result: (results.append(result), stamps.append(time.perf_counter())))
    return time.perf_counter() - started, loaded - started, stamps, results


def on_ray(lines: list[str], workers: int) -> tuple[float, list[float], list[dict]]:
    stamps: list[float] = []

    def progress(done: int, total: int) -> None:
        if done:
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        started = time.perf_counter()
        run_batch_on_ray(lines, WorkerConfig(model="smollm2"), out, workers=workers, threads_per_worker=1,
                         progress=progress)
        seconds = time.perf_counter() - started
        return seconds, stamps, [json.loads(line) for line in out.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--granularity", default="sentence")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/cpu-smollm2-ray.json"))
    args = parser.parse_args()
    lines = requests(args.requests, args.granularity)
    load_before = os.getloadavg()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        local_s, load_s, local_t, expected = local(lines)
        print(f"local batch: {local_s:.1f} s ({load_s:.1f} s of it loading the model)", flush=True)
        one_s, one_t, one = on_ray(lines, 1)
        print(f"ray, 1 worker: {one_s:.1f} s", flush=True)
        two_s, two_t, two = on_ray(lines, 2)
        print(f"ray, 2 workers: {two_s:.1f} s", flush=True)
    finally:
        ray.shutdown()
    equal = one == expected and two == expected
    report = {
        "requests": args.requests, "granularity": args.granularity, "model": "SmolLM2-135M-Instruct",
        "seconds": {"local": round(local_s, 2), "local_model_load": round(load_s, 2),
                    "ray_1_worker": round(one_s, 2), "ray_2_workers": round(two_s, 2)},
        "steady_requests_per_s": {"local": round(steady(local_t), 4), "ray_1_worker": round(steady(one_t), 4),
                                  "ray_2_workers": round(steady(two_t), 4)},
        "ray_overhead": round(one_s / local_s - 1, 3),
        "ray_overhead_steady": round(steady(local_t) / steady(one_t) - 1, 3),
        "scaling_2_vs_1": round(one_s / two_s, 3),
        "scaling_2_vs_1_steady": round(steady(two_t) / steady(one_t), 3),
        "results_equal_to_local": equal,
        "environment": {"cpus": psutil.cpu_count(), "ray_cpus": args.cpus, "ray": ray.__version__,
                        "torch": torch.__version__, "python": platform.python_version(),
                        "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_after": [round(x, 2) for x in os.getloadavg()]},
    }
    print(json.dumps(report, indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    if not equal:
        raise SystemExit("the Ray results differ from the local batch's")


if __name__ == "__main__":
    main()
