"""Render an :class:`~atman.explanation.Explanation` as self-contained HTML.

The output has no external assets and needs no JavaScript: colours are inline styles, the hover
value is both a ``title`` attribute and a CSS tooltip. Every piece of user text goes through
:func:`html.escape`.

The small helpers at the top (:func:`split_units`, :func:`~atman.render.palette.max_abs_score`, :func:`intensity`,
:func:`format_score`) hold the scale logic that the terminal renderer shares, and the colours come
from :mod:`atman.render.palette`, so every view agrees on what a score looks like.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from html import escape
from typing import TYPE_CHECKING

from .palette import AGAINST_RGB, FOR_RGB, LEGEND, MAX_ALPHA, max_abs_score, rgba, shade
from .titles import item_label, method_name, part_names, score_unit, settings_line, view_title

if TYPE_CHECKING:
    from ..explanation import Explanation, Item, TargetExplanation

TOP_K = 5


def split_units(text: str, items: Iterable[Item]) -> list[tuple[str, Item | None]]:
    """Cut ``text`` into consecutive pieces, each either one item or a gap between items (``None``).

    The pieces always join back to ``text``. Offsets are clamped to the text and an item that
    overlaps the previous one loses the overlapping part, so bad offsets cannot duplicate text.

    >>> from atman.explanation import Item
    >>> split_units("Hi there", [Item("prompt", "there", 3, 5, 0.5)])
    [('Hi ', None), ('there', Item(kind='prompt', text='there', start=3, length=5, score=0.5, refined=False))]
    """
    pieces: list[tuple[str, Item | None]] = []
    cursor = 0
    for item in sorted(items, key=lambda it: it.start):
        start = min(max(item.start, cursor), len(text))
        end = min(item.start + item.length, len(text))
        if end <= start:
            continue
        if start > cursor:
            pieces.append((text[cursor:start], None))
        pieces.append((text[start:end], item))
        cursor = end
    if cursor < len(text):
        pieces.append((text[cursor:], None))
    return pieces


def intensity(score: float, max_abs: float) -> float:
    """How strongly to colour ``score``, from 0 to 1, relative to ``max_abs``.

    All-zero explanations (``max_abs == 0``) and NaN scores get 0 instead of a division error.

    >>> intensity(-1.0, 4.0), intensity(1.0, 0.0)
    (0.25, 0.0)
    """
    if max_abs <= 0 or math.isnan(score):
        return 0.0
    return min(abs(score) / max_abs, 1.0)


def format_score(score: float, signed: bool = True) -> str:
    """A short score for labels; tiny non-zero scores keep their magnitude visible.

    >>> format_score(0.12345), format_score(-0.00001234), format_score(2.0, signed=False)
    ('+0.1235', '-1.234e-05', '2.0000')
    """
    sign = "+" if signed else ""
    if score != 0 and abs(score) < 1e-3:
        return f"{score:{sign}.3e}"
    return f"{score:{sign}.4f}"


def _background(score: float, max_abs: float) -> str:
    *rgb, alpha = shade(score, intensity(score, max_abs))
    return rgba(tuple(rgb), alpha)


_CSS = """
.atman { color-scheme: light; background: #fff; color: #111; font: 15px/1.5 system-ui, -apple-system,
  "Segoe UI", Roboto, sans-serif; max-width: 60rem; margin: 0 auto; padding: 1rem; }
