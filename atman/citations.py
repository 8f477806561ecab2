"""Citations: the result of :func:`atman.cite` — which sources of a context each part of a response rests on.

Plain data, no torch. A context is a sequence of passages (a retrieved document each, with an
optional id and title); its sources are passages, sentences or tokens, each a character span of the
context. The response is cut into spans (its sentences by default); each span has one score per
source: how much less likely that part of the response became when the source was suppressed
(summed cross-entropy rise over the span's tokens; positive = the span rests on the source).

JSON::

    {"model": "...", "context": "...", "question": "...", "response": "...",
     "passages": [{"text": "...", "id": "doc-1", "title": "...", "start": 0, "end": 120}],
     "sources": [{"text": "...", "start": 0, "end": 42, "passage": 0}],
     "spans": [{"text": "...", "start": 0, "end": 30, "scores": [0.1, 2.3, ...]}],
     "settings": {...}}

``start``/``end`` of passages and sources are offsets into ``context``, of spans into ``response``.

A **transcript** (:meth:`atman.Citer.cite_messages`: a chat of system, user, assistant and tool
messages) gives the same result with ``messages`` (the chat, the explained answer last), an empty
``context``, and sources and passages that name their message: ``message`` (its index), ``role``
(``reasoning`` for a step of the final answer's reasoning, ``document`` for a document given apart
from the messages) and ``tool_call_id``; their ``start``/``end`` are then offsets into that
message's ``content`` (into its ``reasoning`` for a reasoning step, into the document's text for a
document).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Passage:
    """One retrieved passage: its text, an optional id and title, and where it sits in the context (in a
    transcript: the index of the ``message`` that holds it, None for a separate document, and where it
    sits in that message's text)."""

    text: str
    id: str | None = None
    title: str | None = None
    start: int = 0
    end: int = 0
    message: int | None = None
    index: int | None = None   # its place in the list of passages given (an empty one is left out)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"text": self.text, "start": self.start, "end": self.end}
        if self.index is not None:
            data["index"] = self.index
        if self.id is not None:
            data["id"] = self.id
        if self.title is not None:
            data["title"] = self.title
        if self.message is not None:
            data["message"] = self.message
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Passage:
        message = data.get("message")
        return cls(text=data["text"], id=data.get("id"), title=data.get("title"), start=int(data.get("start", 0)),
                   end=int(data.get("end", 0)), message=None if message is None else int(message),
                   index=None if data.get("index") is None else int(data["index"]))

    @property
    def label(self) -> str:
        """How views name the passage: its title, else its id, else nothing."""
        return self.title or self.id or ""


@dataclass(frozen=True)
class Source:
    """One unit of the context that was suppressed: its text, span in the context and passage index.

    In a transcript also the ``message`` that holds it (its index; None for a separate document), that
    message's ``role`` (``reasoning`` for a reasoning step, ``document`` for a document) and the
    ``tool_call_id`` of a tool result; ``start``/``end`` are then offsets into that message's text."""

    text: str
    start: int
    end: int
    passage: int
    message: int | None = None
    role: str | None = None
    tool_call_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"text": self.text, "start": self.start, "end": self.end, "passage": self.passage}
        if self.role is not None:
            data.update(message=self.message, role=self.role)
            if self.tool_call_id is not None:
                data["tool_call_id"] = self.tool_call_id
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Source:
        message = data.get("message")
        return cls(text=data["text"], start=int(data["start"]), end=int(data["end"]), passage=int(data["passage"]),
                   message=None if message is None else int(message), role=data.get("role"),
                   tool_call_id=data.get("tool_call_id"))

    @property
    def label(self) -> str:
        """How views name a transcript source: ``#2 tool (call_1)``, ``reasoning``; empty otherwise."""
        if self.role is None:
            return ""
        where = f"#{self.message} " if self.message is not None and self.role != "reasoning" else ""
        return where + self.role + (f" ({self.tool_call_id})" if self.tool_call_id else "")


