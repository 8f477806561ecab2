"""The HTTP server, driven by the official Aleph Alpha client (sync and async) on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
aa = pytest.importorskip("aleph_alpha_client")
httpx = pytest.importorskip("httpx")

from _server import serving  # noqa: E402
from aleph_alpha_client import (  # noqa: E402
    AsyncClient,
    Client,
    CompletionRequest,
    ControlTokenOverlap,
    CustomGranularity,
    DetokenizationRequest,
    EvaluationRequest,
    ExplanationPostprocessing,
    ExplanationRequest,
    Prompt,
    PromptGranularity,
    TargetGranularity,
    Text,
    TextControl,
    TokenizationRequest,
    Tokens,
)

from atman import Explainer  # noqa: E402
from atman.rows import Suppression  # noqa: E402
from atman.server import Limits, create_app  # noqa: E402
from atman.steering import Steerer  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2"
LIMITS = Limits(max_body_bytes=100_000, max_prompt_tokens=256, max_units=48, max_tokens=24)
FACTS = "Ada lives in Oslo.\n\nBo lives in Rome.\n\nAda lives in"
QA = ("Tamsin Orrelby keeps bees on the island of Quellmark. Doran Vesk repairs clocks in the town of Lindhaven.\n"
      "Question: Where does Doran Vesk repair clocks?\nAnswer: Doran Vesk repairs clocks in the town of")


@pytest.fixture(scope="module")
def app(smollm2):
    return create_app({MODEL: smollm2}, limits=LIMITS)


@pytest.fixture(scope="module")
def url(app):
    with serving(app) as base:
        yield base


@pytest.fixture
def client(url):
    return Client(token="unused", host=url, total_retries=0)


def scores(response, index=0, item=0):
    return [(s.start, s.length, s.score) for s in response.explanations[index].items[item].scores]


def test_version_models_tokenizer_and_openapi(client, url, smollm2):
    client.validate_version()
    names = [m["name"] for m in client.models()]
    assert names == [smollm2.name]
    assert client.tokenizer(MODEL).encode("Oslo is cold").ids == smollm2.tokenizer("Oslo is cold")["input_ids"]
    schema = httpx.get(url + "/openapi.json").json()
    paths = {"/explain", "/complete", "/evaluate", "/tokenize", "/detokenize", "/models_available"}
    assert paths <= set(schema["paths"])


@pytest.mark.parametrize("granularity, core", [
    (None, dict(granularity="auto")),
    (PromptGranularity.Token, dict(granularity="token")),
    (PromptGranularity.Word, dict(granularity="word")),
    (PromptGranularity.Sentence, dict(granularity="sentence")),
    (PromptGranularity.Paragraph, dict(granularity="paragraph")),
    (CustomGranularity(" in"), dict(granularity="delimiter", delimiter=" in")),
])
def test_explain_at_each_granularity_equals_the_python_api(app, client, smollm2, granularity, core):
    request = ExplanationRequest(Prompt.from_text(FACTS), " Oslo", prompt_granularity=granularity)
    response = client.explain(request, MODEL)
    # the server cuts passes into pieces sized by timing its model at start-up (a loaded machine gives
    # smaller pieces, and pieces change the floats in the last digits): the same engine setting here
    pieces = app.state.services[MODEL].explainer.engine.piece_tokens
    expected = Explainer(smollm2, piece_tokens=pieces).explain(FACTS, " Oslo", **core)
    assert len(response.explanations) == 1 and response.explanations[0].target == " Oslo"
    got = scores(response)
    want = [(i.start, i.length, i.score) for i in expected.explanations[0].items]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], abs=1e-5)
    assert response.explanations[0].items[-1].scores == []  # the target item: nothing before a complete target
    if core["granularity"] == "paragraph":
        top = max(response.with_text_from_prompt(request).explanations[0].items[0].scores, key=lambda s: s.score)
        assert top.text == "Ada lives in Oslo."


def test_served_answers_equal_the_library_calls(app, client, smollm2):
    """Every served answer is a library call a Python user can make: explain with contextual suppression
    (Aleph Alpha's rule, the "same" multiplier), per target token, and a steered evaluation."""
    pieces = app.state.services[MODEL].explainer.engine.piece_tokens
    explainer = Explainer(smollm2, piece_tokens=pieces,
                          suppression=Suppression(multiplier=0.2, kappa=0.7, similar="same"))
    request = ExplanationRequest(Prompt.from_text(FACTS), " Oslo", prompt_granularity=PromptGranularity.Word,
                                 control_factor=0.2, contextual_control_threshold=0.7,
                                 target_granularity=TargetGranularity.Token)
    response = client.explain(request, MODEL)
    expected = explainer.explain(FACTS, " Oslo", granularity="word", target_granularity="token")
    assert len(response.explanations) == len(expected.explanations)
    for got, want in zip(response.explanations, expected.explanations, strict=True):
        served = [(s.start, s.length, s.score) for s in got.items[0].scores + got.items[-1].scores]
        library = [(i.start, i.length, i.score) for i in want.items]
        assert [s[:2] for s in served] == [w[:2] for w in library]
        assert [s[2] for s in served] == pytest.approx([w[2] for w in library], abs=1e-5)
    oslo = FACTS.index("Oslo")
    controls = [TextControl(start=oslo, length=4, factor=0.3)]
    served = client.evaluate(EvaluationRequest(Prompt.from_text(FACTS, controls), completion_expected=" Oslo",
                                               contextual_control_threshold=0.6), MODEL).result
    from atman.rows import TextControl as LibraryControl

    scored = Steerer(smollm2).score(FACTS, " Oslo", [LibraryControl(oslo, 4, 0.3)], contextual_threshold=0.6)
    assert served["log_probability"] == pytest.approx(float(scored.log_probs.sum()), abs=1e-5)
    assert served["correct_greedy"] is bool(scored.greedy.all())


def test_explain_per_target_token_with_postprocessing(client):
    request = ExplanationRequest(Prompt.from_text(FACTS), " Oslo.", prompt_granularity=PromptGranularity.Sentence,
                                 target_granularity=TargetGranularity.Token,
                                 postprocessing=ExplanationPostprocessing.Square, normalize=True,
                                 control_factor=0.2, control_token_overlap=ControlTokenOverlap.Complete)
    response = client.explain(request, MODEL).with_text_from_prompt(request)
    assert [e.target for e in response.explanations] == [" Oslo", "."]
    for index, explanation in enumerate(response.explanations):
        values = [s.score for item in explanation.items for s in item.scores]
        assert min(values) == pytest.approx(0.0) and max(values) == pytest.approx(1.0)
        assert len(explanation.items[-1].scores) == index  # earlier target tokens explain later ones
    assert response.explanations[1].items[-1].scores[0].text == " Oslo"


def test_explain_a_prompt_of_text_and_token_items(client, smollm2):
    ids = smollm2.tokenizer(" Bo lives in Rome.", add_special_tokens=False)["input_ids"]
    prompt = Prompt([Text.from_text("Ada lives in Oslo."), Tokens.from_token_ids(ids), Text.from_text(" Ada lives in")])
    response = client.explain(ExplanationRequest(prompt, " Oslo", prompt_granularity="word"), MODEL)
    items = response.explanations[0].items
    assert [type(i).__name__ for i in items] == ["TextPromptItemExplanation", "TokenPromptItemExplanation",
                                                 "TextPromptItemExplanation", "TargetPromptItemExplanation"]
    assert [(s.start, s.length) for s in items[0].scores] == [(0, 3), (4, 5), (10, 2), (13, 5)]
    assert len(items[1].scores) == len(ids)
    assert [(s.start, s.length) for s in items[2].scores] == [(1, 3), (5, 5), (11, 2)]
    best = max(items[0].scores + items[2].scores, key=lambda s: s.score)
    assert (best.start, best.length) == (13, 5)  # "Oslo."
    # conceptual suppression reaches the token items too
    request = ExplanationRequest(prompt, " Oslo", prompt_granularity="word", contextual_control_threshold=0.7)
    assert len(client.explain(request, MODEL).explanations[0].items[1].scores) == len(ids)


def test_token_controls_steer_a_prompt_of_text_and_token_items(client, smollm2):
    ids = smollm2.tokenizer(" Bo lives in Rome.", add_special_tokens=False)["input_ids"]

    def prompt(factor):
        controls = [aa.TokenControl(pos=i, factor=factor) for i in range(len(ids))]
        return Prompt([Text.from_text("Ada lives in Oslo."), Tokens(ids, controls), Text.from_text(" Ada lives in")])

    plain = client.complete(CompletionRequest(prompt(1.0), maximum_tokens=2), MODEL).completions[0].completion
    hidden = client.complete(CompletionRequest(prompt(0.0), maximum_tokens=2), MODEL).completions[0].completion
    assert plain.startswith(" Rome") and hidden.startswith(" Oslo")


def test_a_full_queue_answers_503(smollm2):
    body = {"model": MODEL, "prompt": FACTS, "target": " Oslo", "prompt_granularity": {"type": "word"}}

    async def burst(base):
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(http.post(base + "/explain", json=body) for _ in range(4)))

    with serving(create_app({MODEL: smollm2}, limits=Limits(max_queue=1))) as base:
        statuses = sorted(r.status_code for r in asyncio.run(burst(base)))
    assert statuses[0] == 200 and statuses[-1] == 503, statuses


