"""Request and response bodies of the OpenAI-compatible endpoints (``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``), with the fields the official ``openai`` client and the
frameworks built on it send, and atman's extension ``"atman": {"cite": {...}}``.

Fields a client sends that this server does not implement are accepted at their neutral value and
refused (400) otherwise (:data:`NEUTRAL`); fields that only concern a hosted service (``user``,
``store``, ``metadata``, ``service_tier``, ``parallel_tool_calls``) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..transcripts import ROLES

# what a request may set these fields to (anything else: 400 "not supported by this server")
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}
SOURCE_LEVELS = ("message", "passage", "sentence", "token")
MAX_TOP_LOGPROBS = 20


MESSAGE_SCHEMA = {
    "type": "object", "required": ["role"],
    "properties": {
        "role": {"enum": list(ROLES)},
        "content": {"anyOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]},
        "name": {"type": "string"},
        "tool_calls": {"type": "array", "items": {"type": "object"}},
        "tool_call_id": {"type": "string"},
        "reasoning_content": {"type": "string"},
    },
}


def _neutral_only(schema: dict[str, Any]) -> None:
    """In a request's JSON schema, the fields of :data:`NEUTRAL` take only their neutral values."""
    for name, values in NEUTRAL.items():
        if name in schema.get("properties", {}):
            allowed = sorted({v for v in values if v is not None}, key=repr)
            schema["properties"][name] = {"anyOf": [{"enum": allowed}, {"type": "null"}], "default": None,
                                          "description": "accepted only at its neutral value (not supported here)"}


class _Body(BaseModel):
    # clients send fields of newer API versions and of their own (hosted services' options)
    model_config = ConfigDict(extra="ignore", json_schema_extra=_neutral_only)


class CiteOptions(_Body):
    """``atman.cite``: cite the answer's sentences in the transcript."""

    sources: Literal["message", "passage", "sentence", "token"] = "sentence"
    top: int = Field(3, ge=1, le=100)
    roles: list[str] | None = None
    method: Literal["readout", "atman"] = "readout"
    multiplier: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)


class AtmanOptions(_Body):
    """``atman``: ``cite`` the answer; ``answer``: cite this answer (written elsewhere, or the last turn of a
    pasted transcript) instead of generating one."""

    cite: CiteOptions | None = None
    answer: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``. ``messages`` are read by :func:`atman.transcripts.parse_messages`
    (so that a wrong role or a tool result without a call is answered with what is wrong)."""

    # read by parse_messages (free-form here, so that its errors say what is wrong); the schema shows the shape
    messages: list[Any] = Field(json_schema_extra={"items": MESSAGE_SCHEMA, "minItems": 1})
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    atman: AtmanOptions | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` as a text (or a list of one), or token ids."""

    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class CitedSource(BaseModel):
    """A source of an answer sentence: where it is in the transcript, its text and score."""

    message: int | None
    role: str
    tool_call_id: str | None = None
    text: str
    start: int
    end: int
    score: float


class SentenceCitation(BaseModel):
    """One answer sentence: its index, text and character span in the answer, its top sources."""

    index: int
    text: str
    start: int
    end: int
    sources: list[CitedSource]


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    citations: list[SentenceCitation] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    """The legacy completions' log-probabilities."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "atman"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error JSON."""

    error: ErrorDetail
