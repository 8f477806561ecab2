"""Terminal and HTML rendering of hand-built explanations (no model needed)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

import atman
from atman.explanation import Explanation, Item, TargetExplanation, TargetSpan
from atman.render import render_fragment, render_html, render_terminal
from atman.render.html import format_score, intensity, split_units
from atman.render.palette import AGAINST_RGB, FOR_RGB, LEGEND, MAX_ALPHA, blend, max_abs_score
from atman.render.terminal import terminal_renderables

PROMPT = "Ada lives in Oslo.\n  Bob <script>alert(1)</script> lives in Rome.\n\nWhere does Ada live? In"
TARGET = " Oslo, Norway"


def _item(text: str, score: float, kind: str = "prompt", source: str = PROMPT) -> Item:
    start = source.index(text)
    return Item(kind, text, start, len(text), score)


PROMPT_ITEMS = (
    _item("Ada lives in Oslo.", 0.8),
    _item("Bob <script>alert(1)</script> lives in Rome.", -0.4),
    _item("Where does Ada live?", 0.1),
    _item("In", 0.0),
)


def _explanation(*explanations: TargetExplanation, prompt: str = PROMPT, target: str = TARGET) -> Explanation:
    return Explanation(model="test/model", prompt=prompt, target=target, explanations=explanations,
                       settings={"granularity": "sentence", "factor": 0.1})


def _whole(items: tuple[Item, ...] = PROMPT_ITEMS) -> Explanation:
    return _explanation(TargetExplanation(TargetSpan(TARGET, 0, len(TARGET)), items))


def _per_token() -> Explanation:
    tokens = [(" Oslo", 0), (",", 5), (" Norway", 6)]
    explanations = []
    for index, (text, start) in enumerate(tokens):
        previous = tuple(_item(tok, 0.05 * (i + 1), "target", TARGET)
                         for i, (tok, _) in enumerate(tokens[:index]))
        scaled = tuple(Item(it.kind, it.text, it.start, it.length, it.score * (index + 1))
                       for it in PROMPT_ITEMS)
        explanations.append(TargetExplanation(TargetSpan(text, start, len(text)), scaled + previous))
    return _explanation(*explanations)


class _Units(HTMLParser):
    """Collects every ``span.unit`` and the full text of each ``div.text`` block."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.units: list[dict[str, str]] = []
        self.blocks: list[tuple[str, str]] = []
        self._unit: dict[str, str] | None = None
        self._block: list[str] | None = None
        self._block_kind = ""
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        classes = attributes.get("class", "").split()
        if self._block is not None and tag == "div":
            self._depth += 1
        if tag == "div" and "text" in classes:
            self._block, self._block_kind, self._depth = [], attributes["data-kind"], 0
        if tag == "span" and "unit" in classes:
            self._unit = dict(attributes, text="")

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._unit is not None:
            self.units.append(self._unit)
            self._unit = None
        if tag == "div" and self._block is not None:
            if self._depth == 0:
                self.blocks.append((self._block_kind, "".join(self._block)))
                self._block = None
            else:
                self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._unit is not None:
            self._unit["text"] += data
        if self._block is not None:
            self._block.append(data)


def _parse(document: str) -> _Units:
    parser = _Units()
    parser.feed(document)
    return parser


def _recorded(explanation: Explanation, **kwargs: int) -> str:
    console = Console(record=True, width=200, color_system="truecolor", force_terminal=True)
    render_terminal(explanation, console, **kwargs)
    return console.export_text()


# --- shared helpers -------------------------------------------------------------------------


def test_split_units_rejoins_text_and_keeps_gaps():
    pieces = split_units(PROMPT, PROMPT_ITEMS)
    assert "".join(piece for piece, _ in pieces) == PROMPT
    assert [item for _, item in pieces if item is not None] == list(PROMPT_ITEMS)
    assert ("\n  ", None) in pieces


def test_split_units_survives_out_of_range_and_overlapping_offsets():
    items = [Item("prompt", "abc", 0, 3, 1.0), Item("prompt", "cde", 2, 3, 1.0),
             Item("prompt", "x", 50, 4, 1.0)]
    pieces = split_units("abcdef", items)
    assert pieces == [("abc", items[0]), ("de", items[1]), ("f", None)]