def test_complete_without_controls_equals_the_python_api(client, smollm2):
    response = client.complete(CompletionRequest(Prompt.from_text(QA), maximum_tokens=3, tokens=True, log_probs=0),
                               MODEL)
    expected = Steerer(smollm2).generate(QA, max_new_tokens=3)
    result = response.completions[0]
    assert result.completion == expected.text
    assert result.completion_tokens == list(expected.tokens)
    assert [list(d.values())[0] for d in result.log_probs] == pytest.approx(list(expected.log_probs), abs=1e-5)
    assert response.num_tokens_generated == 3 and result.finish_reason == "maximum_tokens"


def test_a_suppression_control_on_the_answer_lowers_its_probability(client):
    start = QA.index("Lindhaven")
    controls = [TextControl(start=start, length=len("Lindhaven"), factor=0.0)]
    plain = client.evaluate(EvaluationRequest(Prompt.from_text(QA), completion_expected=" Lindhaven"), MODEL)
    damped = client.evaluate(EvaluationRequest(Prompt.from_text(QA, controls), completion_expected=" Lindhaven"),
                             MODEL)
    assert damped.result["log_probability"] < plain.result["log_probability"] - 2.0
    steered = client.complete(CompletionRequest(Prompt.from_text(QA, controls), maximum_tokens=2), MODEL)
    assert not steered.completions[0].completion.startswith(" Lindhaven")


