"""Citation evaluation: sources, metrics, data, readout suppression and the ContextCite wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atman import enable, manipulate
from atman.errors import AtmanError, EmptyInputError
from atman.evaluate.citation import (
    HOLDOUT_SEED,
    CitationTask,
    HoldOut,
    ResponseScorer,
    Sources,
    keep_masks,
    layout,
    lds,
    leave_one_out,
    logit_prob,
    readout_logprobs,
    readout_suppression,
    readout_surrogate,
    run_method,
    score_method,
    tail_logprobs,
    top_sources,
    topk_drop,
)
from atman.evaluate.cite_data import KINDS, invented_example, invented_examples, squad_examples
from tests.conftest import have, tiny_model


def test_sources_delete_their_text_and_what_precedes_them():
    text = "Title: A b. C d.\n\nNext: E f."
    sources = Sources.from_spans(text, [(7, 11), (12, 16), (18, 28)])
    assert sources.texts == ["A b.", "C d.", "Next: E f."]
    assert sources.ablate() == text
    assert sources.ablate([True, False, True]) == "Title: A b.\n\nNext: E f."
    assert sources.ablate([False, True, True]) == "C d.\n\nNext: E f."
    assert sources.ablate([False, False, True]) == "Next: E f."
    with pytest.raises(AtmanError):
        sources.ablate([True, True])


@pytest.mark.parametrize("spans", [[(0, 4), (3, 8)], [(4, 4)], [(0, 99)], [(4, 5)], []])
def test_bad_sources_are_refused(spans):
    with pytest.raises((AtmanError, EmptyInputError)):
        Sources.from_spans("A b. C d.", spans)


def test_empty_context_query_or_response_is_refused():
    with pytest.raises(EmptyInputError):
        Sources.from_spans("   ", [(0, 2)])
    sources = Sources.from_spans("A b.", [(0, 4)])
    with pytest.raises(EmptyInputError):
        CitationTask(sources, " ", "yes")
    with pytest.raises(EmptyInputError):
        CitationTask(sources, "Why?", "")


def test_lds_on_a_linear_toy():
    weights = np.array([3.0, -1.0, 0.5, 2.0])
    masks = keep_masks(4, 32, seed=HOLDOUT_SEED)
    outputs = masks @ weights
    assert lds(weights, masks, outputs) == pytest.approx(1.0)
    assert lds(-weights, masks, outputs) == pytest.approx(-1.0)
    # hand-computed: predictions 1, 2, 3 against outputs 1, 3, 2 -> ranks differ by 0, 1, 1: 1 - 6*2/(3*8)
    assert lds(np.array([1.0, 2.0]), np.array([[1, 0], [0, 1], [1, 1]]), np.array([1.0, 3.0, 2.0])) == 0.5
    assert lds(np.zeros(4), masks, outputs) == 0.0


def test_logit_prob_matches_context_cites_aggregation():
    tokens = np.log(np.array([[0.9, 0.5, 0.99], [0.2, 0.3, 0.6]]))
    summed = tokens.sum(axis=1)
    expected = np.log(np.exp(summed) / (1 - np.exp(summed)))
    assert np.allclose(logit_prob(summed), expected)
    if have("context_cite"):
        from context_cite.utils import aggregate_logit_probs

        from atman.baselines import contextcite  # noqa: F401  (imports the package quietly)

        per_token_logit = tokens - np.log1p(-np.exp(tokens))   # what ContextCite stores per token
        assert np.allclose(aggregate_logit_probs(per_token_logit.astype(np.float32)), logit_prob(summed), atol=1e-4)


def test_holdout_masks_are_reproducible_and_disjoint_from_training_seeds():
    masks = keep_masks(50, 32)
    assert masks.shape == (32, 50)
    assert np.array_equal(masks, keep_masks(50, 32))
    assert 0.4 < masks.mean() < 0.6
    training = keep_masks(50, 64, seed=0)   # the seeds ContextCite trains on
    assert not any(np.array_equal(m, t) for m in masks for t in training)
    # ContextCite draws mask i as RandomState(seed + i).choice([False, True], p=[1 - keep, keep])
    assert np.array_equal(training[5], np.random.RandomState(5).choice([False, True], size=50, p=[0.5, 0.5]))


class _AdditiveScorer:
    """A scorer whose response log-probability falls by ``weights[i]`` when source i is deleted."""

    def __init__(self, weights):
        self.weights = np.asarray(weights, dtype=float)
        self.task = CitationTask(Sources.from_spans("a. b. c. d.", [(0, 2), (3, 5), (6, 8), (9, 11)]), "q?", "r")
        self.full_logprob = -1.0

    def logprobs(self, keeps):
        return (self.full_logprob - (~np.asarray(keeps)) @ self.weights)[:, None]


def test_topk_drop_deletes_the_highest_scored_sources():
    scorer = _AdditiveScorer([4.0, 1.0, 2.0, 0.5])
    drops = topk_drop(scorer, np.array([0.1, 0.3, 0.9, 0.2]), ks=(1, 3, 5))
    assert drops == {1: 2.0, 3: 2.0 + 1.0 + 0.5, 5: 7.5}
    assert list(top_sources(np.array([1.0, 3.0, 3.0, 0.0]), 2)) == [1, 2]


def test_invented_data_is_reproducible_and_sized():
    a, b = invented_example(7, n_sources=60), invented_example(7, n_sources=60)
    assert a == b and invented_example(8, n_sources=60).sources.text != a.sources.text
    assert len(a.sources) == 60
    examples = invented_examples(3, seed=0, n_sources=120)
    assert [e.kind for e in examples] == list(KINDS)
    for ex in examples:
        assert len(ex.sources) == 120
        evidence = [ex.sources.texts[i] for i in ex.evidence]
        assert len(evidence) == {"single": 1, "multihop": 2, "multi-sentence": 3}[ex.kind]
        # distractors share the query's invented name; every evidence sentence names something the response says
        name = ex.query.split(" the ")[-1].split(" Institute")[0]
        assert sum(name in s for s in ex.sources.texts) >= 4
        for sentence in evidence:
            names = {w.strip(".,") for w in sentence.split()[1:] if w[0].isupper()}
            assert any(n in ex.response for n in names), sentence
    assert ex.response.count(". ") >= 1   # several sentences
    with pytest.raises(AtmanError):
        invented_example(0, n_sources=5)


def test_squad_examples_point_at_the_answer_sentence():
    examples = squad_examples()
    assert examples
    for ex in examples:
        (i,) = ex.evidence
        assert ex.response in ex.sources.texts[i]


def _reference_tail_logprobs(model, ids, tail_start, response_start, multipliers):
    """One eager pass over the whole sequence per row, log(m) added to the tail's query rows only."""
    length = len(ids)
    causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
    out = []
    for row in multipliers:
        mask = causal.clone()
        bias = torch.log(row).clamp(min=torch.finfo(torch.float32).min)
        mask[tail_start:] = mask[tail_start:] + bias
        mask = mask.clamp(min=torch.finfo(torch.float32).min)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), attention_mask=mask[None, None]).logits
        lp = torch.log_softmax(logits[0, response_start - 1:-1], dim=-1)
        out.append(lp.gather(-1, torch.tensor(ids[response_start:])[:, None])[:, 0].numpy())
    return np.stack(out)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_readout_suppression_equals_the_slow_reference(family):
    reference = tiny_model(family, attn_implementation="eager", seed=3)
    fast = enable(tiny_model(family, seed=3))
    ids = [int(t) for t in torch.randint(1, 120, (24,), generator=torch.Generator().manual_seed(1))]
    tail_start, response_start = 15, 19
    rows = torch.ones(4, len(ids))
    rows[1, 2:6] = 0.0
    rows[2, 6:12] = 0.1
    rows[3, [0, 5, 9, 16]] = 0.3   # a tail key too
    got = tail_logprobs(fast, ids, tail_start, response_start, rows, token_budget=20)   # several batches
    want = _reference_tail_logprobs(reference, ids, tail_start, response_start, rows)
    assert np.allclose(got, want, atol=1e-4)
    # the suppression matters, and differs from suppressing every query row (the context's too)
    assert np.abs(got[1] - got[0]).max() > 1e-3
    with torch.no_grad(), manipulate(rows[1:2]):
        logits = fast(input_ids=torch.tensor([ids])).logits
    everywhere = torch.log_softmax(logits[0, response_start - 1:-1], -1).gather(
        -1, torch.tensor(ids[response_start:])[:, None])[:, 0].numpy()
    assert np.abs(everywhere - got[1]).max() > 1e-4


