"""The HTTP app: Aleph Alpha's API (explain, complete, evaluate, tokenize, ...) over AtMan, and a web page.

The models it serves are loaded models (:func:`atman.load_model`, :func:`atman.load_vision_language`),
each answered by the service of its ``modality`` (:data:`SERVICES`); serve the app with ``uvicorn.run``.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from importlib.resources import files
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..errors import AtmanError
from ..models import LoadedModel
from . import schemas
from .base import LimitError, Limits, Service, Timeout
from .openai_service import openai_router, request_schemas
from .queue import Cancelled, JobCheck, JobQueue, QueueFull
from .security import token_problem
from .text_service import TextService
from .vision_service import VisionLanguageService

# the service that serves each kind of loaded model (``LoadedModel.modality``)
SERVICES: dict[str, type[Service]] = {"text": TextService, "vision-language": VisionLanguageService}

T = TypeVar("T")

# the API version reported at /version: the Aleph Alpha client accepts 1.x from its minimum on
API_VERSION = "1.19.0"
log = logging.getLogger("atman.server")
STATIC = files("atman.server") / "static"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse, "description": text}
    for code, text in ((400, "invalid request"), (401, "missing or wrong bearer token"),
                       (404, "model not served here"), (408, "ran past the time limit"),
                       (413, "request too large"), (422, "a field out of range or of the wrong type"),
                       (503, "too many requests waiting, or shutting down"))
}


class SafeJSONResponse(JSONResponse):
    """JSON that is always valid and encodable: non-ASCII escaped (so lone surrogates a client sent
    cannot break the encoding) and non-finite numbers refused by the encoder."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


BEARER = HTTPBearer(auto_error=False, description="the server's token, when it was started with one")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


