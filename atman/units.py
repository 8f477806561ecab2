"""From the user's text to units (sets of token positions) and back to character offsets.

A :class:`Unit` is what AtMan suppresses in one perturbation: one or more token positions of the
model's input, with the character span of the user's text it stands for. Text units come from
character spans (words, sentences, ...) intersected with the tokenizer's offsets, so every score
maps back to characters. Template and special tokens belong to no unit and are never suppressed.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import AtmanError, EmptyInputError, GranularityError, NoUnitsError

GRANULARITIES = ("auto", "token", "word", "sentence", "paragraph", "delimiter", "spans", "refine")
TARGET_GRANULARITIES = ("complete", "token")
AUTO_UNITS = 30

_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)|[。！？]+[」』”’）]*|\n+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# Words: runs of non-space characters, except that Chinese and Japanese, written without spaces, are
# cut by script: each Han character is a word (as BERT's tokenizers cut Chinese), a run of hiragana
# or of katakana is one, and CJK punctuation stays with its neighbour (opening brackets with the
# word after them, the rest with the word before), as "it." keeps its period.
_HAN = "\u3005\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_HIRAGANA = "\u3041-\u309f"
_KATAKANA = "\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
_CJK_OPEN = "\u3008\u300a\u300c\u300e\u3010\u3014\u3016\u3018\u301a\u301d\uff08\uff3b\uff5b\uff5f\uff62"
_CJK_PUNCT = "\u3001-\u3004\u3006\u3008-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
_CJK_CLOSE = f"(?:(?![{_CJK_OPEN}])[{_CJK_PUNCT}])*"
_WORD = re.compile(
    f"[{_CJK_OPEN}]*(?:[{_HAN}]|[{_HIRAGANA}]+|[{_KATAKANA}]+|[^\\s{_HAN}{_HIRAGANA}{_KATAKANA}{_CJK_PUNCT}]+)"
    f"{_CJK_CLOSE}|\\S"
)
# a period after these does not end a sentence
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "etc", "e.g", "i.e", "no", "fig",
                  "approx", "inc", "ltd", "co", "mt"}


@dataclass(frozen=True)
class Unit:
    """Token ``positions`` that are suppressed together; ``start``/``length`` in the prompt or target."""

    kind: str
    positions: tuple[int, ...]
    start: int
    length: int
    text: str


@dataclass(frozen=True)
class ImageUnit:
    """An image tile suppressed as one unit: image ``image`` of the input, its token ``positions`` in the
    sequence, and the tile's rectangle ``left``, ``top``, ``width``, ``height`` in 0..1 of the image."""

    image: int
    positions: tuple[int, ...]
    left: float
    top: float
    width: float
    height: float
    kind: str = "image"


@dataclass(frozen=True)
class EncodedInput:
    """Prompt and target as one token sequence, with character offsets of every explainable token.

    ``prompt_spans[i]`` is the (start, end) character span in ``prompt`` of token ``i``, or None for
    tokens that are not the user's prompt text (BOS, chat template). Target tokens occupy positions
    ``target_start`` onwards; ``target_spans`` are their spans in ``target``.
    """

    input_ids: tuple[int, ...]
    prompt: str
    target: str
    prompt_spans: tuple[tuple[int, int] | None, ...]
    target_start: int
    target_spans: tuple[tuple[int, int], ...]

    @property
    def target_positions(self) -> range:
        return range(self.target_start, len(self.input_ids))


def encode(
    tokenizer,
    prompt: str,
    target: str | Sequence[int],
    *,
    chat: bool = False,
    system: str | None = None,
) -> EncodedInput:
    """Tokenize ``prompt`` (optionally inside the chat template) followed by ``target``.

    ``target`` is text, or token ids (a generated continuation, kept exactly as generated).
    """
    if not prompt or not prompt.strip():
        raise EmptyInputError("the prompt is empty")
    _check_text(prompt, "prompt")
    if isinstance(target, str):
        _check_text(target, "target")
    if chat:
        ids, spans = _encode_chat(tokenizer, prompt, system)
    else:
        ids, spans = tokenize(tokenizer, prompt)
    if isinstance(target, str):
        if not target:
            raise EmptyInputError("the target is empty")
        tenc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
        target_ids = list(tenc["input_ids"])
        target_spans = [(int(a), int(b)) for a, b in tenc["offset_mapping"]]
        target_text = target
    else:
        target_ids = [int(t) for t in target]
        target_text, target_spans = _decode_with_offsets(tokenizer, target_ids)
    if not target_ids:
        raise EmptyInputError("the target is empty (it has no tokens)")
    return EncodedInput(
        input_ids=tuple(ids + target_ids),
        prompt=prompt,
        target=target_text,
        prompt_spans=tuple(spans),
        target_start=len(ids),
        target_spans=tuple(target_spans),
    )


