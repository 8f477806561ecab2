"""Citing the sources of an answer in a chat transcript (Citer.cite_messages) on the embedded SmolLM2."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from _approx import close
from rich.console import Console
from transformers import DynamicCache

import atman
from atman import Citations, Citer, EmptyInputError, manipulate
from atman.citer import CitationError
from atman.render.citations import render_citations_html, render_citations_terminal
from atman.transcripts import TranscriptError, parse_messages, render_transcript

pytestmark = pytest.mark.slow

DOCS = ["Tamsin Orrelby keeps bees on the island of Quellmark.",
        "Doran Vesk repairs clocks in the town of Lindhaven.",
        "The river Sorrow runs past the mill at Brackwater."]
RAG = [
    {"role": "system", "content": "Answer from the documents."},
    {"role": "user", "content": [{"type": "text", "text": DOCS[0]}, {"type": "text", "text": DOCS[1]},
                                 {"type": "text", "text": DOCS[2]},
                                 {"type": "text", "text": "Where does Doran Vesk repair clocks?"}]},
    {"role": "assistant", "content": "Doran Vesk repairs clocks in Lindhaven. He has done so for years."},
]
TOOL = [
    {"role": "user", "content": "What is the weather in Oslo today?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_7", "content": "Oslo: light snow, minus four degrees."},
    {"role": "assistant", "content": "It is snowing lightly in Oslo, at minus four degrees."},
]
REASONING = "The user asks about Mirela. Mirela Castaine teaches music in Olvereth. Bees are kept by Tamsin."
THOUGHT = [
    {"role": "user", "content": "Where does Mirela Castaine teach music?"},
    {"role": "assistant", "reasoning_content": REASONING, "content": "Mirela Castaine teaches music in Olvereth."},
]
# a template that shows tool calls and places documents itself (in the manner of Qwen's and Command-R's)
TOOL_TEMPLATE = (
    "{%- if documents %}<|im_start|>system\nDocuments:\n{% for d in documents %}[{{ loop.index }}] {{ d.title }}: "
    "{{ d.text }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n{{ message.content }}"
    "{% for call in message.tool_calls %}<tool_call>{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STRICT_TEMPLATE = ("{% for message in messages %}{% if message.role not in ['system', 'user', 'assistant'] %}"
                   "{{ raise_exception('Conversation roles must be system, user or assistant') }}{% endif %}"
                   "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def with_template(lm, template):
    """The model with a copy of its tokenizer that has another chat template."""
    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.chat_template = template
    return dataclasses.replace(lm, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def citer(smollm2):
    return Citer(smollm2)


@pytest.fixture(scope="module")
def rag(citer):
    return citer.cite_messages(RAG, sources="passage")


def test_a_rag_transcript_cites_the_document_the_answer_rests_on(rag):
    first, score = rag.cite(0, k=1)[0]
    assert first.text == DOCS[1] and score > 0
    assert (first.message, first.role, first.tool_call_id) == (1, "user", None)
    # each list part is a passage of its message; spans are offsets into the message's own text
    assert [s.text for s in rag.sources if s.message == 1] == [*DOCS, "Where does Doran Vesk repair clocks?"]
    for source in rag.sources:
        assert rag.messages[source.message].content[source.start:source.end] == source.text
        assert rag.passages[source.passage].message == source.message
    assert [m.role for m in rag.messages] == ["system", "user", "assistant"]
    assert rag.response == RAG[-1]["content"] and rag.messages[-1].content == rag.response
    assert [s.text for s in rag.spans] == ["Doran Vesk repairs clocks in Lindhaven.", "He has done so for years."]
    assert rag.question == "\n\n".join([*DOCS, "Where does Doran Vesk repair clocks?"])
    assert rag.settings["generated_response"] is False and rag.settings["template_tool_calls"] is False


def test_readout_from_after_the_last_source_equals_a_slow_reference(citer, rag, smollm2):
    """Sources in several messages: the prompt up to the last source is encoded once, unperturbed, and
    only the positions after it (the rest of the prompt and the answer) lose the source. Reference: a
    plain cache of that prefix, then each source's row over the tail alone."""
    prepared, _ = citer.prepare_messages(RAG, sources="passage")
    last = max(p for positions in prepared.source_positions for p in positions)
    assert prepared.readout_from == last + 1 == rag.settings["readout_from"]
    ids = torch.tensor([prepared.encoded.input_ids])
    n = len(prepared.encoded.target_spans)
    targets = ids[0, -n:]

    def losses(row):
        cache = DynamicCache()
        with torch.no_grad():
            smollm2.model(input_ids=ids[:, :prepared.readout_from], cache=cache, use_cache=True)
            with manipulate(row[None]):
                logits = smollm2.model(input_ids=ids[:, prepared.readout_from:], cache=cache, use_cache=True).logits
        logprobs = torch.log_softmax(logits[0, -n - 1:-1].float(), -1)
        return -logprobs.gather(-1, targets[:, None])[:, 0].double()

    base = losses(torch.ones(ids.shape[1]))
    for s, positions in enumerate(prepared.source_positions):
        row = torch.ones(ids.shape[1])
        row[list(positions)] = 0.0
        delta = losses(row) - base
        for span, tokens in zip(rag.spans, prepared.span_tokens, strict=True):
            assert span.scores[s] == pytest.approx(float(delta[list(tokens)].sum()), abs=2e-4)