def test_scale_helpers_handle_zero_and_nan():
    assert max_abs_score([]) == 0.0
    assert max_abs_score([Item("prompt", "a", 0, 1, -3.0), Item("prompt", "b", 1, 1, float("nan"))]) == 3.0
    assert intensity(0.0, 0.0) == 0.0
    assert intensity(float("nan"), 1.0) == 0.0
    assert intensity(-2.0, 4.0) == 0.5
    assert format_score(0.12345) == "+0.1235"
    assert format_score(-0.00001) == "-1.000e-05"


# --- HTML -----------------------------------------------------------------------------------


def test_every_item_is_a_unit_span_with_its_score_in_the_title():
    units = _parse(render_html(_whole())).units
    assert [unit["text"] for unit in units] == [item.text for item in PROMPT_ITEMS]
    for unit, item in zip(units, PROMPT_ITEMS, strict=True):
        assert unit["title"] == f"score: {item.score:+.4f}"
        assert float(unit["data-score"]) == item.score


def test_user_text_is_escaped():
    explanation = _whole()
    explanation = Explanation("<b>model</b>", explanation.prompt, explanation.target,
                              explanation.explanations, {"<i>key</i>": "<u>value</u>"})
    document = render_html(explanation, title="<script>title</script>")
    assert "<script>" not in document
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in document
    for raw in ("<b>model", "<i>key", "<u>value"):
        assert raw not in document


def test_document_is_self_contained():
    document = render_html(_whole())
    assert document.startswith("<!DOCTYPE html>")
    assert "http://" not in document and "https://" not in document
    assert not re.search(r"\b(?:src|href)\s*=", document)
    assert "@import" not in document and "url(" not in document
    assert "<style>" in document


def test_prompt_whitespace_and_newlines_are_preserved():
    document = render_html(_whole())
    assert re.search(r"\.atman \.text \{[^}]*white-space: pre-wrap", document)
    blocks = dict(_parse(document).blocks)
    assert blocks["prompt"] == PROMPT
    assert blocks["target"] == TARGET


def test_positive_and_negative_scores_get_different_colours():
    units = {unit["text"]: unit["style"] for unit in _parse(render_html(_whole())).units}
    positive, negative = units["Ada lives in Oslo."], units["Bob <script>alert(1)</script> lives in Rome."]
    hue = re.compile(r"rgba\((\d+), (\d+), (\d+), ([\d.]+)\)")
    assert hue.search(positive).groups()[:3] != hue.search(negative).groups()[:3]
    # The strongest unit is the most opaque one; a zero score is fully transparent.
    assert float(hue.search(positive).group(4)) > float(hue.search(negative).group(4)) > 0
    assert float(hue.search(units["In"]).group(4)) == 0


def test_all_zero_scores_render():
    zero = tuple(Item(it.kind, it.text, it.start, it.length, 0.0) for it in PROMPT_ITEMS)
    explanation = _whole(zero)
    document = render_html(explanation)
    assert len(_parse(document).units) == len(zero)
    assert "All scores are 0" in document
    assert "all scores are 0" in _recorded(explanation)


def test_empty_items_and_no_explanations_render():
    empty = _whole(())
    assert _parse(render_html(empty)).blocks[0] == ("prompt", PROMPT)
    assert PROMPT.splitlines()[0] in _recorded(empty)
    none = _explanation()
    assert "no target explanations" in render_html(none)
    assert "no target explanations" in _recorded(none)


def test_per_token_explanations_are_all_rendered():
    explanation = _per_token()
    document = render_html(explanation)
    parsed = _parse(document)
    assert document.count('class="explained"') == 3
    assert [kind for kind, _ in parsed.blocks] == ["prompt", "target"] * 3
    target_units = [unit["text"] for unit in parsed.units if unit["data-kind"] == "target"]
    assert target_units == [" Oslo", " Oslo", ","]
    # The explained token is marked, outside of any unit.
    assert '<span class="current">,</span>' in document
    assert "Target 3 of 3" in document


def test_settings_are_listed():
    document = render_html(_whole())
    assert "<th>granularity</th><td>sentence</td>" in document
    assert "<th>factor</th><td>0.1</td>" in document


def test_top_table_lists_the_best_five():
    explanation = _per_token()
    document = render_html(explanation)
    tables = re.findall(r'<table class="top">.*?</table>', document)
    assert len(tables) == 3
    assert tables[-1].count("<tr>") == 1 + 5
    assert tables[0].index("Ada lives in Oslo.") < tables[0].index("Where does Ada live?")


