"""The LangChain and LlamaIndex adapters against the real packages, on the embedded SmolLM2."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from _approx import close  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.language_models.fake_chat_models import FakeListChatModel  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnableLambda, RunnablePassthrough  # noqa: E402
from llama_index.core.base.response.schema import Response  # noqa: E402
from llama_index.core.schema import NodeWithScore, TextNode  # noqa: E402

from atman import Citer  # noqa: E402
from atman.integrations.langchain import CiteAnswer, cite, documents_from, messages_from  # noqa: E402
from atman.integrations.llamaindex import cite_response  # noqa: E402

pytestmark = pytest.mark.slow
TEXTS = ["Tamsin Orrelby keeps bees on the island of Quellmark.",
         "Doran Vesk repairs clocks in the town of Lindhaven.",
         "The river Sorrow runs past the mill at Brackwater."]
QUESTION = "Where does Doran Vesk repair clocks?"
ANSWER = "Doran Vesk repairs clocks in Lindhaven. Tamsin Orrelby keeps bees in Quellmark."


@pytest.fixture(scope="module")
def citer(smollm2):
    return Citer(smollm2)


def test_a_langchain_chain_gets_its_answer_cited(citer):
    docs = [Document(page_content=t, id=f"doc-{k}", metadata={"source": f"file{k}.txt"}) for k, t in enumerate(TEXTS)]
    retriever = RunnableLambda(lambda _: docs)
    prompt = ChatPromptTemplate.from_messages([("human", "{documents}\n\n{question}")])
    llm = FakeListChatModel(responses=[ANSWER])
    chain = ({"documents": retriever, "question": RunnablePassthrough()}
             | RunnablePassthrough.assign(answer=prompt | llm)
             | CiteAnswer(citer, sources="passage"))
    out = chain.invoke(QUESTION)
    result = out["citations"]
    assert isinstance(out["answer"], AIMessage) and result.response == ANSWER
    firsts = [result.cite(k, k=1)[0][0] for k in range(2)]
    assert [result.passages[s.passage].id for s in firsts] == ["doc-1", "doc-0"]
    assert {p.title for p in result.passages if p.message is None} == {"file0.txt", "file1.txt", "file2.txt"}
    # the same call as the library's, documents placed as the template places them
    direct = citer.cite_messages([{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
                                 documents=documents_from(docs), sources="passage")
    assert close([s.scores for s in result.spans], [s.scores for s in direct.spans], abs=1e-5)


def test_langchain_messages_with_a_tool_call(citer):
    messages = [SystemMessage("Use the tools."), HumanMessage("What is the weather in Oslo today?"),
                AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Oslo"}, "id": "call_7"}]),
                ToolMessage("Oslo: light snow, minus four degrees.", tool_call_id="call_7")]
    chat = messages_from(messages)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "tool"]
    assert chat[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    result = cite(citer, answer=AIMessage("It is snowing lightly in Oslo, at minus four degrees."),
                  messages=messages, sources="message")
    first = result.cite(0, k=1)[0][0]
    assert (first.role, first.tool_call_id) == ("tool", "call_7")


def test_llamaindex_source_nodes_are_rescored_per_sentence(citer):
    nodes = [NodeWithScore(node=TextNode(text=t, id_=f"n{k}"), score=0.9 - 0.1 * k) for k, t in enumerate(TEXTS)]
    # the retriever ranked the bee node first; the first sentence rests on the clock node
    response = Response(response=ANSWER, source_nodes=nodes)
    cited = cite_response(response, QUESTION, citer)
    assert [s.text for s in cited.sentences] == ["Doran Vesk repairs clocks in Lindhaven.",
                                                 "Tamsin Orrelby keeps bees in Quellmark."]
    assert [s.nodes[0].node.node_id for s in cited.sentences] == ["n1", "n0"]
    assert all(len(s.nodes) == 3 for s in cited.sentences)
    scores = cited.citations.spans[0].scores
    assert cited.sentences[0].nodes[0].score == pytest.approx(max(scores))
    with pytest.raises(ValueError, match="no source nodes"):
        cite_response(Response(response=ANSWER, source_nodes=[]), QUESTION, citer)