def test_tail_logprobs_refuses_bad_layouts():
    model = enable(tiny_model("llama"))
    with pytest.raises(AtmanError):
        tail_logprobs(model, list(range(1, 11)), 0, 5, torch.ones(1, 10))
    with pytest.raises(AtmanError):
        tail_logprobs(model, list(range(1, 11)), 4, 5, torch.ones(1, 9))


def _small_task() -> tuple[CitationTask, int]:
    sentences = ["Mirel Dask keeps three goats.", "The Vorn Institute was founded in Talbeck.",
                 "The Vorn Archive was founded in Osk.", "Rain falls often in Pell."]
    text, spans = "", []
    for s in sentences:
        text += (" " if text else "")
        spans.append((len(text), len(text) + len(s)))
        text += s
    task = CitationTask(Sources.from_spans(text, spans), "In which town was the Vorn Institute founded?",
                        "The Vorn Institute was founded in Talbeck.")
    return task, 1


@pytest.mark.slow
def test_scoring_and_methods_on_smollm2(smollm2):
    task, evidence = _small_task()
    scorer = ResponseScorer(smollm2, task, token_budget=64)   # one row per batch
    batched = ResponseScorer(smollm2, task)
    masks = keep_masks(4, 5)
    assert np.allclose(scorer.logprobs(masks), batched.logprobs(masks), atol=1e-3)   # left padding is exact
    loo = leave_one_out(batched)
    assert int(np.argmax(loo)) == evidence
    assert topk_drop(batched, loo, ks=(1,))[1] == pytest.approx(loo.max())
    readout = readout_suppression(smollm2, task)
    assert int(np.argmax(readout)) == evidence
    # layout: every source has tokens, the tail starts after the context and holds the response
    lay = layout(smollm2.tokenizer, task)
    assert lay.source_positions[-1][-1] < lay.tail_start < lay.response_start
    assert readout_logprobs(smollm2, task, np.ones((1, 4))).sum() == pytest.approx(batched.full_logprob, abs=1e-3)
    surrogate = readout_surrogate(smollm2, task, 16)
    assert int(np.argmax(surrogate)) == evidence
    reused = ResponseScorer(smollm2, task, reuse_prefix=True)   # the full context's keys and values reused
    assert np.allclose(reused.logprobs(masks), batched.logprobs(masks), atol=1e-3)
    holdout = HoldOut.measure(batched, 8)
    run = score_method(run_method("readout", smollm2, lambda: readout_suppression(smollm2, task)), batched, holdout,
                       [evidence])
    assert run.metrics["evidence_first"] == 1.0 and run.token_forwards > 0
    assert set(run.metrics) == {"top1_drop", "top3_drop", "top5_drop", "lds", "evidence_first"}


