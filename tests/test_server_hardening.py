"""Server hardening: abandoned requests stop, client mistakes get 4xx, start-up checks, connection limits.

Most tests run a tiny random-init Llama with SmolLM2's tokenizer (the behaviour does not depend on
the model); the disconnection test needs real work to abandon and runs SmolLM2.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _server import serving  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from atman import AtmanError, Explainer, LoadedModel, enable  # noqa: E402
from atman.server import Limits, create_app  # noqa: E402
from atman.server.protocol import guarded_protocol  # noqa: E402

MODEL = "tiny"
CONTEXT = 256
LIMITS = Limits(max_body_bytes=20_000, max_prompt_tokens=64, max_units=16, max_tokens=4, max_completions=2,
                timeout_s=30.0)


@pytest.fixture(scope="module")
def tiny(smollm2) -> LoadedModel:
    import torch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=CONTEXT)
    model = enable(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval())
    return LoadedModel(model=model, tokenizer=smollm2.tokenizer, name="tiny-llama")


@pytest.fixture(scope="module")
def api(tiny):
    with TestClient(create_app({MODEL: tiny}, limits=LIMITS), raise_server_exceptions=False) as client:
        yield client


# --- every client mistake is a 4xx: property-based ----------------------------------------------------

INF_LITERAL = "__1e999__"
NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf, INF_LITERAL, "-" + INF_LITERAL])
EXTREME_FLOATS = st.sampled_from([1e308, -1e308, 5e-324, -5e-324, 1e-300, 1e-45, 3.5e38, -3.5e38, -0.0, 1e-5,
                                  1e-7, 2.0**63])
FLOATS = st.one_of(NONFINITE, EXTREME_FLOATS, st.floats(allow_nan=True, allow_infinity=True))
INTS = st.one_of(st.sampled_from([2**63, -(2**63), 2**64, 2**31, 2**31 - 1, -1, 0, 10**30, -(10**30)]), st.integers())
CATEGORIES = ("Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf",
              "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn")
# every Unicode general category, lone surrogates (Cs) and unassigned code points (Cn) included
TEXTS = st.sampled_from(CATEGORIES).flatmap(
    lambda category: st.text(st.characters(categories=[category]), min_size=1, max_size=12))

CONTROLLED = [{"type": "text", "data": "Ada lives in Oslo.", "controls": [{"start": 0, "length": 3, "factor": 0.5}]},
              {"type": "token_ids", "data": [100, 200], "controls": [{"index": 1, "factor": 2.0}]}]
BODIES = {
    "/explain": {"model": MODEL, "prompt": "Ada lives in Oslo. Bo lives in Rome.", "target": " Oslo",
                 "control_factor": 0.1, "contextual_control_threshold": 0.7,
                 "prompt_granularity": {"type": "custom", "delimiter": "."}},
    "/complete": {"model": MODEL, "prompt": CONTROLLED, "maximum_tokens": 2, "temperature": 0.5, "top_p": 0.9,
                  "top_k": 5, "n": 1, "logit_bias": {"5": 1.5}, "log_probs": 1, "stop_sequences": ["\n"],
                  "minimum_tokens": 0, "contextual_control_threshold": 0.5, "presence_penalty": 0.0,
                  "frequency_penalty": 0.0, "sequence_penalty": 0.0},
    "/evaluate": {"model": MODEL, "prompt": CONTROLLED, "completion_expected": " Oslo",
                  "contextual_control_threshold": 0.5},
    "/tokenize": {"model": MODEL, "prompt": "Ada lives in Oslo.", "tokens": True, "token_ids": True},
    "/detokenize": {"model": MODEL, "token_ids": [100, 200, 300]},
}


def _leaves(value, path=()):
    """Paths to every scalar in a JSON body."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path, value


def _replace(body, path, value):
    body = json.loads(json.dumps(body))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


def _raw(body) -> bytes:
    # NaN/Infinity literals as Python writes them; 1e999 as a literal that parses to infinity; lone
    # surrogates escaped as \udXXX, which JSON allows and which decode to lone surrogates
    text = json.dumps(body, allow_nan=True, ensure_ascii=True)
    return text.replace(f'"{INF_LITERAL}"', "1e999").encode()


@st.composite
def mistakes(draw):
    """One endpoint's valid body with one scalar replaced by a hostile value of the same kind (or another)."""
    path = draw(st.sampled_from(sorted(BODIES)))
    body = BODIES[path]
    where, old = draw(st.sampled_from(list(_leaves(body))))
    if isinstance(old, bool):
        new = draw(st.one_of(FLOATS, INTS, TEXTS))
    elif isinstance(old, float):
        new = draw(FLOATS)
    elif isinstance(old, int):
        new = draw(st.one_of(INTS, FLOATS))
    else:
        new = draw(st.one_of(TEXTS, TEXTS.map(lambda t: old + t), FLOATS))
    return path, _raw(_replace(body, where, new))


@given(mistakes())
@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_hostile_values_in_any_field_never_get_a_server_error(api, case):
    path, raw = case
    response = api.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (path, raw[:300], response.text[:500])
    body = response.json()  # always valid JSON, whatever was sent
    if response.status_code >= 400:
        assert body["error"] and body["code"]