@dataclass(frozen=True)
class Message:
    """One message of a cited transcript, as the model read it: its role and text (list-of-parts content
    joined), a tool result's ``tool_call_id``, an assistant's ``tool_calls`` (OpenAI's objects), and
    the ``reasoning`` of an assistant message (its ``reasoning_content``, or what stood between
    ``<think>`` markers, which ``content`` then no longer holds)."""

    role: str
    content: str
    tool_call_id: str | None = None
    name: str | None = None
    tool_calls: tuple[dict[str, Any], ...] = ()
    reasoning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        for key in ("tool_call_id", "name", "reasoning"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.tool_calls:
            data["tool_calls"] = [dict(call) for call in self.tool_calls]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        return cls(role=data["role"], content=data["content"], tool_call_id=data.get("tool_call_id"),
                   name=data.get("name"), tool_calls=tuple(data.get("tool_calls") or ()),
                   reasoning=data.get("reasoning"))


@dataclass(frozen=True)
class CitedSpan:
    """A part of the response (a sentence by default) and one score per source."""

    text: str
    start: int
    end: int
    scores: tuple[float, ...]

    def top(self, k: int = 3) -> list[tuple[int, float]]:
        """The ``k`` highest-scoring sources as (source index, score), best first, positive scores only."""
        ranked = sorted(range(len(self.scores)), key=lambda i: self.scores[i], reverse=True)
        return [(i, self.scores[i]) for i in ranked[:k] if self.scores[i] > 0]

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "start": self.start, "end": self.end, "scores": list(self.scores)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CitedSpan:
        return cls(text=data["text"], start=int(data["start"]), end=int(data["end"]),
                   scores=tuple(float(s) for s in data["scores"]))


@dataclass(frozen=True)
class Citations:
    """Sources of each response span. ``citations.cite(0)`` lists the sources the first span rests on.

    Example::

        >>> result = atman.cite(["Ada lives in Oslo.", "Bo lives in Rome."], "Where does Ada live?",
        ...                     "Ada lives in Oslo.")
        >>> [(result.sources[i].text, round(s, 2)) for i, s in result.spans[0].top(1)]  # doctest: +SKIP
        [('Ada lives in Oslo.', 5.12)]
    """

    model: str
    context: str
    question: str
    response: str
    passages: tuple[Passage, ...]
    sources: tuple[Source, ...]
    spans: tuple[CitedSpan, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    messages: tuple[Message, ...] = ()

    def cite(self, span: int = 0, k: int = 3) -> list[tuple[Source, float]]:
        """The top ``k`` sources of response span ``span`` (positive scores only), best first."""
        return [(self.sources[i], score) for i, score in self.spans[span].top(k)]

    def source_scores(self) -> list[float]:
        """Each source's score for the whole response: the sum over the spans."""
        return [sum(span.scores[i] for span in self.spans) for i in range(len(self.sources))]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"model": self.model, "context": self.context, "question": self.question,
                                "response": self.response}
        if self.messages:
            data["messages"] = [m.to_dict() for m in self.messages]
        data.update(passages=[p.to_dict() for p in self.passages], sources=[s.to_dict() for s in self.sources],
                    spans=[s.to_dict() for s in self.spans], settings=dict(self.settings))
        return data

    def source_text(self, index: int) -> str:
        """The text a source's ``start``/``end`` point into: the context, or (transcripts) its message's
        content, reasoning or document."""
        source = self.sources[index]
        if not self.messages:
            return self.context
        if source.message is None:
            return self.passages[source.passage].text
        message = self.messages[source.message]
        return (message.reasoning or "") if source.role == "reasoning" else message.content

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Citations:
        return cls(model=data["model"], context=data["context"], question=data["question"],
                   response=data["response"], passages=tuple(Passage.from_dict(p) for p in data["passages"]),
                   sources=tuple(Source.from_dict(s) for s in data["sources"]),
                   spans=tuple(CitedSpan.from_dict(s) for s in data["spans"]), settings=dict(data.get("settings", {})),
                   messages=tuple(Message.from_dict(m) for m in data.get("messages", ())))

    @classmethod
    def from_json(cls, text: str) -> Citations:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write JSON (``.json``) or a standalone HTML page (``.html``), by the file's extension."""
        path = Path(path)
        if path.suffix.lower() in (".html", ".htm"):
            from .render.citations import render_citations_html

            path.write_text(render_citations_html(self), encoding="utf-8")
        elif path.suffix.lower() == ".json":
            path.write_text(self.to_json(indent=2) + "\n", encoding="utf-8")
        else:
            raise ValueError(f"cannot save citations as {path.suffix or 'a file without extension'}; "
                             "use .json or .html")

    @classmethod
    def load(cls, path: str | Path) -> Citations:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def _repr_html_(self) -> str:
        from .render.citations import render_citations_fragment

        return render_citations_fragment(self)
