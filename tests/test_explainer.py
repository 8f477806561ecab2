"""The explainer's public behaviour on the embedded SmolLM2: units, targets, chat, options, errors."""

from __future__ import annotations

import pytest

from atman import (
    ContextLengthError,
    EmptyInputError,
    Explainer,
    Explanation,
    GranularityError,
    NoUnitsError,
)
from atman.units import encode

pytestmark = pytest.mark.slow
PROMPT = "Kira Denholm lives in Vostrand. Omar Pelle lives in Quillmere.\n\nWhere does Omar live? Omar lives in"
TARGET = " Quillmere"


@pytest.fixture(scope="module")
def explainer(smollm2):
    return Explainer(smollm2)


def _covered(exp: Explanation) -> str:
    return "".join(exp.prompt[i.start:i.start + i.length] for i in exp.explanations[0].items if i.kind == "prompt")


@pytest.mark.parametrize(
    ("granularity", "expected"),
    [
        ("word", ["Kira", "Denholm", "lives", "in", "Vostrand.", "Omar", "Pelle", "lives", "in", "Quillmere.",
                  "Where", "does", "Omar", "live?", "Omar", "lives", "in"]),
        ("sentence", ["Kira Denholm lives in Vostrand.", "Omar Pelle lives in Quillmere.", "Where does Omar live?",
                      "Omar lives in"]),
        ("paragraph", ["Kira Denholm lives in Vostrand. Omar Pelle lives in Quillmere.",
                       "Where does Omar live? Omar lives in"]),
    ],
)
def test_text_granularities_give_the_expected_units(explainer, granularity, expected):
    exp = explainer.explain(PROMPT, TARGET, granularity=granularity)
    assert [i.text for i in exp.explanations[0].items] == expected
    for item in exp.explanations[0].items:
        assert exp.prompt[item.start:item.start + item.length] == item.text
    assert exp.settings["granularity"] == granularity


def test_token_granularity_covers_every_prompt_character(explainer):
    exp = explainer.explain(PROMPT, TARGET, granularity="token")
    assert _covered(exp) == PROMPT


def test_delimiter_and_explicit_spans(explainer):
    exp = explainer.explain(PROMPT, TARGET, granularity="delimiter", delimiter="lives")
    assert [i.text for i in exp.explanations[0].items][0] == "Kira Denholm lives"
    spans = [(0, 12), (32, 42)]
    exp = explainer.explain(PROMPT, TARGET, granularity="spans", spans=spans)
    assert [(i.start, i.start + i.length) for i in exp.explanations[0].items] == spans
    assert [i.text for i in exp.explanations[0].items] == ["Kira Denholm", "Omar Pelle"]


def test_auto_granularity_picks_about_thirty_units(explainer):
    exp = explainer.explain(PROMPT, TARGET)  # 17 words, 27 tokens, 4 sentences
    assert exp.settings["granularity"] == "token"
    long_prompt = " ".join(["The weather in Olvereth was mild and the harbour was quiet that year."] * 6)
    exp = explainer.explain(long_prompt, " The", kappa=None)  # 78 words, 6 sentences
    assert exp.settings["granularity"] == "sentence"


def test_evidence_is_positive_and_ranked_first(explainer):
    exp = explainer.explain(PROMPT, TARGET, granularity="sentence")
    top = exp.top(1)[0]
    assert top.text == "Omar Pelle lives in Quillmere."
    assert top.score > 0


def test_token_target_granularity_explains_each_target_token(explainer):
    exp = explainer.explain(PROMPT, TARGET, granularity="sentence", target_granularity="token", kappa=None)
    pieces = [e.target.text for e in exp.explanations]
    assert "".join(pieces) == TARGET and len(pieces) > 1
    for t, sub in enumerate(exp.explanations):
        targets = [i for i in sub.items if i.kind == "target"]
        assert len(targets) == t  # the target tokens before t
        assert [i.text for i in targets] == pieces[:t]
    # without conceptual suppression (which also damps similar target tokens in token mode) the
    # per-token scores add up to the complete one
    complete = explainer.explain(PROMPT, TARGET, granularity="sentence", kappa=None)
    summed = [sum(sub.items[u].score for sub in exp.explanations) for u in range(4)]
    assert summed == pytest.approx(complete.explanations[0].scores, abs=1e-4)


