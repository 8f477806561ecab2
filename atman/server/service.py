"""From API requests to the core: prompts of several items, explanations, steered completions.

Everything here runs on the model's worker thread (see :mod:`atman.server.queue`); nothing here
knows about HTTP. User errors raise :class:`atman.AtmanError` (the app answers 400) or
:class:`LimitError` (413/422).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..citer import Citer
from ..engine import DEFAULT_MULTIPLIER, Suppression, piece_tokens_for
from ..errors import AtmanError, ContextLengthError, EmptyInputError, NoUnitsError
from ..explainer import Explainer, build_explanation
from ..explanation import TargetExplanation
from ..models import LoadedModel
from ..steering import Steerer, TextControl, TokenControl
from ..units import EncodedInput, Unit, choose_granularity, encode, prompt_units, target_units, tokenize
from . import schemas

# Aleph Alpha's explanation control factor is the attention multiplier of a suppressed unit, as ours
DEFAULT_CONTROL_FACTOR = DEFAULT_MULTIPLIER
GRANULARITY_NAMES = {"token": "token", "word": "word", "sentence": "sentence", "paragraph": "paragraph",
                     "custom": "delimiter"}


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


def piece_tokens(model: torch.nn.Module, limits: Limits) -> int | None:
    """The engine's ``piece_tokens`` for a served model: what it runs in ``limits.check_interval_s`` at
    its device's nominal speed (:func:`atman.engine.piece_tokens_for`; never timed, so every server and
    replica of a model cuts its work alike and gives the same results)."""
    if limits.check_interval_s is None:
        return None
    return piece_tokens_for(model, limits.check_interval_s)


class LimitError(AtmanError):
    """A request beyond a configured limit; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


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


class Timeout(Exception):
    """The request ran past its deadline."""


@dataclass
class PromptInput:
    """A prompt of several items as one token sequence.

    ``text`` concatenates the items' texts (a token item contributes its decoded text, so that the
    sequence has one character string); ``spans[i]`` is token ``i``'s span in ``text``, None for
    special tokens and for tokens given as ids. ``items[j]`` = (kind, first char, end char, first
    token, end token) of item ``j``.
    """

    input_ids: list[int]
    text: str
    spans: list[tuple[int, int] | None]
    items: list[tuple[str, int, int, int, int]] = field(default_factory=list)


