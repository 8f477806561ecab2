"""A served causal language model: Aleph Alpha's API (explain, complete, evaluate, cite) over the library.

Each endpoint reads the request's prompt items into one token sequence (:class:`PromptInput`), calls
the library (:class:`atman.Explainer`, :class:`atman.Steerer`, :class:`atman.Citer`) and writes the
result in the API's JSON; limits, deadlines, the tokenizer endpoints and the request settings every
served model shares are :mod:`atman.server.base`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..citer import Citer
from ..errors import AtmanError, EmptyInputError, NoUnitsError
from ..explainer import Explainer
from ..explanation import TargetExplanation
from ..models import LoadedModel
from ..render.citations import source_names
from ..rows import TextControl, TokenControl
from ..steering import Steerer
from ..units import EncodedInput, Unit, choose_granularity, encode, prompt_units, tokenize
from . import schemas
from .base import (
    GRANULARITY_NAMES,
    Capabilities,
    Check,
    LimitError,
    Limits,
    Service,
    completion_length,
    contextual_threshold,
    control_mode,
    evaluation_response,
    explanation_suppression,
    piece_tokens,
    prompt_granularity,
)


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


class TextService(Service):
    """One served causal language model: explanations, citations, steered completions, evaluation and
    tokenization in the API's JSON."""

    capabilities = Capabilities(cite=True)

    def __init__(self, lm: LoadedModel, limits: Limits, aliases: tuple[str, ...] = ()) -> None:
        super().__init__(lm.name, limits, aliases, lm.tokenizer,
                         int(lm.model.get_input_embeddings().num_embeddings), lm.context_length)
        self.lm = lm
        self.explainer = Explainer(lm, piece_tokens=piece_tokens(lm.model, limits))
        self.steerer = Steerer(lm)
        probe = lm.tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = lm.tokenizer("a", add_special_tokens=False)["input_ids"]
        self.prefix = list(probe[: len(probe) - len(plain)]) if probe[len(probe) - len(plain):] == plain else []

    # --- prompts ---------------------------------------------------------------------------
    def prompt(self, prompt: str | list) -> PromptInput:
        """Token ids and character spans of a prompt given as text or as a list of items."""
        items = [schemas.TextPromptItem(type="text", data=prompt)] if isinstance(prompt, str) else prompt
        if not items:
            raise EmptyInputError("the prompt has no items")
        tokenizer = self.lm.tokenizer
        out = PromptInput(input_ids=[], text="", spans=[])
        if len(items) == 1 and isinstance(items[0], schemas.TextPromptItem):
            if not items[0].data:
                raise EmptyInputError("the prompt is empty")
            ids, spans = self.steerer.encode(items[0].data)
            out = PromptInput(list(ids), items[0].data, list(spans),
                              [("text", 0, len(items[0].data), 0, len(ids))])
        else:
            out.input_ids.extend(self.prefix)
            out.spans.extend([None] * len(self.prefix))
            for item in items:
                if isinstance(item, schemas.ImagePromptItem):
                    raise AtmanError(f"image prompt items are not supported: {self.name} takes text and tokens")
                first_char, first_token = len(out.text), len(out.input_ids)
                if isinstance(item, schemas.TextPromptItem):
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
                    self.check_ids(item.data)
                    out.input_ids.extend(int(t) for t in item.data)
                    out.spans.extend([None] * len(item.data))
                    out.text += tokenizer.decode(item.data, skip_special_tokens=False)
                    kind = "token_ids"
                out.items.append((kind, first_char, len(out.text), first_token, len(out.input_ids)))
        if not out.input_ids:
            raise EmptyInputError("the prompt has no tokens")
        self.check_tokens(len(out.input_ids), "the prompt")
        return out

    def controls(self, prompt: str | list, encoded: PromptInput) -> list[TextControl | TokenControl]:
        """The items' attention controls, moved to positions in the whole prompt."""
        if isinstance(prompt, str):
            return []
        out: list[TextControl | TokenControl] = []
        for item, (_, first_char, end_char, first_token, end_token) in zip(prompt, encoded.items, strict=True):
            for control in item.controls:
                if isinstance(control, schemas.TextControlJson):
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

    def multipliers(self, prompt: str | list, encoded: PromptInput, threshold: float | None) -> torch.Tensor:
        """The steering row of /complete and /evaluate: the items' controls, spread to similar tokens with
        ``contextual_control_threshold``."""
        controls = self.controls(prompt, encoded)
        return self.steerer.multipliers(encoded.input_ids, encoded.spans, controls, text_length=len(encoded.text),
                                        contextual_threshold=contextual_threshold(threshold))

    # --- endpoints -------------------------------------------------------------------------
    def explain(self, request: schemas.ExplanationRequest, check: Check) -> schemas.ExplanationResponse:
        """AtMan explanation of ``request.target`` in the API's JSON (one entry per prompt item):
        :meth:`atman.Explainer.explain_units` over the units of each prompt item."""
        prompt = self.prompt(request.prompt)
        if not request.target:
            raise EmptyInputError("the target is empty")
        suppression = explanation_suppression(request)
        target_granularity = request.target_granularity or "complete"
        granularity, delimiter = prompt_granularity(request)
        self.refuse_controls(request.prompt, prompt)
        encoded = self._encoded(prompt, request.target)
        self.check_tokens(len(encoded.input_ids), "prompt and target")
        units, owners = self._units(prompt, encoded, GRANULARITY_NAMES[granularity] if granularity else "auto",
                                    delimiter)
        self.check_units(len(units) + (len(encoded.target_spans) if target_granularity == "token" else 0))
        check()
        explanation = self.explainer.explain_units(encoded, units, target_granularity, suppression=suppression,
                                                   progress=check)
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

    def complete(self, request: schemas.CompletionRequest, check: Check) -> schemas.CompletionResponse:
        """Steered completion(s): the prompt items' controls apply to every generated token."""
        maximum = completion_length(request, self.limits)
        if request.logit_bias:
            self.check_ids(list(request.logit_bias))
        prompt = self.prompt(request.prompt)
        multipliers = self.multipliers(request.prompt, prompt, request.contextual_control_threshold)
        mode = control_mode(request.control_log_additive)
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

    def cite(self, request: schemas.CitationRequest, check: Check) -> schemas.CitationResponse:
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
        self.check_tokens(len(prepared.encoded.input_ids), "context, question and response",
                          extra=request.maximum_tokens if request.response is None else 0)
        self.check_units(len(prepared.sources), "this citation has", "level")
        check()
        result = citer.cite(context, request.question, request.response, sources=request.sources,
                            spans=request.spans, max_new_tokens=request.maximum_tokens, refine=request.refine,
                            group_size=request.group_size, refine_share=request.refine_share, progress=check)
        data = {k: v for k, v in result.to_dict().items() if k != "model"}
        for source, name in zip(data["sources"], source_names(result), strict=True):
            source["name"] = name
        return schemas.CitationResponse(model_version=self.name, **data)

    def evaluate(self, request: schemas.EvaluationRequest, check: Check) -> schemas.EvaluationResponse:
        """Log-probability of ``completion_expected`` after the (controlled) prompt."""
        prompt = self.prompt(request.prompt)
        if not request.completion_expected:
            raise EmptyInputError("completion_expected is empty")
        continuation = [int(t) for t in self.lm.tokenizer(request.completion_expected,
                                                           add_special_tokens=False)["input_ids"]]
        if not continuation:
            raise EmptyInputError("completion_expected has no tokens")
        self.check_tokens(len(prompt.input_ids) + len(continuation), "prompt and completion")
        multipliers = self.multipliers(request.prompt, prompt, request.contextual_control_threshold)
        mode = control_mode(request.control_log_additive)
        check()
        scored = self.steerer.score_ids(prompt.input_ids, continuation, multipliers, mode=mode)
        return evaluation_response(self.name, scored.log_probs, scored.greedy, request.completion_expected,
                                   len(prompt.input_ids))

def _api_explanation(exp: TargetExplanation, prompt: PromptInput,
                     owners: list[int]) -> schemas.TargetExplanationJson:
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
    return schemas.TargetExplanationJson(target=exp.target.text, items=items)
