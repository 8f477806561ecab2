"""Views of :class:`~atman.citations.Citations`: the terminal and a page where hovering a response
sentence lights up the sources it rests on. Pure functions of the result; nothing here runs a model.

>>> from atman.render.citations import render_citations_html
>>> page = render_citations_html(result)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import html
import json
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .palette import FOR_RGB, MAX_ALPHA, blend, rgba

if TYPE_CHECKING:
    from ..citations import Citations

DEFAULT_TOP = 3
SNIPPET = 90
# what a citation score is, in words with its unit (the views print it beside the scores)
CITATION_UNIT = ("score: rise of the response part's cross-entropy (summed over its tokens), in nats, when the "
                 "source is suppressed")
UNIT_HTML = f'<p class="unit">{html.escape(CITATION_UNIT)}</p>'


def _snippet(text: str, limit: int = SNIPPET) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def source_names(result: Citations) -> list[str]:
    """How the views name each source, in one pass: in a context, by its passage (the passage's id, else its
    place from 1 in the list given) and, below passage level, its number within that passage (``p2:3`` =
    the third sentence of passage p2); in a transcript, by its number among the sources (its message is in
    its label)."""
    in_passage: dict[int, int] = {}
    for source in result.sources:
        if source.role is None:
            in_passage[source.passage] = in_passage.get(source.passage, 0) + 1
    names, seen = [], dict.fromkeys(in_passage, 0)
    for index, source in enumerate(result.sources):
        if source.role is not None:
            names.append(str(index + 1))
            continue
        passage = result.passages[source.passage]
        number = passage.index if passage.index is not None else source.passage
        pid = passage.id if passage.id is not None else str(number + 1)
        seen[source.passage] += 1
        if in_passage[source.passage] == 1 and source.text == passage.text:
            names.append(pid)
        else:
            names.append(f"{pid}:{seen[source.passage]}")
    return names


def citations_table(result: Citations, top: int = DEFAULT_TOP) -> Table:
    """A rich table: each response span with its top sources (score, passage, text)."""
    table = Table(title=f"Sources of the response ({result.model}, {result.settings.get('method', 'readout')}, "
                        f"{result.settings.get('sources', 'sentence')} level)", caption=CITATION_UNIT,
                  show_lines=True, expand=True)
    table.add_column("response", ratio=2)
    table.add_column("rests on", ratio=3)
    names = source_names(result)
    for span in result.spans:
        cited = Text()
        best = max((abs(s) for s in span.scores), default=0.0) or 1.0
        for rank, (index, score) in enumerate(span.top(top)):
            source = result.sources[index]
            passage = result.passages[source.passage]
            if rank:
                cited.append("\n")
            r, g, b = blend(score, score / best)
            cited.append(f"[{names[index]}] {score:+.2f} ", style=f"bold on rgb({r},{g},{b})")
            label = " ".join(x for x in (source.label, passage.title if source.role is None else passage.label) if x)
            if label:
                cited.append(f"({label}) ", style="dim")
            cited.append(_snippet(source.text))
        if not cited:
            cited.append("no source raised this part's likelihood", style="dim")
        table.add_row(span.text, cited)
    return table


def chat_table(result: Citations) -> Table:
    """A transcript's messages as a rich table (role, text), the explained answer last."""
    table = Table(title="Transcript", show_lines=True, expand=True)
    table.add_column("#", justify="right", width=3)
    table.add_column("role", width=10)
    table.add_column("message", ratio=5)
    for index, message in enumerate(result.messages):
        text = Text()
        if message.reasoning:
            text.append("thinking: " + _snippet(message.reasoning, 2 * SNIPPET) + "\n", style="dim italic")
        text.append(_snippet(message.content, 3 * SNIPPET) if message.content else "")
        for call in message.tool_calls:
            text.append(f"\ncalls {call['function']['name']} ({call['id']})", style="dim")
        role = message.role + (f"\n{message.tool_call_id}" if message.tool_call_id else "")
        table.add_row(str(index), role, text)
    return table


def render_citations_terminal(result: Citations, console: Console | None = None, top: int = DEFAULT_TOP) -> None:
    """Print the response's spans with their top ``top`` sources (a transcript's chat first)."""
    console = console or Console()
    if result.messages:
        console.print(chat_table(result))
    console.print(citations_table(result, top))


