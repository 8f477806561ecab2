"""The HTTP app: Aleph Alpha's API (explain, complete, evaluate, tokenize, ...) over AtMan, and a web page.

Example::

    >>> from atman import load_model
    >>> from atman.server import create_app
    >>> app = create_app({"smollm2": load_model()})   # serve with uvicorn.run(app)
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from ..errors import AtmanError
from ..models import LoadedModel
from . import schemas
from .queue import JobQueue, QueueFull
from .service import LimitError, Limits, ModelService, Timeout

# the API version reported at /version: the Aleph Alpha client accepts 1.x from its minimum on
API_VERSION = "1.19.0"
log = logging.getLogger("atman.server")
STATIC = files("atman.server") / "static"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse, "description": text}
    for code, text in ((400, "invalid request"), (401, "missing or wrong bearer token"),
                       (404, "model not served here"), (408, "ran past the time limit"),
                       (413, "request too large"), (503, "too many requests waiting"))
}


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


def _error(message: str, code: str) -> dict[str, str]:
    return {"error": message, "code": code}


class _ApiError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def create_app(
    models: Mapping[str, LoadedModel],
    *,
    limits: Limits | None = None,
    token: str | None = None,
) -> FastAPI:
    """The app serving ``models`` (name -> loaded model; each also answers to its own display name).

    ``token``: when set, every API call needs ``Authorization: Bearer <token>`` (the page asks for it).
    Requests can only name these models: nothing a request says loads a model or reads a file.
    """
    if not models:
        raise AtmanError("create_app needs at least one model")
    limits = limits or Limits()
    services: dict[str, ModelService] = {}
    for alias, lm in models.items():
        service = ModelService(lm, limits, aliases=(alias,) if alias != lm.name else ())
        services[alias] = service
        services.setdefault(lm.name, service)
    queue = JobQueue(limits.max_queue, limits.timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(
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

    def authorize(credentials: Credentials) -> None:
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise _ApiError(401, "missing or wrong bearer token (send Authorization: Bearer <token>)",
                            "UNAUTHENTICATED")

    def service_for(name: str) -> ModelService:
        service = services.get(name)
        if service is None:
            served = ", ".join(sorted(services))
            raise _ApiError(404, f"model {name!r} is not served here; served models: {served}", "UNKNOWN_MODEL")
        return service

    @app.exception_handler(_ApiError)
    async def api_error(_: Request, exc: _ApiError) -> JSONResponse:
        return JSONResponse(_error(exc.message, exc.code), status_code=exc.status)

    @app.exception_handler(LimitError)
    async def limit_error(_: Request, exc: LimitError) -> JSONResponse:
        return JSONResponse(_error(str(exc), "LIMIT_EXCEEDED"), status_code=exc.status)

    @app.exception_handler(AtmanError)
    async def bad_request(_: Request, exc: AtmanError) -> JSONResponse:
        return JSONResponse(_error(str(exc), "BAD_REQUEST"), status_code=400)

    @app.exception_handler(Timeout)
    async def timeout(_: Request, exc: Timeout) -> JSONResponse:
        return JSONResponse(_error(str(exc), "TIMEOUT"), status_code=408)

    @app.exception_handler(QueueFull)
    async def busy(_: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(_error(str(exc), "BUSY"), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(_error(f"internal error ({type(exc).__name__}); the server keeps running",
                                   "INTERNAL"), status_code=500)

    api = APIRouter(dependencies=[Depends(authorize)], responses=ERRORS)

    @api.post("/explain", response_model_exclude_none=True)
    async def explain(body: schemas.ExplanationRequest) -> schemas.ExplanationResponse:
        """AtMan explanation of ``target`` given ``prompt``: per target span, a score per unit of each item."""
        service = service_for(body.model)
        return await queue.run(lambda deadline: service.explain(body, deadline))

    @api.post("/complete", response_model_exclude_none=True)
    async def complete(body: schemas.CompletionRequest) -> schemas.CompletionResponse:
        """Completion steered by the prompt items' attention controls (AtMan, every generated token)."""
        service = service_for(body.model)
        return await queue.run(lambda deadline: service.complete(body, deadline))

    @api.post("/evaluate")
    async def evaluate(body: schemas.EvaluationRequest) -> schemas.EvaluationResponse:
        """Log-probability of ``completion_expected`` after the (controlled) prompt."""
        service = service_for(body.model)
        return await queue.run(lambda deadline: service.evaluate(body, deadline))

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