def test_an_amplification_raises_copying_of_its_span(client):
    oslo = FACTS.index("Oslo")
    logprob = {}
    for factor in (1.0, 5.0):
        prompt = Prompt.from_text(FACTS, [TextControl(start=oslo, length=4, factor=factor)])
        logprob[factor] = client.evaluate(EvaluationRequest(prompt, completion_expected=" Oslo"),
                                          MODEL).result["log_probability"]
    assert logprob[5.0] > logprob[1.0] + 0.5


def test_evaluate_equals_the_log_probs_of_a_greedy_completion(client):
    done = client.complete(CompletionRequest(Prompt.from_text(QA), maximum_tokens=2, log_probs=0), MODEL)
    result = done.completions[0]
    evaluated = client.evaluate(EvaluationRequest(Prompt.from_text(QA), completion_expected=result.completion),
                                MODEL).result
    assert evaluated["log_probability"] == pytest.approx(sum(list(d.values())[0] for d in result.log_probs),
                                                         abs=1e-4)
    assert evaluated["correct_greedy"] is True and evaluated["token_count"] == 2


def test_tokenize_detokenize_round_trip(client):
    text = "Doran Vesk repairs clocks in Lindhaven, 1894."
    tokens = client.tokenize(TokenizationRequest(text, tokens=True, token_ids=True), MODEL)
    assert len(tokens.tokens) == len(tokens.token_ids) > 5
    assert client.detokenize(DetokenizationRequest(tokens.token_ids), MODEL).result == text


def _requests():
    """16 different requests: (method name, request)."""
    out = []
    for i, target in enumerate([" Oslo", " Rome", " Bergen", " Oslo."]):
        granularity = [PromptGranularity.Word, PromptGranularity.Sentence, None, PromptGranularity.Token][i]
        out.append(("explain", ExplanationRequest(Prompt.from_text(FACTS), target, prompt_granularity=granularity)))
    for i, factor in enumerate([0.0, 0.5, 2.0, 8.0]):
        out.append(("explain", ExplanationRequest(Prompt.from_text(QA[:60 + 10 * i]), " the",
                                                  control_factor=factor / 8, prompt_granularity="word")))
    for i, factor in enumerate([0.0, 0.3, 1.0, 4.0]):
        prompt = Prompt.from_text(FACTS, [TextControl(start=0, length=18, factor=factor)])
        out.append(("complete", CompletionRequest(prompt, maximum_tokens=2 + i, log_probs=1)))
    for completion in [" Oslo", " Rome", " Paris", " Oslo and Rome"]:
        prompt = Prompt.from_text(FACTS, [TextControl(start=20, length=17, factor=3.0)])
        out.append(("evaluate", EvaluationRequest(prompt, completion_expected=completion)))
    return out


