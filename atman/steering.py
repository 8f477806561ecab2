"""Steering: AtMan's attention multipliers applied while the model generates.

A control names part of the prompt and a ``factor``: the attention *to* those prompt tokens is
multiplied by the factor in every layer, head and query, for the prompt pass and for every new
token. ``factor < 1`` suppresses the span, ``factor > 1`` amplifies it, ``1`` does nothing. This is
the same primitive as an explanation (:func:`atman.manipulate`), used forwards, with the semantics
of Aleph Alpha's API:

* ``mode="log-additive"`` (default) adds ``log(factor)`` to the attention scores: the softmax
  weights of the controlled keys are multiplied by ``factor`` and renormalised. ``factor = 0``
  removes the keys completely.
* ``mode="multiplicative"`` scales the shifted raw scores: ``(S - min S) * factor``.
* A :class:`TextControl` covers a character span of the prompt. With ``token_overlap="partial"``
  (default) a token only partly covered gets a factor moved towards 1 by the share of its
  characters that the span covers: ``1 + (factor - 1) * covered / token_length`` (a factor of 2
  over 2 of 4 characters gives 1.5). With ``"complete"`` any overlap applies the full factor.
* A :class:`TokenControl` names one prompt token position directly.
* Several controls on one token multiply.
* ``contextual_threshold`` (Aleph Alpha's ``contextual_control_threshold``): an uncontrolled prompt
  token whose input embedding has cosine similarity >= threshold with a controlled token gets the
  factor of the most similar such token.

Generation uses the KV cache: the multipliers cover the prompt's positions only, so the keys of
generated tokens are never touched, and the controls stay in force for every new token.

Example::

    >>> steerer = Steerer(load_model())
    >>> prompt = "Ada lives in Oslo. Bo lives in Rome. Ada lives in"
    >>> steerer.generate(prompt, max_new_tokens=2).text
    ' Rome.'
    >>> steerer.generate(prompt, [TextControl(19, 17, 0.0)], max_new_tokens=2).text   # hide Bo's sentence
    ' Oslo.'
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .engine import Engine, forward_options
from .errors import AtmanError, ContextLengthError, EmptyInputError
from .manipulation import manipulate
from .models import LoadedModel
from .rows import (  # noqa: F401  (the controls are part of steering's API)
    OVERLAPS,
    Control,
    ImageControl,
    Suppression,
    TextControl,
    TokenControl,
    control_multipliers,
    spread_to_similar,
)
from .units import tokenize

FINISH_REASONS = ("maximum_tokens", "end_of_text", "stop_sequence_reached")


@dataclass(frozen=True)
class Scored:
    """A given continuation's token log-probabilities, and whether each token was the greedy choice."""

    log_probs: torch.Tensor
    greedy: torch.Tensor


@dataclass(frozen=True)
class Completion:
    """A generated continuation: its text, tokens, and the log-probability of each chosen token.

    ``top_log_probs[i]`` maps token strings to log-probabilities (the most likely ones and the chosen
    one) when they were asked for. ``finish_reason`` is one of :data:`FINISH_REASONS`.
    """

    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    log_probs: tuple[float, ...]
    finish_reason: str
    top_log_probs: tuple[dict[str, float], ...] | None = None


@dataclass(frozen=True)
class Step:
    """One token of a streamed generation: its id, token string and log-probability, the completion's
    ``text`` so far (a stop string cut off), the top log-probabilities when asked for, and the
    ``finish_reason`` on the last step of a completion that ends on a stop string or on its length
    (one that ends on end-of-text has no step for that token: the stream just ends)."""

    token_id: int
    token: str
    log_prob: float
    text: str
    top_log_probs: dict[str, float] | None = None
    finish_reason: str | None = None


class Stream:
    """The steps of a generation as they are made (iterate once); ``completion`` once it is exhausted."""

    def __init__(self, steps: Iterator[Step]) -> None:
        self._steps = steps
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[Step]:
        self.completion = yield from self._steps