@given(st.sampled_from(sorted(BODIES)), TEXTS)
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_any_text_as_model_name_gets_a_4xx(api, path, name):
    response = api.post(path, content=_raw({**BODIES[path], "model": name}),
                        headers={"Content-Type": "application/json"})
    assert response.status_code in (404, 422), response.text[:300]
    response = api.get("/models/" + name.encode("utf-8", "surrogatepass").hex() + "/tokenizer")
    assert response.status_code == 404


@pytest.mark.parametrize("field, value, words", [
    ("temperature", 1e-40, "temperature must be 0 (off) or at least"),
    ("top_p", 1e-50, "top_p must be 0 (off) or at least"),
    ("temperature", "__1e999__", "temperature"),
])
def test_degenerate_sampling_values_are_named(api, field, value, words):
    body = {**BODIES["/complete"], field: value}
    response = api.post("/complete", content=_raw(body), headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and words in response.json()["error"]


def test_smallest_sampling_values_still_sample(api):
    body = {**BODIES["/complete"], "temperature": 1e-4, "top_p": 1e-6}
    assert api.post("/complete", json=body).status_code == 200


# --- /explain and controls ---------------------------------------------------------------------------

def test_explain_refuses_controls_after_validating_them(api):
    body = {"model": MODEL, "target": " Oslo", "prompt": [
        {"type": "text", "data": "Ada lives in Oslo.", "controls": [{"start": 0, "length": 3, "factor": 0.0}]}]}
    response = api.post("/explain", json=body)
    assert response.status_code == 400 and "not supported on /explain" in response.json()["error"]
    body["prompt"][0]["controls"][0]["start"] = 40
    response = api.post("/explain", json=body)
    assert response.status_code == 400 and "past the end" in response.json()["error"]
    body["prompt"][0]["controls"] = []
    assert api.post("/explain", json=body).status_code == 200


# --- start-up checks -----------------------------------------------------------------------------------

def test_a_prompt_limit_above_the_context_is_refused(tiny):
    with pytest.raises(AtmanError, match="exceeds the 256-token context"):
        create_app({MODEL: tiny}, limits=Limits(max_prompt_tokens=CONTEXT + 1))
    create_app({MODEL: tiny}, limits=Limits(max_prompt_tokens=CONTEXT))


def test_every_endpoint_checks_the_context(tiny):
    app = create_app({MODEL: tiny}, limits=Limits(max_prompt_tokens=CONTEXT))
    # a service whose limits were raised behind create_app's back still refuses past the context
    service = app.state.services[MODEL]
    service.limits = Limits(max_prompt_tokens=10 * CONTEXT, max_units=10_000)
    long = "word " * (CONTEXT + 10)
    with TestClient(app, raise_server_exceptions=False) as client:
        explain = client.post("/explain", json={"model": MODEL, "prompt": long, "target": " x",
                                                "prompt_granularity": {"type": "paragraph"}})
        evaluate = client.post("/evaluate", json={"model": MODEL, "prompt": long, "completion_expected": " x"})
    assert explain.status_code == 400 and "context of 256" in explain.json()["error"]
    assert evaluate.status_code == 400 and "context of 256" in evaluate.json()["error"]


@pytest.mark.parametrize("token", ["", "   ", "two words", "tab\there", "caf\u00e9"])
def test_a_token_no_client_can_send_is_refused(tiny, token):
    with pytest.raises(AtmanError, match="token"):
        create_app({MODEL: tiny}, limits=LIMITS, token=token)


def test_host_header_checked_when_auth_is_off(tiny):
    app = create_app({MODEL: tiny}, limits=LIMITS, allowed_hosts=["127.0.0.1", "localhost", "::1"])
    with TestClient(app) as client:
        for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example", "attacker.example:8000", "localhost.attacker.example", ""):
            response = client.get("/health", headers={"Host": host})
            assert response.status_code == 400 and response.json()["code"] == "BAD_HOST", host
    with TestClient(create_app({MODEL: tiny}, limits=LIMITS, token="s3cret", allowed_hosts=["localhost"])) as client:
        # with a token the browser of a rebinding page has nothing to send: the name does not matter
        assert client.get("/health", headers={"Host": "attacker.example"}).status_code == 200


# --- connections ---------------------------------------------------------------------------------------

def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(1024):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_slow_requests_are_closed_and_the_connection_limit_holds(tiny):
    app = create_app({MODEL: tiny}, limits=LIMITS)
    with serving(app, http=guarded_protocol(1.0), limit_concurrency=3) as base:
        port = int(base.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port))
        half_header = socket.create_connection(("127.0.0.1", port))
        half_header.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        half_body = socket.create_connection(("127.0.0.1", port))
        half_body.sendall(b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"model\": ")
        # three connections held: a fourth is turned away while they last
        assert httpx.get(base + "/health").status_code == 503
        for sock in (silent, half_header, half_body):
            assert _closed_within(sock, 30), "a connection with an unfinished request was kept open"
            sock.close()
        assert httpx.get(base + "/health").status_code == 200


