"""The real-document split, the metrics beyond ContextCite's, the question bootstrap, the docs tables; the
AttriBoT port and AT2 on the harness's sources."""

from __future__ import annotations

import numpy as np
import pytest

from atman.errors import AtmanError
from atman.evaluate.citation import CitationTask, ResponseScorer, Sources, leave_one_out
from atman.evaluate.cite_real import (
    average_precision,
    hits,
    loo_outliers,
    reliance,
    render,
    shortest,
    split,
    summarise,
)
from tests.conftest import have


def test_the_splits_share_no_question_and_cover_every_set():
    dev, test = split("dev"), split("test")
    assert len(dev) + len(test) == 60
    assert not {d.question_id for d in dev} & {d.question_id for d in test}
    assert {d.set for d in dev} == {d.set for d in test} == {"wikihop", "squad", "quoref", "drop", "quac"}
    for documents in (dev, test):   # all three positions of a question stay together
        assert all(sum(d.question_id == q.question_id for d in documents) == 3 for q in documents)
    one = shortest(test)
    assert len(one) == len({d.question_id for d in test})
    assert all(d.context_tokens <= e.context_tokens for d in one for e in test if e.question_id == d.question_id)
    with pytest.raises(AtmanError):
        split("train")


def test_hits_outliers_and_average_precision():
    scores = np.array([0.1, 3.0, 2.0, -1.0, 0.5])
    assert hits(scores, [2], 1) == 0.0 and hits(scores, [2], 3) == 1.0
    loo = np.array([0.0, 0.1, 9.0, 0.2, -0.1, 0.0, 0.1, 0.0, 0.05, 0.0])
    assert loo_outliers(loo) == [2]
    assert loo_outliers(np.array([1.0, 1.1, 0.9])) == [1]   # none stands out: the top one
    # ranking 1, 2, 0, 4, 3 against relevant {2, 3}: precision 1/2 at rank 2, 2/5 at rank 5
    assert average_precision(scores, [2, 3]) == pytest.approx((1 / 2 + 2 / 5) / 2)
    assert average_precision(scores, [1]) == 1.0
    with pytest.raises(AtmanError):
        average_precision(scores, [])


def _records() -> list[dict]:
    rows = []
    for q, contexts in (("q1", ["a", "b"]), ("q2", ["c"]), ("q3", ["d"])):
        for c in contexts:
            for m, lds, tokens, cpu in (("contextcite-32", 0.5, 1000, 10.0), ("mine", 0.7, 100, 2.0)):
                rows.append({"run": "r", "context": c, "question_id": q, "method": m, "top1_drop": 1.0,
                             "top3_drop": 2.0, "top5_drop": 3.0, "lds": lds + (0.1 if c == "a" else 0.0),
                             "hit1": 1.0, "hit3": 1.0, "token_forwards": tokens, "cpu_seconds": cpu, "tokens": 500,
                             "scores": [3.0, 0.0, 0.1] if m == "mine" else [0.0, 3.0, 0.1]})
    rows += [{**r, "method": "attribot-loo", "scores": [5.0, 0.0, 0.1]} for r in rows if r["method"] == "mine"]
    return rows


def test_summaries_resample_questions_and_pair_by_context():
    table = summarise(_records(), ["contextcite-32", "mine"], paired_with="contextcite-32")
    mine = table["mine"]
    assert mine["contexts"] == 4 and mine["questions"] == 3
    assert mine["lds"][0] == pytest.approx(0.725)
    assert mine["lds"][1] <= 0.725 <= mine["lds"][2]
    assert mine["lds_diff"][0] == pytest.approx(0.2) and mine["lds_diff"][1] == pytest.approx(0.2)
    assert mine["token_ratio"][0] == pytest.approx(0.1) and mine["cpu_ratio"][0] == pytest.approx(0.2)
    assert mine["plain_forwards"] == pytest.approx(0.2)
    assert mine["ap_loo"][0] == 1.0 and table["contextcite-32"]["ap_loo"][0] == pytest.approx(1 / 3)
    text = render(table, loo=True, paired_with="contextcite-32")
    assert "| mine | 1.00 [1.00, 1.00] |" in text and "0.10x | 0.20x |" in text
    assert "Paired differences" in text and "| mine | 0.00 [0.00, 0.00]" in text
    # CPU time is compared only within one run
    other_run = [dict(r, run="s") if r["method"] == "mine" else r for r in _records()]
    assert "cpu_ratio" not in summarise(other_run, ["mine"])["mine"]


