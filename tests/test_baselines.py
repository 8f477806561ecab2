"""Comparison methods: same units as AtMan, sum aggregation, correctness identities, spec parsing."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from atman import AtmanError, Explainer
from atman.baselines import (
    METHODS,
    AtMan,
    AttentionRollout,
    AttnLRP,
    BaselineUnavailableError,
    IntegratedGradients,
    Occlusion,
    Random,
    get_method,
    parse_spec,
    sequence_logprobs,
)
from atman.baselines.base import delete_units, target_logprob_from_logits
from atman.units import encode, prompt_units

pytestmark = pytest.mark.slow
PROMPT = "Kira Denholm lives in Vostrand. Omar Pelle lives in Quillmere.\nWhere does Omar live? Omar lives in"
TARGET = " Quillmere"
AVAILABLE = [name for name in METHODS if name != "attnlrp"]


def _logprob(lm, ids: list[int], n_target: int) -> float:
    tensor = torch.tensor([ids])
    with torch.no_grad():
        logits = lm.model(input_ids=tensor, use_cache=False).logits
    return float(target_logprob_from_logits(logits, tensor, len(ids) - n_target)[0])


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_method_explains_exactly_atmans_units(smollm2, name):
    method = get_method(name, smollm2)
    encoded = encode(smollm2.tokenizer, PROMPT, TARGET)
    for granularity in ("sentence", "token"):
        plan = Explainer(smollm2).plan(encoded, granularity)
        exp = method.attribute(PROMPT, TARGET, granularity=granularity)
        items = exp.explanations[0].items
        assert [(i.start, i.length) for i in items] == [(u.start, u.length) for u in plan.units]
        assert all(torch.isfinite(torch.tensor(i.score)) for i in items)
        assert exp.settings["method"] == name


@pytest.mark.parametrize("name", ["integrated-gradients", "input-x-gradient", "saliency", "attention-rollout",
                                  "chefer", "random"])
def test_token_methods_sum_token_scores_into_units(smollm2, name):
    method = get_method(name, smollm2)
    encoded = encode(smollm2.tokenizer, PROMPT, TARGET)
    token_units = prompt_units(encoded, "token")
    sentence_units = prompt_units(encoded, "sentence")
    tokens = method.attribute(PROMPT, TARGET, granularity="token").explanations[0].scores
    by_position = {unit.positions[0]: score for unit, score in zip(token_units, tokens, strict=True)}
    sentences = method.attribute(PROMPT, TARGET, granularity="sentence").explanations[0].scores
    for unit, score in zip(sentence_units, sentences, strict=True):
        assert score == pytest.approx(sum(by_position[p] for p in unit.positions), rel=1e-6, abs=1e-9)


def test_integrated_gradients_is_complete():
    """Completeness: attributions sum to f(input) - f(baseline), the prompt's tokens set to padding.

    On a tiny random Llama, where the path integral is smooth; SmolLM2's is rough (see the class).
    """
    from types import SimpleNamespace

    from conftest import tiny_model

    from atman import enable
    from atman.models import LoadedModel
    from atman.units import EncodedInput

    model = enable(tiny_model("llama"))
    lm = LoadedModel(model, SimpleNamespace(pad_token_id=1, eos_token_id=None, unk_token_id=None), "tiny")
    ids = [5, 17, 29, 33, 41, 52, 60, 7]
    encoded = EncodedInput(input_ids=tuple(ids), prompt="abcdef", target="xy",
                           prompt_spans=(None, (0, 1), (1, 2), (2, 3), (3, 4), (4, 5)), target_start=6,
                           target_spans=((0, 1), (1, 2)))
    method = IntegratedGradients(lm, steps=64)
    total = float(method.token_scores(encoded).sum())
    tensor = torch.tensor([ids])
    padded = torch.tensor([[5, 1, 1, 1, 1, 1, 60, 7]])
    with torch.no_grad():
        expected = float(target_logprob_from_logits(model(input_ids=tensor).logits, tensor, 6)
                         - target_logprob_from_logits(model(input_ids=padded).logits, tensor, 6))
    assert total == pytest.approx(expected, rel=1e-3, abs=1e-4)
    assert abs(method.convergence_delta) < 1e-3
    assert method.baseline_token == "pad" and method.settings()["baseline_token"] == "pad"
    # completeness as the method reports it, from both baselines (the zero one by its own difference)
    check = method.completeness(encoded)
    assert check["difference"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert check["sum"] == pytest.approx(total, rel=1e-6, abs=1e-7)
    zeros = IntegratedGradients(lm, steps=64, baseline="zeros")
    check = zeros.completeness(encoded)
    assert zeros.baseline_token == "zeros" and check["difference"] != pytest.approx(expected)
    assert check["sum"] == pytest.approx(check["difference"], rel=1e-2, abs=1e-3)
    with pytest.raises(ValueError, match="baseline must be"):
        IntegratedGradients(lm, baseline="mean")


def test_occlusion_score_is_the_drop_when_the_unit_is_deleted(smollm2):
    encoded = encode(smollm2.tokenizer, PROMPT, TARGET)
    units = prompt_units(encoded, "sentence")
    scores = Occlusion(smollm2).unit_scores(encoded, units)
    n_target = len(encoded.input_ids) - encoded.target_start
    full = _logprob(smollm2, list(encoded.input_ids), n_target)
    for unit, score in zip(units, scores.tolist(), strict=True):
        assert score == pytest.approx(full - _logprob(smollm2, delete_units(encoded, [unit]), n_target), abs=1e-3)
    # deleting the sentence that states the answer hurts most
    assert units[int(scores.argmax())].text == "Omar Pelle lives in Quillmere."


def test_padded_batches_give_the_unpadded_log_probabilities(smollm2):
    encoded = encode(smollm2.tokenizer, PROMPT, TARGET)
    units = prompt_units(encoded, "word")
    sequences = [list(encoded.input_ids)] + [delete_units(encoded, units[:k]) for k in (1, 3, 5)]
    n_target = len(encoded.input_ids) - encoded.target_start
    batched = sequence_logprobs(smollm2, sequences, n_target)
    single = [_logprob(smollm2, seq, n_target) for seq in sequences]
    assert batched.tolist() == pytest.approx(single, abs=1e-3)


def test_atman_method_matches_the_explainer(smollm2):
    for options in ({}, {"multiplier": 0.5, "mode": "multiplicative"}):
        ours = AtMan(smollm2, **options).attribute(PROMPT, TARGET, granularity="sentence")
        theirs = Explainer(smollm2, **options).explain(PROMPT, TARGET, granularity="sentence")
        assert ours.explanations[0].scores == pytest.approx(theirs.explanations[0].scores, abs=1e-4)


def test_rollout_rows_keep_their_mass(smollm2):
    """Rollout multiplies row-stochastic matrices: each target row's relevance sums to 1."""
    encoded = encode(smollm2.tokenizer, PROMPT, TARGET)
    scores = AttentionRollout(smollm2).token_scores(encoded)
    n_rows = len(encoded.input_ids) - encoded.target_start
    assert float(scores.sum()) == pytest.approx(n_rows, rel=1e-4)
    assert bool((scores >= 0).all())