def test_concurrent_requests_each_equal_their_sequential_run(client, url):
    requests = _requests()
    assert len(requests) == 16
    sequential = [getattr(client, method)(request, MODEL) for method, request in requests]

    async def together():
        async with AsyncClient(token="unused", host=url, total_retries=0) as async_client:
            return await asyncio.gather(*(getattr(async_client, method)(request, MODEL)
                                          for method, request in requests))

    concurrent = asyncio.run(together())
    assert concurrent == sequential
    assert len({repr(r) for r in sequential}) == 16


@pytest.mark.parametrize("body, status, words", [
    ({"model": "gpt-9", "prompt": "hi", "maximum_tokens": 2}, 404, "not served here"),
    ({"model": MODEL, "prompt": [{"type": "image", "data": "aGk="}], "maximum_tokens": 2}, 400, "image"),
    ({"model": MODEL, "prompt": "hi", "maximum_tokens": 2, "best_of": 3}, 400, "best_of is not supported"),
    ({"model": MODEL, "prompt": "hi", "maximum_tokens": 2000}, 422, "maximum_tokens 2000 exceeds"),
    ({"model": MODEL, "prompt": "hi " * 300, "maximum_tokens": 2}, 413, "at most 256"),
    ({"model": MODEL, "prompt": [{"type": "text", "data": "hi", "controls": [
        {"start": 1, "length": 5, "factor": 0.5}]}], "maximum_tokens": 2}, 400, "past the end"),
    ({"model": MODEL, "prompt": [{"type": "token_ids", "data": [10**9]}], "maximum_tokens": 2}, 400, "vocabulary"),
    ({"model": MODEL, "prompt": "hi", "maximum_tokens": 2, "temperature": -1}, 422, "temperature"),
])
def test_bad_completion_requests_get_clear_4xx(url, body, status, words):
    response = httpx.post(url + "/complete", json=body, timeout=60)
    assert response.status_code == status
    assert words in response.text


def test_explanation_limits(url):
    long_prompt = "word " * 60
    response = httpx.post(url + "/explain", json={"model": MODEL, "prompt": long_prompt, "target": " x",
                                                  "prompt_granularity": {"type": "token"}}, timeout=60)
    assert response.status_code == 422 and "at most 48" in response.json()["error"]
    response = httpx.post(url + "/explain", content=b'{"model": "' + b"x" * 200_000 + b'"}',
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413 and "100000 bytes" in response.json()["error"]

    def chunks():  # no Content-Length: the body is counted as it arrives
        yield b'{"model": "smollm2", "target": " x", "prompt": "'
        for _ in range(150):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(url + "/explain", content=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413 and "100000 bytes" in response.json()["error"]
    response = httpx.post(url + "/explain", json={"model": MODEL, "prompt": "a", "target": ""}, timeout=60)
    assert response.status_code == 400


def test_bearer_token_auth(smollm2):
    with serving(create_app({MODEL: smollm2}, limits=LIMITS, token="s3cret")) as base:
        request = TokenizationRequest("hi", tokens=False, token_ids=True)
        with pytest.raises(PermissionError):
            Client(token="wrong", host=base, total_retries=0).tokenize(request, MODEL)
        assert Client(token="s3cret", host=base, total_retries=0).tokenize(request, MODEL).token_ids
        assert httpx.get(base + "/").status_code == 200  # the page itself is public; it asks for the token


def test_a_failing_request_does_not_take_the_server_down(smollm2):
    app = create_app({MODEL: smollm2}, limits=LIMITS)
    service = app.state.services[MODEL]

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    with serving(app) as base:
        service.steerer.generate_ids = broken
        failed = httpx.post(base + "/complete", json={"model": MODEL, "prompt": "hi", "maximum_tokens": 1})
        assert failed.status_code == 500 and "RuntimeError" in failed.json()["error"]
        del service.steerer.generate_ids
        ok = httpx.post(base + "/complete", json={"model": MODEL, "prompt": "hi", "maximum_tokens": 1}, timeout=60)
        assert ok.status_code == 200


def test_timeouts_answer_408(smollm2):
    with serving(create_app({MODEL: smollm2}, limits=Limits(timeout_s=0.05))) as base:
        response = httpx.post(base + "/explain", json={"model": MODEL, "prompt": QA, "target": " Lindhaven",
                                                       "prompt_granularity": {"type": "token"}}, timeout=60)
        assert response.status_code == 408 and "limit of 0.05 s" in response.json()["error"]
        assert httpx.get(base + "/health").json()["status"] == "ok"


def test_graceful_shutdown_finishes_the_running_request(smollm2):
    app = create_app({MODEL: smollm2}, limits=LIMITS)
    results = []
    with serving(app) as base:
        def call():
            results.append(httpx.post(base + "/explain", json={"model": MODEL, "prompt": FACTS, "target": " Oslo",
                                                               "prompt_granularity": {"type": "word"}}, timeout=120))
        worker = threading.Thread(target=call)
        worker.start()
        deadline = time.monotonic() + 30
        while app.state.queue.pending == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    worker.join(timeout=120)
    assert results and results[0].status_code == 200


def test_serve_command_rejects_bad_limits():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "atman.cli", "serve", "--max-units", "0"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--max-units must be a whole number" in done.stderr


def test_serve_command_serves_and_shuts_down_gracefully(tmp_path):
    import os
    import signal
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, ATMAN_SERVER_TOKEN="t0ken", PYTHONPATH=str(root))
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "atman.cli", "serve", "--port", str(port), "--max-tokens", "4"],
                               cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        client = Client(token="t0ken", host=base, total_retries=0)
        done = client.complete(CompletionRequest(Prompt.from_text("The capital of France is"), maximum_tokens=2),
                               "smollm2")
        assert done.completions[0].completion.strip()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