def test_a_tool_result_the_answer_rests_on_ranks_first(citer):
    result = citer.cite_messages(TOOL, sources="message")
    first, score = result.cite(0, k=1)[0]
    assert (first.role, first.message, first.tool_call_id) == ("tool", 2, "call_7") and score > 0
    assert first.text == TOOL[2]["content"]
    # SmolLM2's template does not show tool calls: they are written after the assistant's (empty) text
    assert result.settings["template_tool_calls"] is False
    rendered = render_transcript(citer.lm.tokenizer, parse_messages(TOOL))
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in rendered.prompt
    assert result.messages[1].tool_calls[0]["id"] == "call_7"


def test_a_reasoning_step_that_carries_the_fact_ranks_first(citer):
    result = citer.cite_messages(THOUGHT, roles=["reasoning"])
    assert {s.role for s in result.sources} == {"reasoning"}
    first, score = result.cite(0, k=1)[0]
    assert first.text == "Mirela Castaine teaches music in Olvereth." and score > 0
    assert result.messages[-1].reasoning == REASONING
    assert REASONING[first.start:first.end] == first.text and first.message == 1
    # the same reasoning inside <think> markers of the content is the same transcript
    content = f"<think>\n{REASONING}\n</think>\n\n{THOUGHT[1]['content']}"
    marked = [THOUGHT[0], {"role": "assistant", "content": content}]
    again = citer.cite_messages(marked, roles=["reasoning"])
    assert close([s.scores for s in again.spans], [s.scores for s in result.spans], abs=1e-5)
    assert again.response == THOUGHT[1]["content"]


def test_documents_given_apart_are_placed_like_a_one_context_citation(citer):
    """SmolLM2's template places no documents: they go into the last user message in the prompt of
    Citer.cite, so both give the same scores."""
    question, response = "Where does Doran Vesk repair clocks?", "He repairs them in Lindhaven."
    chat = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
    transcript = citer.cite_messages(chat, documents=[{"text": d, "id": f"d{k}"} for k, d in enumerate(DOCS)],
                                     roles=["document"], sources="passage")
    context = citer.cite(DOCS, question, response, sources="passage")
    assert transcript.settings["documents"] == "last user message"
    assert close([s.scores for s in transcript.spans], [s.scores for s in context.spans], abs=1e-5)
    first = transcript.cite(0, k=1)[0][0]
    assert first.role == "document" and first.message is None and transcript.passages[first.passage].id == "d1"


def test_a_template_with_tools_and_documents_places_them_itself(smollm2):
    citer = Citer(with_template(smollm2, TOOL_TEMPLATE))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "today's weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    result = citer.cite_messages(TOOL, tools=tools, documents=[{"text": DOCS[0], "title": "Bees"}],
                                 sources="message")
    assert result.settings["template_tool_calls"] is True and result.settings["documents"] == "template"
    rendered = render_transcript(citer.lm.tokenizer, parse_messages(TOOL), tools=tools)
    assert '<tool_call>{"name": "get_weather"' in rendered.prompt
    first = result.cite(0, k=1)[0][0]
    assert (first.role, first.tool_call_id) == ("tool", "call_7")
    assert [s.role for s in result.sources] == ["document", "user", "tool"]


