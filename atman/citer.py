"""Cite the sources of an answer in a long context, with AtMan.

Retrieval-augmented generation: a context of retrieved passages, a question, a response (given,
e.g. written by a larger model elsewhere, or generated here), and for each sentence of the
response the sources (passages, sentences or tokens of the context) it rests on.

One suppressed pass per source, batched, at inference memory. Two ways to suppress a source:

* ``readout`` (default): the context is encoded once, unperturbed; only the queries after it (the
  question and the response) see the source's attention multiplied. Each source then costs a pass
  over the tail only, whatever the context's length. It measures how much the answer reads the
  source directly; later context tokens still saw it.
* ``atman``: the paper's AtMan — every later position, context included, loses the source; each
  source costs a pass from its first token to the end.

A chat transcript (:meth:`Citer.cite_messages`; rendering and locating its messages is
:mod:`atman.transcripts`' job) is cited the same way. Both are kept together because they share one
scoring loop (coarse to fine included) and one result type.

Example::

    >>> citer = Citer(load_model())
    >>> result = citer.cite(["Ada lives in Oslo.", "Bo lives in Rome."], "Where does Ada live?",
    ...                     "Ada lives in Oslo.")
    >>> result.cite(0, k=1)[0][0].text
    'Ada lives in Oslo.'
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .citations import Citations, CitedSpan, Message, Passage, Source
from .engine import Progress
from .errors import AtmanError, EmptyInputError, GranularityError
from .explainer import Explainer, covering
from .models import LoadedModel
from .readout import ReadoutPass, screened_scores
from .rows import Suppression, suppression_rows
from .steering import Steerer
from .transcripts import (
    LEVELS,
    RenderedTranscript,
    TranscriptError,
    answer_of,
    encode_transcript,
    parse_documents,
    parse_messages,
    question_of,
    render_transcript,
    transcript_sources,
)
from .units import EncodedInput, encode, prompt_units, text_spans

SOURCE_LEVELS = ("passage", "sentence", "token")
# a transcript's sources can also be whole messages
TRANSCRIPT_LEVELS = LEVELS
MessageLike = Mapping | Message
METHODS = ("readout", "atman")
DEFAULT_METHOD = "readout"
# the attention to a cited source is removed (multiplier 0): docs/defaults.md has the measurements
DEFAULT_CITE_MULTIPLIER = 0.0
PROMPT_TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"
PASSAGE_SEPARATOR = "\n\n"
PassageLike = str | Passage | Mapping
# coarse to fine: sources are scored in runs of this many first when there are more than REFINE_ABOVE
DEFAULT_GROUP_SIZE = 8
DEFAULT_REFINE_SHARE = 0.99
REFINE_ABOVE = 100


def source_groups(owners: Sequence[int], size: int) -> list[list[int]]:
    """Sources (indices) in runs of at most ``size`` consecutive sources of the same passage.

    >>> source_groups([0, 0, 0, 1, 1], 2)
    [[0, 1], [2], [3, 4]]
    """
    groups: list[list[int]] = []
    for s, owner in enumerate(owners):
        if groups and len(groups[-1]) < size and owners[groups[-1][-1]] == owner:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def coarse_to_fine(score: Callable[[list[list[int]]], torch.Tensor], groups: Sequence[Sequence[int]], n: int,
                   share: float) -> tuple[torch.Tensor, list[bool]]:
    """Scores of ``n`` sources in two stages: every group suppressed as a whole, then each source of the
    fewest top groups that hold ``share`` of the groups' positive total, alone.

    ``score(units)`` returns one row per unit (a list of sources suppressed together): the rise of
    the loss, per column (response token). A source of a group that was not refined gets an equal
    share of its group's row. Returns the (n, columns) scores and which sources were refined.
    """
    coarse = score([list(g) for g in groups]).double()
    totals = coarse.sum(dim=1)
    ranked = sorted(range(len(groups)), key=lambda g: float(totals[g]), reverse=True)
    chosen = covering(ranked, [float(totals[g]) for g in ranked], float(totals.clamp(min=0).sum()), share)
    out = torch.zeros(n, coarse.shape[1], dtype=torch.float64)
    for g, members in enumerate(groups):
        out[list(members)] = coarse[g] / len(members)
    fine_sources = [s for g in chosen for s in groups[g]]
    refined = [False] * n
    if fine_sources:
        out[fine_sources] = score([[s] for s in fine_sources]).double()
        for s in fine_sources:
            refined[s] = True
    return out, refined


class CitationError(AtmanError):
    """Input that cannot be cited (an empty context, a span outside the response, ...)."""


def _check_refine(refine: bool | None, group_size: int, refine_share: float) -> None:
    if refine is not None and not isinstance(refine, bool):
        raise CitationError(f"refine must be true, false or null (automatic), got {refine!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise CitationError(f"group_size must be a whole number of at least 2, got {group_size!r}")
    if isinstance(refine_share, bool) or not isinstance(refine_share, (int, float)) or not (
            0.0 < refine_share <= 1.0):
        raise CitationError(f"refine_share must lie in (0, 1], got {refine_share!r}")


@dataclass(frozen=True)
class CitationInput:
    """The encoded prompt + response, the sources as units and the response spans as target tokens."""

    encoded: EncodedInput
    passages: tuple[Passage, ...]
    sources: tuple[Source, ...]
    source_positions: tuple[tuple[int, ...], ...]
    spans: tuple[tuple[int, int], ...]
    span_tokens: tuple[tuple[int, ...], ...]
    readout_from: int


def passages_from(context: str | Sequence[PassageLike]) -> list[Passage]:
    """Passages from a context given as one text (split at blank lines), or as a list of texts,
    :class:`Passage` objects or dicts with ``text`` and optional ``id``/``title``."""
    if isinstance(context, str):
        pieces = [context[a:b] for a, b in text_spans(context, "paragraph")] if context.strip() else []
        items: list[PassageLike] = pieces
    else:
        items = list(context)
    passages, start = [], 0
    for k, item in enumerate(items):
        if isinstance(item, Passage):
            text, pid, title = item.text, item.id, item.title
        elif isinstance(item, Mapping):
            if not isinstance(item.get("text"), str):
                raise CitationError(f"passage {k} has no text field")
            text, pid, title = item["text"], item.get("id"), item.get("title")
            pid = None if pid is None else str(pid)
            title = None if title is None else str(title)
        elif isinstance(item, str):
            text, pid, title = item, None, None
        else:
            raise CitationError(f"passage {k} is a {type(item).__name__}; give text, a dict or a Passage")
        text = text.strip()
        if not text:
            if not isinstance(context, str):
                warnings.warn(f"passage {k}{'' if pid is None else f' ({pid})'} is empty and is left out: the "
                              "result's passages are numbered without it (each keeps its place in the given list "
                              "as Passage.index)", UserWarning, stacklevel=3)
            continue
        passages.append(Passage(text=text, id=pid, title=title, start=start, end=start + len(text), index=k))
        start += len(text) + len(PASSAGE_SEPARATOR)
    if not passages:
        raise EmptyInputError("the context is empty")
    return passages


class Citer:
    """Finds the sources of a response in a context (see the module docs for the two methods).

    ``multiplier``: the attention to a suppressed source is multiplied by it (default 0: removed).
    ``batch_size``/``max_memory``/``backend``/``mode`` as for :class:`atman.Explainer`.
    ``screen`` (readout only; default None: one row per source): estimate every source's score from one
    autograd pass of the tail and suppress only the ``screen`` sources it ranks highest
    (:func:`atman.readout.screened_scores`), about one forward pass in all; ``settings["refined"]``
    lists the sources scored by their own row. It runs the tail in one call, without progress reports.
    """

    def __init__(self, model: LoadedModel, *, method: str = DEFAULT_METHOD,
                 multiplier: float = DEFAULT_CITE_MULTIPLIER, mode: str = "log-additive", backend: str = "sdpa",
                 batch_size: int | None = None, max_memory: int | str | None = None,
                 piece_tokens: int | None = None, screen: int | None = None) -> None:
        if method not in METHODS:
            raise AtmanError(f"unknown citation method {method!r}; choose one of {', '.join(METHODS)}")
        if screen is not None and (isinstance(screen, bool) or not isinstance(screen, int) or screen < 0
                                   or method != "readout"):
            raise AtmanError(f"screen must be a whole number >= 0 with method='readout', got {screen!r}")
        self.screen = screen
        self.method = method
        self.explainer = Explainer(model, suppression=Suppression(multiplier=multiplier, mode=mode, backend=backend),
                                   batch_size=batch_size, max_memory=max_memory, piece_tokens=piece_tokens)
        self.lm = model

    @property
    def suppression(self) -> Suppression:
        return self.explainer.suppression

    def prepare(
        self,
        context: str | Sequence[PassageLike],
        question: str,
        response: str | Sequence[int],
        *,
        sources: str = "sentence",
        spans: Sequence[tuple[int, int]] | None = None,
        chat: bool | None = None,
        system: str | None = None,
    ) -> CitationInput:
        """Encode the prompt and response; locate sources (context units) and response spans."""
        if sources not in SOURCE_LEVELS:
            raise GranularityError(f"unknown source level {sources!r}; choose one of {', '.join(SOURCE_LEVELS)}")
        if not isinstance(question, str) or not question.strip():
            raise EmptyInputError("the question is empty")
        passages = passages_from(context)
        context_text = PASSAGE_SEPARATOR.join(p.text for p in passages)
        prompt = PROMPT_TEMPLATE.format(context=context_text, question=question)
        offset = PROMPT_TEMPLATE.index("{context}")
        if chat is None:
            chat = bool(getattr(self.lm.tokenizer, "chat_template", None))
        encoded = encode(self.lm.tokenizer, prompt, response, chat=chat, system=system)
        self.explainer.check_length(len(encoded.input_ids))
        units, owners = self._sources(encoded, passages, sources, offset)
        context_end = offset + len(context_text)
        readout_from = 1 + max(pos for pos, span in enumerate(encoded.prompt_spans)
                               if span is not None and span[0] < context_end)
        spans_, members = self._response_spans(encoded, spans)
        return CitationInput(
            encoded=encoded, passages=tuple(passages),
            sources=tuple(Source(u.text, u.start - offset, u.start - offset + u.length, owner)
                          for u, owner in zip(units, owners, strict=True)),
            source_positions=tuple(u.positions for u in units), spans=tuple(spans_), span_tokens=tuple(members),
            readout_from=readout_from)

    def cite(
        self,
        context: str | Sequence[PassageLike],
        question: str,
        response: str | None = None,
        *,
        sources: str = "sentence",
        spans: Sequence[tuple[int, int]] | None = None,
        chat: bool | None = None,
        system: str | None = None,
        max_new_tokens: int = 128,
        refine: bool | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        refine_share: float = DEFAULT_REFINE_SHARE,
        progress: Progress | None = None,
    ) -> Citations:
        """Scores of every source for every span of ``response`` (its sentences unless ``spans`` gives
        (start, end) character ranges of the response). ``response=None`` generates the model's own
        greedy answer first (chat template applied where the tokenizer has one, unless ``chat=False``).

        ``refine`` (coarse to fine; default: on above REFINE_ABOVE sources): runs of ``group_size``
        consecutive sources of one passage are suppressed together first, then each source of the
        fewest top runs holding ``refine_share`` of the positive total alone; a source of another run
        gets an equal share of its run's score. ``settings["refined"]`` lists the sources scored alone.
        """
        _check_refine(refine, group_size, refine_share)
        generated = response is None
        if generated:
            passages = passages_from(context)
            prompt = PROMPT_TEMPLATE.format(context=PASSAGE_SEPARATOR.join(p.text for p in passages),
                                            question=question)
            use_chat = bool(getattr(self.lm.tokenizer, "chat_template", None)) if chat is None else chat
            target: str | list[int] = self.explainer.generate(prompt, chat=use_chat, system=system,
                                                              max_new_tokens=max_new_tokens)
        else:
            if not isinstance(response, str) or not response.strip():
                raise EmptyInputError("the response is empty")
            target = response
        prepared = self.prepare(context, question, target, sources=sources, spans=spans, chat=chat, system=system)
        cited, settings = self._score(prepared, refine, group_size, refine_share, progress)
        return Citations(
            model=self.lm.name, context=PASSAGE_SEPARATOR.join(p.text for p in prepared.passages), question=question,
            response=prepared.encoded.target, passages=prepared.passages, sources=prepared.sources, spans=cited,
            settings={"method": self.method, "sources": sources, **self.suppression.settings(),
                      "generated_response": generated, **settings})

    def _score(self, prepared: CitationInput, refine: bool | None, group_size: int, refine_share: float,
               progress: Progress | None) -> tuple[tuple[CitedSpan, ...], dict]:
        """Every source's score for every span (one suppressed pass per source or run of sources), and the
        settings that say how they were computed."""
        if self.screen is not None:
            return self._screened(prepared)
        encoded = prepared.encoded
        n = len(prepared.sources)
        refine = n > REFINE_ABOVE if refine is None else bool(refine)
        spent = self.explainer.engine.token_forwards
        baseline: list[torch.Tensor] = []
        stage = [0]

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(stage[0] + done, stage[0] + total)

        def score(units: list[list[int]]) -> torch.Tensor:
            positions = [sorted(p for s in unit for p in prepared.source_positions[s]) for unit in units]
            rows = suppression_rows(len(encoded.input_ids), positions, self.suppression.multiplier)
            losses = self.explainer.losses(encoded, rows, readout_from=prepared.readout_from
                                           if self.method == "readout" else None, progress=report)
            stage[0] += rows.shape[0]
            baseline.append(losses[0])
            return losses[1:] - losses[0:1]

        # both stages share one unperturbed pass
        with self.explainer.engine.keeping_unperturbed():
            if refine:
                groups = source_groups([source.passage for source in prepared.sources], group_size)
                delta, refined = coarse_to_fine(score, groups, n, refine_share)
            else:
                delta, refined = score([[s] for s in range(n)]).double(), [True] * n
        if not bool(torch.isfinite(delta).all()):
            raise AtmanError("the citation produced non-finite scores (a multiplier of 0 with the multiplicative "
                             "variant can do this); use the log-additive variant")
        cited = tuple(
            CitedSpan(encoded.target[a:b], a, b, tuple(float(v) for v in delta[:, list(tokens)].sum(dim=1)))
            for (a, b), tokens in zip(prepared.spans, prepared.span_tokens, strict=True))
        return cited, {"readout_from": prepared.readout_from,
                       "refine": {"group_size": group_size, "share": refine_share} if refine else None,
                       "refined": [s for s in range(n) if refined[s]],
                       "response_logprob": -float(baseline[0].sum()),
                       "token_forwards": self.explainer.engine.token_forwards - spent}

    def _screened(self, prepared: CitationInput) -> tuple[tuple[CitedSpan, ...], dict]:
        """Scores from first-order estimates and exact rows for the top ``screen`` sources (see the class)."""
        encoded = prepared.encoded
        readout = ReadoutPass(self.lm.model, encoded.input_ids, prepared.readout_from,
                              len(encoded.input_ids) - encoded.target_start, mode=self.suppression.mode)
        screened = screened_scores(readout, prepared.source_positions, prepared.span_tokens, top=self.screen,
                                   multiplier=self.suppression.multiplier)
        cited = tuple(CitedSpan(encoded.target[a:b], a, b, tuple(float(v) for v in screened.scores[:, k]))
                      for k, (a, b) in enumerate(prepared.spans))
        return cited, {"readout_from": prepared.readout_from, "refine": None, "screen": self.screen,
                       "refined": sorted(screened.exact), "response_logprob": -float(screened.base.sum()),
                       "token_forwards": readout.token_forwards}

    # --- transcripts ----------------------------------------------------------------------------
    def prepare_messages(
        self,
        messages: Sequence[MessageLike],
        *,
        documents: Sequence[PassageLike] | None = None,
        tools: Sequence[Mapping] | None = None,
        sources: str = "sentence",
        roles: Sequence[str] | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[CitationInput, RenderedTranscript]:
        """Render a transcript that ends with its answer (see :meth:`cite_messages`); locate its sources
        (regions of the chosen ``roles``) and the answer's spans."""
        if sources not in TRANSCRIPT_LEVELS:
            raise GranularityError(f"unknown source level {sources!r}; choose one of {', '.join(TRANSCRIPT_LEVELS)}")
        parsed = _messages(messages)
        if answer_of(parsed) is None:
            raise TranscriptError("the transcript does not end with an assistant's answer to explain")
        rendered = render_transcript(self.lm.tokenizer, parsed, documents=parse_documents(documents), tools=tools,
                                     context_template=PROMPT_TEMPLATE, separator=PASSAGE_SEPARATOR)
        encoded = encode_transcript(self.lm.tokenizer, rendered, rendered.answer.content)
        self.explainer.check_length(len(encoded.input_ids))
        passages, found, char_spans = transcript_sources(rendered, encoded, sources, roles)
        try:
            units = prompt_units(encoded, "spans", spans=char_spans)
        except GranularityError as exc:
            raise CitationError(f"a source tokenises to nothing of its own ({exc}); cite at a coarser level") from None
        spans_, members = self._response_spans(encoded, spans)
        readout_from = 1 + max(p for unit in units for p in unit.positions)
        return CitationInput(encoded=encoded, passages=tuple(passages), sources=tuple(found),
                             source_positions=tuple(u.positions for u in units), spans=tuple(spans_),
                             span_tokens=tuple(members), readout_from=readout_from), rendered

    def cite_messages(
        self,
        messages: Sequence[MessageLike],
        *,
        documents: Sequence[PassageLike] | None = None,
        tools: Sequence[Mapping] | None = None,
        sources: str = "sentence",
        roles: Sequence[str] | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
        max_new_tokens: int = 128,
        refine: bool | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        refine_share: float = DEFAULT_REFINE_SHARE,
        progress: Progress | None = None,
    ) -> Citations:
        """The sources in a chat transcript of each sentence of its final answer.

        ``messages``: OpenAI chat messages (``system``/``developer``, ``user``, ``assistant`` with optional
        ``tool_calls``, ``tool`` with ``tool_call_id``; string or list-of-text-parts content), rendered with
        the model's chat template (``tools`` handed to it). The last message, when it is an assistant's
        answer, is explained; otherwise the model answers first (greedy, up to ``max_new_tokens``).
        ``documents``: texts or ``{text, id, title}`` placed where the template puts documents (else in the
        last user message, as the one-context prompt does). ``sources``: ``message``, ``passage``
        (paragraphs and list parts; each document), ``sentence`` (default) or ``token``, over the
        messages of ``roles`` (default every role: earlier assistant turns, tool results, documents and the
        answer's reasoning, ``reasoning_content`` or ``<think>...</think>``, included). Readout
        suppression reads the answer from just after the last source (see docs/citations.md).

        Example::

            >>> result = Citer(load_model()).cite_messages([
            ...     {"role": "user", "content": "Ada lives in Oslo. Bo lives in Rome. Where does Ada live?"},
            ...     {"role": "assistant", "content": "Ada lives in Oslo."}])
            >>> result.cite(0, k=1)[0][0].text
            'Ada lives in Oslo.'
        """
        _check_refine(refine, group_size, refine_share)
        parsed = _messages(messages)
        generated = answer_of(parsed) is None
        if generated:
            parsed.append(self.answer(parsed, documents=documents, tools=tools, max_new_tokens=max_new_tokens))
        prepared, rendered = self.prepare_messages(parsed, documents=documents, tools=tools, sources=sources,
                                                   roles=roles, spans=spans)
        cited, settings = self._score(prepared, refine, group_size, refine_share, progress)
        return Citations(
            model=self.lm.name, context="", question=question_of(rendered.messages), response=prepared.encoded.target,
            passages=prepared.passages, sources=prepared.sources, spans=cited, messages=rendered.messages,
            settings={"method": self.method, "sources": sources, **self.suppression.settings(),
                      "generated_response": generated, "roles": list(roles) if roles is not None else None,
                      "template_tool_calls": rendered.template_tool_calls,
                      "documents": None if not rendered.documents
                      else "template" if rendered.template_documents else "last user message", **settings})

    def answer(self, messages: Sequence[MessageLike], *, documents: Sequence[PassageLike] | None = None,
               tools: Sequence[Mapping] | None = None, max_new_tokens: int = 128) -> Message:
        """The model's own greedy answer to a transcript (the assistant message that would end it)."""
        parsed = _messages(messages)
        rendered = render_transcript(self.lm.tokenizer, parsed, documents=parse_documents(documents), tools=tools,
                                     context_template=PROMPT_TEMPLATE, separator=PASSAGE_SEPARATOR)
        ids = [int(t) for t in self.lm.tokenizer(rendered.prompt, add_special_tokens=False)["input_ids"]]
        self.explainer.check_length(len(ids) + max_new_tokens)
        text = Steerer(self.lm).generate_ids(ids, max_new_tokens=max_new_tokens).text
        if not text.strip():
            raise EmptyInputError("the model generated no answer to this transcript, so there is nothing to explain")
        return parse_messages([{"role": "assistant", "content": text}])[0]

    def _sources(self, encoded: EncodedInput, passages: list[Passage], level: str,
                 offset: int) -> tuple[list, list[int]]:
        """Units over the context (in prompt offsets) and the passage each belongs to."""
        char_spans: list[tuple[int, int]] = []
        owners: list[int] = []
        for k, passage in enumerate(passages):
            if level == "passage":
                pieces = [(0, len(passage.text))]
            elif level == "sentence":
                pieces = text_spans(passage.text, "sentence")
            else:
                pieces = [(a - offset - passage.start, b - offset - passage.start)
                          for a, b in (span for span in encoded.prompt_spans if span is not None)
                          if offset + passage.start <= a and b <= offset + passage.end]
            for a, b in pieces:
                char_spans.append((offset + passage.start + a, offset + passage.start + b))
                owners.append(k)
        if not char_spans:
            raise CitationError(f"the context yields no {level} source")
        try:
            units = prompt_units(encoded, "spans", spans=char_spans)
        except GranularityError as exc:
            raise CitationError(f"a source tokenises to nothing of its own ({exc}); cite at a coarser level") from None
        return units, owners

    @staticmethod
    def _response_spans(encoded: EncodedInput, spans: Sequence[tuple[int, int]] | None
                        ) -> tuple[list[tuple[int, int]], list[tuple[int, ...]]]:
        """Response spans (sentences by default) and the target tokens (indices) in each."""
        response = encoded.target
        if spans is None:
            chosen = text_spans(response, "sentence") or [(0, len(response))]
        else:
            chosen = []
            for span in spans:
                a, b = (int(v) for v in span)
                if not 0 <= a < b <= len(response):
                    raise CitationError(f"span ({a}, {b}) lies outside the response of {len(response)} characters")
                chosen.append((a, b))
        members: list[tuple[int, ...]] = []
        for a, b in chosen:
            tokens = tuple(t for t, (ta, tb) in enumerate(encoded.target_spans)
                           if min(b, tb) - max(a, ta) > 0 or (ta == tb and a <= ta < b))
            if not tokens:
                raise CitationError(f"span ({a}, {b}) of the response holds no token")
            members.append(tokens)
        return chosen, members


