"""LangChain: cite a chain's answer in the documents it retrieved or the messages it sent
(``pip install "atman[langchain]"``, which brings ``langchain-core``).

Thin: LangChain's ``Document`` objects and messages become :meth:`atman.Citer.cite_messages`'s
documents and OpenAI messages, and :class:`CiteAnswer` is a runnable that attaches the citations
to a chain's output.

Example::

    >>> from atman.integrations.langchain import CiteAnswer
    >>> chain = retrieve_and_answer | CiteAnswer(atman.Citer(atman.load_model()))  # doctest: +SKIP
    >>> chain.invoke("Where does Doran repair clocks?")["citations"].cite(0)          # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..citations import Citations
from ..citer import Citer
from . import missing

try:
    from langchain_core.documents import Document
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
    from langchain_core.runnables import Runnable, RunnableConfig
except ImportError as exc:
    raise missing("langchain-core", 'pip install "atman[langchain]"') from exc

ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}


def documents_from(documents: Sequence[Document | str]) -> list[dict[str, Any]]:
    """LangChain documents as citation documents: their text, their ``id`` (or ``metadata["id"]``) and a title
    from ``metadata`` (``title``, else ``source``)."""
    out = []
    for doc in documents:
        if isinstance(doc, str):
            out.append({"text": doc})
            continue
        meta = doc.metadata or {}
        ident = doc.id or meta.get("id")
        title = meta.get("title") or meta.get("source")
        out.append({"text": doc.page_content, **({"id": str(ident)} if ident is not None else {}),
                    **({"title": str(title)} if title is not None else {})})
    return out


def messages_from(messages: Sequence[BaseMessage | Mapping]) -> list[dict[str, Any]]:
    """LangChain messages (system, human, AI with tool calls, tool) as OpenAI chat messages."""
    out = []
    for message in messages:
        if isinstance(message, Mapping):
            out.append(dict(message))
            continue
        role = ROLES.get(message.type)
        if role is None:
            raise TypeError(f"a {type(message).__name__} has no chat role atman can cite (use system, human, AI or "
                            "tool messages)")
        data: dict[str, Any] = {"role": role, "content": message.content}
        if isinstance(message, AIMessage) and message.tool_calls:
            data["tool_calls"] = [{"id": call["id"], "type": "function",
                                   "function": {"name": call["name"], "arguments": json.dumps(call["args"])}}
                                  for call in message.tool_calls]
            data["content"] = message.content or None
        if isinstance(message, ToolMessage):
            data["tool_call_id"] = message.tool_call_id
        out.append(data)
    return out


def _text(answer: Any) -> str:
    return answer.content if isinstance(answer, BaseMessage) else str(answer)


def cite(citer: Citer, *, answer: Any, question: str | None = None, documents: Sequence[Document | str] = (),
         messages: Sequence[BaseMessage | Mapping] | None = None, **options) -> Citations:
    """The citations of ``answer`` (text or an AI message): in ``documents`` for ``question``, or in the chat
    ``messages`` that led to it (with ``documents`` placed as the model's template places them).
    ``options``: those of :meth:`atman.Citer.cite_messages` (``sources``, ``roles``, ...)."""
    if messages is None:
        if question is None:
            raise ValueError("give the question (or the messages) the answer answers")
        messages = [HumanMessage(question)]
    chat = [*messages_from(messages), {"role": "assistant", "content": _text(answer)}]
    return citer.cite_messages(chat, documents=documents_from(documents) or None, **options)


class CiteAnswer(Runnable[dict, dict]):
    """A runnable that adds ``"citations"`` (:class:`atman.Citations`) to a chain's output: a dict with the
    ``answer`` (text or an AI message) and the ``question`` and retrieved ``documents`` (or the
    ``messages``) it rests on. The keys can be renamed; ``options`` go to
    :meth:`atman.Citer.cite_messages`."""

    def __init__(self, citer: Citer, *, answer_key: str = "answer", question_key: str = "question",
                 documents_key: str = "documents", messages_key: str = "messages", **options) -> None:
        self.citer = citer
        self.keys = (answer_key, question_key, documents_key, messages_key)
        self.options = options

    def invoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> dict:
        answer, question, documents, messages = self.keys
        result = cite(self.citer, answer=input[answer], question=input.get(question),
                      documents=input.get(documents) or (), messages=input.get(messages), **self.options)
        return {**input, "citations": result}


__all__ = ["CiteAnswer", "cite", "documents_from", "messages_from"]
