"""AtMan on the real embedded models: the identities, and evidence that the explanations explain."""

from __future__ import annotations

import pytest
import torch

from atman import Explainer, manipulate
from atman.evaluate.context_qa import hits, make_examples

pytestmark = pytest.mark.slow
PROMPT = "Ada Brenholm keeps bees in Quillmere. Ada Brenholm's favourite fruit is the plum. Where are the bees?"


def _ids(lm, text=PROMPT) -> torch.Tensor:
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


def _logits(lm, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=ids, use_cache=False, **kwargs).logits


@pytest.fixture(params=["smollm2", "gemma"])
def lm(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_multiplier_one_reproduces_the_real_model(lm, kernel):
    ids = _ids(lm)
    lm.model.set_attn_implementation(kernel)
    try:
        expected = _logits(lm, ids)
    finally:
        lm.model.set_attn_implementation("atman")
    for mode in ("log-additive", "multiplicative"):
        with manipulate(torch.ones(1, ids.shape[1]), mode=mode, backend=kernel) as state:
            got = _logits(lm, ids)
        assert state.calls == lm.model.config.num_hidden_layers
        assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item() / 10), mode


def test_removal_equals_masking_on_the_real_model(lm):
    ids = _ids(lm)
    n = ids.shape[1]
    for key in (0, 5):
        mask = torch.ones(1, n, dtype=torch.long)
        mask[0, key] = 0
        masked = _logits(lm, ids, attention_mask=mask, position_ids=torch.arange(n)[None])
        multipliers = torch.ones(1, n)
        multipliers[0, key] = 0.0
        with manipulate(multipliers):
            got = _logits(lm, ids)
        assert torch.isfinite(got).all()
        keep = slice(1, None) if key == 0 else slice(None)
        assert torch.allclose(got[:, keep], masked[:, keep], atol=1e-4, rtol=0)


def test_batched_equals_unbatched_on_the_real_model(lm):
    ids = _ids(lm)
    n = ids.shape[1]
    multipliers = torch.ones(3, n)
    multipliers[1, 3:6] = 0.1
    multipliers[2, 10] = 0.0
    with manipulate(multipliers):
        batched = _logits(lm, ids.expand(3, -1))
    for row in range(3):
        with manipulate(multipliers[row:row + 1]):
            single = _logits(lm, ids)
        assert torch.allclose(batched[row], single[0], atol=1e-4, rtol=0)


def test_explainer_scores_do_not_depend_on_batch_size(smollm2):
    prompt, target = make_examples(1, seed=3)[0].prompt, make_examples(1, seed=3)[0].target
    one = Explainer(smollm2, batch_size=1).explain(prompt, target, granularity="word")
    many = Explainer(smollm2, batch_size=7).explain(prompt, target, granularity="word")
    assert one.explanations[0].scores == pytest.approx(many.explanations[0].scores, abs=1e-4)


@pytest.mark.parametrize("mode", ["log-additive", "multiplicative"])
def test_cached_engine_equals_naive_on_smollm2(smollm2, mode):
    ex = make_examples(1, seed=4)[0]
    options = dict(granularity="word", target_granularity="token", kappa=0.7, mode=mode)
    naive = Explainer(smollm2, engine="naive").explain(ex.prompt, ex.target, **options)
    cached = Explainer(smollm2, engine="cached").explain(ex.prompt, ex.target, **options)
    for a, b in zip(naive.explanations, cached.explanations, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-4)


def test_context_qa_top_units_are_the_evidence(smollm2):
    """The acceptance check: >= 90 % top sentence, >= 80 % top token inside the evidence sentence."""
    examples = make_examples(20, seed=0, facts=4)
    explainer = Explainer(smollm2)
    sentence = token = 0
    for ex in examples:
        sentence += hits(explainer.explain(ex.prompt, ex.target, granularity="sentence"), ex)[1]
        token += hits(explainer.explain(ex.prompt, ex.target, granularity="token"), ex)[0]
    assert sentence / len(examples) >= 0.9, sentence
    assert token / len(examples) >= 0.8, token


def test_gemma_explains_context_qa(gemma):
    explainer = Explainer(gemma)
    examples = make_examples(6, seed=11)
    found = sum(hits(explainer.explain(ex.prompt, ex.target, granularity="sentence"), ex)[1] for ex in examples)
    assert found >= 5