@pytest.mark.slow
def test_invented_contexts_have_the_benchmark_sizes(smollm2):
    ex = invented_example(0, n_sources=48)
    tokens = len(layout(smollm2.tokenizer, ex.task).input_ids)
    assert 1000 <= tokens <= 4000


@pytest.mark.slow
@pytest.mark.skipif(not have("context_cite"), reason="context-cite is not installed (pip install 'atman[cite]')")
def test_contextcite_runs_offline_on_our_sources(smollm2):
    from atman.baselines.contextcite import contextcite_scores, make_partitioner

    task, evidence = _small_task()
    partitioner = make_partitioner(task.sources)
    assert partitioner.sources == task.sources.texts
    keep = np.array([True, False, True, True])
    assert partitioner.get_context(keep) == task.sources.ablate(keep)
    scores = contextcite_scores(smollm2, task, num_ablations=16)
    assert scores.shape == (4,) and int(np.argmax(scores)) == evidence


def test_a_method_run_elsewhere_adds_the_cost_it_reports(smollm2):
    from atman.evaluate.citation import OutOfProcess

    done = run_method("elsewhere", smollm2, lambda: OutOfProcess(np.array([1.0, 2.0]), 300, 2.5))
    assert done.scores.tolist() == [1.0, 2.0] and done.token_forwards == 300 and done.cpu_seconds >= 2.5
    here = run_method("here", smollm2, lambda: [3.0])
    assert here.token_forwards == 0 and here.scores.dtype == np.float64
