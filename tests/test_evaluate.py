"""The evaluation suite: datasets, metrics (hand-computed values), a tiny run, reports and the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from atman.evaluate.context_qa import make_examples
from atman.evaluate.datasets import context_qa, python_texts, squad_examples
from atman.evaluate.metrics import curve_steps, faithfulness, plausibility, summarize
from atman.evaluate.report import paired, render_markdown, verdict, write_report
from atman.evaluate.suite import SuiteConfig, run_suite
from atman.units import text_spans

ROOT = Path(__file__).resolve().parents[1]


def test_plausibility_by_hand():
    # ranking: 2.0 (gold), 1.0, 0.5 (gold), -1.0 -> AP = (1/1 + 2/3) / 2
    m = plausibility([1.0, 2.0, -1.0, 0.5], [False, True, False, True])
    assert m["ap"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["precision"] == pytest.approx(2.5 / 3.5)
    assert m["recall"] == pytest.approx((1.0 + 0.25) / 2)
    assert m["top1"] == 1.0
    # equal scores: ties keep text order, so nothing is gained by scoring everything alike
    assert plausibility([0.0, 0.0, 0.0], [False, False, True]) == {"ap": 1 / 3, "precision": 0.0, "recall": 0.0,
                                                                   "top1": 0.0}
    with pytest.raises(ValueError, match="gold"):
        plausibility([1.0, 2.0], [False, False])
    with pytest.raises(ValueError, match="same length"):
        plausibility([1.0], [True, False])


def test_faithfulness_by_hand():
    assert curve_steps(6) == [1, 2, 4, 5]
    assert curve_steps(2) == [1]
    assert curve_steps(1) == []
    full = -1.0
    morf = {1: -3.0, 2: -5.0}
    lerf = {1: -1.5, 2: -2.0}
    m = faithfulness(full, morf, lerf, [1, 2], 3)
    assert m["aopc_morf"] == pytest.approx(3.0)
    assert m["aopc_lerf"] == pytest.approx(0.75)
    assert m["abpc"] == pytest.approx(2.25)
    # keeping the top 1 of 3 = deleting the bottom 2; keeping the top 2 = deleting the bottom 1
    assert m["insertion"] == pytest.approx(((-2.0 + 1.0) + (-1.5 + 1.0)) / 2)


def test_summaries_and_verdicts():
    s = summarize([0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    assert s["mean"] == pytest.approx(0.75) and s["low"] <= 0.75 <= s["high"] and s["n"] == 8
    assert s["iqm"] == pytest.approx(1.0)
    assert summarize([2.0, 2.0]) == {"n": 2, "mean": 2.0, "iqm": 2.0, "low": 2.0, "high": 2.0}
    assert verdict({"low": 0.1, "high": 0.3}, "ap") == "better"
    assert verdict({"low": 0.1, "high": 0.3}, "aopc_lerf") == "worse"
    assert verdict({"low": -0.1, "high": 0.3}, "ap") == "tie"


def test_datasets():
    squad = squad_examples()
    assert len(squad) == 5
    for ex in squad:
        (start, end), = ex.gold
        assert ex.prompt[start:end] == ex.target.strip() and ex.prompt.endswith("\nAnswer:")
    qa = context_qa(6, seed=3, facts=3)
    assert qa == context_qa(6, seed=3, facts=3)
    for ex in qa:
        (start, end), = ex.gold
        assert ex.target.strip() in ex.prompt[start:end]
        assert (start, end) in text_spans(ex.prompt, "sentence")
    texts = python_texts(4)
    assert len(texts) == 4 and all(len(text_spans(t.prompt, "sentence")) >= 3 for t in texts)
    assert texts[0].prompt.startswith("Beautiful is better than ugly.")


def test_context_qa_is_the_same_in_every_process():
    code = "from atman.evaluate.context_qa import make_examples; print(make_examples(3, seed=5)[2].prompt)"
    runs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert len(runs) == 1 and make_examples(3, seed=5)[2].prompt + "\n" in runs
    extended = make_examples(40, seed=0, extended=True)
    assert any("married" in ex.prompt or "sails" in ex.prompt or "bakery" in ex.prompt for ex in extended)


@pytest.mark.slow
def test_tiny_suite_run_and_report(smollm2, tmp_path, monkeypatch):
    # a method that cannot run (AttnLRP without lxt's environment) is reported, not fatal
    monkeypatch.setenv("ATMAN_LXT_PYTHON", str(tmp_path / "no-such-env" / "bin" / "python"))
    config = SuiteConfig(qa=2, squad=1, squad_granularities=("sentence",), texts=1,
                         qa_granularities=("sentence",), max_new_tokens=3)
    result = run_suite(smollm2, ["occlusion", "random", "attnlrp"], config)
    methods = {r["method"] for r in result["records"]}
    assert methods == {"occlusion", "random"} and "attnlrp" in result["unavailable"]
    # 2 QA + 1 SQuAD + 1 text, one granularity each, two methods
    assert len(result["records"]) == 8
    qa = result["summary"]["plausibility"]["qa"]["sentence"]
    assert set(qa["occlusion"]) == {"ap", "precision", "recall", "top1"}
    texts = result["summary"]["faithfulness"]["texts"]["sentence"]
    assert set(texts["random"]) == {"aopc_morf", "aopc_lerf", "abpc", "insertion"}
    for r in result["records"]:
        m = r["metrics"]
        assert m["abpc"] == pytest.approx(m["aopc_morf"] - m["aopc_lerf"])
    diffs = paired(result["records"], "occlusion")
    assert set(diffs["plausibility"]["qa"]["sentence"]) == {"random"}
    markdown = render_markdown(result, reference="occlusion")
    assert "## Plausibility: qa, sentence units" in markdown and "`random`" in markdown and "attnlrp" in markdown
    md, js = write_report(result, tmp_path, reference="occlusion", command="atman evaluate")
    assert json.loads(js.read_text())["records"] == result["records"] and md.exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atman.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_evaluate_command_rejects_bad_options(tmp_path):
    bad = _cli("evaluate", "--methods", "gradcam", "-o", str(tmp_path))
    assert bad.returncode == 2 and "unknown method" in bad.stderr
    both = _cli("evaluate", "--methods", "atman", "--ablations", "-o", str(tmp_path))
    assert both.returncode == 2 and "not both" in both.stderr
    grans = _cli("evaluate", "--granularities", "paragraph", "-o", str(tmp_path))
    assert grans.returncode == 2 and "--granularities" in grans.stderr


@pytest.mark.slow
def test_evaluate_command_writes_reports(tmp_path):
    run = _cli("evaluate", "--qa", "1", "--squad", "0", "--texts", "1", "--granularities", "sentence",
               "--methods", "atman:multiplier=0.0+mode=log-additive,random", "-o", str(tmp_path), "--name", "r", "-q")
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["methods"] == ["atman:multiplier=0.0,mode=log-additive", "random"]
    assert "atman:multiplier=0.0,mode=log-additive" in (tmp_path / "r.md").read_text()
    # the log starts with the environment that made it; a merge names that machine, not the merging one
    log = (tmp_path / "r.records.jsonl").read_text().splitlines()
    assert json.loads(log[0]) == {"environment": result["environment"]}
    made_elsewhere = {"torch": "2.11.0+cu130", "python": "3.12.3", "machine": "x86_64", "threads": 16}
    (tmp_path / "gpu.records.jsonl").write_text("\n".join([json.dumps({"environment": made_elsewhere})] + log[1:]))
    (tmp_path / "old.records.jsonl").write_text("\n".join(log[1:]))   # a log from before the header
    for name, expected in (("gpu", made_elsewhere), ("old", dict.fromkeys(made_elsewhere, "not recorded"))):
        merged = _cli("evaluate", "--methods", "atman:multiplier=0.0+mode=log-additive,random", "--merge",
                      str(tmp_path / f"{name}.records.jsonl"), "-o", str(tmp_path), "--name", f"m-{name}", "-q")
        assert merged.returncode == 0, merged.stderr
        report = json.loads((tmp_path / f"m-{name}.json").read_text())
        assert report["environment"] == expected and report["records"] == result["records"]
        said = "machine not recorded" if name == "old" else f"torch {expected['torch']}, {expected['threads']} threads"
        assert said in (tmp_path / f"m-{name}.md").read_text()


@pytest.mark.slow
def test_explain_command_with_a_baseline_method():
    run = _cli("explain", "Ada lives in Oslo. Bo lives in Rome. Ada lives in", "-t", " Oslo", "-g", "sentence",
               "--method", "occlusion", "-f", "json", "-q")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["settings"]["method"] == "occlusion"
    assert [i["text"] for i in data["explanations"][0]["items"]] == ["Ada lives in Oslo.", "Bo lives in Rome.",
                                                                    "Ada lives in"]
    refine = _cli("explain", "Ada lives in Oslo.", "-t", " x", "-g", "refine", "--method", "random", "-q")
    assert refine.returncode == 2 and "AtMan only" in refine.stderr


def test_a_text_the_model_ends_at_once_is_left_out_not_fatal(monkeypatch):
    from atman.errors import EmptyInputError
    from atman.evaluate import suite

    texts = python_texts(3)

    class Generator:
        def __init__(self, lm):
            pass

        def generate(self, prompt, max_new_tokens):
            if prompt == texts[1].prompt:
                raise EmptyInputError("the model generated no text after this prompt")
            return [5, 6]

    monkeypatch.setattr(suite, "Explainer", Generator)
    skipped = {}
    items = SuiteConfig(qa=0, squad=0, texts=3).datasets(object(), skipped)
    assert [ex.id for _, ex, _ in items] == [texts[0].id, texts[2].id]
    assert items[0][1].target == (5, 6)
    assert skipped == {texts[1].id: "the model generated no text after this prompt"}
    result = {"model": "m", "methods": ["atman"], "skipped": skipped, "config": asdict(SuiteConfig()),
              "environment": {"torch": "x", "threads": 1, "machine": "x"}, "seconds": 1.0,
              "summary": {"plausibility": {}, "faithfulness": {}, "seconds": {}}, "records": []}
    assert f"example `{texts[1].id}` left out" in render_markdown(result)


def test_quick_runs_integrated_gradients_with_fewer_steps():
    from argparse import Namespace

    from atman.cli.evaluate import QUICK_IG, methods
    from atman.evaluate.suite import DEFAULT_METHODS

    quick = methods(Namespace(methods=None, ablations=False, quick=True))
    assert QUICK_IG in quick and "integrated-gradients" not in quick and len(quick) == len(DEFAULT_METHODS)
    assert methods(Namespace(methods=None, ablations=False, quick=False)) == list(DEFAULT_METHODS)
    assert methods(Namespace(methods="integrated-gradients", ablations=False, quick=True)) == ["integrated-gradients"]


def test_time_left_learns_from_the_finished_records_of_each_method():
    from atman.evaluate.suite import TimeLeft

    pending = [("atman", "qa", "token", 100), ("random", "qa", "token", 100),
               ("atman", "squad", "token", 300), ("random", "squad", "token", 300),
               ("atman", "squad", "sentence", 50)]
    left = TimeLeft(pending)
    assert left.seconds() is None
    left.finished(10.0)
    # nothing finished of `random` yet: it counts at the mean of what finished (10 s)
    assert left.seconds() == pytest.approx(10.0 + 30.0 + 10.0 + 5.0)
    left.finished(0.5)
    # `random` now has a rate of its own (0.005 s per unit of size); atman's sentence job takes its token rate
    assert left.seconds() == pytest.approx(30.0 + 1.5 + 5.0)
    left.finished(27.0)
    left.finished(1.5)
    # no atman record at sentence level yet: every atman record gives its rate, (10 + 27) s over 400
    assert left.seconds() == pytest.approx(50 * (10.0 + 27.0) / 400)
    left.finished(4.0)
    assert left.seconds() == 0.0


def test_time_per_method_is_summed_reported_and_printed():
    from atman.cli.evaluate import method_table, time_left
    from atman.evaluate.report import time_table
    from atman.evaluate.suite import method_seconds

    records = [{"method": "atman", "seconds": 2.0}, {"method": "random", "seconds": 0.25},
               {"method": "atman", "seconds": 4.0}, {"method": "random", "seconds": 0.25}]
    per_method = method_seconds(records)
    assert per_method == {"atman": {"explanations": 2, "seconds": 6.0}, "random": {"explanations": 2, "seconds": 0.5}}
    assert time_table(per_method)[4:] == ["| `atman` | 2 | 6.0 | 3.00 | 92 % |", "| `random` | 2 | 0.5 | 0.25 | 8 % |"]
    printed = method_table({"method_seconds": per_method}).splitlines()
    assert printed[1].split() == ["atman", "2", "6.0", "92%"] and printed[2].split() == ["random", "2", "0.5", "8%"]
    assert [time_left(s) for s in (None, 0.4, 59.6, 61)] == [
        "estimating the time left", "about 0 s left", "about 1 min 0 s left", "about 1 min 1 s left"]


def test_the_methods_of_a_job_run_each_deletion_sequence_once(smollm2, monkeypatch):
    from atman.baselines import get_method
    from atman.evaluate import suite

    config = SuiteConfig(qa=1, qa_facts=2, qa_granularities=("sentence",), squad=0, texts=0)
    job = config.jobs(smollm2)[0]
    methods = {spec: get_method(spec, smollm2) for spec in ("occlusion", "random", "random:seed=1")}
    alone = [suite.score_job(smollm2, job, spec, method) for spec, method in methods.items()]
    asked: list[tuple[int, ...]] = []
    real = suite.sequence_logprobs

    def counting(lm, sequences, n_target):
        asked.extend(tuple(s) for s in sequences)
        return real(lm, sequences, n_target)

    monkeypatch.setattr(suite, "sequence_logprobs", counting)
    shared = list(suite.run_jobs(smollm2, [job], methods))
    # every sequence once: the unperturbed one (and any deletion two methods share) is not run again
    assert len(asked) == len(set(asked))
    assert asked.count(tuple(suite.encode(smollm2.tokenizer, job.example.prompt, job.example.target).input_ids)) == 1
    for a, b in zip(alone, shared, strict=True):
        assert a["metrics"].keys() == b["metrics"].keys()
        for key in a["metrics"]:
            assert b["metrics"][key] == pytest.approx(a["metrics"][key], abs=1e-4)
