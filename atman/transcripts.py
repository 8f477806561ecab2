"""Chat transcripts as the input of a citation: which message, document, tool result or reasoning step
did each sentence of the final answer rest on?

A transcript is a list of messages in the OpenAI chat format: ``system`` (or ``developer``), ``user``,
``assistant`` (optionally with ``tool_calls``) and ``tool`` (with the ``tool_call_id`` it answers);
content as a string or a list of text parts. It is rendered with the model's own chat template
(``tools`` and ``documents`` handed to it), and every message's text is located in the rendered
prompt, so that a source can be named by its message and its span in that message, not only by
offsets in a prompt nobody wrote.

What the template does not show is placed where this module says:

* tool calls a template ignores (SmolLM2's, for one) are written after the assistant's text as one
  JSON object per call, ``{"name": ..., "arguments": ...}``, so that the model sees what was called;
* documents a template does not place (no ``documents`` support) go into the last user message, in
  the prompt of a one-context citation (``Context:\\n{documents}\\n\\nQuestion: {message}``);
* the final answer's reasoning (``reasoning_content``, or ``<think>...</think>`` at the start of its
  content) follows the generation prompt between the template's thinking markers (``<think>`` and
  ``</think>``), as a reasoning model wrote it; earlier turns' reasoning is dropped, as reasoning
  models' templates drop it.

Nothing here runs the model: :meth:`atman.Citer.cite_messages` scores the sources.

Example::

    >>> rendered = render_transcript(tokenizer, parse_messages([
    ...     {"role": "user", "content": "Where does Ada live?"},
    ...     {"role": "assistant", "content": "In Oslo."}]))  # doctest: +SKIP
    >>> rendered.prompt[rendered.regions[0].start:][:20]  # doctest: +SKIP
    'Where does Ada live?'
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .citations import Message, Passage, Source
from .errors import AtmanError, EmptyInputError, GranularityError
from .units import EncodedInput, text_spans

ROLES = ("system", "developer", "user", "assistant", "tool")
# the roles a source can have: a message's, a step of the final answer's reasoning, a separate document
SOURCE_ROLES = (*ROLES, "reasoning", "document")
LEVELS = ("message", "passage", "sentence", "token")
# the text parts of a list-of-parts content are joined with this (each part a passage of its own)
PART_SEPARATOR = "\n\n"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.DOTALL)
_SENTINEL = "\u2063ATMAN-{}\u2063"


class TranscriptError(AtmanError):
    """A transcript that cannot be read or rendered (an unknown role, a tool result without a call, ...)."""


@dataclass(frozen=True)
class Region:
    """A text the model read that can hold sources: a message's content, the final answer's reasoning or a
    document, with where it starts in the rendered prompt."""

    role: str
    text: str
    start: int
    message: int | None
    tool_call_id: str | None = None
    document: Passage | None = None


@dataclass(frozen=True)
class RenderedTranscript:
    """A transcript rendered up to its final answer: the prompt text (template included), the regions in
    it, the messages (the answer last, when there is one) and how the template placed what it got."""

    prompt: str
    regions: tuple[Region, ...]
    messages: tuple[Message, ...]
    answer: Message | None
    documents: tuple[Passage, ...]
    template_tool_calls: bool
    template_documents: bool


def _text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for k, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind not in ("text", "input_text", "output_text") or not isinstance(part.get("text"), str):
                raise TranscriptError(f"message {index} part {k} is {'a ' + repr(kind) if kind else 'not a text'} "
                                      "part; only text parts can be cited")
            texts.append(part["text"])
        return PART_SEPARATOR.join(t.strip() for t in texts if t.strip())
    raise TranscriptError(f"message {index} has content of type {type(content).__name__}; give text or a list "
                          "of text parts")


def _tool_calls(calls: Any, index: int) -> tuple[dict[str, Any], ...]:
    if calls is None:
        return ()
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        raise TranscriptError(f"message {index}: tool_calls must be a list")
    out = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise TranscriptError(f"message {index} tool call {k} has no function name")
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise TranscriptError(f"message {index} tool call {k} has no id")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, (str, Mapping)):
            raise TranscriptError(f"message {index} tool call {k}: arguments must be a JSON string or an object")
        out.append({"id": call["id"], "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return tuple(out)


def parse_messages(messages: Sequence[Mapping[str, Any]]) -> list[Message]:
    """Check OpenAI-format ``messages`` and read them into :class:`Message` objects.

    Refused with :class:`TranscriptError`: an unknown role, a tool message whose ``tool_call_id`` names
    no earlier tool call, a message without text (an assistant's may have tool calls instead), parts
    that are not text. Texts are stripped of surrounding white space (templates trim them).

    >>> [m.role for m in parse_messages([{"role": "user", "content": "Hi"}])]
    ['user']
    """
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise TranscriptError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    out: list[Message] = []
    calls: dict[str, str] = {}
    for i, raw in enumerate(messages):
        if not isinstance(raw, Mapping):
            raise TranscriptError(f"message {i} is a {type(raw).__name__}, not an object with role and content")
        role = raw.get("role")
        if role not in ROLES:
            raise TranscriptError(f"message {i} has the unknown role {role!r}; roles are {', '.join(ROLES)}")
        content = _text(raw.get("content"), i).strip()
        tool_calls = _tool_calls(raw.get("tool_calls"), i) if role == "assistant" else ()
        if raw.get("tool_calls") and role != "assistant":
            raise TranscriptError(f"message {i} is a {role} message with tool_calls; only assistants call tools")
        reasoning = raw.get("reasoning_content", raw.get("reasoning")) if role == "assistant" else None
        if reasoning is not None and not isinstance(reasoning, str):
            raise TranscriptError(f"message {i}: reasoning_content must be text")
        if role == "assistant":
            match = _THINK.match(content)
            if match is not None:
                if reasoning is not None:
                    raise TranscriptError(f"message {i} has reasoning_content and <think> markers; give one")
                reasoning, content = match.group(1), content[match.end():]
        reasoning = reasoning.strip() or None if reasoning is not None else None
        tool_call_id = None
        name = raw.get("name") if isinstance(raw.get("name"), str) else None
        if role == "tool":
            tool_call_id = raw.get("tool_call_id")
            if not isinstance(tool_call_id, str) or tool_call_id not in calls:
                called = f"; the calls so far are {', '.join(calls)}" if calls else ""
                raise TranscriptError(f"message {i} is a tool result without a call: its tool_call_id "
                                      f"{tool_call_id!r} names no tool call of an earlier assistant message{called}")
            name = name or calls[tool_call_id]
        if not content and not tool_calls and not reasoning:
            raise EmptyInputError(f"message {i} ({role}) has no text")
        for call in tool_calls:
            calls[call["id"]] = call["function"]["name"]
        out.append(Message(role=role, content=content, tool_call_id=tool_call_id, name=name, tool_calls=tool_calls,
                           reasoning=reasoning))
    return out


def parse_documents(documents: Sequence[str | Mapping | Passage] | None) -> list[Passage]:
    """Documents given apart from the messages: texts, dicts with ``text`` and optional ``id``/``title``,
    or :class:`Passage` objects."""
    out = []
    for k, item in enumerate(documents or ()):
        if isinstance(item, Passage):
            text, pid, title = item.text, item.id, item.title
        elif isinstance(item, Mapping) and isinstance(item.get("text"), str):
            text, pid, title = item["text"], item.get("id"), item.get("title")
        elif isinstance(item, str):
            text, pid, title = item, None, None
        else:
            raise TranscriptError(f"document {k} is not text, a dict with a text field or a Passage")
        text = text.strip()
        if not text:
            raise EmptyInputError(f"document {k} is empty")
        out.append(Passage(text=text, id=None if pid is None else str(pid), title=None if title is None else str(title),
                           start=0, end=len(text)))
    return out


def answer_of(messages: Sequence[Message]) -> Message | None:
    """The final answer of a transcript: its last message when that is an assistant's without tool calls."""
    last = messages[-1]
    return last if last.role == "assistant" and not last.tool_calls else None


def _arguments(arguments: str | Mapping) -> Any:
    if isinstance(arguments, Mapping):
        return dict(arguments)
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _template_message(message: Message, content: str, with_calls: bool) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": content}
    if message.tool_calls and with_calls:
        data["tool_calls"] = [{"id": c["id"], "type": "function",
                               "function": {"name": c["function"]["name"],
                                            "arguments": _arguments(c["function"]["arguments"])}}
                              for c in message.tool_calls]
    if message.tool_call_id is not None:
        data["tool_call_id"] = message.tool_call_id
    if message.name is not None and message.role == "tool":
        data["name"] = message.name
    return data


def calls_text(message: Message) -> str:
    """The plain text of an assistant's tool calls, for a template that does not show them."""
    return "\n".join(json.dumps({"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])},
                                ensure_ascii=False) for c in message.tool_calls)


def _render(tokenizer, messages: list[dict[str, Any]], **options) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)
    except Exception as exc:  # a template refuses with its own exception type (jinja2's, raise_exception)
        raise TranscriptError(f"the model's chat template refuses this transcript ({type(exc).__name__}: {exc})"
                              ) from None


def render_transcript(tokenizer, messages: Sequence[Message], *, documents: Sequence[Passage] = (),
                      tools: Sequence[Mapping] | None = None, context_template: str = "Context:\n{context}\n\n"
                      "Question: {question}", separator: str = "\n\n", with_answer: bool = True) -> RenderedTranscript:
    """Render the transcript up to its final answer with the model's chat template and locate every
    message's text (and each document, and the answer's reasoning) in it.

    Each text is rendered as a unique marker first; the prompt is that rendering with the markers
    replaced by the texts, checked against the template's rendering of the texts themselves.
    ``context_template``/``separator``: how documents go into the last user message when the template
    does not place them (the one-context citation's prompt). ``with_answer=False``: every message is
    history and the prompt ends with the generation prompt for a new answer.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TranscriptError("this model's tokenizer has no chat template, so a transcript cannot be rendered; "
                              "cite a context and a question instead")
    messages = list(messages)
    answer = answer_of(messages) if with_answer else None
    history = messages[:-1] if answer is not None else messages
    if not history:
        raise TranscriptError("the transcript has nothing before its answer")
    if history[-1].role == "assistant" and history[-1].tool_calls and answer is None:
        raise TranscriptError("the transcript ends with a tool call; add the tool's result (a tool message)")
    # the texts, in the order their markers are numbered: each message's content, then each document
    texts: list[str] = [m.content for m in history]
    docs = list(documents)
    texts += [d.text for d in docs]
    marks = [_SENTINEL.format(k) for k in range(len(texts))]
    doc_marks = marks[len(history):]
    extra: dict[str, Any] = {}
    if tools:
        extra["tools"] = [dict(t) for t in tools]

    def render(values: list[str], with_calls: bool, calls_inline: bool, docs_by_template: bool) -> str:
        rows = []
        for i, m in enumerate(history):
            content = values[i]
            if calls_inline and m.tool_calls:
                content += ("\n" if m.content else "") + calls_text(m)
            rows.append(_template_message(m, content, with_calls))
        options = dict(extra)
        placed = values[len(history):]
        if docs and docs_by_template:
            options["documents"] = [{"title": d.title or "", "text": v} for d, v in zip(docs, placed, strict=True)]
        elif docs:
            users = [i for i, m in enumerate(history) if m.role == "user"]
            if not users:
                raise TranscriptError("documents need a user message to go into (this template does not place "
                                      "documents itself)")
            rows[users[-1]]["content"] = context_template.format(context=separator.join(placed),
                                                                 question=rows[users[-1]]["content"])
        return _render(tokenizer, rows, **options)

    has_calls = any(m.tool_calls for m in history)
    template_calls = has_calls and render(marks, True, False, False) != render(marks, False, False, False)
    inline = has_calls and not template_calls
    template_docs = bool(docs) and all(render(marks, template_calls, inline, True).count(mark) == 1
                                       for mark in doc_marks)
    shape = render(marks, template_calls, inline, template_docs)
    regions: list[Region] = []
    pieces: list[str] = []
    cursor = length = 0
    for at, k in sorted((shape.find(mark), k) for k, mark in enumerate(marks)):
        count = shape.count(marks[k])
        what = f"document {k - len(history)}" if k >= len(history) else f"message {k}"
        if count > 1:
            raise TranscriptError(f"the chat template repeats {what}, so its sources cannot be located")
        if count == 0:
            continue  # the template leaves this text out: it is nothing the model read
        pieces.append(shape[cursor:at])
        length += at - cursor
        if k < len(history):
            regions.append(Region(history[k].role, texts[k], length, k, history[k].tool_call_id))
        else:
            regions.append(Region("document", texts[k], length, None, document=docs[k - len(history)]))
        pieces.append(texts[k])
        length += len(texts[k])
        cursor = at + len(marks[k])
    pieces.append(shape[cursor:])
    text = "".join(pieces)
    # the template given the texts themselves must say the same (else it rewrites them: escapes, cuts)
    if render(texts, template_calls, inline, template_docs) != text:
        raise TranscriptError("the chat template changes a message's text, so its sources cannot be located")
    if answer is not None and answer.reasoning:
        text += THINK_OPEN + "\n"
        regions.append(Region("reasoning", answer.reasoning, len(text), len(messages) - 1))
        text += answer.reasoning + "\n" + THINK_CLOSE + "\n\n"
    return RenderedTranscript(prompt=text, regions=tuple(regions), messages=tuple(messages), answer=answer,
                              documents=tuple(docs), template_tool_calls=template_calls,
                              template_documents=template_docs)


def encode_transcript(tokenizer, rendered: RenderedTranscript, response: str) -> EncodedInput:
    """The rendered prompt and ``response`` as one token sequence; a prompt token's span is its part of a
    region (None for template text), so only the messages' own text is ever suppressed."""
    if not response or not response.strip():
        raise EmptyInputError("the answer is empty")
    enc = tokenizer(rendered.prompt, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids)
    bounds = [(r.start, r.start + len(r.text)) for r in rendered.regions if r.text]
    spans: list[tuple[int, int] | None] = []
    for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        best, overlap = None, 0
        if token not in special:
            for lo, hi in bounds:
                got = min(int(b), hi) - max(int(a), lo)
                if got > overlap:
                    best, overlap = (max(int(a), lo), min(int(b), hi)), got
        spans.append(best)
    target = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    if not target["input_ids"]:
        raise EmptyInputError("the answer has no tokens")
    ids = [int(t) for t in enc["input_ids"]]
    return EncodedInput(input_ids=tuple(ids + [int(t) for t in target["input_ids"]]), prompt=rendered.prompt,
                        target=response, prompt_spans=tuple(spans), target_start=len(ids),
                        target_spans=tuple((int(a), int(b)) for a, b in target["offset_mapping"]))


def transcript_sources(rendered: RenderedTranscript, encoded: EncodedInput, level: str,
                       roles: Sequence[str] | None = None) -> tuple[list[Passage], list[Source], list[tuple[int, int]]]:
    """The passages and sources of the regions whose role is in ``roles`` (default: all), at ``level``, in
    the order of the prompt; and each source's character span in the rendered prompt.

    Passages: at ``message`` level each message (document, reasoning) is one; otherwise a message's
    paragraphs (a list-of-parts content's parts among them) and each document whole. Sources: the
    passages, their sentences, or their tokens.
    """
    if level not in LEVELS:
        raise GranularityError(f"unknown source level {level!r}; choose one of {', '.join(LEVELS)}")
    chosen = set(SOURCE_ROLES if roles is None else roles)
    unknown = sorted(chosen - set(SOURCE_ROLES))
    if unknown:
        raise TranscriptError(f"unknown source role(s) {', '.join(map(repr, unknown))}; choose among "
                              f"{', '.join(SOURCE_ROLES)}")
    passages: list[Passage] = []
    sources: list[Source] = []
    spans: list[tuple[int, int]] = []
    tokens = [span for span in encoded.prompt_spans if span is not None]
    for region in sorted(rendered.regions, key=lambda r: r.start):
        if region.role not in chosen or not region.text:
            continue
        if region.document is not None:
            pieces = [(0, len(region.text))]
        elif level == "message":
            pieces = [(0, len(region.text))]
        else:
            pieces = text_spans(region.text, "paragraph")
        for a, b in pieces:
            base = region.document or Passage(text=region.text[a:b])
            passage = replace(base, text=region.text[a:b], start=a, end=b, message=region.message)
            index = len(passages)
            passages.append(passage)
            if level in ("message", "passage"):
                units = [(a, b)]
            elif level == "sentence":
                units = [(a + x, a + y) for x, y in text_spans(region.text[a:b], "sentence")]
            else:
                lo, hi = region.start + a, region.start + b
                units = [(x - region.start, y - region.start) for x, y in tokens if lo <= x and y <= hi]
            for x, y in units:
                sources.append(Source(region.text[x:y], x, y, index, message=region.message, role=region.role,
                                      tool_call_id=region.tool_call_id))
                spans.append((region.start + x, region.start + y))
    if not sources:
        which = "" if roles is None else f" among the roles {', '.join(roles)}"
        raise TranscriptError(f"the transcript has no {level} source{which}")
    return passages, sources, spans


def question_of(messages: Sequence[Message]) -> str:
    """The last user message's text (what views show as the question)."""
    return next((m.content for m in reversed(messages) if m.role == "user"), "")