def test_refine_explains_only_the_top_sentences_at_token_level(explainer):
    exp = explainer.explain(PROMPT, TARGET, granularity="refine", refine_top=1)
    items = exp.explanations[0].items
    refined = [i for i in items if i.refined]
    coarse = [i for i in items if not i.refined]
    assert [i.text for i in coarse] == ["Kira Denholm lives in Vostrand.", "Where does Omar live?", "Omar lives in"]
    assert "".join(i.text for i in refined).strip() == "Omar Pelle lives in Quillmere."
    assert [i.start for i in items] == sorted(i.start for i in items)
    assert exp.top(1)[0].refined
    assert exp.settings["granularity"] == "refine" and exp.settings["refine_top"] == 1
    token_level = explainer.explain(PROMPT, TARGET, granularity="token")
    by_start = {i.start: i.score for i in token_level.explanations[0].items}
    for item in refined:
        assert item.score == pytest.approx(by_start[item.start], abs=1e-4)
    assert Explanation.from_json(exp.to_json()) == exp


def test_refine_share_refines_the_fewest_units_holding_that_share(explainer):
    sentences = explainer.explain(PROMPT, TARGET, granularity="sentence").explanations[0]
    ranked = sorted(sentences.items, key=lambda i: i.score, reverse=True)
    positive = sum(max(i.score, 0.0) for i in sentences.items)
    # a share just above what the top sentence holds needs the second one too
    share = max(ranked[0].score, 0.0) / positive + 1e-3
    exp = explainer.explain(PROMPT, TARGET, granularity="refine", refine_top=3, refine_share=share)
    refined_text = "".join(i.text for i in exp.explanations[0].items if i.refined)
    for sentence in ranked[:2]:
        assert sentence.text.strip() in refined_text
    assert ranked[2].text not in refined_text
    assert exp.settings["refine_share"] == share
    one = explainer.explain(PROMPT, TARGET, granularity="refine", refine_top=3, refine_share=share - 2e-3)
    assert "".join(i.text for i in one.explanations[0].items if i.refined).strip() == ranked[0].text.strip()


def test_missing_target_explains_the_greedy_continuation(explainer):
    exp = explainer.explain(PROMPT, granularity="sentence", max_new_tokens=4)
    assert exp.settings["generated_target"] is True
    assert exp.target.startswith(" Qu")
    assert exp.explanations[0].target.text == exp.target


def test_chat_mode_never_suppresses_template_tokens(explainer, smollm2):
    encoded = encode(smollm2.tokenizer, PROMPT, TARGET, chat=True, system="Answer briefly.")
    plan = explainer.plan(encoded, "token", kappa=0.6)
    template = [p for p, span in enumerate(encoded.prompt_spans) if span is None and p < encoded.target_start]
    assert len(template) > 5
    assert (plan.rows[:, template] == 1).all()
    exp = explainer.explain(PROMPT, TARGET, chat=True, system="Answer briefly.", granularity="token")
    assert _covered(exp) == PROMPT
    assert "<|im_start|>" not in "".join(i.text for i in exp.explanations[0].items)


@pytest.mark.parametrize("prompt", ["Hugging Face", "user", "You are"])
def test_chat_mode_finds_the_users_text_not_the_template(smollm2, prompt):
    """SmolLM2's template has a default system message containing these words."""
    encoded = encode(smollm2.tokenizer, prompt, TARGET, chat=True)
    positions = [p for p, span in enumerate(encoded.prompt_spans) if span is not None]
    text = smollm2.tokenizer.decode([encoded.input_ids[p] for p in positions])
    assert text == prompt
    tail = smollm2.tokenizer.decode(list(encoded.input_ids[positions[-1] + 1:encoded.target_start]))
    assert "assistant" in tail and prompt not in tail
    head = smollm2.tokenizer.decode(list(encoded.input_ids[:positions[0]]))
    assert head.rstrip().endswith("user")


def test_generated_target_offsets_survive_multibyte_characters(smollm2):
    from atman.units import encode

    ids = smollm2.tokenizer("a 𓀀 bc de 日本語", add_special_tokens=False)["input_ids"]
    encoded = encode(smollm2.tokenizer, "The text:", ids)  # a generated target: token ids, decoded with offsets
    text, spans = encoded.target, encoded.target_spans
    assert text == "a 𓀀 bc de 日本語"
    assert "".join(text[a:b] for a, b in spans) == text
    assert all(b >= a for a, b in spans)