def test_a_generated_answer_and_the_one_call_form(citer, smollm2):
    result = citer.cite_messages(RAG[:2], max_new_tokens=12, sources="passage")
    assert result.settings["generated_response"] is True and result.response.strip()
    assert result.messages[-1].role == "assistant" and result.messages[-1].content == result.response
    again = atman.cite(messages=RAG, model=smollm2, sources="passage")
    assert close([s.scores for s in again.spans],
                 [s.scores for s in citer.cite_messages(RAG, sources="passage").spans])
    with pytest.raises(CitationError, match="either messages"):
        atman.cite("some context", "a question", messages=RAG, model=smollm2)


def test_coarse_to_fine_and_token_level_over_a_transcript(citer):
    fine = citer.cite_messages(TOOL, sources="sentence", refine=True, group_size=2)
    assert fine.settings["refine"] == {"group_size": 2, "share": 0.99}
    assert fine.cite(0, k=1)[0][0].role == "tool"
    tokens = citer.cite_messages(TOOL, sources="token", roles=["tool"])
    assert {s.role for s in tokens.sources} == {"tool"} and len(tokens.sources) > 5
    assert "".join(s.text for s in tokens.sources).replace(" ", "") == TOOL[2]["content"].replace(" ", "")


def test_json_round_trip_and_the_chat_views(rag, tmp_path):
    path = tmp_path / "chat.json"
    rag.save(path)
    back = Citations.load(path)
    assert back == rag and json.loads(path.read_text())["messages"][1]["role"] == "user"
    assert json.loads(rag.to_json())["sources"][2] == {"text": DOCS[1], "start": len(DOCS[0]) + 2,
                                                       "end": len(DOCS[0]) + 2 + len(DOCS[1]), "passage": 2,
                                                       "message": 1, "role": "user"}
    page = render_citations_html(rag)
    assert page.count('class="msg ') == 3 and 'data-message="2"' in page and page.count('class="source"') == 5
    assert '<div class="span" tabindex="0" data-span="1">' in page
    console = Console(record=True, width=140)
    render_citations_terminal(rag, console)
    text = console.export_text()
    assert "Transcript" in text and "#1 user" in text and "Lindhaven" in text


@pytest.mark.parametrize(("messages", "error", "message"), [
    ([{"role": "robot", "content": "hi"}], TranscriptError, "unknown role 'robot'"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "42"}], TranscriptError,
     "tool result without a call"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], TranscriptError,
     "only text parts"),
    ([{"role": "user", "content": "  "}], EmptyInputError, "no text"),
    (TOOL[:2], TranscriptError, "ends with a tool call"),
    ("hello", TranscriptError, "non-empty list"),
])
def test_bad_transcripts_are_refused_with_a_message(citer, messages, error, message):
    with pytest.raises(error, match=message):
        citer.cite_messages(messages)


def test_templates_that_refuse_or_lack_are_named(smollm2):
    with pytest.raises(TranscriptError, match="refuses this transcript.*roles must be"):
        Citer(with_template(smollm2, STRICT_TEMPLATE)).cite_messages(TOOL)
    with pytest.raises(TranscriptError, match="no chat template"):
        Citer(with_template(smollm2, None)).cite_messages(RAG)
    with pytest.raises(TranscriptError, match="no passage source among the roles tool"):
        Citer(smollm2).cite_messages(RAG, roles=["tool"], sources="passage")


def test_cli_cites_a_transcript_file(tmp_path, capsys, smollm2):
    from atman.cli import main

    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps({"messages": TOOL}))
    out = tmp_path / "cited.json"
    assert main(["cite", "--messages", str(chat), "--sources", "message", "-f", "json", "-o", str(out), "-q"]) == 0
    result = Citations.load(out)
    assert result.cite(0, k=1)[0][0].tool_call_id == "call_7"
    assert main(["cite", "--messages", str(chat), "--roles", "tool,user", "-q"]) == 0
    assert "call_7" in capsys.readouterr().out
    lines = tmp_path / "requests.jsonl"
    lines.write_text(json.dumps({"id": "t", "messages": TOOL, "sources": "message"}) + "\n"
                     + json.dumps({"id": "bad", "messages": [{"role": "robot", "content": "x"}]}) + "\n")
    assert main(["cite", "--input", str(lines), "-q"]) == 1
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["id"] == "t" and first["messages"][2]["tool_call_id"] == "call_7"
    assert second["id"] == "bad" and "unknown role" in second["error"]
    assert main(["cite", "--messages", str(chat), "-Q", "why?"]) == 2
    assert "do not also give --question" in capsys.readouterr().err