def _messages(messages: Sequence[MessageLike]) -> list[Message]:
    """Messages given as OpenAI dicts or as :class:`Message` objects (a result's), checked."""
    if isinstance(messages, Sequence) and not isinstance(messages, str) and messages and all(
            isinstance(m, Message) for m in messages):
        return parse_messages([m.to_dict() for m in messages])
    return parse_messages(messages)


def cite(context: str | Sequence[PassageLike] | None = None, question: str | None = None,
         response: str | None = None, *, messages: Sequence[MessageLike] | None = None,
         model: LoadedModel | None = None, **options) -> Citations:
    """One-call citation with the embedded default model (loaded once per process): of a context and a
    question (:meth:`Citer.cite`), or of a chat transcript (``messages=``, :meth:`Citer.cite_messages`).

    Options of :class:`Citer` (``method``, ``multiplier``, ``batch_size``, ``max_memory``) and of
    :meth:`Citer.cite` (``sources``, ``spans``, ``chat``, ``system``, ``max_new_tokens``, ``refine``,
    ``group_size``, ``refine_share``) or :meth:`Citer.cite_messages` (``documents``, ``tools``,
    ``roles``, ...).

    Example::

        >>> cite("Ada lives in Oslo.\\n\\nBo lives in Rome.", "Where does Ada live?", "In Oslo.").cite(0)
        >>> cite(messages=[{"role": "user", "content": "Ada lives in Oslo. Where does she live?"},
        ...                {"role": "assistant", "content": "In Oslo."}]).cite(0)
    """
    from .models import default_model

    keys = ("method", "multiplier", "mode", "backend", "batch_size", "max_memory")
    citer = Citer(model or default_model(), **{k: options.pop(k) for k in keys if k in options})
    if messages is not None:
        if context is not None or question is not None or response is not None:
            raise CitationError("give either messages or a context and a question, not both")
        return citer.cite_messages(messages, **options)
    if context is None or question is None:
        raise CitationError("give a context and a question, or messages")
    return citer.cite(context, question, response, **options)