def render_citations_fragment(result: Citations, top: int = DEFAULT_TOP) -> str:
    """An HTML fragment (for notebooks and pages): the response's spans on the left, the context's
    sources on the right; hovering or focusing a span colours its sources by score and lists its top
    ``top``. Works without JavaScript too (each span's sources are listed under it)."""
    if result.messages:
        return render_chat_fragment(result, top)
    digest = hashlib.sha1((result.context + "\0" + result.response).encode("utf-8", "replace")).hexdigest()
    ident = f"atman-cite-{digest[:10]}"
    scores = [[round(s, 6) for s in span.scores] for span in result.spans]
    names = [html.escape(name) for name in source_names(result)]
    spans_html = []
    for k, span in enumerate(result.spans):
        listed = "".join(
            f"<li>[{names[i]}] {score:+.3f} "
            f"{html.escape(_snippet(result.sources[i].text, 60))}</li>"
            for i, score in span.top(top))
        spans_html.append(
            f'<div class="span" tabindex="0" data-span="{k}"><span class="text">{html.escape(span.text)}</span>'
            f'<ol class="top">{listed or "<li>no positive source</li>"}</ol></div>')
    # the context with every source marked, passage by passage
    context_html = []
    for p, passage in enumerate(result.passages):
        pieces, cursor = [], passage.start
        for i, source in enumerate(result.sources):
            if source.passage != p:
                continue
            pieces.append(html.escape(result.context[cursor:source.start]))
            pieces.append(f'<span class="source" data-source="{i}"><sup>{names[i]}</sup>'
                          f"{html.escape(result.context[source.start:source.end])}</span>")
            cursor = source.end
        pieces.append(html.escape(result.context[cursor:passage.end]))
        label = f'<div class="label">{html.escape(passage.label)}</div>' if passage.label else ""
        context_html.append(f'<div class="passage">{label}{"".join(pieces)}</div>')
    return _page(ident, "2fr 3fr", f'<div><h3>Response — hover a sentence</h3>{UNIT_HTML}{"".join(spans_html)}</div>'
                 f'<div><h3>Context — orange: the sentence rests on it</h3>{"".join(context_html)}</div>', scores)


def _spans_html(result: Citations, top: int) -> str:
    out, names = [], source_names(result)
    for k, span in enumerate(result.spans):
        listed = "".join(
            f"<li>[{html.escape(names[i])}] {score:+.3f} "
            + (f'<span class="where">{html.escape(result.sources[i].label)}</span> ' if result.sources[i].label else "")
            + f"{html.escape(_snippet(result.sources[i].text, 60))}</li>"
            for i, score in span.top(top))
        out.append(f'<div class="span" tabindex="0" data-span="{k}"><span class="text">{html.escape(span.text)}'
                   f'</span><ol class="top">{listed or "<li>no positive source</li>"}</ol></div>')
    return "".join(out)


def _marked(text: str, marks: list[tuple[int, int, int]]) -> str:
    """``text`` with each (start, end, source index) wrapped as a source."""
    pieces, cursor = [], 0
    for start, end, i in sorted(marks):
        pieces.append(html.escape(text[cursor:start]))
        pieces.append(f'<span class="source" data-source="{i}"><sup>{i + 1}</sup>{html.escape(text[start:end])}</span>')
        cursor = end
    pieces.append(html.escape(text[cursor:]))
    return "".join(pieces)


def render_chat_fragment(result: Citations, top: int = DEFAULT_TOP) -> str:
    """A transcript's citations as a chat: each message in a bubble with its sources marked, the
    answer's sentences in the last bubble with their top ``top`` sources under each; hovering or
    focusing a sentence colours its sources in the messages by score."""
    digest = hashlib.sha1(json.dumps([m.to_dict() for m in result.messages], sort_keys=True).encode(
        "utf-8", "replace")).hexdigest()
    ident = f"atman-cite-{digest[:10]}"
    scores = [[round(s, 6) for s in span.scores] for span in result.spans]
    by_place: dict[tuple[int | None, str, int], list[tuple[int, int, int]]] = {}
    for i, source in enumerate(result.sources):
        place = "reasoning" if source.role == "reasoning" else "content"
        key = (source.message, place, source.passage if source.message is None else -1)
        by_place.setdefault(key, []).append((source.start, source.end, i))
    bubbles = []
    documents = sorted({s.passage for s in result.sources if s.message is None})
    for p in documents:
        passage = result.passages[p]
        label = html.escape(passage.label or "document")
        bubbles.append(f'<div class="msg document"><div class="role">{label}</div><div class="body">'
                       f'{_marked(passage.text, by_place.get((None, "content", p), []))}</div></div>')
    last = len(result.messages) - 1
    for index, message in enumerate(result.messages):
        role = html.escape(message.role) + (f' <span class="call">{html.escape(message.tool_call_id)}</span>'
                                           if message.tool_call_id else "")
        body = ""
        if message.reasoning:
            body += (f'<details class="thinking" open><summary>thinking</summary>'
                     f'{_marked(message.reasoning, by_place.get((index, "reasoning", -1), []))}</details>')
        if index == last:
            body += f'<div class="answer">{_spans_html(result, top)}</div>'
        else:
            body += f'<div class="body">{_marked(message.content, by_place.get((index, "content", -1), []))}</div>'
        for call in message.tool_calls:
            body += (f'<div class="call">calls <code>{html.escape(call["function"]["name"])}</code> '
                     f'({html.escape(call["id"])})</div>')
        bubbles.append(f'<div class="msg {html.escape(message.role)}" data-message="{index}">'
                       f'<div class="role">#{index} {role}</div>{body}</div>')
    return _page(ident, "1fr", f'<div class="chat"><h3>Transcript — hover a sentence of the answer</h3>{UNIT_HTML}'
                               f'{"".join(bubbles)}</div>', scores)