# --- abandoned requests stop -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_disconnected_clients_work_is_cancelled(smollm2, caplog):
    app = create_app({"smollm2": smollm2}, limits=Limits(max_prompt_tokens=512, max_units=512, timeout_s=300))
    service = app.state.services["smollm2"]
    # pieces of 4 perturbations: the running job notices its client is gone at the next piece
    service.explainer = Explainer(smollm2, batch_size=4)
    prompt = " ".join(f"Person {i} lives in town {i}." for i in range(40)) + " Person 7 lives in"
    body = {"model": "smollm2", "prompt": prompt, "target": " town 7", "prompt_granularity": {"type": "token"}}
    caplog.set_level(logging.WARNING, logger="atman.server")
    outcomes = {}
    with serving(app) as base:
        def abandon(name: str, patience: float) -> None:
            try:
                outcomes[name] = httpx.post(base + "/explain", json=body, timeout=patience).status_code
            except httpx.TimeoutException:
                outcomes[name] = "gave up"

        # the first request runs; the second waits behind it and its client gives up first, while the
        # first is still running, so the queued job must be dropped without ever starting
        running = threading.Thread(target=abandon, args=("running", 6.0))
        running.start()
        deadline = time.monotonic() + 60
        while app.state.queue.pending == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = threading.Thread(target=abandon, args=("queued", 1.0))
        queued.start()
        queued.join()
        running.join()
        assert outcomes == {"queued": "gave up", "running": "gave up"}
        # served although two explanations of ~400 passes each were asked for before it
        response = httpx.post(base + "/tokenize", json={"model": "smollm2", "prompt": "hi"}, timeout=120)
        assert response.status_code == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "atman.server"]
    dropped = [m for m in messages if "dropped before it started" in m]
    stopped = [m for m in messages if "stopped after" in m and "client went away" in m]
    assert len(dropped) == 1 and len(stopped) == 1, messages
    done, total = (int(v) for v in stopped[0].split("stopped after ")[1].split(" perturbations")[0].split(" of "))
    assert done < total, stopped


@pytest.mark.slow
def test_a_time_limit_inside_the_unperturbed_pass_stops_it_there(smollm2, caplog):
    """The unperturbed pass of a long prompt runs in pieces, each followed by a check: a limit that
    falls inside it stops the request there (0 perturbations done), not after the whole pass."""
    app = create_app({"smollm2": smollm2}, limits=Limits(max_prompt_tokens=2048, timeout_s=1.5))
    service = app.state.services["smollm2"]
    # pieces far shorter than the pass, whatever the machine's speed
    service.explainer = Explainer(smollm2, piece_tokens=64)
    prompt = " ".join(f"Person {i} lives in town {i}." for i in range(160)) + " Person 7 lives in"
    body = {"model": "smollm2", "prompt": prompt, "target": " town 7", "prompt_granularity": {"type": "sentence"}}
    caplog.set_level(logging.WARNING, logger="atman.server")
    with serving(app) as base:
        response = httpx.post(base + "/explain", json=body, timeout=300)
    assert response.status_code == 408, response.text
    stopped = [r.getMessage() for r in caplog.records if r.name == "atman.server" and "stopped" in r.getMessage()]
    assert len(stopped) == 1 and "after 0 of 162 perturbations" in stopped[0] and "time limit" in stopped[0], stopped


@pytest.mark.slow
def test_shutdown_finishes_queued_requests(smollm2):
    app = create_app({"smollm2": smollm2}, limits=Limits(max_prompt_tokens=256, max_units=48))
    body = {"model": "smollm2", "prompt": "Ada lives in Oslo.\n\nBo lives in Rome.\n\nAda lives in", "target": " Oslo",
            "prompt_granularity": {"type": "word"}}
    results = []
    with serving(app) as base:
        def call():
            results.append(httpx.post(base + "/explain", json=body, timeout=120).status_code)

        workers = [threading.Thread(target=call) for _ in range(3)]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while app.state.queue.pending < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.queue.pending >= 2  # one running, at least one queued when the server is told to stop
    for worker in workers:
        worker.join(timeout=120)
    assert results == [200, 200, 200]


# --- atman serve's start-up ------------------------------------------------------------------------------

def test_serve_start_up_checks_warning_and_host_check(tiny, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    model_dir = tmp_path / "tiny"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "ATMAN_SERVER_TOKEN"}
    env["PYTHONPATH"] = str(root)
    serve = [sys.executable, "-m", "atman", "serve", "--model", str(model_dir)]
    refused = subprocess.run([*serve, "--max-prompt-tokens", str(CONTEXT + 1)], cwd=root, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "exceeds the 256-token context" in refused.stderr, refused.stderr[-2000:]

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([*serve, "--host", "0.0.0.0", "--port", str(port)], cwd=root, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    if httpx.get(base + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.3)
            assert "without authentication" in log_path.read_text()
            rebound = httpx.get(base + "/health", headers={"Host": "attacker.example"})
            assert rebound.status_code == 400 and rebound.json()["code"] == "BAD_HOST"
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