def test_reliance_splits_hit_at_1_by_how_much_one_gold_sentence_carries_the_response():
    records = [dict(r, hit1=float(r["context"] != "b" or r["method"] == "contextcite-32")) for r in _records()]
    gold = {"a": [0], "b": [1, 2], "c": [0], "d": [2]}   # leave-one-out drops 5.0, then 0.0 / 0.1, 5.0, 0.1
    lines = reliance(records, gold, ["contextcite-32", "mine"])
    assert lines[2] == "| `a` | 1 | 5.00 | 5.00 | hit | hit |"
    assert lines[3] == "| `b` | 2 | 0.10 | 5.00 | hit | · |"
    assert lines[-2] == "| **hit@1, gold drop ≥ 1 nat (2 contexts)** | | | | 1.00 | 1.00 |"
    assert lines[-1] == "| **hit@1, gold drop < 1 nat (2 contexts)** | | | | 1.00 | 0.50 |"
    with pytest.raises(AtmanError):
        reliance([r for r in records if r["method"] != "attribot-loo"], gold, ["mine"])


def _paragraph_task() -> CitationTask:
    sentences = ["Mirel Dask keeps three goats.", "The Vorn Institute was founded in Talbeck.",
                 "The Vorn Archive was founded in Osk.", "Rain falls often in Pell.", "Pell is a town."]
    text = f"{sentences[0]} {sentences[1]}\n\n{sentences[2]} {sentences[3]}\n\n{sentences[4]}"
    spans, position = [], 0
    for s in sentences:
        start = text.index(s, position)
        spans.append((start, start + len(s)))
        position = start + len(s)
    return CitationTask(Sources.from_spans(text, spans), "In which town was the Vorn Institute founded?",
                        "The Vorn Institute was founded in Talbeck.")


@pytest.mark.slow
def test_attribot_ports_equal_leave_one_out_where_they_should(smollm2):
    from atman.baselines.attribot import cached_leave_one_out, hierarchical_leave_one_out

    task = _paragraph_task()
    loo = leave_one_out(ResponseScorer(smollm2, task))
    assert np.allclose(cached_leave_one_out(smollm2, task), loo, atol=1e-3)
    hierarchical = hierarchical_leave_one_out(smollm2, task, keep_paragraphs=1)
    # the first paragraph (goats, the institute) is kept; its sentences are scored in the cut context
    assert hierarchical[2:].tolist() == [0.0, 0.0, 0.0]
    assert int(np.argmax(hierarchical)) == 1
    cut = ResponseScorer(smollm2, task)
    kept = np.array([True, True, False, False, False])
    alone = cut.logprobs(np.array([kept, [True, False, False, False, False]])).sum(axis=1)
    assert hierarchical[1] == pytest.approx(alone[0] - alone[1], abs=1e-3)
    with pytest.raises(AtmanError):
        hierarchical_leave_one_out(smollm2, task, keep_paragraphs=0)


@pytest.mark.slow
@pytest.mark.skipif(not have("at2"), reason="AT2 is not installed (pip install at2==0.0.1)")
def test_at2_runs_on_the_harness_sources(smollm2):
    from atman.baselines.at2 import at2_scores, harness_task, import_at2

    at2 = import_at2()
    task = _paragraph_task()
    made = harness_task(smollm2, task)
    assert made.num_sources == 5 and made.generation.strip() == task.response
    config = smollm2.model.config
    uniform = at2.AT2ScoreEstimator(at2.AT2FeatureExtractor(config.num_hidden_layers, config.num_attention_heads,
                                                            model_type="llama"))
    scores = at2_scores(smollm2, task, uniform)
    assert scores.shape == (5,) and np.all(np.isfinite(scores))