def test_random_is_reproducible_and_seeded(smollm2):
    first = Random(smollm2).attribute(PROMPT, TARGET, granularity="word").explanations[0].scores
    again = Random(smollm2).attribute(PROMPT, TARGET, granularity="word").explanations[0].scores
    other = Random(smollm2, seed=1).attribute(PROMPT, TARGET, granularity="word").explanations[0].scores
    assert first == again and first != other


def test_generated_targets_as_token_ids(smollm2):
    ids = Explainer(smollm2).generate(PROMPT, max_new_tokens=3)
    exp = get_method("saliency", smollm2).attribute(PROMPT, ids, granularity="sentence")
    assert exp.target == smollm2.tokenizer.decode(ids)


@pytest.mark.skipif(importlib.util.find_spec("lxt") is not None, reason="lxt is installed")
def test_attnlrp_says_why_it_cannot_run(smollm2, monkeypatch, tmp_path):
    # without lxt's environment (tests/test_lrp.py runs it where the environment exists)
    monkeypatch.setenv("ATMAN_LXT_PYTHON", str(tmp_path / "no-such-env" / "bin" / "python"))
    with pytest.raises(BaselineUnavailableError, match="lxt"):
        AttnLRP(smollm2)


def test_specs_and_their_errors(smollm2):
    assert parse_spec("atman:multiplier=0.5,kappa=none") == ("atman", {"multiplier": 0.5, "kappa": None})
    assert parse_spec("integrated-gradients:steps=8") == ("integrated-gradients", {"steps": 8})
    assert get_method("atman:kappa=0.7", smollm2).explainer.kappa == 0.7
    with pytest.raises(AtmanError, match="unknown method"):
        parse_spec("gradcam")
    with pytest.raises(AtmanError, match="bad option"):
        parse_spec("atman:strength=2")
    with pytest.raises(AtmanError, match="bad value"):
        parse_spec("atman:multiplier=high")
    with pytest.raises(AtmanError, match="does not take"):
        get_method("occlusion:multiplier=0.5", smollm2)
    with pytest.raises(AtmanError, match="multiplier must lie"):
        get_method("atman:multiplier=1.5", smollm2)
    # the old spelling meant the opposite (suppression strength): refused, never reinterpreted
    with pytest.raises(AtmanError, match="multiplier = 1 - factor"):
        parse_spec("atman:factor=0.9")
    with pytest.raises(AtmanError, match="refine"):
        get_method("occlusion", smollm2).attribute(PROMPT, TARGET, granularity="refine")
