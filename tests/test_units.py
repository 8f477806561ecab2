"""Character spans at each text granularity (no model needed)."""

from __future__ import annotations

import pytest

from atman import GranularityError
from atman.units import text_spans

TEXT = "Dr. Vesk fixed it. Really?  Yes!\nNew line here\n\n  Second paragraph, one sentence."


def _pieces(granularity, **kw):
    return [TEXT[a:b] for a, b in text_spans(TEXT, granularity, **kw)]


def test_words_are_whitespace_separated():
    assert _pieces("word")[:4] == ["Dr.", "Vesk", "fixed", "it."]


def test_sentences_end_at_punctuation_and_newlines():
    assert _pieces("sentence") == ["Dr. Vesk fixed it.", "Really?", "Yes!", "New line here",
                                   "Second paragraph, one sentence."]


def test_abbreviations_and_initials_do_not_end_sentences():
    text = "Mr. J. Vesk met Prof. Ode, e.g. at noon. Then he left."
    assert [text[a:b] for a, b in text_spans(text, "sentence")] == [
        "Mr. J. Vesk met Prof. Ode, e.g. at noon.", "Then he left."]


def test_cjk_sentence_punctuation_ends_sentences():
    text = "東京は大きい。大阪も大きい！ Fine."
    assert [text[a:b] for a, b in text_spans(text, "sentence")] == ["東京は大きい。", "大阪も大きい！", "Fine."]


def test_paragraphs_split_at_blank_lines():
    assert _pieces("paragraph") == ["Dr. Vesk fixed it. Really?  Yes!\nNew line here",
                                    "Second paragraph, one sentence."]


def test_delimiter_keeps_the_delimiter_with_the_piece_before():
    assert _pieces("delimiter", delimiter=",") == [TEXT[:TEXT.index(",") + 1].strip(),
                                                   " one sentence.".strip()]


def test_explicit_spans_are_checked():
    assert text_spans(TEXT, "spans", spans=[(4, 8), (0, 3)]) == [(0, 3), (4, 8)]
    with pytest.raises(GranularityError, match="overlap"):
        text_spans(TEXT, "spans", spans=[(0, 5), (3, 8)])
    with pytest.raises(GranularityError, match="inside"):
        text_spans(TEXT, "spans", spans=[(0, len(TEXT) + 1)])
    with pytest.raises(GranularityError, match="at least one"):
        text_spans(TEXT, "spans", spans=[])
    with pytest.raises(GranularityError, match="delimiter"):
        text_spans(TEXT, "delimiter")
    with pytest.raises(GranularityError, match="unknown"):
        text_spans(TEXT, "chapter")