def tokenize(tokenizer, text: str, *, add_special_tokens: bool = True,
             offset: int = 0) -> tuple[list[int], list[tuple[int, int] | None]]:
    """Token ids of ``text`` and each token's character span (shifted by ``offset``); None for special
    tokens and tokens that cover no character. The one place text meets a tokenizer's offsets.

    >>> tokenize(tokenizer, "Hi there")  # all-MiniLM-L6-v2's: [CLS] and [SEP] are special
    ([101, 7632, 2045, 102], [None, (0, 2), (3, 8), None])
    """
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids)
    ids = [int(t) for t in enc["input_ids"]]
    spans = [None if tok in special or b <= a else (offset + int(a), offset + int(b))
             for tok, (a, b) in zip(ids, enc["offset_mapping"], strict=True)]
    return ids, spans


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AtmanError(f"the {what} is not valid text (undecodable bytes at character {exc.start})") from None


def _explainable(a: int, b: int) -> tuple[int, int] | None:
    return (int(a), int(b)) if b > a else None


_SENTINEL = "\u2063ATMAN-USER-TEXT\u2063"


def _encode_chat(tokenizer, prompt: str, system: str | None) -> tuple[list[int], list]:
    if not getattr(tokenizer, "chat_template", None):
        raise AtmanError("this model's tokenizer has no chat template; run without chat mode")

    def render(content: str) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": content}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # locate the user's text by rendering a sentinel in its place: the prompt itself may also
    # occur in the system message or in the template's own words
    skeleton = render(_SENTINEL)
    if skeleton.count(_SENTINEL) != 1:
        raise AtmanError("the chat template does not place the user message exactly once")
    offset = skeleton.index(_SENTINEL)
    text = render(prompt)
    if text != skeleton[:offset] + prompt + skeleton[offset + len(_SENTINEL):]:
        raise AtmanError("the chat template changes the prompt text, so its units cannot be located")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids)
    spans = []
    for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        lo, hi = max(int(a), offset) - offset, min(int(b), offset + len(prompt)) - offset
        spans.append((lo, hi) if hi > lo and token not in special else None)
    return list(enc["input_ids"]), spans