class BodyLimit:
    """ASGI middleware: answer 413 once a request body exceeds ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        seen = 0
        started = rejected = False

        async def counted_receive() -> dict:
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # answer now; the app sees the client go away and its own answer is dropped
                    rejected = True
                    if not started:
                        await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if rejected:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, tracked_send)

    async def _reject(self, send: Callable) -> None:
        response = JSONResponse(_error(f"the request body exceeds this server's limit of {self.limit} bytes",
                                       "PAYLOAD_TOO_LARGE"), status_code=413)
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


class HostCheck:
    """ASGI middleware: answer 400 unless the request's Host header names one of ``hosts``.

    Without a token, this is what keeps a web page that a browser loaded from elsewhere from reaching
    a local server under a DNS name of its own (DNS rebinding).
    """

    def __init__(self, app: Callable, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = {h.lower().strip("[]") for h in hosts}

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        raw = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        try:
            name = urlsplit("//" + raw).hostname or ""
        except ValueError:
            name = ""
        if name.lower() in self.hosts:
            await self.app(scope, receive, send)
            return
        message = (f"the Host header {raw!r} is not a name of this server ({', '.join(sorted(self.hosts))}); "
                   "start it with --allow-host NAME to accept another")
        response = SafeJSONResponse(_error(message, "BAD_HOST"), status_code=400)
        await response({"type": "http"}, _no_receive, send)


def _error(message: str, code: str) -> dict[str, str]:
    return {"error": message, "code": code}


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as strings (a validation error may quote the number it refused)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _unparsable(exc: RequestValidationError) -> dict[str, str] | None:
    """The 400 body for a request body that is not JSON at all (FastAPI reports it as a validation error)."""
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            where = error.get("loc", ())[-1:]
            at = f" at character {where[0]}" if where and isinstance(where[0], int) else ""
            return _error(f"the request body is not valid JSON ({reason}{at})", "MALFORMED_BODY")
    return None


def _http_error(request: Request, exc: HTTPException) -> dict[str, str]:
    """The body for an error the routing or the body parser raised: no such path, a wrong method, a body
    that cannot be read (undecodable bytes)."""
    path = request.url.path
    if exc.status_code == 404:
        return _error(f"no endpoint at {path}; the API is described at /openapi.json", "NOT_FOUND")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return _error(f"{request.method} is not allowed on {path} (allowed: {allowed})", "METHOD_NOT_ALLOWED")
    if exc.status_code == 400:
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ is not None else ""
        return _error(f"the request body cannot be parsed{cause}", "MALFORMED_BODY")
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "error"
    return _error(str(exc.detail), phrase.upper().replace(" ", "_").replace("-", "_"))


def _validation_errors(exc: RequestValidationError) -> dict[str, Any]:
    """A 422 body naming every failing field, without echoing the input (which may not be encodable)."""
    details = [{"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", "")),
                "type": str(error.get("type", ""))} for error in exc.errors()]
    fields = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details[:5])
    return {"error": f"invalid request: {fields}", "code": "INVALID_REQUEST", "detail": _finite(details)}


def check_token(token: str | None) -> None:
    """Refuse (:class:`atman.AtmanError`) a token that no client could send.

    >>> check_token("s3cret")  # fine; check_token("") raises
    """
    problem = None if token is None else token_problem(token)
    if problem is not None:
        raise AtmanError(f"the server token {problem}, which no client can send in an Authorization header; "
                         "give a real token or none (no authentication)")


async def _client_gone(request: Request) -> None:
    """Completes when the client of ``request`` disconnects (its body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _ApiError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def create_app(
    models: Mapping[str, LoadedModel],
    *,
    limits: Limits | None = None,
    token: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
) -> FastAPI:
    """The app serving ``models`` (name -> loaded model; each also answers to its own display name).

    ``token``: when set, every API call needs ``Authorization: Bearer <token>`` (the page asks for it).
    ``allowed_hosts``: without a token, the names a request's Host header may carry (None: any).
    Requests can only name these models: nothing a request says loads a model or reads a file.
    ``limits.max_prompt_tokens`` must fit every model's context (else :class:`atman.AtmanError`).
    """
    if not models:
        raise AtmanError("create_app needs at least one model")
    check_token(token)
    limits = limits or Limits()
    services: dict[str, Service] = {}
    for alias, lm in models.items():
        kind = SERVICES.get(lm.modality)
        if kind is None:
            raise AtmanError(f"{lm.name} is a {lm.modality} model; atman serve serves {' and '.join(SERVICES)} models")
        service = kind(lm, limits, aliases=(alias,) if alias != lm.name else ())
        context = lm.context_length
        if context is not None and limits.max_prompt_tokens > context:
            raise AtmanError(f"max_prompt_tokens {limits.max_prompt_tokens} exceeds the {context}-token context of "
                             f"{lm.name} ({alias}); give at most {context}")
        services[alias] = service
        services.setdefault(lm.name, service)
    queue = JobQueue(limits.max_queue, limits.timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(
        default_response_class=SafeJSONResponse,
        title="atman",
        version=API_VERSION,
        summary="AtMan explanations and attention steering, in the JSON of Aleph Alpha's API",
        lifespan=lifespan,
        docs_url=None,  # the interactive docs load scripts from a CDN; the page here loads nothing external
        redoc_url=None,
    )
    app.state.services = services
    app.state.queue = queue
    app.state.limits = limits
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    if token is None and allowed_hosts is not None:
        app.add_middleware(HostCheck, hosts=allowed_hosts)

    def authorize(credentials: Credentials) -> None:
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise _ApiError(401, "missing or wrong bearer token (send Authorization: Bearer <token>)",
                            "UNAUTHENTICATED")

    def service_for(name: str) -> Service:
        service = services.get(name)
        if service is None:
            served = ", ".join(sorted(services))
            raise _ApiError(404, f"model {name!r} is not served here; served models: {served}", "UNKNOWN_MODEL")
        return service

    @app.exception_handler(_ApiError)
    async def api_error(_: Request, exc: _ApiError) -> JSONResponse:
        return SafeJSONResponse(_error(exc.message, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        unparsable = _unparsable(exc)
        if unparsable is not None:
            return SafeJSONResponse(unparsable, status_code=400)
        return SafeJSONResponse(_validation_errors(exc), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's and Starlette's own errors (unknown path, wrong method, unreadable body) in our shape
        return SafeJSONResponse(_http_error(request, exc), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(LimitError)
    async def limit_error(_: Request, exc: LimitError) -> JSONResponse:
        return SafeJSONResponse(_error(str(exc), "LIMIT_EXCEEDED"), status_code=exc.status)

    @app.exception_handler(AtmanError)
    async def bad_request(_: Request, exc: AtmanError) -> JSONResponse:
        return SafeJSONResponse(_error(str(exc), "BAD_REQUEST"), status_code=400)

    @app.exception_handler(Timeout)
    async def timeout(_: Request, exc: Timeout) -> JSONResponse:
        return SafeJSONResponse(_error(str(exc), "TIMEOUT"), status_code=408)

    @app.exception_handler(Cancelled)
    async def cancelled(_: Request, exc: Cancelled) -> JSONResponse:
        # 499: nobody reads it (the client is gone); 503: the server stopped before the job ended
        return SafeJSONResponse(_error(str(exc), "CANCELLED"), status_code=exc.status)

    @app.exception_handler(QueueFull)
    async def busy(_: Request, exc: QueueFull) -> JSONResponse:
        return SafeJSONResponse(_error(str(exc), "BUSY"), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return SafeJSONResponse(_error(f"internal error ({type(exc).__name__}); the server keeps running",
                                       "INTERNAL"), status_code=500)

    async def run(request: Request, job: Callable[[JobCheck], T]) -> T:
        """``job`` on the model worker, cancelled when the client goes away."""
        return await queue.run(job, lambda: _client_gone(request), label=f"{request.method} {request.url.path}")

    api = APIRouter(dependencies=[Depends(authorize)], responses=ERRORS)

    @api.post("/explain", response_model_exclude_none=True)
    async def explain(body: schemas.ExplanationRequest, request: Request) -> schemas.ExplanationResponse:
        """AtMan explanation of ``target`` given ``prompt``: per target span, a score per unit of each item."""
        service = service_for(body.model)
        return await run(request, lambda check: service.explain(body, check))

    @api.post("/complete", response_model_exclude_none=True)
    async def complete(body: schemas.CompletionRequest, request: Request) -> schemas.CompletionResponse:
        """Completion steered by the prompt items' attention controls (AtMan, every generated token)."""
        service = service_for(body.model)
        return await run(request, lambda check: service.complete(body, check))

    @api.post("/cite")
    async def cite(body: schemas.CitationRequest, request: Request) -> schemas.CitationResponse:
        """The sources in ``context`` that each sentence of ``response`` rests on (atman's own endpoint)."""
        service = service_for(body.model)
        if not service.capabilities.cite:
            raise _ApiError(400, f"{body.model} is a vision-language model; /cite serves text models", "BAD_REQUEST")
        return await run(request, lambda check: service.cite(body, check))

    @api.post("/evaluate")
    async def evaluate(body: schemas.EvaluationRequest, request: Request) -> schemas.EvaluationResponse:
        """Log-probability of ``completion_expected`` after the (controlled) prompt."""
        service = service_for(body.model)
        return await run(request, lambda check: service.evaluate(body, check))

    @api.post("/tokenize", response_model_exclude_none=True)
    async def tokenize(body: schemas.TokenizationRequest) -> schemas.TokenizationResponse:
        """The model's tokens of a text (no special tokens added)."""
        service = service_for(body.model)
        # through the worker too: a tokenizer must not be used by two threads at once
        return await queue.run(lambda _: service.tokenize(body))

    @api.post("/detokenize")
    async def detokenize(body: schemas.DetokenizationRequest) -> schemas.DetokenizationResponse:
        """The text of token ids."""
        service = service_for(body.model)
        return await queue.run(lambda _: service.detokenize(body))

    @api.get("/models_available")
    async def models_available() -> list[schemas.ModelInfo]:
        """The served models (each once, under its display name)."""
        unique = {id(s): s for s in services.values()}
        return [s.info() for s in unique.values()]

    @api.get("/models/{model}/tokenizer", response_class=PlainTextResponse)
    async def tokenizer(model: str) -> Response:
        """The model's tokenizer in the JSON format of Hugging Face ``tokenizers``."""
        service = service_for(model)
        return Response(await queue.run(lambda _: service.tokenizer_json()), media_type="application/json")

    app.include_router(api)
    # the OpenAI-compatible endpoints (/v1/...), on the same queue and token
    app.include_router(openai_router(services, queue, token, run))
    described = app.openapi

    def openapi() -> dict[str, Any]:
        # FastAPI builds the schema once and keeps it on the app; the /v1 request bodies join it then
        if app.openapi_schema is None:
            request_schemas(described())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/version", response_class=PlainTextResponse)
    async def version() -> str:
        """The API version (Aleph Alpha's numbering) that this server speaks."""
        return API_VERSION

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the served models and the number of waiting requests."""
        return {"status": "ok", "models": sorted(services), "waiting": queue.pending,
                "auth": token is not None}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return (STATIC / "index.html").read_text(encoding="utf-8")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app
