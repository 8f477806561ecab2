"""Batches on Ray and the batch contract: the same results as one process, bad lines, resume, a killed
worker, order; one local Ray (2 CPUs) for the whole session (the two-node cluster test,
tests/test_ray_cluster.py, runs its cluster in a child process beside it)."""

from __future__ import annotations

import doctest
import importlib
import json
import os
import signal
import socket
import sys
import threading
import time

import psutil
import pytest

from atman import cli
from atman.batch import error_result, parse_line, request_id, run_batch, run_line, split_lines
from atman.distributed import WorkerConfig, explain_dataset, plan_workers, run_batch_on_ray

PROMPTS = [
    ("Ada lives in Oslo. Bo lives in Rome. Ada lives in", " Oslo"),
    ("Kira Denholm lives in Quillmere. Omar Pelle lives in Varn. Where does Kira live? In", " Quillmere"),
    ("The mill stands at Brackwater. The bees live on Quellmark. The mill stands at", " Brackwater"),
]
LINES = [
    json.dumps({"prompt": PROMPTS[0][0], "target": PROMPTS[0][1], "granularity": "sentence", "id": "ada"}),
    '{"prompt": 3, "id": 7}',
    "",
    json.dumps({"prompt": PROMPTS[1][0], "target": PROMPTS[1][1], "granularity": "sentence"}),
    "{not json",
    json.dumps({"prompt": PROMPTS[2][0], "target": PROMPTS[2][1], "granularity": "sentence"}),
]


@pytest.fixture(scope="session")
def local_results(smollm2):
    """The single-process batch of LINES, by line number."""
    import torch

    from atman import Explainer

    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker below: equal threads give bit-equal scores
    try:
        run_batch(Explainer(smollm2), LINES, results.append)
    finally:
        torch.set_num_threads(threads)
    return {r["line"]: r for r in results}


def test_batch_contract_echoes_id_and_line():
    assert error_result(ValueError("boom"), 4, "q") == {"error": "ValueError: boom", "line": 4, "id": "q"}
    assert request_id('{"prompt": "a", "id": 12}') == 12 and request_id("{bad") is None
    assert request_id('{"id": true}') is None
    assert "id" not in parse_line('{"prompt": "a b", "id": "x"}')
    assert run_line(None, '{"id": "x", "colour": "red"}', 9)["id"] == "x"
    assert split_lines("a\n\nb\r\n") == ["a", "", "b"]


def test_local_batch_results_carry_line_and_id(local_results):
    assert sorted(local_results) == [1, 2, 4, 5, 6]
    assert local_results[1]["id"] == "ada" and "explanations" in local_results[1]
    assert local_results[2] == {"error": "field 'prompt' has the wrong type (int)", "line": 2, "id": 7}
    assert "not valid JSON" in local_results[5]["error"]


def test_a_lone_surrogate_in_an_id_does_not_stop_the_output(tmp_path):
    """A JSON line may hold "\\ud800" (a lone UTF-16 surrogate, not encodable as UTF-8); its result
    echoes the id escaped, and the lines after it are still written."""
    import argparse

    from atman.cli.batch import run_requests

    out = tmp_path / "out.jsonl"
    lines = ['{"prompt": "a", "id": "\\ud800"}', '{"prompt": "b", "id": "caf\u00e9"}']
    args = argparse.Namespace(output=out, quiet=True, fail_fast=False)
    assert run_requests(lambda line: {"ok": parse_line(line)["prompt"]}, lines, args) == 0
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in written] == ["\ud800", "caf\u00e9"] and [r["ok"] for r in written] == ["a", "b"]
    assert "café" in out.read_text(encoding="utf-8")   # UTF-8 kept where it can be


