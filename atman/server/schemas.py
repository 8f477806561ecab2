"""Request and response bodies of the HTTP API, in the JSON of Aleph Alpha's API.

The field names and shapes are those that the official ``aleph-alpha-client`` sends and parses
(``CompletionRequest.to_json``, ``ExplanationResponse.from_json`` and so on). Fields the client
always sends with a neutral default but that this server does not implement are accepted at that
default and rejected (400) otherwise; see ``UNSUPPORTED_COMPLETION_FIELDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# attention control factors above this overflow the multiplicative variant's float32 scores
MAX_CONTROL_FACTOR = 1000.0
# below these (but above 0, which means off), logits / temperature overflow to infinity and a top_p
# rounds to 0 in float32: the sampling probabilities would be NaN
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6
Factor = Annotated[float, Field(ge=0.0, le=MAX_CONTROL_FACTOR, allow_inf_nan=False)]
Overlap = Literal["partial", "complete"]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


def _valid_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_valid_text)]


def _off_or_at_least(name: str, minimum: float) -> Callable[[float], float]:
    def check(value: float) -> float:
        if 0.0 < value < minimum:
            raise ValueError(f"{name} must be 0 (off) or at least {minimum:g}, got {value:g}")
        return value

    return check


class _Body(BaseModel):
    # clients add routing fields (hosting, tags) that do not concern a single server
    model_config = ConfigDict(extra="ignore")


class TextControlJson(_Body):
    start: int = Field(ge=0, lt=2**31)
    length: int = Field(ge=1, lt=2**31)
    factor: Factor
    token_overlap: Overlap | None = None


class TokenControlJson(_Body):
    index: int = Field(ge=0, lt=2**31)
    factor: Factor


class Rect(_Body):
    left: float = Field(allow_inf_nan=False)
    top: float = Field(allow_inf_nan=False)
    width: float = Field(allow_inf_nan=False)
    height: float = Field(allow_inf_nan=False)


class ImageControlJson(_Body):
    rect: Rect
    factor: Factor
    token_overlap: Overlap | None = None


class TextPromptItem(_Body):
    type: Literal["text"]
    data: str
    controls: list[TextControlJson] = Field(default_factory=list)

    _text = field_validator("data")(_valid_text)


class TokensPromptItem(_Body):
    type: Literal["token_ids"]
    data: list[TokenId]
    controls: list[TokenControlJson] = Field(default_factory=list)


class ImagePromptItem(_Body):
    type: Literal["image"]
    data: str
    x: int | None = None
    y: int | None = None
    size: int | None = None
    controls: list[ImageControlJson] = Field(default_factory=list)


PromptItem = Annotated[TextPromptItem | TokensPromptItem | ImagePromptItem, Field(discriminator="type")]
Prompt = Annotated[Text, Field(description="plain text")] | list[PromptItem]


class CustomGranularity(_Body):
    type: Literal["token", "word", "sentence", "paragraph", "custom"]
    delimiter: str | None = Field(default=None, description="for type 'custom': split the prompt after it")

    _text = field_validator("delimiter")(lambda v: v if v is None else _valid_text(v))


class ExplanationRequest(_Body):
    model: str
    prompt: Prompt
    target: str
    contextual_control_threshold: float | None = Field(default=None, allow_inf_nan=False)
    control_factor: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False,
                                         description="multiplier of a suppressed unit (default 0.1)")
    control_token_overlap: Overlap | None = None
    control_log_additive: bool | None = None
    prompt_granularity: CustomGranularity | None = Field(
        default=None, description='{"type": "word"} as the official client sends it, or the bare name "word"')
    target_granularity: Literal["complete", "token"] | None = None
    postprocessing: Literal["none", "absolute", "square"] | None = None
    normalize: bool | None = None

    _text = field_validator("target")(_valid_text)

    @field_validator("prompt_granularity", mode="before")
    @classmethod
    def _bare_granularity(cls, value: object) -> object:
        """A bare granularity name means the object of that type (a bare "custom" has no delimiter)."""
        return {"type": value} if isinstance(value, str) else value


# an image item of an explanation scores rectangles with coordinates in 0..1 of the whole image as sent
# (``ImagePromptItemExplanation.from_json`` / ``ImageScore.from_json`` of the official aleph-alpha-client)
class ImageRect(BaseModel):
    """A rectangle of an image: top-left corner and size, all in 0..1 of the image's width and height."""

    left: float
    top: float
    width: float
    height: float


class ImageScore(BaseModel):
    """The score of one rectangle (a tile of image tokens)."""

    rect: ImageRect
    score: float


class ImageExplanationItem(BaseModel):
    """The scores of an image prompt item's tiles."""

    type: Literal["image"]
    scores: list[ImageScore]


class TextScore(BaseModel):
    start: int
    length: int
    score: float


class TextExplanationItem(BaseModel):
    type: Literal["text", "target"]
    scores: list[TextScore]


class TokenExplanationItem(BaseModel):
    type: Literal["token_ids"]
    scores: list[float]


class TargetExplanationJson(BaseModel):
    target: str
    items: list[TextExplanationItem | TokenExplanationItem | ImageExplanationItem]


class ExplanationResponse(BaseModel):
    model_version: str
    explanations: list[TargetExplanationJson]


class CitationPassage(_Body):
    text: Text
    id: Text | None = None
    title: Text | None = None