def _page(ident: str, columns: str, inner: str, scores: list[list[float]]) -> str:
    r, g, b = FOR_RGB
    return f"""<div class="atman-cite" id="{ident}">
<style>
#{ident} {{ display: grid; grid-template-columns: {columns}; gap: 1.2em; font-family: system-ui, sans-serif;
  line-height: 1.5; }}
#{ident} .span {{ padding: .3em .5em; margin: .2em 0; border-left: 3px solid #ccc; cursor: pointer; }}
#{ident} .span:hover, #{ident} .span:focus, #{ident} .span.active {{ border-left-color: rgb({r}, {g}, {b});
  background: {rgba(FOR_RGB, 0.08)}; outline: none; }}
#{ident} .span .top {{ font-size: .8em; color: #555; margin: .2em 0 0 1.2em; padding: 0; }}
#{ident} .passage {{ margin: 0 0 .8em; white-space: pre-wrap; }}
#{ident} .label {{ font-weight: 600; font-size: .85em; color: #444; }}
#{ident} .source {{ border-radius: 3px; transition: background .15s; }}
#{ident} .source sup {{ color: #888; font-size: .65em; margin-right: .1em; }}
#{ident} h3 {{ font-size: 1em; margin: 0 0 .4em; }}
#{ident} .unit {{ font-size: .8em; color: #666; margin: 0 0 .4em; }}
#{ident} .msg {{ margin: .5em 0; padding: .4em .7em; border-radius: 8px; background: #f3f3f3; white-space: pre-wrap;
  max-width: 85%; }}
#{ident} .msg.user {{ margin-left: auto; background: #e8f0fb; }}
#{ident} .msg.tool, #{ident} .msg.document {{ background: #f1f6ec; }}
#{ident} .msg.system, #{ident} .msg.developer {{ background: #fafafa; border: 1px dashed #ccc; }}
#{ident} .msg .role {{ font-size: .75em; color: #666; font-weight: 600; }}
#{ident} .msg .call, #{ident} .span .where {{ font-size: .8em; color: #666; }}
#{ident} .thinking {{ font-size: .9em; color: #555; }}
#{ident} .answer .span {{ white-space: normal; }}
</style>
{inner}
<script>
(function () {{
  const root = document.getElementById({json.dumps(ident)});
  const scores = {json.dumps(scores)};
  const sources = root.querySelectorAll(".source");
  function show(k) {{
    const row = scores[k] || [];
    const best = Math.max(1e-12, ...row.map(Math.abs));
    sources.forEach((el) => {{
      const s = row[Number(el.dataset.source)] || 0;
      el.style.background = s > 0 ? "rgba({r}, {g}, {b}, " + (s / best * {MAX_ALPHA}).toFixed(3) + ")" : "";
      el.title = "score " + s.toFixed(3) + " nats";
    }});
    root.querySelectorAll(".span").forEach((el) => el.classList.toggle("active", Number(el.dataset.span) === k));
  }}
  root.querySelectorAll(".span").forEach((el) => {{
    el.addEventListener("mouseenter", () => show(Number(el.dataset.span)));
    el.addEventListener("focus", () => show(Number(el.dataset.span)));
  }});
  if (scores.length) show(0);
}})();
</script>
</div>"""


def render_citations_html(result: Citations, title: str | None = None, top: int = DEFAULT_TOP) -> str:
    """A standalone HTML page of :func:`render_citations_fragment`, with the question as its heading."""
    heading = html.escape(title or f"Sources of the answer to: {result.question}")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{heading}</title></head>'
            f'<body style="max-width: 1100px; margin: 2em auto; padding: 0 1em;"><h2 style="font-family: '
            f'system-ui, sans-serif">{heading}</h2>\n{render_citations_fragment(result, top)}\n</body></html>\n')