@pytest.mark.parametrize("name", ["atman.batch", "atman.distributed.ray_data"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_worker_plan_defaults():
    assert plan_workers({"CPU": 2.0}) == plan_workers({"CPU": 2.0}, threads_per_worker=1)
    assert plan_workers({"CPU": 2.0}).workers == 2
    assert plan_workers({"CPU": 8.0}, threads_per_worker=4).workers == 2
    gpu = plan_workers({"CPU": 32.0, "GPU": 8.0}, gpus_per_worker=2)
    assert (gpu.workers, gpu.gpus) == (4, 2)
    with pytest.raises(ValueError, match="workers must be at least 1"):
        plan_workers({"CPU": 2.0}, workers=0)


def test_clear_errors(monkeypatch, tmp_path, capsys):
    # runs before the session's Ray starts: the CLI then connects on its own
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    requests = tmp_path / "in.jsonl"
    requests.write_text(LINES[0] + "\n")
    assert cli.main(["explain", "--input", str(requests), "--ray", "127.0.0.1:1", "-q"]) == 2
    assert "cannot reach a Ray cluster at '127.0.0.1:1'" in capsys.readouterr().err
    assert cli.main(["explain", "--input", str(requests), "--ray", "--resume", "-q"]) == 2
    assert "--resume needs an output file (-o)" in capsys.readouterr().err
    assert cli.main(["explain", "--input", str(requests), "--workers", "2", "-q"]) == 2
    assert "--workers applies to --ray batches" in capsys.readouterr().err
    assert cli.main(["evaluate", "--workers", "2", "-o", str(tmp_path)]) == 2
    assert "--workers and --threads-per-worker apply to --ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)
    assert cli.main(["explain", "--input", str(requests), "--ray", "-q"]) == 2
    assert 'Ray is not installed; install it with: pip install "atman[ray]"' in capsys.readouterr().err


def test_workers_import_this_checkout(ray_session):
    import atman

    where = ray_session.get(ray_session.remote(lambda: __import__("atman").__file__).remote())
    assert where == atman.__file__


def test_cli_on_ray_equals_the_local_batch_in_input_order(ray_session, local_results, tmp_path, capsys):
    requests = tmp_path / "in.jsonl"
    requests.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "out.jsonl"
    code = cli.main(["explain", "--input", str(requests), "-o", str(out), "--ray", "--workers", "2", "-q"])
    assert code == 1
    assert "2 of 5 lines failed" in capsys.readouterr().err
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in results] == [1, 2, 4, 5, 6]
    assert results == [local_results[r["line"]] for r in results]


def test_resume_runs_only_what_is_missing_and_bad_bytes_are_error_lines(ray_session, local_results, tmp_path):
    out = tmp_path / "out.jsonl"
    kept = dict(local_results[4], model="kept from the first run")
    # the input as the CLI reads it (bytes), with a line that is not UTF-8 and one nested too deeply to parse
    lines = [line.encode() for line in LINES] + [b'{"prompt": "Z\xfcrich"}', b'{"prompt":' + b"[" * 10_000 + b"]}"]
    # a finished result, an error object (tried again) and a line cut off by a killed run inside a character
    out.write_bytes(json.dumps(kept).encode() + b"\n" + json.dumps(error_result("lost", 6)).encode() + b"\n"
                    + '{"model": "Smo", "prompt": "Z\u00fc'.encode()[:-1])
    summary = run_batch_on_ray(lines, WorkerConfig(model="smollm2"), out, workers=1, threads_per_worker=1,
                               resume=True)
    assert (summary.requests, summary.failed, summary.kept, summary.answered) == (7, 4, 1, 6)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in results] == [1, 2, 4, 5, 6, 7, 8]
    assert results[2] == kept
    assert results[0] == local_results[1] and results[4] == local_results[6]
    assert results[5] == {"error": "not valid UTF-8: byte 0xfc at byte 14 of the line", "line": 7}
    assert results[6] == {"error": "not valid JSON: nested too deeply", "line": 8}


def _kill_first_worker_that_runs(killed: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if cmdline and cmdline[0].startswith("ray::BatchWorker.run"):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return
        time.sleep(0.05)


def test_a_killed_worker_costs_nothing_its_requests_are_retried(ray_session, local_results, capsys):
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_worker_that_runs, args=(killed, stop), daemon=True)
    killer.start()
    try:  # no output file: the results go to stdout, in input order
        summary = run_batch_on_ray(LINES, WorkerConfig(model="smollm2"), None, workers=1, threads_per_worker=1)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was seen running"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert summary.failed == 2  # the two bad lines only
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert results == [local_results[n] for n in (1, 2, 4, 5, 6)]