def test_conceptual_suppression_damps_similar_tokens(explainer, smollm2):
    encoded = encode(smollm2.tokenizer, PROMPT, TARGET)
    units_off = explainer.plan(encoded, "word", kappa=None)
    units_on = explainer.plan(encoded, "word", kappa=0.7)
    omar_units = [row + 1 for row, u in enumerate(units_on.units) if u.text == "Omar"]
    row = omar_units[0]
    other = units_on.units[omar_units[1] - 1].positions
    assert (units_off.rows[row, list(other)] == 1).all()
    assert (units_on.rows[row, list(other)] == pytest.approx(0.1, abs=1e-3))


def test_postprocessing_and_normalize(explainer):
    raw = explainer.explain(PROMPT, TARGET, granularity="sentence")
    squared = explainer.explain(PROMPT, TARGET, granularity="sentence", postprocessing="square", normalize=True)
    scores = squared.explanations[0].scores
    assert min(scores) == 0 and max(scores) == 1
    expected = raw.postprocessed("square", normalize=True).explanations[0].scores
    assert scores == pytest.approx(expected, abs=1e-6)
    absolute = explainer.explain(PROMPT, TARGET, granularity="sentence", postprocessing="absolute")
    assert absolute.explanations[0].scores == pytest.approx([abs(s) for s in raw.explanations[0].scores])
    assert absolute.settings["postprocessing"] == "absolute"


def test_json_round_trip_is_lossless(explainer, tmp_path):
    exp = explainer.explain(PROMPT, TARGET, granularity="word", target_granularity="token")
    assert Explanation.from_json(exp.to_json()) == exp
    exp.save(tmp_path / "e.json")
    assert Explanation.load(tmp_path / "e.json") == exp
    data = exp.to_dict()
    assert set(data) >= {"model", "prompt", "target", "explanations"}
    item = data["explanations"][0]["items"][0]
    assert set(item) == {"kind", "text", "start", "length", "score"}


def test_multiplicative_mode_explains_too(explainer):
    exp = explainer.explain(PROMPT, TARGET, granularity="sentence", mode="multiplicative")
    assert exp.top(1)[0].text == "Omar Pelle lives in Quillmere."
    assert exp.settings["mode"] == "multiplicative"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"prompt": "", "target": TARGET}, EmptyInputError),
        ({"prompt": "   \n", "target": TARGET}, EmptyInputError),
        ({"prompt": PROMPT, "target": ""}, EmptyInputError),
        ({"prompt": "word " * 9000, "target": TARGET}, ContextLengthError),
        ({"prompt": "<|im_start|><|im_end|>", "target": TARGET}, NoUnitsError),
        ({"prompt": PROMPT, "target": TARGET, "granularity": "chapter"}, GranularityError),
        ({"prompt": PROMPT, "target": TARGET, "granularity": "delimiter"}, GranularityError),
        ({"prompt": PROMPT, "target": TARGET, "granularity": "spans", "spans": [(5, 500)]}, GranularityError),
        ({"prompt": PROMPT, "target": TARGET, "granularity": "spans", "spans": [(0, 9), (5, 12)]}, GranularityError),
        ({"prompt": PROMPT, "target": TARGET, "target_granularity": "word"}, GranularityError),
        ({"prompt": PROMPT, "target": TARGET, "multiplier": 1.5}, ValueError),
        ({"prompt": PROMPT, "target": TARGET, "multiplier": float("nan")}, ValueError),
        ({"prompt": PROMPT, "target": TARGET, "factor": 0.9}, ValueError),
        ({"prompt": PROMPT, "target": TARGET, "granularity": "refine", "refine_top": 0}, GranularityError),
        ({"prompt": PROMPT, "target": TARGET, "granularity": "refine", "refine_from": "token"}, GranularityError),
        ({"prompt": PROMPT, "target": TARGET, "granularity": "refine", "refine_share": 0.0}, GranularityError),
        ({"prompt": PROMPT, "target": TARGET, "granularity": "refine", "refine_share": 1.5}, GranularityError),
        ({"prompt": PROMPT, "target": TARGET, "kappa": 0.0}, ValueError),
        ({"prompt": PROMPT, "target": TARGET, "postprocessing": "cube"}, ValueError),
        ({"prompt": "caf\udce9 au lait", "target": TARGET}, ValueError),
        ({"prompt": PROMPT, "target": TARGET, "granularity": "spans", "spans": [(13, 15), (15, 17)]}, GranularityError),
    ],
)
def test_bad_input_raises_a_specific_value_error(explainer, kwargs, error):
    with pytest.raises(error) as info:
        explainer.explain(**kwargs)
    assert isinstance(info.value, ValueError)
    assert str(info.value)