.atman h1 { font-size: 1.3rem; margin: 0 0 .5rem; }
.atman .meta, .atman .note { color: #555; font-size: .85rem; }
.atman table { border-collapse: collapse; font-size: .85rem; margin: .4rem 0 .8rem; }
.atman th, .atman td { border: 1px solid #ddd; padding: .15rem .5rem; text-align: left;
  vertical-align: top; }
.atman th { background: #f4f4f4; font-weight: 600; }
.atman td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.atman details.explained { border: 1px solid #ddd; border-radius: 6px; padding: .4rem .8rem;
  margin: .8rem 0; }
.atman summary { cursor: pointer; font-weight: 600; }
.atman code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  background: #f2f2f2; border-radius: 3px; padding: 0 .2em; white-space: pre-wrap; }
.atman .images { display: flex; flex-wrap: wrap; gap: .8rem; }
.atman .images figure { margin: 0; }
.atman .images img { image-rendering: pixelated; max-width: 20rem; border: 1px solid #eee; }
.atman .label { font-size: .75rem; text-transform: uppercase; letter-spacing: .05em; color: #666;
  margin-top: .6rem; }
.atman .text { white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.9;
  border: 1px solid #eee; border-radius: 4px; padding: .4rem .6rem; }
/* The faint inset line keeps neighbouring units apart when their colours are alike. */
.atman .unit { position: relative; border-radius: 3px; box-shadow: inset -1px 0 rgba(0, 0, 0, .12);
  cursor: help; }
.atman .unit:hover { outline: 1px solid #333; }
.atman .unit:hover::after { content: attr(title); position: absolute; left: 0; bottom: 100%;
  z-index: 1; background: #222; color: #fff; font-size: .75rem; line-height: 1.3;
  padding: .1rem .35rem; border-radius: 3px; white-space: nowrap; pointer-events: none; }
.atman .current { text-decoration: underline 2px; text-underline-offset: 3px; font-weight: 600; }
.atman .legend { display: flex; align-items: center; gap: .5rem; font-size: .8rem; color: #444;
  margin-top: .6rem; flex-wrap: wrap; }
.atman .legend .bar { width: 12rem; height: .8rem; border: 1px solid #ccc; border-radius: 3px; }
.atman .swatch { display: inline-block; width: .8em; height: .8em; border-radius: 2px;
  border: 1px solid #ccc; margin-right: .3em; vertical-align: -.05em; }
"""


def _unit(piece: str, item: Item, max_abs: float, current: bool = False) -> str:
    title = f"score: {format_score(item.score)}"
    css_class = "unit current" if current else "unit"
    return (f'<span class="{css_class}" data-kind="{escape(item.kind)}" data-score="{item.score!r}" '
            f'title="{escape(title)}" style="background-color: {_background(item.score, max_abs)}">'
            f"{escape(piece)}</span>")


def _text_block(text: str, items: Sequence[Item], max_abs: float, kind: str,
                current: tuple[int, int] | None = None) -> str:
    """One text with its units coloured; ``current`` marks the explained target span."""
    parts = []
    offset = 0
    for piece, item in split_units(text, items):
        end = offset + len(piece)
        if item is not None:
            overlaps = current is not None and offset < current[1] and current[0] < end
            parts.append(_unit(piece, item, max_abs, overlaps))
        elif current is None:
            parts.append(escape(piece))
        else:
            # Gaps are plain text, so the explained span can be cut out of them without nesting.
            lo = min(max(current[0], offset), end) - offset
            hi = min(max(current[1], offset), end) - offset
            parts.append(escape(piece[:lo]))
            if hi > lo:
                parts.append(f'<span class="current">{escape(piece[lo:hi])}</span>')
            parts.append(escape(piece[hi:]))
        offset = end
    return f'<div class="text {kind}" data-kind="{kind}">{"".join(parts)}</div>'


def _legend(max_abs: float) -> str:
    if max_abs == 0:
        return '<div class="legend">All scores are 0: no unit changed the target\'s likelihood.</div>'
    bound = escape(format_score(max_abs, signed=False))
    gradient = (f"linear-gradient(to right, {rgba(AGAINST_RGB, MAX_ALPHA)}, {rgba(AGAINST_RGB, 0)} 50%, "
                f"{rgba(FOR_RGB, 0)} 50%, {rgba(FOR_RGB, MAX_ALPHA)})")
    return (f'<div class="legend"><span>&minus;{bound} against</span>'
            f'<span class="bar" style="background: {gradient}"></span>'
            f"<span>+{bound} for the target</span>"
            '<span class="note">(colour strength = |score| / max |score| of this target)</span></div>')


def _top_table(exp: TargetExplanation, max_abs: float, settings: dict) -> str:
    top = exp.top(TOP_K)
    if not top:
        return '<p class="note">No units to rank.</p>'
    rows = []
    for rank, item in enumerate(top, 1):
        part, text, where = item_label(item, settings)
        rows.append(f"<tr><td class=\"num\">{rank}</td><td>{escape(part)}</td>"
                    f"<td><code>{escape(text if item.kind == 'image' else item.text)}</code></td>"
                    f'<td class="note">{escape(where)}</td>'
                    f'<td class="num"><span class="swatch" style="background-color: '
                    f'{_background(item.score, max_abs)}"></span>{escape(format_score(item.score))}</td></tr>')
    return ('<table class="top"><caption class="note">Top units by score</caption>'
            "<tr><th>#</th><th>part</th><th>text</th><th>where</th><th>score</th></tr>"
            f"{''.join(rows)}</table>")


def _image_block(explanation: Explanation, index: int, images: Sequence | None) -> str:
    """Overlays of the input images for the ``index``-th target explanation, if there are image items."""
    if not images or not any(item.kind == "image" for item in explanation.explanations[index].items):
        return ""
    from .image import overlay_data_uri

    figures = "".join(
        f'<figure><img src="{overlay_data_uri(explanation, image, number, index)}" '
        f'alt="relevance over image {number + 1}"><figcaption class="note">image {number + 1}</figcaption></figure>'
        for number, image in enumerate(images)
    )
    return f'<div class="label">Images</div><div class="images">{figures}</div>'


def _capital(name: str) -> str:
    return name[:1].upper() + name[1:]


def _target_section(explanation: Explanation, exp: TargetExplanation, index: int,
                    images: Sequence | None = None) -> str:
    max_abs = max_abs_score(exp.items)
    count = len(explanation.explanations)
    span = exp.target
    prompt_items = [item for item in exp.items if item.kind == "prompt"]
    target_items = [item for item in exp.items if item.kind == "target"]
    current = (span.start, span.start + span.length)
    first, second = part_names(explanation.settings)
    prompt_block = (f'<div class="label">{escape(_capital(first))}</div>'
                    + _text_block(explanation.prompt, prompt_items, max_abs, "prompt") if explanation.prompt else "")
    return (
        f'<details class="explained" data-index="{index}" open>'
        f"<summary>{escape(_capital(second))} {index + 1} of {count}: <code>{escape(span.text)}</code> "
        f'<span class="note">(characters {span.start}&ndash;{span.start + span.length} of the target, '
        f"max |score| {escape(format_score(max_abs, signed=False))})</span></summary>"
        # an image classifier's input is the image alone: no empty prompt box
        f"{prompt_block}"
        f"{_image_block(explanation, index, images)}"
        f'<div class="label">{escape(_capital(second))} <span class="note">(explained part underlined)</span></div>'
        f"{_text_block(explanation.target, target_items, max_abs, 'target', current)}"
        f"{_legend(max_abs)}{_top_table(exp, max_abs, explanation.settings)}"
        "</details>"
    )


def _settings_table(settings: dict[str, object]) -> str:
    """The settings in words, and every recorded setting in a table a click away."""
    if not settings:
        return ""
    described = settings_line(settings)
    rows = "".join(
        f"<tr><th>{escape(str(key))}</th><td>"
        f"{escape(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str))}"
        "</td></tr>"
        for key, value in settings.items()
    )
    return (f'<p class="settings-line note">{escape(described)}</p>' if described else "") + (
        f'<details class="settings"><summary class="note">All settings</summary><table class="settings">{rows}'
        "</table></details>")


def _body(explanation: Explanation, title: str, images: Sequence | None = None) -> str:
    sections = "".join(_target_section(explanation, exp, index, images)
                       for index, exp in enumerate(explanation.explanations))
    if not sections:
        sections = '<p class="note">This explanation has no target explanations.</p>'
    return (
        f"<h1>{escape(title)}</h1>"
        f'<div class="meta">Method <strong class="method">{escape(method_name(explanation.settings))}</strong>'
        f" &middot; model <code>{escape(explanation.model)}</code> &middot; target "
        f"<code>{escape(explanation.target)}</code> &middot; {escape(LEGEND)}; hover a unit for its score.</div>"
        f'<div class="meta note">Scores: {escape(score_unit(explanation.settings))}.</div>'
        f"{_settings_table(explanation.settings)}{sections}"
    )


def render_fragment(explanation: Explanation) -> str:
    """The explanation as one ``<div class="atman">`` with its own inline ``<style>``.

    This is what Jupyter shows through ``Explanation._repr_html_``; the CSS is scoped to
    ``.atman`` so it does not restyle the notebook.

    >>> html = render_fragment(exp)  # exp from atman.explain(...)
    >>> html.startswith('<div class="atman">')
    True
    """
    body = _body(explanation, view_title(explanation.settings))
    return f'<div class="atman"><style>{_CSS}</style>{body}</div>'


def render_html(explanation: Explanation, title: str | None = None, images: Sequence | None = None) -> str:
    """The explanation as one self-contained HTML5 document (inline CSS, no assets, no script).

    ``images`` (PIL images, in input order) are shown with their relevance overlays. The title
    defaults to the method's name (``"AtMan explanation"``, ``"Integrated Gradients explanation"``);
    the method is named under any title.

    >>> from pathlib import Path
    >>> _ = Path("explanation.html").write_text(render_html(exp, title="Why Oslo?"), encoding="utf-8")
    """
    title = title or view_title(explanation.settings)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>body {{ margin: 0; background: #fff; }}{_CSS}</style>"
        f'</head><body><div class="atman">{_body(explanation, title, images)}</div></body></html>\n'
    )
