"""The OpenAI-compatible endpoints of atman serve, driven by the official openai client (and httpx for the
raw event stream) against a served SmolLM2 on loopback."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from _server import serving  # noqa: E402

from atman import Citer  # noqa: E402
from atman.server import Limits, create_app  # noqa: E402
from atman.steering import Steerer  # noqa: E402
from atman.transcripts import parse_messages, render_transcript  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2"
TOKEN = "s3cret"
LIMITS = Limits(max_body_bytes=100_000, max_prompt_tokens=512, max_units=48, max_tokens=40)
DOCS = ["Tamsin Orrelby keeps bees on the island of Quellmark.",
        "Doran Vesk repairs clocks in the town of Lindhaven.",
        "The river Sorrow runs past the mill at Brackwater."]
RAG = [{"role": "user", "content": "".join(f"Document {k + 1}: {d}\n\n" for k, d in enumerate(DOCS))
        + "Who keeps bees, and where does Doran Vesk repair clocks? Answer in two sentences."}]
TOOL = [
    {"role": "user", "content": "What is the weather in Oslo today?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_7", "content": "Oslo: light snow, minus four degrees."},
]
LONG = [{"role": "user", "content": "\n\n".join(DOCS) + "\n\nTell me about Doran Vesk and Tamsin Orrelby."}]
CITE = {"atman": {"cite": {"sources": "passage", "top": 2}}}


@pytest.fixture(scope="module")
def url(smollm2):
    with serving(create_app({MODEL: smollm2}, limits=LIMITS, token=TOKEN)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0)


def library_citations(lm, messages, answer, sources, top, spans=None):
    """What the endpoint must return: Citer.cite_messages over the transcript and its answer."""
    result = Citer(lm).cite_messages([*messages, {"role": "assistant", "content": answer}], sources=sources,
                                     spans=spans)
    return [[(result.sources[i].message, result.sources[i].text, pytest.approx(score, abs=1e-4))
             for i, score in span.top(top)] for span in result.spans]


def test_models_are_listed(client):
    names = [m.id for m in client.models.list().data]
    assert MODEL in names and "SmolLM2-135M-Instruct" in names
    assert client.models.retrieve(MODEL).owned_by == "atman"


def test_a_rag_transcript_with_three_documents_is_answered_with_its_citations(client, smollm2):
    done = client.chat.completions.create(model=MODEL, messages=RAG, temperature=0, max_tokens=30, logprobs=True,
                                          top_logprobs=2, extra_body=CITE)
    choice = done.choices[0]
    text = choice.message.content
    # the answer is the model's own greedy one, through the library's Steerer
    prompt = render_transcript(smollm2.tokenizer, parse_messages(RAG), with_answer=False).prompt
    ids = smollm2.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expected = Steerer(smollm2).generate_ids(ids, max_new_tokens=30)
    assert text == expected.text and "Lindhaven" in text
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == len(expected.token_ids)
    assert [e.logprob for e in choice.logprobs.content] == pytest.approx(list(expected.log_probs), abs=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)
    citations = choice.message.model_extra["citations"]
    assert [c["text"] for c in citations] == [text[c["start"]:c["end"]] for c in citations]
    got = [[(s["message"], s["text"], s["score"]) for s in c["sources"]] for c in citations]
    assert got == library_citations(smollm2, RAG, text, "passage", 2)
    # the sentence that names Lindhaven rests on the document that says it, first
    lindhaven = next(c for c in citations if "Lindhaven" in c["text"])
    first = lindhaven["sources"][0]
    assert first["text"] == "Document 2: " + DOCS[1] and first["role"] == "user" and first["message"] == 0
    assert RAG[0]["content"][first["start"]:first["end"]] == first["text"]


def test_a_tool_call_transcript_ranks_the_tool_result_first(client):
    done = client.chat.completions.create(model=MODEL, messages=TOOL, temperature=0, max_tokens=30,
                                          extra_body={"atman": {"cite": {"sources": "message"}}})
    text = done.choices[0].message.content
    assert "snow" in text and done.choices[0].finish_reason == "stop"
    first = done.choices[0].message.model_extra["citations"][0]["sources"][0]
    assert (first["role"], first["message"], first["tool_call_id"]) == ("tool", 2, "call_7")
    assert first["text"] == TOOL[2]["content"] and first["score"] > 0


def _events(url, body):
    """The raw server-sent events of a streamed request, in order."""
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    return events


def test_a_streamed_answer_gets_each_sentences_citations_as_soon_as_it_is_complete(url, client, smollm2):
    body = {"model": MODEL, "messages": LONG, "temperature": 0, "max_tokens": 40, "stream": True,
            "stream_options": {"include_usage": True}, **CITE}
    events = _events(url, body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    text = "".join(d.get("content") or "" for d in deltas)
    cited = [(k, d["citations"]) for k, d in enumerate(deltas) if "citations" in d]
    # one sentence per chunk, in order, each right after the text that completes it
    assert [c[0]["index"] for _, c in cited] == list(range(len(cited))) and len(cited) >= 3
    assert all(len(c) == 1 for _, c in cited)
    for k, (at, (citation,)) in enumerate(cited):
        before = "".join(d.get("content") or "" for d in deltas[:at])
        assert before[citation["start"]:citation["end"]] == citation["text"]
        if k + 1 < len(cited):
            # the next sentence had begun, and had not ended, when this one's sources came
            assert len(before) < cited[k + 1][1][0]["end"]
    # the last sentence's sources come before the finish chunk, then the usage
    assert deltas[-1] == {} and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 40
    # the streamed text is the non-streamed answer; each sentence's sources are the library's for it
    whole = client.chat.completions.create(model=MODEL, messages=LONG, temperature=0, max_tokens=40)
    assert text == whole.choices[0].message.content
    for _, (citation,) in cited:
        expected = library_citations(smollm2, LONG, text[:citation["end"]], "passage", 2,
                                     spans=[(citation["start"], citation["end"])])
        assert [(s["message"], s["text"], s["score"]) for s in citation["sources"]] == expected[0]


def test_the_openai_client_streams_unchanged(client):
    stream = client.chat.completions.create(model=MODEL, messages=TOOL, temperature=0, max_tokens=30, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    whole = client.chat.completions.create(model=MODEL, messages=TOOL, temperature=0, max_tokens=30)
    assert "".join(pieces) == whole.choices[0].message.content and len(pieces) > 3
    assert whole.choices[0].message.model_extra.get("citations") is None


def test_text_completions_with_logprobs_and_a_stop_string(client, smollm2):
    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                     logprobs=2, stop=["\n"])
    choice = done.choices[0]
    assert choice.text == " Paris." and choice.finish_reason == "stop"
    expected = Steerer(smollm2).generate("The capital of France is", max_new_tokens=8, stop=["\n"])
    assert choice.logprobs.token_logprobs == pytest.approx(list(expected.log_probs), abs=1e-4)
    assert "".join(choice.logprobs.tokens) == " Paris.\n"
    streamed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                         temperature=0, stop=["\n"], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == " Paris."


@pytest.mark.parametrize(("request_body", "status", "message"), [
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "unknown role 'robot'"),
    ({"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "42"}]}, 400, "tool result without a call"),
    ({"messages": TOOL, "n": 2}, 400, "n=2 is not supported"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "accepts at most 512"),
    ({"messages": TOOL, "max_tokens": 41}, 400, "limit of 40"),
    ({"messages": TOOL, "temperature": 3}, 400, "temperature"),
    ({"messages": TOOL, "extra_body": None, "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": TOOL, "model": "gpt-4o"}, 404, "does not exist"),
    ({"messages": "hello"}, 400, "messages"),
])
def test_bad_input_gets_an_openai_shaped_4xx(url, request_body, status, message):
    body = {"model": MODEL, **{k: v for k, v in request_body.items() if k != "extra_body"}}
    for stream in (False, True):
        response = httpx.post(url + "/v1/chat/completions", json={**body, "stream": stream},
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert message in error["message"] and error["type"] == (
            "invalid_request_error") and set(error) == {"message", "type", "param", "code"}


def test_the_client_raises_its_own_errors(url, client):
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="davinci", prompt="x")
    response = httpx.post(url + "/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_stream_ids_steps_are_generate_ids(smollm2):
    steerer = Steerer(smollm2)
    ids = list(steerer.encode("Ada lives in Oslo. Bo lives in Rome. Ada lives in")[0])
    whole = steerer.generate_ids(ids, max_new_tokens=6, top_log_probs=1)
    stream = steerer.stream_ids(ids, max_new_tokens=6, top_log_probs=1)
    steps = list(stream)
    assert tuple(s.token_id for s in steps) == whole.token_ids and stream.completion == whole
    assert steps[-1].text == whole.text and [s.log_prob for s in steps] == list(whole.log_probs)
    assert steps[-1].finish_reason == "maximum_tokens" and all(s.finish_reason is None for s in steps[:-1])


def test_a_given_answer_is_cited_instead_of_generated(client, smollm2):
    answer = "It is snowing lightly in Oslo, at minus four degrees."
    done = client.chat.completions.create(model=MODEL, messages=TOOL, extra_body={
        "atman": {"cite": {"sources": "message", "top": 2}, "answer": answer}})
    assert done.choices[0].message.content == answer
    got = [[(s["message"], s["text"], s["score"]) for s in c["sources"]]
           for c in done.choices[0].message.model_extra["citations"]]
    assert got == library_citations(smollm2, TOOL, answer, "message", 2)
    with pytest.raises(openai.BadRequestError, match="needs atman.cite"):
        client.chat.completions.create(model=MODEL, messages=TOOL, extra_body={"atman": {"answer": answer}})


def test_the_openapi_schema_describes_the_v1_routes(url):
    import httpx

    schema = httpx.get(f"{url}/openapi.json").json()
    paths = {path: ops for path, ops in schema["paths"].items() if path.startswith("/v1")}
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions"} <= paths.keys()
    components = schema["components"]["schemas"]
    for path, request, field in (("/v1/chat/completions", "ChatCompletionRequest", "messages"),
                                 ("/v1/completions", "CompletionRequest", "prompt")):
        post = paths[path]["post"]
        assert post["tags"] == ["OpenAI-compatible"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{request}"
        assert field in components[request]["properties"] and "model" in components[request]["required"]
        assert post["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    # every reference in the schema names a component that is there
    import re

    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', httpx.get(f"{url}/openapi.json").text))
    assert refs <= components.keys(), refs - components.keys()
    assert "atman" in components["ChatCompletionRequest"]["properties"]


def test_the_schema_examples_are_answered(url):
    """Each /v1 request body in /openapi.json carries an example naming a served model; sent as it is, it
    is answered (the chat example with its citations)."""
    schema = httpx.get(f"{url}/openapi.json").json()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/v1/chat/completions", "/v1/completions"):
        example = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        assert example["model"] in httpx.get(f"{url}/health").json()["models"]
        answer = httpx.post(url + path, json=example, headers=headers, timeout=120)
        assert answer.status_code == 200, answer.text
        if path == "/v1/chat/completions":
            assert answer.json()["choices"][0]["message"]["citations"]


def test_a_completion_without_max_tokens_is_held_to_the_servers_lower_limit(smollm2):
    """OpenAI's default of 16 tokens gives way to a server limit below it (it was refused before)."""
    with serving(create_app({MODEL: smollm2}, limits=Limits(max_tokens=4))) as base:
        answer = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert 1 <= answer.json()["usage"]["completion_tokens"] <= 4
