"""What every served model shares: limits, deadlines, tokenizer endpoints, the checks and settings of a request.

A service turns API request bodies (:mod:`atman.server.schemas`) into library calls and their results
into response bodies; :class:`Service` holds everything that does not depend on the kind of model, so
that :class:`~atman.server.text_service.TextService` and
:class:`~atman.server.vision_service.VisionLanguageService` say only how their prompts are read.
What a service offers beyond the shared endpoints is data (:class:`Capabilities`), which the app reads
to route requests and to answer 404 for what a model cannot do.

Everything here runs on the model's worker thread (see :mod:`atman.server.queue`); nothing here
knows about HTTP. User errors raise :class:`atman.AtmanError` (the app answers 400) or
:class:`LimitError` (413/422).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..budget import piece_tokens_for
from ..defaults import DEFAULT_MULTIPLIER
from ..errors import AtmanError, ContextLengthError
from ..rows import Suppression
from . import schemas

# Aleph Alpha's explanation control factor is the attention multiplier of a suppressed unit, as ours
DEFAULT_CONTROL_FACTOR = DEFAULT_MULTIPLIER
# the API's prompt granularities by the names of atman's text units
GRANULARITY_NAMES = {"token": "token", "word": "word", "sentence": "sentence", "paragraph": "paragraph",
                     "custom": "delimiter"}
Check = Callable[..., None]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Exceeding a limit answers 413 (size) or 422 (settings)."""

    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 2048
    max_units: int = 256
    max_tokens: int = 256
    max_completions: int = 8
    timeout_s: float = 300.0
    max_queue: int = 64
    # a running explanation checks its deadline and client about this often (None: between batches only)
    check_interval_s: float | None = 2.0
    # image prompt items (vision-language models): pixels of one image, checked before decoding
    max_image_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class Capabilities:
    """What a served model answers beyond explain, complete, evaluate and the tokenizer endpoints."""

    cite: bool = False
    images: bool = False


class LimitError(AtmanError):
    """A request beyond a configured limit; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Timeout(Exception):
    """The request ran past its deadline."""


class Deadline:
    """A point in time; calling it raises :class:`Timeout` once it has passed (checked between passes)."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.seconds = seconds

    def __call__(self, *_: object) -> None:
        if time.monotonic() > self.at:
            raise Timeout(f"the request took longer than the server's limit of {self.seconds:g} s")


def piece_tokens(model: torch.nn.Module, limits: Limits) -> int | None:
    """The engine's ``piece_tokens`` for a served model: what it runs in ``limits.check_interval_s`` at
    its device's nominal speed (:func:`atman.budget.piece_tokens_for`; never timed, so every server and
    replica of a model cuts its work alike and gives the same results)."""
    if limits.check_interval_s is None:
        return None
    return piece_tokens_for(model, limits.check_interval_s)


def completion_length(request: schemas.CompletionRequest, limits: Limits) -> int:
    """The number of tokens a completion request may generate, after refusing what this server does not
    implement (400) and what exceeds its limits (422): the checks every served model shares."""
    for name, neutral in schemas.UNSUPPORTED_COMPLETION_FIELDS.items():
        if getattr(request, name) != neutral:
            raise AtmanError(f"{name} is not supported by this server (leave it at {neutral!r})")
    maximum = request.maximum_tokens or limits.max_tokens
    if maximum > limits.max_tokens:
        raise LimitError(f"maximum_tokens {maximum} exceeds this server's limit of {limits.max_tokens}", 422)
    if request.n > limits.max_completions:
        raise LimitError(f"n={request.n} exceeds this server's limit of {limits.max_completions}", 422)
    if request.minimum_tokens > maximum:
        raise AtmanError(f"minimum_tokens {request.minimum_tokens} exceeds maximum_tokens {maximum}")
    return maximum


def control_mode(log_additive: bool | None) -> str:
    """The attention variant of a request's ``control_log_additive`` (absent = log-additive)."""
    return "multiplicative" if log_additive is False else "log-additive"


def contextual_threshold(value: float | None) -> float | None:
    """A request's ``contextual_control_threshold``, checked: None, or a cosine similarity in (0, 1]."""
    if value is not None and not 0.0 < value <= 1.0:
        raise AtmanError(f"contextual_control_threshold must lie in (0, 1], got {value}")
    return value


def explanation_suppression(request: schemas.ExplanationRequest) -> Suppression:
    """The suppression an /explain request asks for. ``contextual_control_threshold`` means what it means
    on /complete and /evaluate (Aleph Alpha's rule): a token at least that similar to a suppressed unit's
    gets the very same multiplier (the ``"same"`` rule of :mod:`atman.rows`)."""
    return Suppression(
        multiplier=DEFAULT_CONTROL_FACTOR if request.control_factor is None else request.control_factor,
        kappa=contextual_threshold(request.contextual_control_threshold), similar="same",
        mode=control_mode(request.control_log_additive))


