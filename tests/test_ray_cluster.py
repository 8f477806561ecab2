"""A batch on a two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and two worker raylets on this
machine, one worker actor placed on each): its results equal the local batch's, and a node removed in
the middle of a batch loses no line and duplicates none.

The driver of a Ray cluster is the whole process (``ray.init`` is global), and the suite shares one local
Ray (tests/test_ray.py): the cluster therefore runs in a child process (this file run as a script), with
its own Ray temp directory so that no other ``ray.init()`` on the machine finds it. The model is a tiny
random-init Llama with SmolLM2's tokenizer, saved as a directory that every node loads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

# a request's units: three sentences; 24 requests keep both workers busy for a few seconds
NAMES = ["Ada", "Bo", "Kira", "Omar", "Tamsin", "Doran", "Mirela", "Lin"]
PLACES = ["Oslo", "Rome", "Quillmere", "Varn", "Lindhaven", "Brackwater"]


def batch_lines() -> list[str]:
    lines = []
    for i in range(24):
        who, other = NAMES[i % len(NAMES)], NAMES[(i + 3) % len(NAMES)]
        here, there = PLACES[i % len(PLACES)], PLACES[(i + 1) % len(PLACES)]
        prompt = f"{who} lives in {here}. {other} lives in {there}. Where does {who} live? {who} lives in"
        lines.append(json.dumps({"prompt": prompt, "target": f" {here}", "granularity": "sentence", "id": i}))
    lines.insert(5, '{"prompt": 3}')  # a bad line: the same error object on both paths
    return lines


# --- the child process: the cluster and its batches ----------------------------------------------------------


def _worker_pids(node) -> list[int]:
    """The BatchWorker processes of a cluster node (children of its raylet)."""
    import psutil
    from ray._private import ray_constants

    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    return [p.pid for p in raylet.children(recursive=True) if (p.cmdline() or [""])[0].startswith("ray::BatchWorker")]


def run_cluster(model: str, requests: Path, out: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from atman.distributed import WorkerConfig, run_batch_on_ray

    lines = requests.read_text().splitlines()
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    report: dict = {"cluster_start_s": round(time.perf_counter() - started, 2)}
    try:
        report["nodes_with_cpus"] = sorted(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
        config = WorkerConfig(model=model)
        busy: list[float] = []

        def watch(done: int, total: int) -> None:
            if done == 1:  # both workers have loaded the model and run: every CPU of the cluster is taken
                busy.append(ray.available_resources().get("CPU", 0.0))

        t = time.perf_counter()
        both = run_batch_on_ray(lines, config, out / "both.jsonl", workers=2, threads_per_worker=1, progress=watch)
        report["both"] = {"seconds": round(time.perf_counter() - t, 2), "failed": both.failed,
                          "retried": both.retried, "free_cpus_at_first_result": busy[0]}

        # the second batch loses node 2 after its first result: its worker is stopped (so that it holds
        # the requests it was given), then the node's processes are killed and the node leaves the cluster
        first = threading.Event()
        removed: list[float] = []

        def remove_second_node() -> None:
            first.wait()
            pids = _worker_pids(nodes[1])
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            time.sleep(0.5)  # the driver hands the stopped worker its next request
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            cluster.remove_node(nodes[1])
            removed.append(len(pids))

        remover = threading.Thread(target=remove_second_node, daemon=True)
        remover.start()
        t = time.perf_counter()
        lost = run_batch_on_ray(lines, config, out / "removed.jsonl", workers=2, threads_per_worker=1,
                                progress=lambda done, total: done and first.set())
        remover.join(timeout=60)
        report["removed"] = {"seconds": round(time.perf_counter() - t, 2), "failed": lost.failed,
                             "retried": lost.retried, "workers_killed": removed[0] if removed else 0,
                             "alive_nodes_after": sum(n["Alive"] for n in ray.nodes())}
    finally:
        ray.shutdown()
        cluster.shutdown()
    report["total_s"] = round(time.perf_counter() - started, 2)
    return report


if __name__ == "__main__":
    model_dir, requests_path, out_dir = sys.argv[1:4]
    result = run_cluster(model_dir, Path(requests_path), Path(out_dir))
    (Path(out_dir) / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(0)


# --- the test: the child's results against the local batch ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(smollm2, tmp_path_factory) -> Path:
    from conftest import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=len(smollm2.tokenizer), max_position_embeddings=256).save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    return folder


def _local(model_dir: Path, lines: list[str]) -> list[dict]:
    import torch

    from atman import Explainer, load_model
    from atman.batch import run_batch

    results: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker: equal threads give bit-equal scores
    try:
        run_batch(Explainer(load_model(str(model_dir))), lines, results.append)
    finally:
        torch.set_num_threads(threads)
    return results


def test_two_nodes_equal_the_local_batch_and_a_lost_node_loses_no_line(tiny_dir, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    lines = batch_lines()
    requests = tmp_path / "in.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    local = _local(tiny_dir, lines)
    assert [r["line"] for r in local] == list(range(1, len(lines) + 1)) and "error" in local[5]

    # a short private temp dir: Ray's socket paths must stay under 108 characters
    ray_tmp = tempfile.mkdtemp(prefix="atman-ray-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    child = subprocess.run([sys.executable, __file__, str(tiny_dir), str(requests), str(tmp_path)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(report))  # the cost, for the record (pytest -s)

    assert report["nodes_with_cpus"] == [0, 1, 1]  # the head (the driver only) and two one-CPU nodes
    assert report["both"]["free_cpus_at_first_result"] == 0  # one worker on each node
    for name in ("both.jsonl", "removed.jsonl"):
        results = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert [r["line"] for r in results] == [r["line"] for r in local], name  # every line once, in order
        assert results == local, name
    assert report["both"]["retried"] == 0
    assert report["removed"]["workers_killed"] == 1 and report["removed"]["alive_nodes_after"] == 2
    assert report["removed"]["retried"] >= 1  # the lost node held requests; they ran on the other node
    assert report["removed"]["failed"] == report["both"]["failed"] == 1
