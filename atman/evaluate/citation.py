"""Context attribution ("which sources does this response rest on?") scored the way ContextCite scores itself.

The pieces, in the order data flows:

* :class:`Sources` and :class:`CitationTask`: a context split into sources (character spans), a
  query, a response. The prompt is ContextCite's layout, ``"Context: {context}\\n\\nQuery: {query}"``
  as the user message of the model's chat template (plain text where there is none). Removing a
  source deletes its text from the context, as ContextCite does.
* :class:`ResponseScorer`: log p(response | context with a subset of sources kept), batched.
* Metrics: :func:`topk_drop` (log p(response | full context) minus log p(response | context without the
  method's k highest sources) and :func:`lds` (Spearman correlation, over held-out random ablations,
  between the response's logit-probability and the sum of the kept sources' scores).
* Methods, each a public function returning one score per source (higher = more evidence):
  :func:`leave_one_out`, :func:`attention_weights`, :func:`atman_spans` (AtMan through
  :class:`atman.Explainer`), :func:`readout_suppression` and :func:`readout_surrogate` (the
  context encoded once, only the tail after it recomputed with multipliers on the sources' keys).
  ContextCite itself lives in :mod:`atman.baselines.contextcite`.

It is one module because task, scorer, metrics and methods are one protocol: every method and
metric reads the same prompt layout and the same source spans, and a reader checking that a figure
in docs/evaluation.md is fair to every method needs them side by side.

Example::

    >>> lm = load_model()
    >>> task = CitationTask(Sources.from_spans("Ada lives in Oslo. Bo lives in Rome.", [(0, 18), (19, 36)]),
    ...                     "Where does Ada live?", "Ada lives in Oslo.")
    >>> scorer = ResponseScorer(lm, task)
    >>> scores = readout_suppression(lm, task)
    >>> topk_drop(scorer, scores, ks=(1,))
    {1: ...}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from ..citer import coarse_to_fine, source_groups
from ..engine import Engine, forward_options, target_logprobs
from ..errors import AtmanError, EmptyInputError
from ..explainer import Explainer
from ..manipulation import manipulate
from ..models import LoadedModel
from ..prefix_cache import SharedPrefix
from ..readout import MASK_SEED, ReadoutPass, logit_prob, mask_scores, random_masks, screened_scores
from ..rows import Suppression

# ContextCite's DEFAULT_PROMPT_TEMPLATE (context_cite/context_citer.py)
PROMPT_TEMPLATE = "Context: {context}\n\nQuery: {query}"
# ContextCite draws its training masks from seeds 0 .. num_ablations - 1; ours start far away from those
HOLDOUT_SEED = 1_000_000
DEFAULT_TOKEN_BUDGET = 8192


@dataclass(frozen=True)
class Sources:
    """A context and its sources: sorted, disjoint character spans of ``text``.

    Each source owns the text between the previous source's end and its own end (a passage title or
    the white space before a sentence), so deleting a source deletes that text too; the text after the
    last source always stays.

    Example::

        >>> s = Sources.from_spans("A b. C d.", [(0, 4), (5, 9)])
        >>> s.ablate([False, True])
        'C d.'
    """

    text: str
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def from_spans(cls, text: str, spans: Sequence[tuple[int, int]]) -> Sources:
        """Check and store ``spans``: non-empty, sorted, disjoint, inside ``text``."""
        if not text.strip():
            raise EmptyInputError("the context is empty")
        if text != text.lstrip():
            raise AtmanError("the context starts with white space; strip it first")
        if not spans:
            raise EmptyInputError("the context has no sources")
        previous = 0
        for start, end in spans:
            if not previous <= start < end <= len(text):
                raise AtmanError(f"source span ({start}, {end}) is empty, overlaps the previous one or lies "
                                 f"outside the context of {len(text)} characters")
            if not text[start:end].strip():
                raise AtmanError(f"source span ({start}, {end}) holds only white space")
            previous = end
        return cls(text=text, spans=tuple((int(a), int(b)) for a, b in spans))

    def __len__(self) -> int:
        return len(self.spans)

    @property
    def texts(self) -> list[str]:
        """The sources' own text (without the text before them that they carry)."""
        return [self.text[a:b] for a, b in self.spans]

    @property
    def owned(self) -> list[tuple[int, int]]:
        """Character ranges that deleting each source removes (its span plus the text before it)."""
        starts = [0] + [end for _, end in self.spans[:-1]]
        return [(start, end) for start, (_, end) in zip(starts, self.spans, strict=True)]

    def ablate(self, keep: Sequence[bool] | np.ndarray | None = None) -> str:
        """The context with the sources where ``keep`` is False deleted (all kept when None)."""
        if keep is None:
            return self.text
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self),):
            raise AtmanError(f"a mask needs {len(self)} entries, got shape {keep.shape}")
        pieces = [self.text[a:b] for (a, b), kept in zip(self.owned, keep, strict=True) if kept]
        return ("".join(pieces) + self.text[self.spans[-1][1]:]).lstrip()