class CitationRequest(_Body):
    """``POST /cite`` (this server's own endpoint; not part of Aleph Alpha's API): the sources in
    ``context`` that each sentence of ``response`` rests on (see docs/citations.md)."""

    model: str
    context: Text | list[CitationPassage] = Field(description="text (passages at blank lines) or passages")
    question: Text
    response: Text | None = Field(default=None, description="the text to explain; none: the model answers")
    sources: Literal["passage", "sentence", "token"] = "sentence"
    spans: list[tuple[Annotated[int, Field(ge=0, lt=2**31)], Annotated[int, Field(ge=0, lt=2**31)]]] | None = None
    method: Literal["readout", "atman"] = "readout"
    multiplier: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                              description="attention multiplier of a suppressed source (0: removed)")
    maximum_tokens: int = Field(default=128, ge=1, lt=2**31, description="length of a generated response")
    refine: bool | None = Field(default=None, description="coarse to fine (none: automatic, above 100 sources)")
    group_size: int = Field(default=8, ge=2, le=4096, description="sources per run in the coarse stage")
    refine_share: float = Field(default=0.99, gt=0.0, le=1.0, allow_inf_nan=False,
                                description="refine the fewest top runs holding this share of the positive total")


class CitationSource(BaseModel):
    text: str
    start: int
    end: int
    passage: int
    name: str = Field(description="how the views name the source: its passage's id (else its place from 1) and, "
                                   "below passage level, its number in that passage (\"p2:3\")")


class CitationSpan(BaseModel):
    text: str
    start: int
    end: int
    scores: list[float]


class CitationResponse(BaseModel):
    model_version: str
    context: str
    question: str
    response: str
    passages: list[dict[str, Any]]
    sources: list[CitationSource]
    spans: list[CitationSpan]
    settings: dict[str, Any]


class CompletionRequest(_Body):
    model: str
    prompt: Prompt
    maximum_tokens: int | None = Field(default=None, ge=1)
    temperature: Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False),
                           AfterValidator(_off_or_at_least("temperature", MIN_TEMPERATURE))] = 0.0
    top_k: int = Field(default=0, ge=0, lt=2**31)
    top_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False),
                     AfterValidator(_off_or_at_least("top_p", MIN_TOP_P))] = 0.0
    n: int = Field(default=1, ge=1)
    logit_bias: dict[int, Annotated[float, Field(ge=-1e4, le=1e4, allow_inf_nan=False)]] | None = None
    log_probs: int | None = Field(default=None, ge=0, le=100)
    stop_sequences: list[str] | None = None
    tokens: bool = False
    minimum_tokens: int = Field(default=0, ge=0)
    raw_completion: bool = False
    disable_optimizations: bool = False
    contextual_control_threshold: float | None = Field(default=None, allow_inf_nan=False)
    control_log_additive: bool | None = True
    # sent by the client with these neutral values; anything else is not implemented here
    presence_penalty: float = Field(default=0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, allow_inf_nan=False)
    sequence_penalty: float = Field(default=0.0, allow_inf_nan=False)
    sequence_penalty_min_length: int = 2
    repetition_penalties_include_prompt: bool = False
    repetition_penalties_include_completion: bool = True
    use_multiplicative_presence_penalty: bool = False
    use_multiplicative_frequency_penalty: bool = False
    use_multiplicative_sequence_penalty: bool = False
    penalty_bias: str | None = None
    penalty_exceptions: list[str] | None = None
    penalty_exceptions_include_stop_sequences: bool | None = None
    best_of: int | None = None
    echo: bool = False
    completion_bias_inclusion: list[str] | None = None
    completion_bias_inclusion_first_token_only: bool = False
    completion_bias_exclusion: list[str] | None = None
    completion_bias_exclusion_first_token_only: bool = False
    steering_concepts: list[str] | None = None
    stream: bool = False

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        return value if value is None else [_valid_text(v) for v in value]


# field -> the only value accepted (what the client sends when the feature is not used)
UNSUPPORTED_COMPLETION_FIELDS: dict[str, Any] = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "sequence_penalty": 0.0,
    "penalty_bias": None,
    "penalty_exceptions": None,
    "best_of": None,
    "echo": False,
    "completion_bias_inclusion": None,
    "completion_bias_exclusion": None,
    "steering_concepts": None,
    "stream": False,
}


class CompletionResult(BaseModel):
    completion: str
    finish_reason: str
    completion_tokens: list[str] | None = None
    log_probs: list[dict[str, float]] | None = None
    raw_completion: str | None = None


class CompletionResponse(BaseModel):
    model_version: str
    completions: list[CompletionResult]
    num_tokens_prompt_total: int
    num_tokens_generated: int


class EvaluationRequest(_Body):
    model: str
    prompt: Prompt
    completion_expected: str
    contextual_control_threshold: float | None = Field(default=None, allow_inf_nan=False)
    control_log_additive: bool | None = True

    _text = field_validator("completion_expected")(_valid_text)


class EvaluationResult(BaseModel):
    log_probability: float
    log_perplexity: float
    log_perplexity_per_token: float
    log_perplexity_per_character: float
    correct_greedy: bool
    token_count: int
    character_count: int
    completion: str


class EvaluationResponse(BaseModel):
    model_version: str
    message: str | None = None
    result: EvaluationResult
    num_tokens_prompt_total: int


class TokenizationRequest(_Body):
    model: str
    prompt: str
    tokens: bool = True
    token_ids: bool = True

    _text = field_validator("prompt")(_valid_text)


class TokenizationResponse(BaseModel):
    tokens: list[str] | None = None
    token_ids: list[int] | None = None


class DetokenizationRequest(_Body):
    model: str
    token_ids: list[TokenId]


class DetokenizationResponse(BaseModel):
    result: str


class ModelInfo(BaseModel):
    name: str
    description: str
    max_context_size: int | None
    hostings: list[str]
    image_support: bool
    explanation_support: bool
    steering_support: bool
    aliases: list[str]


class ErrorResponse(BaseModel):
    error: str
    code: str
