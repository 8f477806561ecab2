"""Scaling of Ray batches from 1 to 2 workers, each worker pinned to a core of its own.

    RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 python benchmarks/ray_scaling.py --requests 40
    python benchmarks/ray_scaling.py --report benchmarks/results/cpu-smollm2-ray-scaling.json

Starts one local Ray with as many CPUs as there are cores, then runs the same ``--requests``
invented-fact QA requests (SmolLM2, sentence granularity) through
:func:`atman.distributed.run_batch_on_ray` with 1 and with 2 workers of one thread each, in the order
1, 2, 2, 1 (``--rounds`` times), so that a drift of the machine's speed hits both sides alike. Each
worker process is pinned to a core of its own as soon as it starts (``sched_setaffinity``). Every run's
results are checked equal to the first run's.

Per run it records the time end to end (worker start and model load included) and the steady rate
(requests per second between the first and the last result), and what else the machine did meanwhile:
the cores kept busy by processes outside this benchmark's own process tree (system busy time minus
ours, sampled every half second). A run during which others kept more than ``--busy-limit`` cores busy
is marked ``loaded``; the summary gives the ratios of the quiet runs and, apart, of all runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

DEFAULT_OUTPUT = Path("benchmarks/results/cpu-smollm2-ray-scaling.json")


def requests(n: int, granularity: str) -> list[str]:
    from atman.evaluate.datasets import context_qa

    return [json.dumps({"prompt": ex.prompt, "target": ex.target, "granularity": granularity, "id": ex.id})
            for ex in context_qa(n, seed=1)]


class Watch:
    """While a run lasts: pins each new BatchWorker process of ours to the next free core, and measures the
    CPU time of the whole machine against that of this process and its descendants (Ray's processes)."""

    def __init__(self, cores: list[int]) -> None:
        self.cores = cores
        self.pinned: dict[int, int] = {}
        self.earlier: set[int] = set()  # worker processes of an earlier run, still exiting
        self.own: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    self.own[proc.pid] = cpu.user + cpu.system
                    name = (proc.cmdline() or [""])[0]
                if name.startswith("ray::BatchWorker") and proc.pid not in {*self.pinned, *self.earlier}:
                    proc.cpu_affinity([self._free_core()])
                    self.pinned[proc.pid] = proc.cpu_affinity()[0]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def _free_core(self) -> int:
        """The core with the fewest live workers pinned to it."""
        live = [core for pid, core in self.pinned.items() if psutil.pid_exists(pid)]
        return min(self.cores, key=live.count)

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            self._sample()

    def __enter__(self) -> Watch:
        me = psutil.Process()
        for proc in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if (proc.cmdline() or [""])[0].startswith("ray::BatchWorker"):
                    self.earlier.add(proc.pid)
        self._sample()
        self.own_start = sum(self.own.values())
        self.busy_start = self._busy()
        self.wall_start = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()
        wall = time.perf_counter() - self.wall_start
        own = sum(self.own.values()) - self.own_start
        busy = self._busy() - self.busy_start
        self.own_cores = own / wall
        self.other_cores = max(0.0, busy - own) / wall


def run(lines: list[str], workers: int, cores: list[int]) -> tuple[dict, list[dict]]:
    from atman.distributed import WorkerConfig, run_batch_on_ray

    stamps: list[float] = []

    def progress(done: int, total: int) -> None:
        if done:
            stamps.append(time.perf_counter())

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, Watch(cores) as watch:
        out = Path(tmp) / "out.jsonl"
        started = time.perf_counter()
        run_batch_on_ray(lines, WorkerConfig(model="smollm2"), out, workers=workers, threads_per_worker=1,
                         progress=progress)
        seconds = time.perf_counter() - started
        results = [json.loads(line) for line in out.read_text().splitlines()]
    record = {
        "workers": workers, "seconds": round(seconds, 2),
        "steady_requests_per_s": round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 4),
        "first_result_s": round(stamps[0] - started, 2),
        "pinned_cores": sorted(watch.pinned.values()),
        "own_busy_cores": round(watch.own_cores, 3), "other_busy_cores": round(watch.other_cores, 3),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    return record, results


def ratios(runs: list[dict]) -> dict | None:
    """Medians per number of workers and the 2-vs-1 ratios of ``runs`` (None without runs of both sizes)."""
    by_workers = {w: [r for r in runs if r["workers"] == w] for w in (1, 2)}
    if not all(by_workers.values()):
        return None
    out: dict = {"runs": len(runs)}
    for key, name in (("steady_requests_per_s", "steady"), ("seconds", "end_to_end")):
        one = statistics.median(r[key] for r in by_workers[1])
        two = statistics.median(r[key] for r in by_workers[2])
        out[f"{name}_1_worker"] = one
        out[f"{name}_2_workers"] = two
        out[f"scaling_2_vs_1_{name}"] = round(two / one if name == "steady" else one / two, 3)
    out["other_busy_cores_median"] = statistics.median(r["other_busy_cores"] for r in runs)
    return out


def summarise(runs: list[dict], busy_limit: float) -> dict:
    for record in runs:
        record["loaded"] = record["other_busy_cores"] > busy_limit
    quiet = [r for r in runs if not r["loaded"]]
    return {"quiet_runs": len(quiet), "loaded_runs": len(runs) - len(quiet),
            "all_runs": ratios(runs), "quiet_only": ratios(quiet)}


def format_table(report: dict) -> str:
    lines = ["| run | workers | pinned to cores | end to end (s) | first result (s) | steady (requests/s) | "
             "other processes (busy cores) | quiet |", "|---" * 8 + "|"]
    for i, r in enumerate(report["runs"], start=1):
        lines.append(f"| {i} | {r['workers']} | {', '.join(map(str, r['pinned_cores']))} | {r['seconds']:.1f} | "
                     f"{r['first_result_s']:.1f} | {r['steady_requests_per_s']:.3f} | {r['other_busy_cores']:.2f} | "
                     f"{'no' if r['loaded'] else 'yes'} |")
    lines.append("")
    for key, label in (("quiet_only", "the quiet runs"), ("all_runs", "all runs")):
        s = report["summary"][key]
        if s is None:
            lines.append(f"- {label}: no run of both sizes")
            continue
        lines.append(f"- {label} ({s['runs']}; other processes kept a median {s['other_busy_cores_median']:.2f} "
                     f"cores busy): 2 vs 1 worker steady {s['scaling_2_vs_1_steady']:.2f}x "
                     f"({s['steady_1_worker']:.3f} -> {s['steady_2_workers']:.3f} requests/s), end to end "
                     f"{s['scaling_2_vs_1_end_to_end']:.2f}x ({s['end_to_end_1_worker']:.1f} s -> "
                     f"{s['end_to_end_2_workers']:.1f} s)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--granularity", default="sentence")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the order 1, 2, 2, 1 workers this often")
    parser.add_argument("--busy-limit", type=float, default=0.25,
                        help="a run is 'loaded' when other processes kept more cores than this busy")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--report", type=Path, help="only print the table of a results file this wrote")
    args = parser.parse_args()
    if args.report:
        print(format_table(json.loads(args.report.read_text())))
        return
    import ray
    import torch

    cores = sorted(os.sched_getaffinity(0))
    lines = requests(args.requests, args.granularity)
    ray.init(address="local", num_cpus=len(cores), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    runs: list[dict] = []
    expected = None
    equal = True
    try:
        for _ in range(args.rounds):
            for workers in (1, 2, 2, 1):
                record, results = run(lines, workers, cores)
                expected = expected if expected is not None else results
                equal = equal and results == expected
                runs.append(record)
                print(json.dumps(record), flush=True)
    finally:
        ray.shutdown()
    report = {
        "benchmark": "benchmarks/ray_scaling.py", "requests": args.requests, "granularity": args.granularity,
        "model": "SmolLM2-135M-Instruct", "threads_per_worker": 1, "busy_limit": args.busy_limit,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "summary": summarise(runs, args.busy_limit), "runs": runs, "results_equal_across_runs": equal,
        "environment": {"cores": len(cores), "cpu": platform.processor() or platform.machine(),
                        "ray": ray.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(report))
    if not equal:
        raise SystemExit("the results differ between runs")


if __name__ == "__main__":
    main()
