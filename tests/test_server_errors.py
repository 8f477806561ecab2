"""Every error the server answers is ``{"error": ..., "code": ...}`` with a 4xx (or 503) status: FastAPI's and
Starlette's own (unknown path, wrong method, unparsable body) and those the HTTP protocol gives before the app
(a malformed request, headers over 16 KiB however they arrive, too many connections).

A tiny random-init Llama with SmolLM2's tokenizer serves; nothing here depends on the model.
"""

from __future__ import annotations

import json
import socket

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from _server import serving  # noqa: E402
from conftest import tiny_model  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from atman import LoadedModel, enable  # noqa: E402
from atman.server import Limits, create_app  # noqa: E402
from atman.server.protocol import MAX_HEADER_BYTES, guarded_protocol  # noqa: E402

MODEL = "tiny"
LIMITS = Limits(max_body_bytes=20_000, max_prompt_tokens=64, max_units=16, max_tokens=4, timeout_s=30.0)


@pytest.fixture(scope="module")
def tiny(smollm2) -> LoadedModel:
    model = enable(tiny_model("llama", vocab_size=len(smollm2.tokenizer)).eval())
    return LoadedModel(model=model, tokenizer=smollm2.tokenizer, name="tiny-llama")


@pytest.fixture(scope="module")
def api(tiny):
    with TestClient(create_app({MODEL: tiny}, limits=LIMITS), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def port(tiny):
    """A real server on loopback with the protocol of ``atman serve``."""
    with serving(create_app({MODEL: tiny}, limits=LIMITS), http=guarded_protocol(30.0)) as base:
        yield int(base.rsplit(":", 1)[1])


def _shape(response) -> dict:
    body = response.json()
    assert set(body) == {"error", "code"} and body["error"], body
    assert response.headers["content-type"] == "application/json"
    return body


# --- FastAPI's and Starlette's errors ----------------------------------------------------------------

@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/no-such-endpoint", 404, "NOT_FOUND"),
    ("POST", "/explain/extra", 404, "NOT_FOUND"),
    ("GET", "/static/no-such-file.js", 404, "NOT_FOUND"),
    ("GET", "/explain", 405, "METHOD_NOT_ALLOWED"),
    ("DELETE", "/tokenize", 405, "METHOD_NOT_ALLOWED"),
    ("POST", "/health", 405, "METHOD_NOT_ALLOWED"),
])
def test_unknown_paths_and_wrong_methods(api, method, path, status, code):
    response = api.request(method, path)
    assert response.status_code == status
    body = _shape(response)
    assert body["code"] == code and path in body["error"]
    if status == 405:
        assert method in body["error"] and response.headers["allow"] in body["error"]


def test_a_wrong_method_names_the_allowed_ones(api):
    response = api.get("/tokenize")
    assert response.headers["allow"] == "POST" and "(allowed: POST)" in _shape(response)["error"]


@pytest.mark.parametrize("raw, words", [
    (b'{"model": "tiny", "prompt": ', "not valid JSON"),
    (b"not json at all", "not valid JSON"),
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', "cannot be parsed"),
])
def test_an_unparsable_body_is_a_400(api, raw, words):
    response = api.post("/tokenize", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    body = _shape(response)
    assert body["code"] == "MALFORMED_BODY" and words in body["error"]


def test_a_parsable_body_of_the_wrong_schema_stays_a_422(api):
    response = api.post("/tokenize", json={"model": MODEL, "prompt": 3})
    assert response.status_code == 422 and response.json()["code"] == "INVALID_REQUEST"
    assert api.post("/tokenize", json={"model": MODEL, "prompt": "Ada"}).status_code == 200


# --- what the protocol answers before the app, over a raw socket -------------------------------------

def _head(size: int, path: str = "/health") -> bytes:
    """A GET whose request line and headers are exactly ``size`` bytes, the closing blank line included."""
    start = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Pad: ".encode()
    pad = size - len(start) - len(b"\r\n\r\n")
    assert pad > 0
    return start + b"a" * pad + b"\r\n\r\n"


def _exchange(port: int, pieces: list[bytes]) -> list[tuple[int, dict, bytes]]:
    """Send ``pieces`` one write each, then read every response until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        for piece in pieces:
            sock.sendall(piece)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    responses = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        length = int(headers["content-length"])
        responses.append((int(status_line.split()[1]), headers, rest[:length]))
        received = rest[length:]
    return responses


def _refused_headers(response: tuple[int, dict, bytes]) -> None:
    status, headers, body = response
    assert status == 431 and headers["content-type"] == "application/json"
    error = json.loads(body)
    assert error == {"code": "HEADERS_TOO_LARGE",
                     "error": f"the request line and headers exceed this server's limit of {MAX_HEADER_BYTES} bytes"}


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES + 1, 100_000])
def test_headers_over_the_limit_in_one_write_are_refused(port, size):
    [response] = _exchange(port, [_head(size)])
    _refused_headers(response)


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES + 1, 100_000])
def test_headers_over_the_limit_in_pieces_are_refused(port, size):
    # 1 KiB writes; those after the refusal are read and dropped, so the answer reaches the client
    head = _head(size)
    [response] = _exchange(port, [head[i:i + 1024] for i in range(0, len(head), 1024)])
    _refused_headers(response)


@pytest.mark.parametrize("split", [False, True])
def test_headers_of_exactly_the_limit_are_served(port, split):
    head = _head(MAX_HEADER_BYTES)
    [(status, _, body)] = _exchange(port, [head[:5000], head[5000:]] if split else [head])
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_a_pipelined_request_with_long_headers_is_refused_after_the_first_is_served(port):
    first = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    [(status, _, body), refused] = _exchange(port, [first + _head(50_000)])
    assert status == 200 and json.loads(body)["status"] == "ok"
    _refused_headers(refused)


@pytest.mark.parametrize("raw", [b"NOT AN HTTP REQUEST\r\n\r\n", b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n"])
def test_a_malformed_request_gets_a_400_in_the_error_shape(port, raw):
    [(status, headers, body)] = _exchange(port, [raw])
    error = json.loads(body)
    assert status == 400 and headers["content-type"] == "application/json"
    assert error["code"] == "MALFORMED_REQUEST" and error["error"].startswith("invalid HTTP request: ")


def test_too_many_connections_get_a_503_in_the_error_shape(tiny):
    app = create_app({MODEL: tiny}, limits=LIMITS)
    with serving(app, http=guarded_protocol(30.0), limit_concurrency=3) as base:
        port = int(base.rsplit(":", 1)[1])
        assert httpx.get(base + "/health").status_code == 200
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        # two silent connections and this one reach the limit of 3 (uvicorn's count, the connection itself in it)
        response = httpx.get(base + "/health")
        for sock in held:
            sock.close()
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert _shape(response)["code"] == "BUSY"