def test_fragment_is_one_styled_div_and_is_the_jupyter_repr():
    explanation = _whole()
    fragment = render_fragment(explanation)
    assert fragment.startswith('<div class="atman"><style>') and fragment.endswith("</div>")
    assert "<html" not in fragment and "<body" not in fragment
    assert explanation._repr_html_() == fragment


# --- terminal -------------------------------------------------------------------------------


def test_terminal_shows_prompt_target_and_top_item():
    text = _recorded(_whole())
    for line in PROMPT.splitlines():
        assert line.strip() in text
    assert "top items" in text
    top_line = next(line for line in text.splitlines() if "'Ada lives in Oslo.'" in line)
    assert "+0.8000" in top_line
    assert "0.8000" in text  # legend bound


def test_terminal_prints_markup_literally():
    prompt = "Say [bold]hi[/bold] and [red]stop[/]"
    items = (Item("prompt", "[bold]hi[/bold]", 4, 15, 1.0), Item("prompt", "[red]stop[/]", 24, 12, -1.0))
    explanation = _explanation(TargetExplanation(TargetSpan("[x]", 0, 3), items), prompt=prompt, target="[x]")
    text = _recorded(explanation)
    assert prompt in text
    assert "'[x]'" in text
    assert "'[red]stop[/]'" in text


def test_terminal_colours_differ_by_sign():
    console = Console(record=True, width=200, color_system="truecolor", force_terminal=True)
    console.print(*terminal_renderables(_whole()))
    styled = console.export_html(inline_styles=True)

    def background(text: str) -> str:
        unit = r'<span style="[^"]*background-color: (#[0-9a-f]{6})[^"]*">'
        match = re.search(unit + re.escape(text), styled)
        assert match, text
        return match.group(1)

    assert background("Ada lives in Oslo.") != background("Bob &lt;script&gt;")


def test_terminal_max_targets_limits_and_reports():
    text = _recorded(_per_token(), max_targets=1)
    assert "target 1/3" in text and "target 2/3" not in text
    assert "2 more target explanation(s) not shown" in text
    with pytest.raises(ValueError):
        terminal_renderables(_per_token(), max_targets=-1)


# --- one palette, one legend, the method named ------------------------------------------------


def _with_method(method: str | None) -> Explanation:
    settings = {"granularity": "sentence"} | ({"method": method} if method else {})
    return Explanation(model="test/model", prompt=PROMPT, target=TARGET, settings=settings,
                       explanations=(TargetExplanation(TargetSpan(TARGET, 0, len(TARGET)), PROMPT_ITEMS),))


def test_html_units_use_the_palette_and_its_legend():
    document = render_html(_whole())
    units = {unit["text"]: unit["style"] for unit in _parse(document).units}
    assert f"rgba({', '.join(map(str, FOR_RGB))}, {MAX_ALPHA:.3f})" in units["Ada lives in Oslo."]
    assert f"rgba({', '.join(map(str, AGAINST_RGB))}, {0.5 * MAX_ALPHA:.3f})" in units[
        "Bob <script>alert(1)</script> lives in Rome."]
    assert LEGEND in document and "green" not in document


def test_terminal_uses_the_palette_and_its_legend():
    console = Console(record=True, width=200, color_system="truecolor", force_terminal=True)
    console.print(*terminal_renderables(_whole()))
    assert LEGEND in console.export_text(clear=False)
    styled = console.export_html(inline_styles=True)
    strongest = "#{:02x}{:02x}{:02x}".format(*blend(1.0, 1.0, (228, 228, 228)))
    assert re.search(f"background-color: {strongest}[^\"]*\">Ada lives in Oslo.", styled)


@pytest.mark.parametrize(("method", "title"), [(None, "AtMan explanation"), ("atman", "AtMan explanation"),
                                               ("integrated-gradients", "Integrated Gradients explanation"),
                                               ("brand-new", "brand-new explanation")])
def test_every_view_is_titled_by_its_method(method, title):
    explanation = _with_method(method)
    assert f"<title>{title}</title>" in render_html(explanation)
    assert f"<h1>{title}</h1>" in render_html(explanation)
    assert f"<h1>{title}</h1>" in render_fragment(explanation)
    assert _recorded(explanation).splitlines()[0].startswith(title)