def prompt_granularity(request: schemas.ExplanationRequest) -> tuple[str | None, str | None]:
    """The API's prompt granularity (None when absent) and the delimiter of a ``custom`` one."""
    granularity = request.prompt_granularity
    if granularity is None:
        return None, None
    if granularity.type == "custom" and not granularity.delimiter:
        raise AtmanError("prompt_granularity 'custom' needs a non-empty delimiter")
    return granularity.type, granularity.delimiter if granularity.type == "custom" else None


def evaluation_response(name: str, log_probs: torch.Tensor, greedy: torch.Tensor, completion: str,
                        prompt_tokens: int) -> schemas.EvaluationResponse:
    """An /evaluate answer from the log-probability of each completion token and whether it was greedy."""
    total = float(log_probs.sum())
    count = int(log_probs.numel())
    return schemas.EvaluationResponse(
        model_version=name,
        result=schemas.EvaluationResult(
            log_probability=total, log_perplexity=-total, log_perplexity_per_token=-total / count,
            log_perplexity_per_character=-total / len(completion), correct_greedy=bool(greedy.all()),
            token_count=count, character_count=len(completion), completion=completion,
        ),
        num_tokens_prompt_total=prompt_tokens,
    )


class Service:
    """The part of a served model that does not depend on its kind: name, limits, tokenizer endpoints,
    the checks of a request's size. Subclasses set ``tokenizer``, ``vocab``, ``context_length`` and
    ``capabilities`` and answer explain, complete and evaluate (and cite when they can)."""

    capabilities = Capabilities()
    description = "AtMan explanations and steering"

    def __init__(self, name: str, limits: Limits, aliases: tuple[str, ...], tokenizer, vocab: int,
                 context_length: int | None) -> None:
        self.name = name
        self.limits = limits
        self.aliases = tuple(aliases)
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.context_length = context_length

    def info(self) -> schemas.ModelInfo:
        return schemas.ModelInfo(
            name=self.name, description=f"{self.name}, served by atman ({self.description})",
            max_context_size=self.context_length, hostings=["aleph-alpha"],
            image_support=self.capabilities.images, explanation_support=True, steering_support=True,
            aliases=list(self.aliases),
        )

    # --- checks ----------------------------------------------------------------------------
    def check_tokens(self, tokens: int, what: str, extra: int = 0) -> None:
        """Refuse a sequence of ``tokens`` (plus ``extra`` to generate): beyond the server's prompt limit
        413, beyond the model's context 400, whatever the server's limits say."""
        if tokens > self.limits.max_prompt_tokens:
            raise LimitError(f"{what}: {tokens} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens}", 413)
        if self.context_length is not None and tokens + extra > self.context_length:
            more = f" plus {extra} to generate" if extra else ""
            raise ContextLengthError(f"{what}: {tokens} tokens{more}, more than {self.name}'s context of "
                                     f"{self.context_length} tokens")

    def check_units(self, count: int, what: str = "this explanation has", coarser: str = "prompt_granularity") -> None:
        """Refuse (422) more units than the server computes."""
        if count > self.limits.max_units:
            raise LimitError(f"{what} {count} units; this server computes at most {self.limits.max_units} "
                             f"(choose a coarser {coarser})", 422)

    def check_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise AtmanError(f"token id(s) {bad[:5]} are outside the vocabulary of {self.vocab} tokens")

    # --- tokenizer endpoints ---------------------------------------------------------------
    def tokenize(self, request: schemas.TokenizationRequest) -> schemas.TokenizationResponse:
        ids = [int(t) for t in self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]]
        if len(ids) > self.limits.max_prompt_tokens:
            raise LimitError(f"the text has {len(ids)} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens}", 413)
        return schemas.TokenizationResponse(
            tokens=self.tokenizer.convert_ids_to_tokens(ids) if request.tokens else None,
            token_ids=ids if request.token_ids else None,
        )

    def detokenize(self, request: schemas.DetokenizationRequest) -> schemas.DetokenizationResponse:
        self.check_ids(request.token_ids)
        if len(request.token_ids) > self.limits.max_prompt_tokens:
            raise LimitError(f"{len(request.token_ids)} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens}", 413)
        return schemas.DetokenizationResponse(result=self.tokenizer.decode(request.token_ids))

    def tokenizer_json(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise AtmanError(f"{self.name} has no fast tokenizer to hand out")
        return backend.to_str()

    # --- endpoints of each kind ------------------------------------------------------------
    def explain(self, request: schemas.ExplanationRequest, check: Check) -> schemas.ExplanationResponse:
        raise NotImplementedError

    def complete(self, request: schemas.CompletionRequest, check: Check) -> schemas.CompletionResponse:
        raise NotImplementedError

    def evaluate(self, request: schemas.EvaluationRequest, check: Check) -> schemas.EvaluationResponse:
        raise NotImplementedError

    def cite(self, request: schemas.CitationRequest, check: Check) -> schemas.CitationResponse:
        raise AtmanError(f"{self.name} does not answer /cite")