def assert_nested_close(got, expected, abs_tol: float = 1e-4) -> None:
    """Equal structure and strings; floats within ``abs_tol`` (the order of a sum may differ)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(expected)
        for key in expected:
            assert_nested_close(got[key], expected[key], abs_tol)
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert_nested_close(g, e, abs_tol)
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert got == pytest.approx(expected, abs=abs_tol)
    else:
        assert got == expected


def test_explain_dataset_with_a_baseline_method(ray_session, smollm2):
    from atman import Explainer
    from atman.batch import explain_request

    rows = [{"prompt": p, "target": t, "granularity": "sentence", "line": i} for i, (p, t) in enumerate(PROMPTS)]
    rows.append({"prompt": "", "target": " x", "granularity": "sentence", "line": 99})
    ds = ray_session.data.from_items(rows)
    out = explain_dataset(ds, WorkerConfig(model="smollm2", method="occlusion"), workers=2)
    got = {row["line"]: row for row in out.iter_rows()}
    assert sorted(got) == [0, 1, 2, 99]
    assert got[99]["error"] == "the prompt is empty"
    explainer = Explainer(smollm2)
    for i, (prompt, target) in enumerate(PROMPTS):
        local = explain_request(explainer, {"prompt": prompt, "target": target, "granularity": "sentence"},
                                "occlusion").to_dict()
        assert got[i]["error"] is None
        # a Ray worker runs torch on its one CPU, the local explainer on all: the same sums in another order
        assert_nested_close(json.loads(got[i]["result"]), dict(local, line=i))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic fields
def test_two_serve_replicas_answer_like_one_server(ray_session, smollm2):
    pytest.importorskip("fastapi")
    aa = pytest.importorskip("aleph_alpha_client")
    httpx = pytest.importorskip("httpx")
    from concurrent.futures import ThreadPoolExecutor

    from _server import serving
    from ray import serve

    from atman.distributed.serve import REPLICA_HEADER, application
    from atman.server import create_app

    request = aa.ExplanationRequest(prompt=aa.Prompt.from_text(PROMPTS[0][0]), target=PROMPTS[0][1],
                                    prompt_granularity=aa.PromptGranularity.Sentence)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each replica: equal threads give bit-equal scores
    try:
        with serving(create_app({"smollm2": smollm2})) as single:
            expected = aa.Client(token="unused", host=single, total_retries=0).explain(request, model="smollm2")
    finally:
        torch.set_num_threads(threads)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(application(["smollm2"], replicas=2, threads=1), route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        client = aa.Client(token="unused", host=base, total_retries=0)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: client.explain(request, model="smollm2"), range(4)))
            replicas = set(pool.map(lambda _: httpx.get(f"{base}/health").headers[REPLICA_HEADER], range(32)))
        assert len(replicas) == 2
        assert all(answer == expected for answer in answers)
    finally:
        serve.shutdown()


def test_evaluate_on_ray_reports_what_the_local_run_does(ray_session, smollm2):
    import torch

    from atman.distributed.evaluate import evaluate_runner
    from atman.evaluate.suite import SuiteConfig, run_suite

    config = SuiteConfig(qa=3, qa_facts=2, qa_granularities=("sentence",), squad=0, texts=1, max_new_tokens=4)
    methods = ["atman", "random"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_suite(smollm2, methods, config)
    finally:
        torch.set_num_threads(threads)
    seen = []
    spread = run_suite(smollm2, methods, config, on_record=seen.append,
                       runner=evaluate_runner(model="smollm2", workers=2, threads_per_worker=1))

    def untimed(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert len(local["records"]) == 2 * (3 + 1) and seen == spread["records"]
    assert untimed(spread["records"]) == untimed(local["records"])
    for kind in ("plausibility", "faithfulness"):
        assert spread["summary"][kind] == local["summary"][kind]


def test_serve_application_builder_arguments():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")
    from ray.serve import Application

    from atman.distributed.serve import build

    assert isinstance(build({"models": "smollm2", "replicas": "3", "threads": "1"}), Application)
    with pytest.raises(ValueError, match="unknown argument"):
        build({"replica": "2"})
    with pytest.raises(ValueError, match="bad argument"):
        build({"replicas": "two"})