class Deadline:
    """A point in time; calling it raises :class:`Timeout` once it has passed (checked between passes)."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.seconds = seconds

    def __call__(self, *_: object) -> None:
        if time.monotonic() > self.at:
            raise Timeout(f"the request took longer than the server's limit of {self.seconds:g} s")


class ModelService:
    """One served model: explanations, completions, evaluation and tokenization in the API's JSON."""

    def __init__(self, lm: LoadedModel, limits: Limits, aliases: tuple[str, ...] = ()) -> None:
        self.lm = lm
        self.limits = limits
        self.aliases = aliases
        self.explainer = Explainer(lm, piece_tokens=piece_tokens(lm.model, limits))
        self.steerer = Steerer(lm)
        self.vocab = int(lm.model.get_input_embeddings().num_embeddings)
        self.special = set(lm.tokenizer.all_special_ids)
        probe = lm.tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = lm.tokenizer("a", add_special_tokens=False)["input_ids"]
        self.prefix = list(probe[: len(probe) - len(plain)]) if probe[len(probe) - len(plain):] == plain else []

    @property
    def name(self) -> str:
        return self.lm.name

    def info(self) -> schemas.ModelInfo:
        return schemas.ModelInfo(
            name=self.name, description=f"{self.name}, served by atman (AtMan explanations and steering)",
            max_context_size=self.lm.context_length, hostings=["aleph-alpha"],
            image_support=False, explanation_support=True, steering_support=True, aliases=list(self.aliases),
        )

    # --- prompts ---------------------------------------------------------------------------
    def prompt(self, prompt: str | list) -> PromptInput:
        """Token ids and character spans of a prompt given as text or as a list of items."""
        items = [schemas.TextItem(type="text", data=prompt)] if isinstance(prompt, str) else prompt
        if not items:
            raise EmptyInputError("the prompt has no items")
        tokenizer = self.lm.tokenizer
        out = PromptInput(input_ids=[], text="", spans=[])
        if len(items) == 1 and isinstance(items[0], schemas.TextItem):
            if not items[0].data:
                raise EmptyInputError("the prompt is empty")
            ids, spans = self.steerer.encode(items[0].data)
            out = PromptInput(list(ids), items[0].data, list(spans),
                              [("text", 0, len(items[0].data), 0, len(ids))])
        else:
            out.input_ids.extend(self.prefix)
            out.spans.extend([None] * len(self.prefix))
            for item in items:
                if isinstance(item, schemas.ImageItem):
                    raise AtmanError("image prompt items are not supported: the served models take text and tokens")
                first_char, first_token = len(out.text), len(out.input_ids)
                if isinstance(item, schemas.TextItem):
                    if not item.data:
                        raise EmptyInputError("a text prompt item is empty")
                    ids, spans = tokenize(tokenizer, item.data, add_special_tokens=False, offset=first_char)
                    out.input_ids.extend(ids)
                    out.spans.extend(spans)
                    out.text += item.data
                    kind = "text"
                else:
                    if not item.data:
                        raise EmptyInputError("a token prompt item is empty")
                    self._check_ids(item.data)
                    out.input_ids.extend(int(t) for t in item.data)
                    out.spans.extend([None] * len(item.data))
                    out.text += tokenizer.decode(item.data, skip_special_tokens=False)
                    kind = "token_ids"
                out.items.append((kind, first_char, len(out.text), first_token, len(out.input_ids)))
        if not out.input_ids:
            raise EmptyInputError("the prompt has no tokens")
        if len(out.input_ids) > self.limits.max_prompt_tokens:
            raise LimitError(f"the prompt has {len(out.input_ids)} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens}", 413)
        return out

    def _check_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise AtmanError(f"token id(s) {bad[:5]} are outside the vocabulary of {self.vocab} tokens")

    def controls(self, prompt: str | list, encoded: PromptInput) -> list[TextControl | TokenControl]:
        """The items' attention controls, moved to positions in the whole prompt."""
        if isinstance(prompt, str):
            return []
        out: list[TextControl | TokenControl] = []
        for item, (_, first_char, end_char, first_token, end_token) in zip(prompt, encoded.items, strict=True):
            for control in item.controls:
                if isinstance(control, schemas.TextControl):
                    if control.start + control.length > end_char - first_char:
                        raise AtmanError(f"text control {control.start}..{control.start + control.length} reaches "
                                         f"past the end of its {end_char - first_char}-character item")
                    out.append(TextControl(first_char + control.start, control.length, control.factor,
                                           control.token_overlap or "partial"))
                else:
                    if control.index >= end_token - first_token:
                        raise AtmanError(f"token control index {control.index} is outside its item of "
                                         f"{end_token - first_token} tokens")
                    out.append(TokenControl(first_token + control.index, control.factor))
        return out

    def refuse_controls(self, prompt: str | list, encoded: PromptInput) -> None:
        """/explain: controls are validated like /complete's, then refused (400) rather than ignored."""
        if self.controls(prompt, encoded):
            raise AtmanError("controls on prompt items are not supported on /explain (they would change the "
                             "explained prompt); send them to /complete or /evaluate, or leave them out")

    def check_context(self, tokens: int, what: str) -> None:
        """Refuse (400) a sequence longer than the model's context, whatever the server's limits say."""
        context = self.lm.context_length
        if context is not None and tokens > context:
            raise ContextLengthError(f"{what} have {tokens} tokens; {self.name} has a context of {context}")

    def multipliers(self, prompt: str | list, encoded: PromptInput, threshold: float | None) -> torch.Tensor:
        controls = self.controls(prompt, encoded)
        return self.steerer.multipliers(encoded.input_ids, encoded.spans, controls, text_length=len(encoded.text),
                                        contextual_threshold=threshold)

    # --- endpoints -------------------------------------------------------------------------
    def explain(self, request: schemas.ExplanationRequest, check: Callable[..., None]) -> schemas.ExplanationResponse:
        """AtMan explanation of ``request.target`` in the API's JSON (one entry per prompt item)."""
        prompt = self.prompt(request.prompt)
        if not request.target:
            raise EmptyInputError("the target is empty")
        suppression = Suppression(
            multiplier=DEFAULT_CONTROL_FACTOR if request.control_factor is None else request.control_factor,
            kappa=self._threshold(request.contextual_control_threshold),
            mode="multiplicative" if request.control_log_additive is False else "log-additive")
        target_granularity = request.target_granularity or "complete"
        granularity = request.prompt_granularity
        delimiter = None
        if granularity is not None and granularity.type == "custom":
            if not granularity.delimiter:
                raise AtmanError("prompt_granularity 'custom' needs a non-empty delimiter")
            delimiter = granularity.delimiter
        self.refuse_controls(request.prompt, prompt)
        encoded = self._encoded(prompt, request.target)
        self.check_context(len(encoded.input_ids), "prompt and target")
        if len(encoded.input_ids) > self.limits.max_prompt_tokens:
            raise LimitError(f"prompt and target have {len(encoded.input_ids)} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens}", 413)
        wanted = GRANULARITY_NAMES[granularity.type] if granularity is not None else "auto"
        units, owners = self._units(prompt, encoded, wanted, delimiter)
        if target_granularity == "token":
            units = units + target_units(encoded)
        if len(units) > self.limits.max_units:
            raise LimitError(f"this explanation has {len(units)} units; this server computes at most "
                             f"{self.limits.max_units} (choose a coarser prompt_granularity)", 422)
        check()
        multipliers = self.explainer.multipliers(encoded, units, suppression.multiplier, suppression.kappa)
        losses = self.explainer.losses(encoded, multipliers, mode=suppression.mode, progress=check)
        explanation = build_explanation(encoded, units, losses[1:] - losses[0:1], set(), target_granularity,
                                        model=self.name, settings=suppression.settings())
        explanation = explanation.postprocessed(request.postprocessing or "none", bool(request.normalize))
        return schemas.ExplanationResponse(
            model_version=self.name,
            explanations=[_api_explanation(exp, prompt, owners) for exp in explanation.explanations],
        )

    def _encoded(self, prompt: PromptInput, target: str) -> EncodedInput:
        if len(prompt.items) == 1 and prompt.items[0][0] == "text":
            # exactly what the Python API's Explainer.explain encodes
            return encode(self.lm.tokenizer, prompt.text, target)
        enc = self.lm.tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
        if not enc["input_ids"]:
            raise EmptyInputError("the target is empty (it has no tokens)")
        spans = list(prompt.spans)
        for kind, first_char, end_char, first_token, end_token in prompt.items:
            if kind == "token_ids":
                # explainable, though not text: they take part in contextual suppression
                spans[first_token:end_token] = [(first_char, end_char)] * (end_token - first_token)
        return EncodedInput(
            input_ids=tuple(prompt.input_ids) + tuple(int(t) for t in enc["input_ids"]),
            prompt=prompt.text, target=target, prompt_spans=tuple(spans),
            target_start=len(prompt.input_ids), target_spans=tuple((int(a), int(b)) for a, b in enc["offset_mapping"]),
        )

    def _units(self, prompt: PromptInput, encoded: EncodedInput, granularity: str,
               delimiter: str | None) -> tuple[list[Unit], list[int]]:
        """Units of each item separately (a unit never spans two items; token items give one unit per
        token), and the index of the item that holds each unit."""
        if len(prompt.items) == 1 and prompt.items[0][0] == "text":
            units = prompt_units(encoded, granularity, delimiter=delimiter)
            return units, [0] * len(units)
        if granularity == "auto":
            granularity = choose_granularity(encoded)
        units: list[Unit] = []
        owners: list[int] = []
        for index, (kind, first_char, end_char, first_token, end_token) in enumerate(prompt.items):
            if kind == "token_ids":
                for pos in range(first_token, end_token):
                    units.append(Unit("prompt", (pos,), first_char, 0, ""))
                    owners.append(index)
                continue
            # this item alone: its own text, its tokens' spans relative to it, other positions unexplained
            spans = tuple(
                (span[0] - first_char, span[1] - first_char) if span is not None and first_token <= pos < end_token
                else None
                for pos, span in enumerate(encoded.prompt_spans)
            )
            view = replace(encoded, prompt=encoded.prompt[first_char:end_char], prompt_spans=spans)
            try:
                item_units = prompt_units(view, granularity, delimiter=delimiter)
            except NoUnitsError:
                continue
            units.extend(replace(u, start=u.start + first_char) for u in item_units)
            owners.extend([index] * len(item_units))
        if not units:
            raise NoUnitsError(f"granularity {granularity!r} yields no unit in this prompt")
        return units, owners

    def complete(self, request: schemas.CompletionRequest, check: Callable[..., None]) -> schemas.CompletionResponse:
        """Steered completion(s): the prompt items' controls apply to every generated token."""
        maximum = completion_length(request, self.limits)
        if request.logit_bias:
            self._check_ids(list(request.logit_bias))
        prompt = self.prompt(request.prompt)
        multipliers = self.multipliers(request.prompt, prompt, self._threshold(request.contextual_control_threshold))
        mode = "multiplicative" if request.control_log_additive is False else "log-additive"
        results, generated = [], 0
        for _ in range(request.n):
            completion = self.steerer.generate_ids(
                prompt.input_ids, multipliers, max_new_tokens=maximum, temperature=request.temperature,
                top_k=request.top_k, top_p=request.top_p, stop=request.stop_sequences or (),
                top_log_probs=request.log_probs, logit_bias=request.logit_bias,
                minimum_tokens=request.minimum_tokens, mode=mode, on_token=check,
            )
            generated += len(completion.token_ids)
            results.append(schemas.CompletionResult(
                completion=completion.text,
                finish_reason=completion.finish_reason,
                completion_tokens=list(completion.tokens) if request.tokens else None,
                log_probs=[dict(d) for d in completion.top_log_probs] if completion.top_log_probs is not None
                else None,
                raw_completion=completion.text if request.raw_completion else None,
            ))
        return schemas.CompletionResponse(
            model_version=self.name, completions=results,
            num_tokens_prompt_total=len(prompt.input_ids) * request.n, num_tokens_generated=generated,
        )

    def cite(self, request: schemas.CitationRequest, check: Callable[..., None]) -> schemas.CitationResponse:
        """The sources in ``request.context`` of each sentence of the response (:class:`atman.Citer`)."""
        context = request.context if isinstance(request.context, str) else [
            passage.model_dump(exclude_none=True) for passage in request.context]
        citer = Citer(self.lm, method=request.method, multiplier=request.multiplier,
                      piece_tokens=self.explainer.engine.piece_tokens)
        if request.response is None and request.maximum_tokens > self.limits.max_tokens:
            raise LimitError(f"maximum_tokens {request.maximum_tokens} is above this server's limit of "
                             f"{self.limits.max_tokens}", 422)
        prepared = citer.prepare(context, request.question, request.response if request.response is not None
                                 else "x", sources=request.sources,
                                 spans=request.spans if request.response is not None else None)
        self.check_context(len(prepared.encoded.input_ids) + (request.maximum_tokens if request.response is None
                                                              else 0), "context, question and response")
        if len(prepared.encoded.input_ids) > self.limits.max_prompt_tokens:
            raise LimitError(f"the prompt has {len(prepared.encoded.input_ids)} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens}", 413)
        if len(prepared.sources) > self.limits.max_units:
            raise LimitError(f"this citation has {len(prepared.sources)} sources; this server computes at most "
                             f"{self.limits.max_units} (choose a coarser level)", 422)
        check()
        result = citer.cite(context, request.question, request.response, sources=request.sources,
                            spans=request.spans, max_new_tokens=request.maximum_tokens, refine=request.refine,
                            group_size=request.group_size, refine_share=request.refine_share, progress=check)
        return schemas.CitationResponse(model_version=self.name, **{k: v for k, v in result.to_dict().items()
                                                                     if k != "model"})

    def evaluate(self, request: schemas.EvaluationRequest, check: Callable[..., None]) -> schemas.EvaluationResponse:
        """Log-probability of ``completion_expected`` after the (controlled) prompt."""
        prompt = self.prompt(request.prompt)
        if not request.completion_expected:
            raise EmptyInputError("completion_expected is empty")
        continuation = [int(t) for t in self.lm.tokenizer(request.completion_expected,
                                                           add_special_tokens=False)["input_ids"]]
        if not continuation:
            raise EmptyInputError("completion_expected has no tokens")
        self.check_context(len(prompt.input_ids) + len(continuation), "prompt and completion")
        if len(prompt.input_ids) + len(continuation) > self.limits.max_prompt_tokens:
            raise LimitError(f"prompt and completion have {len(prompt.input_ids) + len(continuation)} tokens; "
                             f"this server accepts at most {self.limits.max_prompt_tokens}", 413)
        multipliers = self.multipliers(request.prompt, prompt, self._threshold(request.contextual_control_threshold))
        mode = "multiplicative" if request.control_log_additive is False else "log-additive"
        check()
        scored = self.steerer.score_ids(prompt.input_ids, continuation, multipliers, mode=mode)
        total = float(scored.log_probs.sum())
        return schemas.EvaluationResponse(
            model_version=self.name,
            result=schemas.EvaluationResult(
                log_probability=total, log_perplexity=-total,
                log_perplexity_per_token=-total / len(continuation),
                log_perplexity_per_character=-total / len(request.completion_expected),
                correct_greedy=bool(scored.greedy.all()), token_count=len(continuation),
                character_count=len(request.completion_expected), completion=request.completion_expected,
            ),
            num_tokens_prompt_total=len(prompt.input_ids),
        )

    def tokenize(self, request: schemas.TokenizationRequest) -> schemas.TokenizationResponse:
        ids = [int(t) for t in self.lm.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]]
        if len(ids) > self.limits.max_prompt_tokens:
            raise LimitError(f"the text has {len(ids)} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens}", 413)
        return schemas.TokenizationResponse(
            tokens=self.lm.tokenizer.convert_ids_to_tokens(ids) if request.tokens else None,
            token_ids=ids if request.token_ids else None,
        )

    def detokenize(self, request: schemas.DetokenizationRequest) -> schemas.DetokenizationResponse:
        self._check_ids(request.token_ids)
        if len(request.token_ids) > self.limits.max_prompt_tokens:
            raise LimitError(f"{len(request.token_ids)} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens}", 413)
        return schemas.DetokenizationResponse(result=self.lm.tokenizer.decode(request.token_ids))

    def tokenizer_json(self) -> str:
        backend = getattr(self.lm.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise AtmanError(f"{self.name} has no fast tokenizer to hand out")
        return backend.to_str()

    @staticmethod
    def _threshold(value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise AtmanError(f"contextual_control_threshold must lie in (0, 1], got {value}")
        return value


def _api_explanation(exp: TargetExplanation, prompt: PromptInput, owners: list[int]) -> schemas.TargetExplanation:
    """One target span's scores, grouped by prompt item, with offsets relative to each item, then the target."""
    items: list[schemas.TextExplanationItem | schemas.TokenExplanationItem] = []
    prompt_items = [i for i in exp.items if i.kind == "prompt"]
    for index, (kind, first_char, _, _, _) in enumerate(prompt.items):
        mine = [item for item, owner in zip(prompt_items, owners, strict=True) if owner == index]
        if kind == "token_ids":
            items.append(schemas.TokenExplanationItem(type="token_ids", scores=[i.score for i in mine]))
        else:
            items.append(schemas.TextExplanationItem(type="text", scores=[
                schemas.TextScore(start=i.start - first_char, length=i.length, score=i.score) for i in mine]))
    items.append(schemas.TextExplanationItem(type="target", scores=[
        schemas.TextScore(start=i.start, length=i.length, score=i.score) for i in exp.items if i.kind == "target"]))
    return schemas.TargetExplanation(target=exp.target.text, items=items)