def _decode_with_offsets(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Text of generated ``ids`` and each token's character span in it.

    A prefix decode counts only once it is a stable prefix of the final text: a token holding part
    of a multi-byte character decodes to replacement characters until the character completes,
    and gets an empty span (the completing token gets the character).
    """
    text = tokenizer.decode(ids, skip_special_tokens=False)
    spans, previous = [], 0
    for i in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:i], skip_special_tokens=False)
        if text.startswith(prefix) and not prefix.endswith("\ufffd") and len(prefix) >= previous:
            spans.append((previous, len(prefix)))
            previous = len(prefix)
        else:
            spans.append((previous, previous))
    return text, spans


def text_spans(
    text: str,
    granularity: str,
    *,
    delimiter: str | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """Character spans (start, end) of ``text`` at a text granularity (not ``token`` or ``auto``).

    >>> text_spans("Ada lives in Oslo. Bo lives in Rome.", "sentence")
    [(0, 18), (19, 36)]
    """
    if granularity == "word":
        return [m.span() for m in _WORD.finditer(text)]
    if granularity == "sentence":
        return _split_after(text, _SENTENCE_END, keep=_is_abbreviation)
    if granularity == "paragraph":
        return _split_after(text, _PARAGRAPH_BREAK)
    if granularity == "delimiter":
        if not delimiter:
            raise GranularityError("granularity 'delimiter' needs a non-empty delimiter")
        return _split_after(text, re.compile(re.escape(delimiter)))
    if granularity == "spans":
        if not spans:
            raise GranularityError("granularity 'spans' needs at least one (start, end) character span")
        checked = []
        for start, end in spans:
            if not 0 <= start < end <= len(text):
                raise GranularityError(
                    f"span ({start}, {end}) is not a non-empty range inside the prompt of {len(text)} characters"
                )
            checked.append((int(start), int(end)))
        checked.sort()
        for (_, end), (start, _) in zip(checked, checked[1:], strict=False):
            if start < end:
                raise GranularityError("explicit spans must not overlap")
        return checked
    raise GranularityError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")


def _is_abbreviation(text: str, match: re.Match) -> bool:
    if match.group().strip() != ".":
        return False
    word = text[:match.start()].rsplit(None, 1)[-1] if text[:match.start()].strip() else ""
    return word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isupper())


def _split_after(text: str, boundary: re.Pattern, keep=None) -> list[tuple[int, int]]:
    """Pieces of ``text`` ending at each boundary match (inclusive), trimmed of whitespace.

    ``keep(text, match)`` true means the match does not end a piece (an abbreviation's period).
    """
    cuts = [m.end() for m in boundary.finditer(text) if keep is None or not keep(text, m)] + [len(text)]
    pieces, start = [], 0
    for end in cuts:
        piece = text[start:end]
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece) - len(piece.rstrip())
        if piece.strip():
            pieces.append((start + lead, end - trail))
        start = end
    return pieces


def prompt_units(
    encoded: EncodedInput,
    granularity: str = "auto",
    *,
    delimiter: str | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
) -> list[Unit]:
    """The units of the prompt at ``granularity``, in text order.

    >>> encoded = encode(tokenizer, "Ada lives in Oslo. Bo lives in Rome.", " Oslo")
    >>> [(unit.text, unit.positions) for unit in prompt_units(encoded, "sentence")]
    [('Ada lives in Oslo.', (1, 2, 3, 4, 5)), ('Bo lives in Rome.', (6, 7, 8, 9, 10))]
    >>> [unit.text for unit in prompt_units(encoded, "word")]
    ['Ada', 'lives', 'in', 'Oslo.', 'Bo', 'lives', 'in', 'Rome.']
    """
    if granularity not in GRANULARITIES:
        raise GranularityError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    tokens = [(pos, span) for pos, span in enumerate(encoded.prompt_spans) if span is not None]
    if granularity == "auto":
        granularity = choose_granularity(encoded)
    if granularity == "token":
        units = [Unit("prompt", (pos,), a, b - a, encoded.prompt[a:b]) for pos, (a, b) in tokens]
    else:
        char_spans = text_spans(encoded.prompt, granularity, delimiter=delimiter, spans=spans)
        units = _assign(encoded.prompt, tokens, char_spans)
        if len(units) < len(char_spans):
            kept = {(u.start, u.start + u.length) for u in units}
            lost = [span for span in char_spans if span not in kept]
            if granularity == "spans":
                raise GranularityError(
                    f"span(s) {lost} hold no token of their own (a token is given to the span it overlaps most); "
                    "widen them or use token boundaries"
                )
            # not an error (the tokenizer merged them into a neighbour), but never silent
            shown = ", ".join(repr(encoded.prompt[a:b]) for a, b in lost[:5]) + (", ..." if len(lost) > 5 else "")
            warnings.warn(f"{len(lost)} {granularity} unit(s) hold no token of their own and get no score (a token "
                          f"belongs to the unit it overlaps most): {shown}", UserWarning, stacklevel=2)
    if not units:
        raise NoUnitsError(f"granularity {granularity!r} yields no unit in this prompt")
    return units


def choose_granularity(encoded: EncodedInput, wanted: int = AUTO_UNITS) -> str:
    """The granularity whose unit count is closest to ``wanted`` (ties go to the finer one)."""
    counts = {"token": sum(span is not None for span in encoded.prompt_spans)}
    for name in ("word", "sentence", "paragraph"):
        counts[name] = len(text_spans(encoded.prompt, name))
    return min(counts, key=lambda name: abs(counts[name] - wanted))


def _assign(text: str, tokens: list[tuple[int, tuple[int, int]]], spans: list[tuple[int, int]]) -> list[Unit]:
    """Give each token to the span it overlaps most; spans left without a token are dropped."""
    members: list[list[int]] = [[] for _ in spans]
    j = 0
    for pos, (a, b) in tokens:
        best, best_overlap = None, 0
        # spans are sorted; only those near the token can overlap it
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        k = j
        while k < len(spans) and spans[k][0] < b:
            overlap = min(b, spans[k][1]) - max(a, spans[k][0])
            if overlap > best_overlap:
                best, best_overlap = k, overlap
            k += 1
        if best is not None:
            members[best].append(pos)
    return [
        Unit("prompt", tuple(pos), s, e - s, text[s:e])
        for (s, e), pos in zip(spans, members, strict=True)
        if pos
    ]


def target_units(encoded: EncodedInput) -> list[Unit]:
    """Each target token but the last as a unit (it can explain the target tokens after it)."""
    units = []
    for i, (a, b) in enumerate(encoded.target_spans[:-1]):
        units.append(Unit("target", (encoded.target_start + i,), a, b - a, encoded.target[a:b]))
    return units