@dataclass(frozen=True)
class CitationTask:
    """Sources, the query asked about them and the response whose sources are sought."""

    sources: Sources
    query: str
    response: str

    def __post_init__(self) -> None:
        if not self.query.strip():
            raise EmptyInputError("the query is empty")
        if not self.response.strip():
            raise EmptyInputError("the response is empty")

    def prompt(self, keep: Sequence[bool] | np.ndarray | None = None) -> str:
        """The user message for the context with only the kept sources."""
        return PROMPT_TEMPLATE.format(context=self.sources.ablate(keep), query=self.query)

    @property
    def context_offset(self) -> int:
        """Where the context starts inside :meth:`prompt`."""
        return PROMPT_TEMPLATE.index("{context}")


def render(tokenizer, user_message: str) -> str:
    """``user_message`` inside the tokenizer's chat template with the generation prompt, as ContextCite
    does; the plain message for a tokenizer without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                             add_generation_prompt=True)
    return user_message


@dataclass(frozen=True)
class Layout:
    """The tokenized full task: ids (prompt then response), where the response and the tail start, and
    the token positions of every source."""

    input_ids: tuple[int, ...]
    response_start: int
    tail_start: int
    source_positions: tuple[tuple[int, ...], ...]


def layout(tokenizer, task: CitationTask) -> Layout:
    """Tokenize ``task`` with the full context and locate every source's tokens.

    A token belongs to the source that owns its first character; the tail is everything from the first
    token that starts after the context (the query, the template's words, the response).
    """
    user = task.prompt()
    text = render(tokenizer, user)
    offset = text.index(user) + task.context_offset
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    response_ids = response_token_ids(tokenizer, task)
    ids = list(enc["input_ids"])
    owned = [(a + offset, b + offset) for a, b in task.sources.owned]
    context_end = offset + task.sources.spans[-1][1]
    positions: list[list[int]] = [[] for _ in owned]
    tail_start = len(ids)
    for i, (a, _) in enumerate(enc["offset_mapping"]):
        if a >= context_end:
            tail_start = i
            break
        for s, (lo, hi) in enumerate(owned):
            if lo <= a < hi:
                positions[s].append(i)
                break
    empty = [s for s, p in enumerate(positions) if not p]
    if empty:
        raise AtmanError(f"sources {empty[:5]} tokenise to nothing (they share their tokens with a neighbour)")
    return Layout(tuple(ids + response_ids), len(ids), tail_start, tuple(tuple(p) for p in positions))


def response_token_ids(tokenizer, task: CitationTask) -> list[int]:
    """The response's token ids (the same for every ablated context)."""
    ids = list(tokenizer(task.response, add_special_tokens=False)["input_ids"])
    if not ids:
        raise EmptyInputError("the response has no tokens")
    return ids


def keep_masks(n_sources: int, n: int, *, keep: float = 0.5, seed: int = HOLDOUT_SEED) -> np.ndarray:
    """``n`` random ablation masks drawn as ContextCite draws its own (:func:`atman.readout.random_masks`);
    the default seeds are disjoint from ContextCite's training masks."""
    return random_masks(n_sources, n, keep=keep, seed=seed)


class TokenCounter:
    """Counts token-forwards (batch rows x tokens, padding included) through a model while active."""

    def __init__(self) -> None:
        self.tokens = 0

    def hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is not None:
            self.tokens += int(ids.shape[0] * ids.shape[1])


@contextmanager
def count_token_forwards(model: torch.nn.Module) -> Iterator[TokenCounter]:
    """Count the token-forwards of every call of ``model`` inside the block.

    Example::

        >>> with count_token_forwards(lm.model) as counter:
        ...     lm.model(ids)
        >>> counter.tokens
    """
    counter = TokenCounter()
    handle = model.register_forward_pre_hook(counter.hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


class PrefixReuse:
    """One sequence's keys and values, reused by later sequences for the token prefix they share with it.

    The positions before the first token where a sequence differs from the reference see exactly what
    they saw in the reference, so their keys and values are the reference's and only the rest is
    computed (AttriBoT's key/value caching for leave-one-out, Liu et al. 2025). One sequence per pass.

    Example::

        >>> reuse = PrefixReuse(lm.model, full_ids)
        >>> reuse.logprobs(ablated_ids, n=len(response_ids))   # response tokens' log-probabilities
    """

    def __init__(self, model: torch.nn.Module, ids: Sequence[int]) -> None:
        self.model = model
        self.ids = torch.tensor([list(ids)])
        self._keep_logits, self._cache_argument = forward_options(model)
        with torch.no_grad():
            cache = DynamicCache()
            out = model(input_ids=self.ids.to(_device(model)), use_cache=True, **{self._cache_argument: cache})
        self.logits = out.logits
        self.prefix = [(layer.keys, layer.values) for layer in cache.layers]

    def shared(self, ids: Sequence[int], limit: int) -> int:
        """Length of the token prefix ``ids`` shares with the reference, at most ``limit``."""
        size = min(len(ids), self.ids.shape[1], limit)
        same = (self.ids[0, :size] == torch.tensor(list(ids[:size]))).int()
        return size if bool(same.all()) else int(same.argmin())

    def logprobs(self, ids: Sequence[int], n: int) -> np.ndarray:
        """Log-probabilities of the last ``n`` tokens of ``ids`` (teacher forced); at least the token
        before them and everything after the shared prefix is recomputed."""
        if list(ids) == self.ids[0].tolist():
            return target_logprobs(self.logits[0, -(n + 1):-1], self.ids[0, -n:]).cpu().numpy()
        start = self.shared(ids, len(ids) - n - 1)
        tail = torch.tensor([list(ids[start:])], device=_device(self.model))
        kwargs: dict = {"logits_to_keep": n + 1} if self._keep_logits else {}
        kwargs["use_cache"] = False
        with torch.no_grad():
            if start > 0:
                kwargs.update({self._cache_argument: SharedPrefix(self.prefix, start), "use_cache": True})
            logits = self.model(input_ids=tail, **kwargs).logits
        return target_logprobs(logits[0, -(n + 1):-1], tail[0, -n:].cpu()).cpu().numpy()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class ResponseScorer:
    """log p(response | context with a subset of sources kept), for a loaded causal LM.

    ``reuse_prefix=True`` computes each ablated context after the full context's keys and values for
    their common token prefix (:class:`PrefixReuse`; the same numbers up to float rounding), one context
    per pass; otherwise ablated contexts run whole, left-padded in batches of ``token_budget`` tokens.

    Example::

        >>> scorer = ResponseScorer(lm, task)
        >>> scorer.logprobs(np.array([[True, False]])).sum(axis=1)   # source 1 deleted
    """

    def __init__(self, lm: LoadedModel, task: CitationTask, *, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 reuse_prefix: bool = False) -> None:
        self.lm = lm
        self.task = task
        self.token_budget = token_budget
        self.response_ids = response_token_ids(lm.tokenizer, task)
        self._keep_logits = forward_options(lm.model)[0]
        self._memo: dict[bytes, np.ndarray] = {}
        self._full: float | None = None
        self._reuse: PrefixReuse | None = None
        self.reuse_prefix = reuse_prefix

    def remember(self, memo: dict[bytes, np.ndarray]) -> None:
        """Take results measured before (mask bytes -> token log-probabilities), e.g. from a cache file."""
        self._memo.update(memo)

    @property
    def memo(self) -> dict[bytes, np.ndarray]:
        """Every mask measured so far (mask bytes -> token log-probabilities)."""
        return dict(self._memo)

    def prompt_ids(self, keep: Sequence[bool] | np.ndarray | None = None) -> list[int]:
        """Token ids of the rendered prompt for the kept sources."""
        return list(self.lm.tokenizer(render(self.lm.tokenizer, self.task.prompt(keep)),
                                      add_special_tokens=False)["input_ids"])

    def logprobs(self, keeps: np.ndarray) -> np.ndarray:
        """Token log-probabilities of the response (columns) for each mask (rows) of kept sources."""
        keeps = np.asarray(keeps, dtype=bool)
        if keeps.ndim != 2 or keeps.shape[1] != len(self.task.sources):
            raise AtmanError(f"masks must have shape (n, {len(self.task.sources)}), got {keeps.shape}")
        # a mask seen before (the same top-k set of two methods) is not run again
        todo = list(dict.fromkeys(k.tobytes() for k in keeps if k.tobytes() not in self._memo))
        if todo:
            fresh = self._run([np.frombuffer(key, dtype=bool) for key in todo])
            self._memo.update(zip(todo, fresh, strict=True))
        return np.stack([self._memo[k.tobytes()] for k in keeps])

    def _run(self, keeps: list[np.ndarray]) -> np.ndarray:
        sequences = [self.prompt_ids(k) + self.response_ids for k in keeps]
        out = np.zeros((len(sequences), len(self.response_ids)))
        if self.reuse_prefix:
            if self._reuse is None:
                self._reuse = PrefixReuse(self.lm.model, self.prompt_ids() + self.response_ids)
            for row, seq in enumerate(sequences):
                out[row] = self._reuse.logprobs(seq, len(self.response_ids))
            return out
        start = 0
        while start < len(sequences):
            longest, stop = 0, start
            while stop < len(sequences):
                longest_next = max(longest, len(sequences[stop]))
                if stop > start and longest_next * (stop - start + 1) > self.token_budget:
                    break
                longest, stop = longest_next, stop + 1
            out[start:stop] = self._batch(sequences[start:stop], longest)
            start = stop
        return out

    def _batch(self, sequences: list[list[int]], longest: int) -> np.ndarray:
        device = self.lm.device
        pad = self.lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):  # left padding: the response ends every row
            ids[row, longest - len(seq):] = torch.tensor(seq)
            mask[row, longest - len(seq):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        n = len(self.response_ids)
        kwargs = {"logits_to_keep": n + 1} if self._keep_logits else {}
        with torch.no_grad():
            logits = self.lm.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   position_ids=positions.to(device), use_cache=False, **kwargs).logits
        return target_logprobs(logits[:, -(n + 1):-1], ids[:, -n:]).cpu().numpy()

    @property
    def full_logprob(self) -> float:
        """log p(response | the full context)."""
        if self._full is None:
            self._full = float(self.logprobs(np.ones((1, len(self.task.sources)), dtype=bool)).sum())
        return self._full


# ---------------------------------------------------------------------------------------------- metrics

def top_sources(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores (ties broken by position)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]


def topk_drop(scorer: ResponseScorer, scores: np.ndarray, ks: Sequence[int] = (1, 3, 5)) -> dict[int, float]:
    """ContextCite's top-k log-probability drop: log p(response | full) minus log p(response | the
    context without the ``k`` highest-scored sources), for each ``k``.

    Example::

        >>> topk_drop(scorer, np.array([2.0, 0.1, 0.0]), ks=(1,))   # deletes source 0
        {1: ...}
    """
    n = len(scorer.task.sources)
    keeps = np.ones((len(ks), n), dtype=bool)
    for row, k in enumerate(ks):
        keeps[row, top_sources(scores, min(k, n))] = False
    ablated = scorer.logprobs(keeps).sum(axis=1)
    return {k: scorer.full_logprob - float(lp) for k, lp in zip(ks, ablated, strict=True)}


def lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> float:
    """Linear datamodeling score: Spearman correlation between ``outputs`` (the response's
    logit-probability under each held-out mask) and the sum of the kept sources' ``scores``.

    Example::

        >>> lds(np.array([1.0, 2.0]), np.array([[1, 0], [0, 1], [1, 1]]), np.array([0.5, 1.0, 3.0]))
        1.0
    """
    from scipy.stats import spearmanr

    predicted = np.asarray(masks, dtype=np.float64) @ np.asarray(scores, dtype=np.float64)
    if np.ptp(predicted) == 0 or np.ptp(outputs) == 0:
        return 0.0
    return float(spearmanr(predicted, outputs).statistic)


@dataclass
class HoldOut:
    """Held-out ablations of one task: the masks and the response's logit-probability under each."""

    masks: np.ndarray
    outputs: np.ndarray

    @classmethod
    def measure(cls, scorer: ResponseScorer, n: int = 32, *, keep: float = 0.5, seed: int = HOLDOUT_SEED) -> HoldOut:
        """Run ``n`` held-out masks (seeds ``seed`` ..) through ``scorer``."""
        masks = keep_masks(len(scorer.task.sources), n, keep=keep, seed=seed)
        return cls(masks=masks, outputs=logit_prob(scorer.logprobs(masks).sum(axis=1)))


@dataclass
class MethodRun:
    """One method's scores on one task and what they cost."""

    name: str
    scores: np.ndarray
    token_forwards: int
    seconds: float
    cpu_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class OutOfProcess:
    """Scores a method computed in another process (AttnLRP's lxt worker), with what they cost there:
    the token-forwards it charges and the CPU seconds of that process, which :func:`run_method` adds to
    what it counts here."""

    scores: np.ndarray
    token_forwards: int
    cpu_seconds: float


def run_method(name: str, lm: LoadedModel, method: Callable[[], np.ndarray | OutOfProcess]) -> MethodRun:
    """Run ``method`` (no arguments, returns one score per source), counting token-forwards, wall time
    and this process's CPU time (the fairer clock on a machine that other jobs share). A method that
    returns :class:`OutOfProcess` adds the cost it reports from its other process."""
    with count_token_forwards(lm.model) as counter:
        start, cpu = time.perf_counter(), time.process_time()
        result = method()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    tokens = counter.tokens
    if isinstance(result, OutOfProcess):
        tokens, cpu_seconds, result = tokens + result.token_forwards, cpu_seconds + result.cpu_seconds, result.scores
    return MethodRun(name=name, scores=np.asarray(result, dtype=np.float64), token_forwards=tokens, seconds=seconds,
                     cpu_seconds=cpu_seconds)


def score_method(run: MethodRun, scorer: ResponseScorer, holdout: HoldOut, evidence: Sequence[int] = ()) -> MethodRun:
    """Fill ``run.metrics``: top-1/3/5 drop, LDS and whether an evidence source is ranked first."""
    drops = topk_drop(scorer, run.scores)
    run.metrics = {f"top{k}_drop": v for k, v in drops.items()}
    run.metrics["lds"] = lds(run.scores, holdout.masks, holdout.outputs)
    if evidence:
        run.metrics["evidence_first"] = float(int(top_sources(run.scores, 1)[0]) in set(evidence))
    return run


# ---------------------------------------------------------------------------------------------- methods

def leave_one_out(scorer: ResponseScorer) -> np.ndarray:
    """Score of source i = log p(response | full) - log p(response | context without source i)."""
    n = len(scorer.task.sources)
    ablated = scorer.logprobs(~np.eye(n, dtype=bool)).sum(axis=1)
    return scorer.full_logprob - ablated


def attention_weights(lm: LoadedModel, task: CitationTask) -> np.ndarray:
    """Attention baseline: the attention the rows predicting the response give each source's tokens,
    averaged over layers and heads, summed over those rows and the source's tokens."""
    lay = layout(lm.tokenizer, task)
    ids = torch.tensor([lay.input_ids], device=lm.device)
    total = torch.zeros(ids.shape[1])
    with torch.no_grad(), manipulate(torch.ones(1, ids.shape[1]), backend="eager"):
        attentions = lm.model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    if not attentions or any(a is None for a in attentions):
        raise AtmanError(f"{type(lm.model).__name__} does not return attention probabilities")
    rows = slice(lay.response_start - 1, ids.shape[1] - 1)
    for layer in attentions:
        total += layer[0, :, rows].float().mean(dim=0).sum(dim=0).cpu()
    total /= len(attentions)
    return np.array([float(total[list(p)].sum()) for p in lay.source_positions])


def atman_explainer(lm: LoadedModel, multiplier: float | None = None) -> Explainer:
    """The AtMan explainer at attention ``multiplier`` (None: the explainer's default).

    """
    if multiplier is None:
        return Explainer(lm)
    return Explainer(lm, multiplier=multiplier)


def atman_spans(lm: LoadedModel, task: CitationTask, multiplier: float | None = None) -> np.ndarray:
    """AtMan at source spans through :meth:`atman.Explainer.explain` (chat template applied): the rise
    of the response's cross-entropy when the attention to a source is damped in every layer and row."""
    offset = task.context_offset
    spans = [(a + offset, b + offset) for a, b in task.sources.owned]
    explanation = atman_explainer(lm, multiplier).explain(task.prompt(), task.response, granularity="spans",
                                                          spans=spans, chat=True)
    by_start = {item.start: item.score for item in explanation.explanations[0].items if item.kind == "prompt"}
    missing = [s for s, (a, _) in enumerate(spans) if a not in by_start]
    if missing:
        raise AtmanError(f"the explanation has no item for sources {missing[:5]}")
    return np.array([by_start[a] for a, _ in spans])


def tail_logprobs(model: torch.nn.Module, input_ids: Sequence[int], tail_start: int, response_start: int,
                  key_multipliers: torch.Tensor, *, mode: str = "log-additive",
                  token_budget: int | None = None, engine: Engine | None = None, full: bool = False) -> np.ndarray:
    """Token log-probabilities of ``input_ids[response_start:]`` (columns) with each row of
    ``key_multipliers`` (rows x all key positions) applied only for the queries from ``tail_start`` on.

    The engine's readout suppression (:meth:`atman.engine.Engine.target_losses` with
    ``readout_from``): ``input_ids[:tail_start]`` is encoded once, unperturbed, its keys and values are
    shared by every row, and only the tail is recomputed with the multipliers on all keys. The positions
    before the tail therefore still see every key: equal to one pass over the whole sequence with the
    multipliers on the tail's query rows only. ``token_budget`` caps the rows x recomputed positions per
    forward pass (default: the engine's). ``full=True`` applies the multipliers to every query instead
    (the paper's AtMan: each row is recomputed from its first damped position).

    Example::

        >>> m = torch.ones(2, len(ids)); m[1, 3:7] = 0.0        # row 1: keys 3..6 hidden from the tail
        >>> tail_logprobs(lm.model, ids, tail_start=10, response_start=12, key_multipliers=m)  # doctest: +SKIP
    """
    if not 0 < tail_start <= response_start < len(input_ids):
        raise AtmanError(f"need 0 < tail_start <= response_start < length, got {tail_start}, {response_start}, "
                         f"{len(input_ids)}")
    if key_multipliers.ndim != 2 or key_multipliers.shape[1] != len(input_ids):
        raise AtmanError(f"key multipliers must have shape (rows, {len(input_ids)}), "
                         f"got {tuple(key_multipliers.shape)}")
    ids = torch.tensor([list(input_ids)])
    engine = engine or Engine(model, suppression=Suppression(mode=mode), token_budget=token_budget)
    # the cached engine's row 0 is the unperturbed pass; the rows asked for follow it
    rows = torch.cat([torch.ones(1, len(input_ids)), key_multipliers.float().cpu()])
    losses = engine.target_losses({"input_ids": ids}, ids[0, response_start:], rows,
                                  readout_from=None if full else tail_start)
    return -losses[1:].numpy()


def readout_logprobs(lm: LoadedModel, task: CitationTask, source_multipliers: np.ndarray, *,
                     mode: str = "log-additive", token_budget: int | None = None,
                     engine: Engine | None = None, full: bool = False, from_response: bool = False) -> np.ndarray:
    """Token log-probabilities of the response (columns) with each row of ``source_multipliers``
    (rows x sources) on the sources' keys, for the queries after the context (query, template,
    response) only; see :func:`tail_logprobs`. The context's own tokens still saw every source:
    this measures how much the answer reads each source directly. ``full=True``: every later
    position loses the sources (the paper's AtMan); ``from_response=True``: only the response (and the
    position predicting its first token) loses them, the query still reads them."""
    source_multipliers = np.asarray(source_multipliers, dtype=np.float32)
    lay = layout(lm.tokenizer, task)
    if source_multipliers.ndim != 2 or source_multipliers.shape[1] != len(lay.source_positions):
        raise AtmanError(f"source multipliers must have shape (rows, {len(lay.source_positions)}), "
                         f"got {source_multipliers.shape}")
    columns = torch.ones(source_multipliers.shape[0], len(lay.input_ids))
    for s, positions in enumerate(lay.source_positions):
        columns[:, list(positions)] = torch.from_numpy(source_multipliers[:, s])[:, None]
    tail_start = lay.response_start - 1 if from_response else lay.tail_start
    return tail_logprobs(lm.model, lay.input_ids, tail_start, lay.response_start, columns, mode=mode,
                         token_budget=token_budget, engine=engine, full=full)


def readout_suppression(lm: LoadedModel, task: CitationTask, multiplier: float = 0.0, *,
                        mode: str = "log-additive", from_response: bool = False) -> np.ndarray:
    """Per-source readout suppression: score of source i = log p(response) unperturbed minus log p with
    the attention from the tail (query and response; ``from_response``: the response only) to source i
    multiplied by ``multiplier``."""
    n = len(task.sources)
    rows = np.ones((n + 1, n), dtype=np.float32)
    rows[np.arange(1, n + 1), np.arange(n)] = multiplier
    logprob = readout_logprobs(lm, task, rows, mode=mode, from_response=from_response).sum(axis=1)
    return logprob[0] - logprob[1:]


def readout_screened(lm: LoadedModel, task: CitationTask, top: int = 8, *, multiplier: float = 0.0,
                     from_response: bool = False) -> np.ndarray:
    """Every source's first-order readout estimate from one gradient of the response's loss, exact readout
    rows for the ``top`` it ranks highest (:func:`atman.readout.screened_scores`); the context is encoded
    once. ``top=0``: the estimate alone."""
    lay = layout(lm.tokenizer, task)
    n_response = len(lay.input_ids) - lay.response_start
    start = lay.response_start - 1 if from_response else lay.tail_start
    readout = ReadoutPass(lm.model, lay.input_ids, start, n_response)
    return screened_scores(readout, lay.source_positions, [range(n_response)], top=top,
                           multiplier=multiplier).scores[:, 0]


def passages_of(sources: Sources) -> list[int]:
    """The passage (blank-line separated block of the context) each source lies in."""
    breaks = [i for i in range(len(sources.text)) if sources.text.startswith("\n\n", i)
              and (i == 0 or sources.text[i - 1] != "\n")]
    return [sum(b < start for b in breaks) for start, _ in sources.spans]


def _group_scorer(lm: LoadedModel, task: CitationTask, engine: Engine, multiplier: float, mode: str,
                  full: bool = False) -> Callable[[list[list[int]]], torch.Tensor]:
    """``score(units)`` for :func:`atman.citer.coarse_to_fine`: the response's log-probability drop
    (one column) when each unit (a list of sources) is suppressed."""
    n = len(task.sources)

    def score(units: list[list[int]]) -> torch.Tensor:
        rows = np.ones((len(units) + 1, n), dtype=np.float32)
        for u, members in enumerate(units, start=1):
            rows[u, members] = multiplier
        logprob = readout_logprobs(lm, task, rows, mode=mode, engine=engine, full=full).sum(axis=1)
        return torch.from_numpy(logprob[0] - logprob[1:])[:, None]

    return score


def readout_refine(lm: LoadedModel, task: CitationTask, block: int = 8, share: float = 0.99, *,
                   multiplier: float = 0.0, mode: str = "log-additive", passages: bool = False,
                   engine: Engine | None = None) -> np.ndarray:
    """Coarse-to-fine readout suppression (:func:`atman.citer.coarse_to_fine`): runs of ``block``
    consecutive sources first, then each source of the fewest top runs holding ``share`` of the
    positive total; one unperturbed pass serves both stages. ``passages=True`` keeps runs inside one
    passage, as :class:`atman.Citer` does; a ``block`` of 0 makes every passage one run."""
    n = len(task.sources)
    engine = engine or Engine(lm.model, suppression=Suppression(mode=mode))
    owners = passages_of(task.sources) if passages else [0] * n
    with engine.keeping_unperturbed():
        scores, _ = coarse_to_fine(_group_scorer(lm, task, engine, multiplier, mode),
                                   source_groups(owners, block or n), n, share)
    return scores[:, 0].numpy()


def readout_full_top(lm: LoadedModel, task: CitationTask, top: int = 5, *, multiplier: float = 0.0,
                     mode: str = "log-additive", base: Callable[[Engine], np.ndarray] | None = None) -> np.ndarray:
    """Readout scores for every source, then the ``top`` highest re-scored with full suppression (every
    position after the source loses it, the paper's AtMan); one unperturbed pass serves both.

    ``base(engine)`` gives the first scores (default: per-source readout suppression)."""
    n = len(task.sources)
    engine = Engine(lm.model, suppression=Suppression(mode=mode))
    with engine.keeping_unperturbed():
        if base is None:
            scores = _group_scorer(lm, task, engine, multiplier, mode)([[s] for s in range(n)])[:, 0].numpy()
        else:
            scores = np.asarray(base(engine), dtype=np.float64).copy()
        chosen = [int(s) for s in top_sources(scores, min(top, n))]
        full = _group_scorer(lm, task, engine, multiplier, mode, full=True)([[s] for s in chosen])[:, 0].numpy()
    scores = scores.astype(np.float64)
    scores[chosen] = full
    return scores


def passage_ends(lay: Layout, owners: Sequence[int]) -> list[int]:
    """For each source, the token position where its passage ends: the first token of the next passage's
    first source, or the start of the tail after the last passage."""
    first: dict[int, int] = {}
    for s, p in enumerate(owners):
        first.setdefault(p, min(lay.source_positions[s]))
    order = sorted(first)
    after = {p: (first[order[i + 1]] if i + 1 < len(order) else lay.tail_start) for i, p in enumerate(order)}
    return [after[p] for p in owners]


def readout_local_top(lm: LoadedModel, task: CitationTask, top: int = 5, *, multiplier: float = 0.0) -> np.ndarray:
    """Per-source readout scores, then the ``top`` highest re-scored with the rest of their passage losing
    them too (:meth:`atman.readout.ReadoutPass.local_losses`); the context is encoded once."""
    lay = layout(lm.tokenizer, task)
    n, n_response = len(task.sources), len(lay.input_ids) - lay.response_start
    readout = ReadoutPass(lm.model, lay.input_ids, lay.tail_start, n_response)
    rows = torch.ones(n + 1, len(lay.input_ids))
    for s, positions in enumerate(lay.source_positions):
        rows[s + 1, list(positions)] = multiplier
    losses = readout.losses(rows).double()
    scores = (losses[1:] - losses[0]).sum(dim=1).numpy()
    ends = passage_ends(lay, passages_of(task.sources))
    for s in top_sources(scores, min(top, n)):
        local = readout.local_losses(lay.source_positions[s], ends[s], multiplier).double()
        scores[s] = float((local - losses[0]).sum())
    return scores


def readout_surrogate(lm: LoadedModel, task: CitationTask, n_masks: int = 64, *, multiplier: float = 0.0,
                      keep: float = 0.5, with_singles: bool = False, seed: int = MASK_SEED,
                      engine: Engine | None = None) -> np.ndarray:
    """Random groups of sources suppressed for the tail's queries (readout suppression, so a mask costs
    only the tail) and ContextCite's linear surrogate fitted to the response's logit-probability
    (:func:`atman.readout.mask_scores`). ``with_singles`` adds the per-source rows to the fit."""

    def logprobs(keeps: np.ndarray) -> np.ndarray:
        return readout_logprobs(lm, task, np.where(keeps, 1.0, multiplier), engine=engine)

    n_tokens = len(response_token_ids(lm.tokenizer, task))
    return mask_scores(logprobs, len(task.sources), [range(n_tokens)], masks=n_masks, keep=keep, seed=seed,
                       singles=with_singles)[:, 0]
