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

Example::

    >>> citer = Citer(load_model())
    >>> result = citer.cite(["Ada lives in Oslo.", "Bo lives in Rome."], "Where does Ada live?",
    ...                     "Ada lives in Oslo.")
    >>> result.cite(0, k=1)[0][0].text
    'Ada lives in Oslo.'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .citations import Citations, CitedSpan, Passage, Source
from .engine import Progress
from .errors import AtmanError, EmptyInputError, GranularityError
from .explainer import Explainer, covering
from .models import LoadedModel
from .rows import Suppression, suppression_rows
from .units import EncodedInput, encode, prompt_units, text_spans

SOURCE_LEVELS = ("passage", "sentence", "token")
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
REFINE_ABOVE = 48


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
            continue
        passages.append(Passage(text=text, id=pid, title=title, start=start, end=start + len(text)))
        start += len(text) + len(PASSAGE_SEPARATOR)
    if not passages:
        raise EmptyInputError("the context is empty")
    return passages


class Citer:
    """Finds the sources of a response in a context (see the module docs for the two methods).

    ``multiplier``: the attention to a suppressed source is multiplied by it (default 0: removed).
    ``batch_size``/``max_memory``/``backend``/``mode`` as for :class:`atman.Explainer`.
    """

    def __init__(self, model: LoadedModel, *, method: str = DEFAULT_METHOD,
                 multiplier: float = DEFAULT_CITE_MULTIPLIER, mode: str = "log-additive", backend: str = "sdpa",
                 batch_size: int | None = None, max_memory: int | str | None = None,
                 piece_tokens: int | None = None) -> None:
        if method not in METHODS:
            raise AtmanError(f"unknown citation method {method!r}; choose one of {', '.join(METHODS)}")
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
        if refine is not None and not isinstance(refine, bool):
            raise CitationError(f"refine must be true, false or null (automatic), got {refine!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise CitationError(f"group_size must be a whole number of at least 2, got {group_size!r}")
        if isinstance(refine_share, bool) or not isinstance(refine_share, (int, float)) or not (
                0.0 < refine_share <= 1.0):
            raise CitationError(f"refine_share must lie in (0, 1], got {refine_share!r}")
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
        return Citations(
            model=self.lm.name, context=PASSAGE_SEPARATOR.join(p.text for p in prepared.passages), question=question,
            response=encoded.target, passages=prepared.passages, sources=prepared.sources, spans=cited,
            settings={"method": self.method, "sources": sources, **self.suppression.settings(),
                      "generated_response": generated, "readout_from": prepared.readout_from,
                      "refine": {"group_size": group_size, "share": refine_share} if refine else None,
                      "refined": [s for s in range(n) if refined[s]],
                      "response_logprob": -float(baseline[0].sum()),
                      "token_forwards": self.explainer.engine.token_forwards - spent})

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


def cite(context: str | Sequence[PassageLike], question: str, response: str | None = None, *,
         model: LoadedModel | None = None, **options) -> Citations:
    """One-call citation with the embedded default model (loaded once per process).

    Options of :class:`Citer` (``method``, ``multiplier``, ``batch_size``, ``max_memory``) and of
    :meth:`Citer.cite` (``sources``, ``spans``, ``chat``, ``system``, ``max_new_tokens``, ``refine``,
    ``group_size``, ``refine_share``).

    Example::

        >>> cite("Ada lives in Oslo.\\n\\nBo lives in Rome.", "Where does Ada live?", "In Oslo.").cite(0)
    """
    from .models import default_model

    keys = ("method", "multiplier", "mode", "backend", "batch_size", "max_memory")
    citer = Citer(model or default_model(), **{k: options.pop(k) for k in keys if k in options})
    return citer.cite(context, question, response, **options)
