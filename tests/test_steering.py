"""Steering: controls -> multipliers (Aleph Alpha's semantics), and generation with the KV cache."""

from __future__ import annotations

import pytest
import torch

from atman import AtmanError, manipulate
from atman.steering import (
    Steerer,
    TextControl,
    TokenControl,
    control_multipliers,
    generate,
    spread_to_similar,
)

FACTS = "Ada lives in Oslo. Bo lives in Rome. Ada lives in"
QA = ("Tamsin Orrelby keeps bees on the island of Quellmark. Doran Vesk repairs clocks in the town of Lindhaven.\n"
      "Question: Where does Doran Vesk repair clocks?\nAnswer: Doran Vesk repairs clocks in the town of")


def test_partial_overlap_moves_the_factor_towards_one_by_the_covered_share():
    spans = [(0, 4), (4, 8), (8, 12)]
    m = control_multipliers(spans, [TextControl(2, 4, 2.0)])
    assert m.tolist() == [1.5, 1.5, 1.0]
    m = control_multipliers(spans, [TextControl(1, 2, 0.0)])
    assert m.tolist() == pytest.approx([0.5, 1.0, 1.0])


def test_complete_overlap_applies_the_whole_factor_to_any_touched_token():
    m = control_multipliers([(0, 4), (4, 8), (8, 12)], [TextControl(3, 2, 0.2, "complete")])
    assert m.tolist() == pytest.approx([0.2, 0.2, 1.0])


def test_controls_multiply_and_skip_non_text_tokens():
    spans = [None, (0, 4), (4, 8)]
    m = control_multipliers(spans, [TextControl(0, 8, 0.5), TextControl(4, 4, 4.0), TokenControl(0, 3.0)])
    assert m.tolist() == pytest.approx([3.0, 0.5, 2.0])


@pytest.mark.parametrize("control", [
    TextControl(0, 2, -1.0), TextControl(0, 2, float("nan")), TextControl(0, 2, float("inf")),
    TextControl(0, 0, 0.5), TextControl(-1, 2, 0.5), TextControl(0, 2, 0.5, "some"), TextControl(6, 4, 0.5),
    TokenControl(3, 0.5), TokenControl(0, -2.0),
])
def test_bad_controls_raise(control):
    with pytest.raises(AtmanError):
        control_multipliers([(0, 4), (4, 8), None], [control], text_length=8)


def test_contextual_threshold_copies_the_factor_of_the_most_similar_controlled_token():
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    m = torch.tensor([0.2, 1.0, 3.0, 1.0])
    out = spread_to_similar(m, embeddings, [0, 1, 2, 3], 0.9)
    assert out.tolist() == pytest.approx([0.2, 0.2, 3.0, 3.0])
    assert spread_to_similar(m, embeddings, [0, 1, 2, 3], 1.0).tolist() == pytest.approx(m.tolist())
    with pytest.raises(AtmanError):
        spread_to_similar(m, embeddings, [0, 1], 0.0)


@pytest.mark.slow
def test_greedy_generation_equals_transformers_generate(smollm2):
    steerer = Steerer(smollm2)
    ids, _ = steerer.encode(FACTS)
    expected = smollm2.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                      max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert list(steerer.generate_ids(ids, max_new_tokens=6).token_ids) == expected


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["log-additive", "multiplicative"])
def test_cached_generation_equals_full_recomputation_with_the_same_controls(smollm2, mode):
    """Every step with the KV cache equals a fresh forward of prompt + generated tokens, prompt keys controlled.

    In the multiplicative variant too: its row minimum runs over the keys a query can see, so no
    position depends on the tokens that follow it.
    """
    steerer = Steerer(smollm2)
    ids, spans = steerer.encode(FACTS)
    multipliers = control_multipliers(spans, [TextControl(0, 18, 3.0), TextControl(19, 17, 0.2)])
    out = steerer.generate_ids(ids, multipliers, max_new_tokens=5, mode=mode)
    assert len(out.token_ids) == 5
    sequence = list(ids)
    for token, logprob in zip(out.token_ids, out.log_probs, strict=True):
        with torch.no_grad(), manipulate(multipliers[None], mode=mode):
            logits = smollm2.model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        assert int(logprobs.argmax()) == token
        assert float(logprobs[token]) == pytest.approx(logprob, abs=1e-4)
        sequence.append(token)


@pytest.mark.slow
def test_a_factor_of_one_changes_nothing(smollm2):
    steerer = Steerer(smollm2)
    plain = steerer.generate(FACTS, max_new_tokens=4)
    neutral = steerer.generate(FACTS, [TextControl(0, 18, 1.0), TokenControl(2, 1.0)], max_new_tokens=4)
    assert neutral == plain


@pytest.mark.slow
def test_suppressing_the_answer_span_lowers_its_probability_and_changes_the_answer(smollm2):
    steerer = Steerer(smollm2)
    start = QA.index("Lindhaven")
    control = TextControl(start, len("Lindhaven"), 0.0)
    before = float(steerer.score(QA, " Lindhaven").log_probs.sum())
    after = float(steerer.score(QA, " Lindhaven", [control]).log_probs.sum())
    assert after < before - 2.0
    assert steerer.generate(QA, max_new_tokens=2).text.startswith(" Lindhaven")
    assert not steerer.generate(QA, [control], max_new_tokens=2).text.startswith(" Lindhaven")


@pytest.mark.slow
def test_amplifying_a_span_raises_copying_of_it_monotonically(smollm2):
    steerer = Steerer(smollm2)
    oslo = FACTS.index("Oslo")
    logprobs = [float(steerer.score(FACTS, " Oslo", [TextControl(oslo, 4, f)]).log_probs.sum())
                for f in (1.0, 2.0, 5.0)]
    assert logprobs[0] < logprobs[1] < logprobs[2]
    assert logprobs[2] > logprobs[0] + 0.5


@pytest.mark.slow
def test_contextual_threshold_reaches_repeated_words(smollm2):
    steerer = Steerer(smollm2)
    text = "I like Oslo. You like Oslo."
    ids, spans = steerer.encode(text)
    control = TextControl(text.index("Oslo"), 4, 0.1, "complete")
    alone = steerer.multipliers(ids, spans, [control])
    spread = steerer.multipliers(ids, spans, [control], contextual_threshold=0.99)
    second = [p for p, s in enumerate(spans) if s is not None and text[s[0]:s[1]].strip() == "Oslo"][-1]
    assert alone[second] == 1.0
    assert spread[second] == pytest.approx(0.1)


@pytest.mark.slow
def test_sampling_is_reproducible_with_a_seed_and_stop_sequences_cut(smollm2):
    steerer = Steerer(smollm2)
    ids, _ = steerer.encode(FACTS)
    a = steerer.generate_ids(ids, max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    b = steerer.generate_ids(ids, max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    assert a == b
    stopped = steerer.generate_ids(ids, max_new_tokens=6, stop=["."])
    assert stopped.finish_reason == "stop_sequence_reached" and "." not in stopped.text


@pytest.mark.slow
def test_module_level_generate(smollm2):
    out = generate(FACTS, [TextControl(0, 18, 1.0)], model=smollm2, max_new_tokens=2)
    assert out.text == Steerer(smollm2).generate(FACTS, max_new_tokens=2).text