class Steerer:
    """Generate, or score a given continuation, with controls on the prompt's attention.

    Example::

        >>> steerer = Steerer(load_model())
        >>> steerer.generate("The capital of France is", max_new_tokens=2).text
        ' Paris.'
    """

    def __init__(self, model: LoadedModel, *, mode: str = "log-additive", backend: str = "sdpa") -> None:
        Suppression(mode=mode, backend=backend)
        self.lm = model
        self.mode = mode
        self.backend = backend
        self._logits_to_keep, self._cache_argument = forward_options(model.model)
        self.engine = Engine(model.model, suppression=Suppression(mode=mode, backend=backend))
        self.eos_ids = model.eos_ids

    # --- text in, text out -------------------------------------------------------------------
    def encode(self, prompt: str) -> tuple[list[int], list[tuple[int, int] | None]]:
        """Prompt token ids and each token's character span (None for special tokens)."""
        if not prompt:
            raise EmptyInputError("the prompt is empty")
        return tokenize(self.lm.tokenizer, prompt)

    def multipliers(
        self,
        input_ids: Sequence[int],
        token_spans: Sequence[tuple[int, int] | None],
        controls: Sequence[Control],
        *,
        text_length: int | None = None,
        contextual_threshold: float | None = None,
    ) -> torch.Tensor:
        """The prompt's multipliers for ``controls``, spread to similar tokens if a threshold is set."""
        multipliers = control_multipliers(token_spans, controls, text_length=text_length)
        if contextual_threshold is not None:
            special = set(self.lm.tokenizer.all_special_ids)
            candidates = [p for p, t in enumerate(input_ids) if t not in special]
            ids = torch.tensor([list(input_ids)], device=self.lm.device)
            with torch.no_grad():
                embeddings = self.lm.model.get_input_embeddings()(ids)[0].float().cpu()
            multipliers = spread_to_similar(multipliers, embeddings, candidates, contextual_threshold)
        return multipliers

    def generate(
        self,
        prompt: str,
        controls: Sequence[Control] = (),
        *,
        max_new_tokens: int = 32,
        contextual_threshold: float | None = None,
        mode: str | None = None,
        **sampling,
    ) -> Completion:
        """Continue ``prompt`` with ``controls`` in force (greedy unless ``temperature`` > 0).

        ``sampling``: the keyword arguments of :meth:`generate_ids` (temperature, top_k, top_p,
        stop, seed, top_log_probs, logit_bias, minimum_tokens).
        """
        ids, spans = self.encode(prompt)
        multipliers = self.multipliers(ids, spans, controls, text_length=len(prompt),
                                       contextual_threshold=contextual_threshold)
        return self.generate_ids(ids, multipliers, max_new_tokens=max_new_tokens, mode=mode, **sampling)

    def score(
        self,
        prompt: str,
        continuation: str,
        controls: Sequence[Control] = (),
        *,
        contextual_threshold: float | None = None,
        mode: str | None = None,
    ) -> Scored:
        """Log-probability of each token of ``continuation`` after ``prompt`` under ``controls``."""
        ids, spans = self.encode(prompt)
        multipliers = self.multipliers(ids, spans, controls, text_length=len(prompt),
                                       contextual_threshold=contextual_threshold)
        if not continuation:
            raise EmptyInputError("the continuation is empty")
        cont = list(self.lm.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        return self.score_ids(ids, cont, multipliers, mode=mode)

    # --- token ids in, tokens out ------------------------------------------------------------
    def _check(self, input_ids: Sequence[int], multipliers: torch.Tensor, extra: int, mode: str | None) -> str:
        if not input_ids:
            raise EmptyInputError("the prompt has no tokens")
        if multipliers.shape != (len(input_ids),):
            raise AtmanError(f"need one multiplier per prompt token ({len(input_ids)}), got {tuple(multipliers.shape)}")
        vocab = self.lm.model.get_input_embeddings().num_embeddings
        bad = [t for t in input_ids if not 0 <= int(t) < vocab]
        if bad:
            raise AtmanError(f"token id(s) {bad[:5]} are outside the vocabulary of {vocab} tokens")
        limit = self.lm.context_length
        if limit is not None and len(input_ids) + extra > limit:
            raise ContextLengthError(
                f"{len(input_ids)} prompt tokens plus {extra} more exceed the model's context of {limit} tokens"
            )
        mode = mode or self.mode
        Suppression(mode=mode)
        return mode

    def _forward(self, ids: torch.Tensor, cache: DynamicCache, keep_last: bool) -> torch.Tensor:
        extra = {self._cache_argument: cache, "use_cache": True}
        if keep_last and self._logits_to_keep:
            extra["logits_to_keep"] = 1
        return self.lm.model(input_ids=ids, **extra).logits[0]

    def score_ids(
        self, input_ids: Sequence[int], continuation: Sequence[int], multipliers: torch.Tensor,
        *, mode: str | None = None,
    ) -> Scored:
        """Log-probability of each ``continuation`` token under teacher forcing (one forward pass)."""
        if not continuation:
            raise EmptyInputError("the continuation has no tokens")
        mode = self._check(list(input_ids) + list(continuation), torch.cat(
            [multipliers, torch.ones(len(continuation))]), 0, mode)
        ids = torch.tensor([list(input_ids) + list(continuation)])
        row = torch.cat([multipliers.float().cpu(), torch.ones(len(continuation))])
        scored = self.engine.logprobs({"input_ids": ids}, ids[0, len(input_ids):], row, mode=mode)
        if not bool(torch.isfinite(scored.chosen).all()):
            raise AtmanError("the controls drove the model's output to non-finite values; use a smaller factor")
        return Scored(log_probs=scored.chosen, greedy=scored.greedy)

    def generate_ids(
        self,
        input_ids: Sequence[int],
        multipliers: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        top_log_probs: int | None = None,
        logit_bias: dict[int, float] | None = None,
        minimum_tokens: int = 0,
        mode: str | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Completion:
        """Generate up to ``max_new_tokens`` after ``input_ids`` with ``multipliers`` on the prompt.

        ``temperature`` 0 is greedy; otherwise logits are divided by it, then ``top_k`` (0 = off)
        and ``top_p`` (0 = off) restrict the choice, as in Aleph Alpha's API. ``stop`` strings end
        the completion (the stop string itself is cut off). ``on_token(step)`` is called before
        each new token; raising from it aborts the generation (used for time limits).
        """
        stream = self.stream_ids(input_ids, multipliers, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, stop=stop, seed=seed, top_log_probs=top_log_probs,
                                 logit_bias=logit_bias, minimum_tokens=minimum_tokens, mode=mode, on_token=on_token)
        for _ in stream:
            pass
        return stream.completion

    def stream_ids(
        self,
        input_ids: Sequence[int],
        multipliers: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        top_log_probs: int | None = None,
        logit_bias: dict[int, float] | None = None,
        minimum_tokens: int = 0,
        mode: str | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Stream:
        """:meth:`generate_ids` one token at a time: iterating the returned :class:`Stream` yields a
        :class:`Step` per kept token as soon as it is chosen (its ``text`` is the completion so far);
        once exhausted, ``stream.completion`` is what :meth:`generate_ids` returns. Between steps
        no manipulation is in force, so the caller may run other model work (an explanation of the
        text so far) before asking for the next token.

        Example::

            >>> [step.text for step in Steerer(load_model()).stream_ids(ids, max_new_tokens=2)]  # doctest: +SKIP
            [' Paris', ' Paris.']
        """
        multipliers = torch.ones(len(input_ids)) if multipliers is None else multipliers.float()
        mode = self._check(input_ids, multipliers, max_new_tokens, mode)
        if max_new_tokens < 1:
            raise AtmanError("max_new_tokens must be at least 1")
        if temperature < 0 or top_k < 0 or not 0.0 <= top_p <= 1.0:
            raise AtmanError("temperature and top_k must be >= 0 and top_p must lie in [0, 1]")
        if minimum_tokens < 0:
            raise AtmanError("minimum_tokens must be >= 0")
        bias = None
        if logit_bias:
            vocab = self.lm.model.get_input_embeddings().num_embeddings
            bias = torch.zeros(vocab)
            for token, value in logit_bias.items():
                if not 0 <= int(token) < vocab or not math.isfinite(value):
                    raise AtmanError(f"logit_bias entry {token}: {value} is not a vocabulary id with a finite bias")
                bias[int(token)] = float(value)
        return Stream(self._steps(list(input_ids), multipliers, mode, max_new_tokens, temperature, top_k, top_p,
                                  stop, seed, top_log_probs, bias, minimum_tokens, on_token))

    def _steps(self, input_ids: list[int], multipliers: torch.Tensor, mode: str, max_new_tokens: int,
               temperature: float, top_k: int, top_p: float, stop: Sequence[str], seed: int | None,
               top_log_probs: int | None, bias: torch.Tensor | None, minimum_tokens: int,
               on_token: Callable[[int], None] | None) -> Generator[Step, None, Completion]:
        generator = None
        if temperature > 0:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        tokenizer = self.lm.tokenizer
        new: list[int] = []
        chosen_logprobs: list[float] = []
        tops: list[dict[str, float]] = []
        finish = "maximum_tokens"
        text = ""
        cache = DynamicCache()
        device = self.lm.device
        row = multipliers[None].to(device)

        def forward(ids: list[int]) -> torch.Tensor:
            # the manipulation is in force for the forward pass only, never across a yield
            with torch.no_grad(), manipulate(row, mode=mode, backend=self.backend):
                return self._forward(torch.tensor([ids], device=device), cache, True)[-1]

        logits = forward(input_ids)
        for step in range(max_new_tokens):
            if on_token is not None:
                on_token(step)
            scores = logits.float().cpu()
            if not bool(torch.isfinite(scores).any()) or bool(torch.isnan(scores).any()):
                raise AtmanError("the controls drove the model's output to non-finite values; use a smaller factor")
            if bias is not None:
                scores = scores + bias
            if step < minimum_tokens:
                scores[list(self.eos_ids)] = -math.inf
            logprobs = torch.log_softmax(scores, dim=-1)
            token = _choose(scores, temperature, top_k, top_p, generator)
            new.append(token)
            chosen_logprobs.append(float(logprobs[token]))
            if top_log_probs is not None:
                tops.append(_top(tokenizer, logprobs, token, top_log_probs))
            if token in self.eos_ids:
                finish = "end_of_text"
                new.pop()
                chosen_logprobs.pop()
                if tops:
                    tops.pop()
                break
            text = tokenizer.decode(new, skip_special_tokens=True)
            cut = _first_stop(text, stop)
            if cut is not None:
                text = text[:cut]
                finish = "stop_sequence_reached"
            last = step + 1 == max_new_tokens
            yield Step(token_id=token, token=tokenizer.convert_ids_to_tokens(token), log_prob=chosen_logprobs[-1],
                       text=text, top_log_probs=tops[-1] if top_log_probs is not None else None,
                       finish_reason=finish if cut is not None or last else None)
            if cut is not None:
                break
            if not last:
                logits = forward([token])
        if finish != "stop_sequence_reached":
            text = tokenizer.decode(new, skip_special_tokens=True)
        return Completion(
            text=text,
            token_ids=tuple(new),
            tokens=tuple(tokenizer.convert_ids_to_tokens(new)),
            log_probs=tuple(chosen_logprobs),
            finish_reason=finish,
            top_log_probs=tuple(tops) if top_log_probs is not None else None,
        )


def _choose(scores: torch.Tensor, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(scores.argmax())
    scores = scores / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[0])).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if 0 < top_p < 1:
        probs = torch.softmax(scores, dim=-1)
        order = torch.argsort(probs, descending=True)
        cumulative = torch.cumsum(probs[order], dim=0)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        drop = cumulative - probs[order] >= top_p
        scores[order[drop]] = -math.inf
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _top(tokenizer, logprobs: torch.Tensor, chosen: int, k: int) -> dict[str, float]:
    ids = torch.topk(logprobs, k).indices.tolist() if k > 0 else []
    if chosen not in ids:
        ids.append(chosen)
    return {tokenizer.convert_ids_to_tokens(i): float(logprobs[i]) for i in ids}


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def generate(
    prompt: str,
    controls: Sequence[Control] = (),
    *,
    model: LoadedModel | None = None,
    mode: str = "log-additive",
    **options,
) -> Completion:
    """One-call steered generation (the embedded default model unless ``model`` is given).

    Example::

        >>> generate("Ada lives in Oslo. Bo lives in Rome. Ada lives in",
        ...          [TextControl(19, 17, 0.0)], max_new_tokens=2).text
        ' Oslo.'
    """
    from .models import default_model

    return Steerer(model or default_model()).generate(prompt, controls, mode=mode, **options)
