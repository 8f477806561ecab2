"""Render an :class:`~atman.explanation.Explanation` in the terminal with rich.

User text only ever enters rich as :class:`rich.text.Text` content, never as markup, so a prompt
containing ``[bold]`` prints literally. Units get an explicit black foreground on a light
background, which reads the same on dark and light terminals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.color import Color
from rich.console import Console, RenderableType
from rich.panel import Panel
from rich.rule import Rule
from rich.style import Style
from rich.table import Table
from rich.text import Text

from .html import TOP_K, format_score, intensity, split_units
from .palette import LEGEND, blend, max_abs_score
from .titles import item_label, part_names, score_unit, settings_line, view_title

if TYPE_CHECKING:
    from ..explanation import Explanation, Item, TargetExplanation

# What a unit with score 0 sits on: light enough for black text, distinct from the plain gaps.
_BASE_RGB = (228, 228, 228)
_LEGEND_STEPS = (1.0, 2 / 3, 1 / 3)


def _colour(positive: bool, strength: float) -> Color:
    """The palette's shade laid over the base, the terminal twin of the HTML alpha over white."""
    return Color.from_rgb(*blend(1.0 if positive else -1.0, strength, _BASE_RGB))


def _style(score: float, max_abs: float) -> Style:
    return Style(color="black", bgcolor=_colour(score >= 0, intensity(score, max_abs)))


def _coloured(text: str, items: list[Item], max_abs: float) -> Text:
    out = Text()
    for piece, item in split_units(text, items):
        out.append(piece, style=_style(item.score, max_abs) if item is not None else "")
    return out


def _legend(max_abs: float) -> Text:
    if max_abs == 0:
        return Text("all scores are 0: no unit changed the target's likelihood", style="dim")
    bound = format_score(max_abs, signed=False)
    legend = Text(f"-{bound} ")
    for step in _LEGEND_STEPS:
        legend.append("  ", style=Style(bgcolor=_colour(False, step)))
    legend.append(" 0 ", style=Style(color="black", bgcolor=_colour(True, 0.0)))
    for step in reversed(_LEGEND_STEPS):
        legend.append("  ", style=Style(bgcolor=_colour(True, step)))
    legend.append(f" +{bound}")
    legend.append(f"   {LEGEND}", style="dim")
    return legend


def _top_table(exp: TargetExplanation, max_abs: float, settings: dict) -> Table:
    """The top items; where the same text appears twice among them, a column says where each one is."""
    top = exp.top(TOP_K)
    labels = [item_label(item, settings) for item in top]
    texts = [(part, text) for part, text, _ in labels]
    repeated = len(set(texts)) < len(texts)
    columns = ("#", "part", "text", "where", "score") if repeated else ("#", "part", "text", "score")
    table = Table(*columns, title="top items", title_justify="left", box=box.SIMPLE, show_edge=False,
                  pad_edge=False)
    for rank, (item, (part, text, where)) in enumerate(zip(top, labels, strict=True), 1):
        cells = [str(rank), Text(part), Text(text)] + ([Text(where, style="dim")] if repeated else [])
        table.add_row(*cells, Text(format_score(item.score), style=_style(item.score, max_abs)))
    return table


def _target_renderables(explanation: Explanation, exp: TargetExplanation, index: int) -> list[RenderableType]:
    max_abs = max_abs_score(exp.items)
    span = exp.target
    header = Text(f"{part_names(explanation.settings)[1]} {index + 1}/{len(explanation.explanations)}: ")
    header.append(repr(span.text), style="bold")
    first, second = part_names(explanation.settings)
    prompt = _coloured(explanation.prompt, [item for item in exp.items if item.kind == "prompt"], max_abs)
    target = _coloured(explanation.target, [item for item in exp.items if item.kind == "target"], max_abs)
    target.stylize("bold underline", span.start, span.start + span.length)
    second_title = second if len(explanation.explanations) == 1 and span.length == len(explanation.target) \
        else f"{second} (explained part underlined)"
    return [
        Rule(header),
        Panel(prompt, title=first, title_align="left", border_style="dim"),
        Panel(target, title=second_title, title_align="left", border_style="dim"),
        _legend(max_abs),
        _top_table(exp, max_abs, explanation.settings) if exp.items else Text("no units to rank", style="dim"),
    ]


def terminal_renderables(explanation: Explanation, max_targets: int | None = None) -> list[RenderableType]:
    """The rich renderables that :func:`render_terminal` prints, for embedding or testing.

    ``max_targets`` limits how many target explanations are shown (per-token explanations of a
    long target get long); a note says how many were left out.

    >>> console = Console(record=True, width=100)
    >>> console.print(*terminal_renderables(exp, max_targets=1))
    >>> "top items" in console.export_text()
    True
    """
    if max_targets is not None and max_targets < 0:
        raise ValueError(f"max_targets must be >= 0 or None, got {max_targets}")
    title = Text(view_title(explanation.settings), style="bold")
    title.append(f" (model {explanation.model})", style="dim")
    shown = explanation.explanations[:max_targets]
    out: list[RenderableType] = [title, Text(f"scores: {score_unit(explanation.settings)}", style="dim")]
    described = settings_line(explanation.settings)
    if described:
        out.append(Text(described, style="dim"))
    for index, exp in enumerate(shown):
        out.extend(_target_renderables(explanation, exp, index))
    if not explanation.explanations:
        out.append(Text("this explanation has no target explanations", style="dim"))
    elif len(shown) < len(explanation.explanations):
        left = len(explanation.explanations) - len(shown)
        out.append(Text(f"... {left} more target explanation(s) not shown (max_targets={max_targets})",
                        style="dim"))
    return out


def render_terminal(explanation: Explanation, console: Console | None = None, *,
                    max_targets: int | None = None) -> None:
    """Print the explanation to ``console`` (a new stdout console by default).

    >>> render_terminal(exp)  # exp from atman.explain(...)
    >>> render_terminal(exp, Console(stderr=True), max_targets=3)
    """
    console = console or Console()
    for renderable in terminal_renderables(explanation, max_targets):
        console.print(renderable)
