"""LlamaIndex: a query response's ``source_nodes`` re-scored by what its answer actually rests on, per
sentence (``pip install "atman[llamaindex]"``, which brings ``llama-index-core``).

A retriever ranks nodes by their similarity to the question; the answer may rest on other nodes, or
on one node for one sentence and another for the next. :func:`cite_response` cites the response's
text in its source nodes with :meth:`atman.Citer.cite_messages` (each node a document) and gives,
for each answer sentence, the nodes ranked by that sentence's AtMan score.

Example::

    >>> from atman.integrations.llamaindex import cite_response
    >>> response = query_engine.query("Where does Doran repair clocks?")                   # doctest: +SKIP
    >>> cited = cite_response(response, "Where does Doran repair clocks?", citer)           # doctest: +SKIP
    >>> cited.sentences[0].nodes[0].node.get_content()                                      # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

from ..citations import Citations
from ..citer import Citer
from . import missing

try:
    from llama_index.core.base.response.schema import Response
    from llama_index.core.schema import NodeWithScore
except ImportError as exc:
    raise missing("llama-index-core", 'pip install "atman[llamaindex]"') from exc


@dataclass(frozen=True)
class CitedSentence:
    """One answer sentence, its span in the answer, and the source nodes by its score (best first)."""

    text: str
    start: int
    end: int
    nodes: list[NodeWithScore]


@dataclass(frozen=True)
class CitedResponse:
    """The sentences of a response with their re-scored nodes; ``citations`` is the full result."""

    sentences: list[CitedSentence]
    citations: Citations


def cite_response(response: Response, question: str, citer: Citer, **options) -> CitedResponse:
    """Each sentence of ``response.response`` with ``response.source_nodes`` re-scored: a node's score is
    how much that sentence rests on it (the sum of its sources' scores at ``options["sources"]``, default
    one source per node). ``options``: those of :meth:`atman.Citer.cite_messages`."""
    if not response.source_nodes:
        raise ValueError("the response has no source nodes to cite")
    if not response.response or not str(response.response).strip():
        raise ValueError("the response has no text to cite")
    documents = [{"text": n.node.get_content(), "id": n.node.node_id} for n in response.source_nodes]
    options.setdefault("sources", "passage")
    result = citer.cite_messages([{"role": "user", "content": question},
                                  {"role": "assistant", "content": str(response.response)}],
                                 documents=documents, roles=["document"], **options)
    by_id = {n.node.node_id: n.node for n in response.source_nodes}
    sentences = []
    for span in result.spans:
        totals: dict[str, float] = {}
        for source, score in zip(result.sources, span.scores, strict=True):
            ident = result.passages[source.passage].id
            totals[ident] = totals.get(ident, 0.0) + score
        ranked = sorted(totals, key=lambda i: totals[i], reverse=True)
        sentences.append(CitedSentence(span.text, span.start, span.end,
                                       [NodeWithScore(node=by_id[i], score=totals[i]) for i in ranked]))
    return CitedResponse(sentences=sentences, citations=result)


__all__ = ["CitedResponse", "CitedSentence", "cite_response"]