def test_a_custom_html_title_still_names_the_method():
    document = render_html(_with_method("chefer"), title="Why Oslo?")
    assert "<h1>Why Oslo?</h1>" in document
    assert '<strong class="method">Chefer et al.</strong>' in document


def test_the_web_page_uses_the_palette_and_its_legend():
    static = Path(atman.__file__).parent / "server" / "static"
    css = (static / "style.css").read_text(encoding="utf-8")
    variables = dict(re.findall(r"--atman-([a-z-]+):\s*([^;]+);", css))
    assert tuple(int(v) for v in variables["for"].split(",")) == FOR_RGB
    assert tuple(int(v) for v in variables["against"].split(",")) == AGAINST_RGB
    assert float(variables["max-alpha"]) == MAX_ALPHA
    script = (static / "app.js").read_text(encoding="utf-8")
    assert "--atman-for" in script and "--atman-against" in script and "--atman-max-alpha" in script
    assert not re.search(r"\d+, \d+, \d+", script)  # no colour of its own
    page = (static / "index.html").read_text(encoding="utf-8")
    assert LEGEND[0].upper() + LEGEND[1:] in page
    assert "AtMan" in page.split('id="result"')[1].split("</section>")[0]


def _text(explanation: Explanation) -> str:
    console = Console(record=True, width=140)
    render_terminal(explanation, console)
    return console.export_text()


def test_every_view_says_what_its_scores_are_and_which_settings_made_them():
    exp = Explanation(model="m", prompt="Ada lives in Oslo.", target=" Oslo",
                      explanations=(TargetExplanation(TargetSpan(" Oslo", 0, 5),
                                                      (Item("prompt", "Oslo", 13, 4, 1.2),)),),
                      settings={"granularity": "refine", "refine_from": "sentence", "refine_top": 1,
                                "multiplier": 0.1, "kappa": None, "mode": "log-additive"})
    text = _text(exp)
    assert "scores: rise of the target's cross-entropy, in nats, when the unit is suppressed" in text
    assert "units: sentences, the top 1 refined to tokens · multiplier 0.1 · conceptual suppression off" in text
    html = render_html(exp)
    assert "Scores: rise of the target&#x27;s cross-entropy, in nats" in html
    assert "units: sentences, the top 1 refined to tokens" in html and "<details class=\"settings\">" in html
    assert "nats" in _text(exp.postprocessed("square", normalize=True)) and "squared; scaled to 0..1" in _text(
        exp.postprocessed("square", normalize=True))


def test_repeated_tokens_are_told_apart_by_their_position():
    prompt = "8 7 8 1"
    scores = (0.4, 0.3, 0.2, 0.1)
    items = tuple(Item("prompt", t, i * 2, 1, s) for i, (t, s) in enumerate(zip("8781", scores, strict=True)))
    exp = Explanation(model="m", prompt=prompt, target=" 8", settings={"granularity": "token"},
                      explanations=(TargetExplanation(TargetSpan(" 8", 0, 2), items),))
    text = _text(exp)
    assert "characters 0-1" in text and "characters 4-5" in text
    assert "<th>where</th>" in render_html(exp) and "characters 4-5" in render_html(exp)


def test_a_sentence_pair_is_named_sentence_a_and_b_and_tiles_are_in_words():
    pair = Explanation(model="m", prompt="A man eats.", target="A man dines.", settings={"task": "similarity"},
                       explanations=(TargetExplanation(TargetSpan("A man dines.", 0, 12), (
                           Item("prompt", "eats", 6, 4, 0.3), Item("target", "dines", 6, 5, 0.2))),))
    text = _text(pair)
    assert "sentence A" in text and "sentence B" in text and "prompt" not in text.replace("prompted", "")
    assert "drop of the two texts' cosine similarity" in text
    assert "Sentence A" in render_html(pair) and "Sentence B" in render_html(pair)
    from atman.explanation import ImageItem

    tiles = Explanation(model="m", prompt="", target="cat", settings={
        "task": "image-classification", "images": [{"width": 96, "height": 96, "rows": 6, "cols": 6, "tile": [2, 2]}]},
        explanations=(TargetExplanation(TargetSpan("cat", 0, 3), (
            ImageItem(0, 2 / 6, 4 / 6, 2 / 6, 2 / 6, 0.9),)),))
    text = _text(tiles)
    assert "image 1, tile row 3, column 2 of 3 x 3" in text
    assert "drop of log p(class), in nats" in text