CITE_CONTEXT = [
    {"id": "a", "title": "Trades", "text": "Doran Vesk repairs clocks in Lindhaven. Mira sails to Olvereth."},
    {"id": "b", "text": "The river Sorrow runs past the mill at Brackwater."},
]


def test_cite_equals_the_python_api(url, smollm2):
    from atman import Citer

    body = {"model": MODEL, "context": CITE_CONTEXT, "question": "Where does Doran Vesk repair clocks?",
            "response": "In Lindhaven. He likes it."}
    response = httpx.post(url + "/cite", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    local = Citer(smollm2).cite(CITE_CONTEXT, body["question"], body["response"])
    assert [s["text"] for s in data["sources"]] == [s.text for s in local.sources]
    for served, ours in zip(data["spans"], local.spans, strict=True):
        assert served["scores"] == pytest.approx(list(ours.scores), abs=1e-4)
    assert data["passages"][0]["id"] == "a" and data["model_version"] == smollm2.name


@pytest.mark.parametrize(("change", "status", "words"), [
    ({"context": ""}, 400, "context is empty"),
    ({"response": "In Lindhaven.", "spans": [[0, 99]]}, 400, "outside the response"),
    ({"sources": "chapter"}, 422, "sources"),
    ({"multiplier": 2}, 422, "multiplier"),
    ({"context": "word " * 300}, 413, "at most 256"),
    ({"context": " ".join(f"S{i}." for i in range(50)), "sources": "sentence"}, 422, "at most 48"),
    ({"maximum_tokens": 1000, "response": None}, 422, "maximum_tokens"),
])
def test_bad_citation_requests_get_clear_4xx(url, change, status, words):
    body = {"model": MODEL, "context": CITE_CONTEXT, "question": "Where?", "response": "In Lindhaven.", **change}
    response = httpx.post(url + "/cite", json=body, timeout=120)
    assert response.status_code == status, response.text
    assert words in response.text


def test_a_bare_prompt_granularity_name_means_its_object(url):
    body = {"model": MODEL, "prompt": FACTS, "target": " Oslo"}
    bare = httpx.post(url + "/explain", json=body | {"prompt_granularity": "sentence"})
    full = httpx.post(url + "/explain", json=body | {"prompt_granularity": {"type": "sentence"}})
    assert bare.status_code == full.status_code == 200
    assert bare.json() == full.json()
    wrong = httpx.post(url + "/explain", json=body | {"prompt_granularity": "sentences"})
    assert wrong.status_code == 422
