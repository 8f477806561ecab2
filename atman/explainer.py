"""The AtMan algorithm: one unperturbed pass, one perturbed pass per unit, scores from the losses.

Relevance of unit u for target token t = CE_t(u suppressed) - CE_t(unperturbed), where CE_t is the
cross-entropy of target token t under teacher forcing. Positive = suppressing u makes the target
less likely = evidence. Perturbations are batched, one per batch row, all through the primitive in
:mod:`atman.manipulation`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from .budget import PLAIN, MemoryModel, default_budget, parse_memory, release_freed_memory
from .errors import AtmanError, ContextLengthError, EmptyInputError, GranularityError
from .explanation import POSTPROCESSING, Explanation, Item, TargetExplanation, TargetSpan
from .manipulation import BACKENDS, MODES, manipulate
from .models import LoadedModel
from .units import (
    TARGET_GRANULARITIES,
    EncodedInput,
    Unit,
    choose_granularity,
    encode,
    prompt_units,
    target_units,
)

DEFAULT_FACTOR = 0.9
# conceptual suppression is off by default: on the context-QA check it lowered sentence top-1 from
# 100 % to 90 % (docs/defaults.md). CONCEPTUAL_KAPPA is the threshold used when it is switched on.
DEFAULT_KAPPA: float | None = None
CONCEPTUAL_KAPPA = 0.7
# token-forwards per batch: enough to keep the CPU's cores busy; a GPU wants far more rows
DEFAULT_TOKEN_BUDGET = 8192
GPU_TOKEN_BUDGET = 131072
ENGINES = ("cached", "naive")
# the naive engine computes logits at every position (as the paper's code did): keep its batches small
NAIVE_TOKEN_BUDGET = 2048
# fixed cost of one forward call, in token-forwards (measured: ~60 ms of a 1.7 ms/token CPU pass)
CPU_CALL_OVERHEAD = 32
GPU_CALL_OVERHEAD = 1024
MAX_GROUP_ROWS = 512
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Plan:
    """What one explanation computes: the encoded input, its units and one multiplier row per unit."""

    encoded: EncodedInput
    units: list[Unit]
    multipliers: torch.Tensor
    granularity: str


class Explainer:
    """Explains a causal LM's target continuation with AtMan.

    Example::

        >>> explainer = Explainer(load_model())
        >>> exp = explainer.explain("Ada lives in Oslo. Where does Ada live? Ada lives in", " Oslo",
        ...                         granularity="sentence")
        >>> exp.top(1)[0].text
        'Ada lives in Oslo.'
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        factor: float = DEFAULT_FACTOR,
        kappa: float | None = DEFAULT_KAPPA,
        mode: str = "log-additive",
        backend: str = "sdpa",
        batch_size: int | None = None,
        engine: str = "cached",
        max_memory: int | str | None = None,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise AtmanError(f"batch_size must be at least 1, got {batch_size}")
        if engine not in ENGINES:
            raise AtmanError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        _check_options(factor, kappa, mode, backend, "complete", "none")
        self.lm = model
        self.engine = engine
        self.max_memory = parse_memory(max_memory) if max_memory is not None else None
        self.factor = factor
        self.kappa = kappa
        self.mode = mode
        self.backend = backend
        self.batch_size = batch_size
        self._logits_to_keep, self._cache_argument = _forward_options(model.model)

    def explain(
        self,
        prompt: str,
        target: str | None = None,
        *,
        granularity: str = "auto",
        target_granularity: str = "complete",
        delimiter: str | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
        chat: bool = False,
        system: str | None = None,
        max_new_tokens: int = 32,
        factor: float | None = None,
        kappa: float | None | str = "default",
        mode: str | None = None,
        postprocessing: str = "none",
        normalize: bool = False,
        refine_from: str = "sentence",
        refine_top: int = 3,
        refine_share: float | None = None,
        progress: Progress | None = None,
    ) -> Explanation:
        """Explain ``target`` (or the model's greedy continuation when None) given ``prompt``.

        ``granularity``: auto | token | word | sentence | paragraph | delimiter (with ``delimiter``)
        | spans (with ``spans``, (start, end) character ranges of the prompt) | refine (coarse to
        fine: explain at ``refine_from`` granularity, then at token level inside the ``refine_top``
        most relevant units only; refined items are marked ``refined``; with ``refine_share`` s, only
        the fewest top units that hold at least s of the positive relevance, at most ``refine_top``
        of them). ``target_granularity``:
        complete (one explanation summed over the target) or token (one per target token).
        ``kappa=None`` switches conceptual suppression off.
        """
        if granularity == "auto" and delimiter:
            granularity = "delimiter"
        if granularity == "auto" and spans:
            granularity = "spans"
        factor = self.factor if factor is None else factor
        kappa = self.kappa if kappa == "default" else kappa
        mode = mode or self.mode
        _check_options(factor, kappa, mode, self.backend, target_granularity, postprocessing)
        generated = target is None
        if generated:
            target_ids = self.generate(prompt, chat=chat, system=system, max_new_tokens=max_new_tokens)
            encoded = encode(self.lm.tokenizer, prompt, target_ids, chat=chat, system=system)
        else:
            encoded = encode(self.lm.tokenizer, prompt, target, chat=chat, system=system)
        self._check_length(len(encoded.input_ids))
        settings: dict = {}
        refine = granularity == "refine"
        if refine:
            if refine_from not in ("sentence", "paragraph", "word", "delimiter", "spans"):
                raise GranularityError(f"refine_from must be a coarse text granularity, got {refine_from!r}")
            if refine_top < 1:
                raise GranularityError(f"refine_top must be at least 1, got {refine_top}")
            if refine_share is not None and not 0.0 < refine_share <= 1.0:
                raise GranularityError(f"refine_share must lie in (0, 1], got {refine_share}")
            settings.update(refine_from=refine_from, refine_top=refine_top)
            if refine_share is not None:
                settings["refine_share"] = refine_share
        plan = self.plan(encoded, refine_from if refine else granularity, target_granularity, factor, kappa,
                         delimiter, spans)
        losses = self.losses(encoded, plan.multipliers, mode=mode, progress=progress)
        delta = losses[1:] - losses[0:1]
        if refine:
            units, delta, refined = self._refine(plan, delta, refine_top, refine_share, factor, kappa, mode)
        else:
            units, refined = plan.units, set()
        explanation = _build(
            encoded, units, delta, refined, target_granularity,
            model=self.lm.name,
            settings={
                "granularity": "refine" if refine else plan.granularity,
                **settings,
                "target_granularity": target_granularity,
                "factor": factor,
                "kappa": kappa,
                "mode": mode,
                "chat": chat,
                "system": system,
                "generated_target": generated,
                "target_logprob": -float(losses[0].sum()),
            },
        )
        return explanation.postprocessed(postprocessing, normalize)

    def plan(
        self,
        encoded: EncodedInput,
        granularity: str = "auto",
        target_granularity: str = "complete",
        factor: float = DEFAULT_FACTOR,
        kappa: float | None = DEFAULT_KAPPA,
        delimiter: str | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> Plan:
        """Units and the multiplier rows that suppress them (row 0 is the unperturbed pass)."""
        resolved = choose_granularity(encoded) if granularity == "auto" else granularity
        units = prompt_units(encoded, resolved, delimiter=delimiter, spans=spans)
        if target_granularity == "token":
            units = units + target_units(encoded)
        return Plan(encoded=encoded, units=units, multipliers=self.multipliers(encoded, units, factor, kappa),
                    granularity=resolved)

    def multipliers(self, encoded: EncodedInput, units: list[Unit], factor: float, kappa: float | None) -> torch.Tensor:
        """Row 0 unperturbed, row u + 1 suppressing ``units[u]`` (and its conceptual neighbours)."""
        multipliers = torch.ones(len(units) + 1, len(encoded.input_ids))
        for row, unit in enumerate(units, start=1):
            multipliers[row, list(unit.positions)] = 1.0 - factor
        if kappa is not None:
            candidates = {pos for pos, span in enumerate(encoded.prompt_spans) if span is not None}
            candidates.update(u.positions[0] for u in target_units(encoded))
            _conceptual(self._embeddings(encoded), units, sorted(candidates), multipliers, factor, kappa)
        return multipliers

    def _refine(
        self, plan: Plan, coarse_delta: torch.Tensor, top: int, share: float | None, factor: float,
        kappa: float | None, mode: str,
    ) -> tuple[list[Unit], torch.Tensor, set[int]]:
        """Token-level scores inside the ``top`` coarse prompt units; the other units stay coarse."""
        totals = coarse_delta.sum(dim=1)
        prompt_rows = [i for i, unit in enumerate(plan.units) if unit.kind == "prompt"]
        chosen = sorted(prompt_rows, key=lambda i: float(totals[i]), reverse=True)[:top]
        if share is not None:
            chosen = _covering(chosen, [float(totals[i]) for i in chosen],
                               float(totals[prompt_rows].clamp(min=0).sum()), share)
        tokens = [unit for unit in prompt_units(plan.encoded, "token")
                  if any(unit.positions[0] in plan.units[i].positions for i in chosen)]
        fine = self.losses(plan.encoded, self.multipliers(plan.encoded, tokens, factor, kappa), mode=mode)
        fine_delta = fine[1:] - fine[0:1]
        entries = [(plan.units[i], coarse_delta[i], False) for i in range(len(plan.units)) if i not in chosen]
        entries += [(unit, fine_delta[j], True) for j, unit in enumerate(tokens)]
        entries.sort(key=lambda e: (e[0].kind != "prompt", e[0].start))
        units = [unit for unit, _, _ in entries]
        refined = {k for k, (_, _, fine_unit) in enumerate(entries) if fine_unit}
        return units, torch.stack([row for _, row, _ in entries]), refined

    def losses(
        self,
        encoded: EncodedInput,
        multipliers: torch.Tensor,
        *,
        mode: str | None = None,
        engine: str | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of every target token (columns) under every multiplier row (rows).

        ``engine="cached"`` reuses the unperturbed pass's keys and values for the positions before
        a row's first damped position and recomputes only the rest (exact); ``"naive"`` runs the
        full sequence for every row, as the paper's code did.
        """
        engine = engine or self.engine
        if engine not in ENGINES:
            raise AtmanError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        ids = torch.tensor([encoded.input_ids], device=self.lm.device)
        run = _Run(self, ids, len(encoded.input_ids) - encoded.target_start, mode or self.mode, progress,
                   multipliers.shape[0])
        with torch.no_grad():
            if engine == "naive":
                return run.naive(multipliers)
            return run.cached(multipliers)

    def generate(
        self, prompt: str, *, chat: bool = False, system: str | None = None, max_new_tokens: int = 32
    ) -> list[int]:
        """The model's greedy continuation of ``prompt`` as token ids (without end-of-sequence)."""
        if max_new_tokens < 1:
            raise AtmanError("max_new_tokens must be at least 1")
        tokenizer = self.lm.tokenizer
        probe = encode(tokenizer, prompt, [0], chat=chat, system=system)
        ids = list(probe.input_ids[:probe.target_start])
        self._check_length(len(ids) + max_new_tokens)
        input_ids = torch.tensor([ids], device=self.lm.device)
        eos = _eos_ids(self.lm)
        with torch.no_grad():
            out = self.lm.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=next(iter(eos), 0),
            )
        new = [int(t) for t in out[0, len(ids):]]
        while new and new[-1] in eos:
            new.pop()
        if not new:
            raise EmptyInputError("the model generated no text after this prompt, so there is nothing to explain")
        return new

    def _embeddings(self, encoded: EncodedInput) -> torch.Tensor:
        ids = torch.tensor([encoded.input_ids], device=self.lm.device)
        with torch.no_grad():
            return self.lm.model.get_input_embeddings()(ids)[0].float().cpu()

    def _check_length(self, length: int) -> None:
        limit = _context_length(self.lm.model.config)
        if limit is not None and length > limit:
            raise ContextLengthError(
                f"prompt and target are {length} tokens, longer than the model's context of {limit} tokens"
            )


_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if cls
)


class _Run:
    """The forward passes of one explanation, batched within the memory budget."""

    def __init__(self, explainer: Explainer, ids: torch.Tensor, n_target: int, mode: str,
                 progress: Progress | None, rows: int) -> None:
        self.explainer = explainer
        self.model = explainer.lm.model
        self.ids = ids
        self.length = ids.shape[1]
        self.n_target = n_target
        self.targets = ids[0, self.length - n_target:]
        self.mode = mode
        self.progress = progress
        self.rows = rows
        self.done = 0
        self.memory = MemoryModel(self.model)
        device = explainer.lm.device
        if explainer.max_memory == PLAIN:
            self.budget = self.memory.plain_forward(self.length)
        else:
            self.budget = explainer.max_memory or default_budget(device, self.memory, self.length)
        self.token_budget = GPU_TOKEN_BUDGET if device.type == "cuda" else DEFAULT_TOKEN_BUDGET

    def _fits(self, count: int, start: int, logits: int, token_budget: int, held: int = 0) -> bool:
        """May ``count`` rows recomputing positions ``start``.. run as one batch, beside ``held`` bytes?"""
        if self.explainer.batch_size is not None:
            return count <= self.explainer.batch_size
        queries = self.length - start
        return (count * queries <= token_budget
                and held + self.memory.batch(count, queries, self.length, logits) <= self.budget)

    def _tick(self, rows: int) -> None:
        self.done += rows
        if self.progress is not None:
            self.progress(self.done, self.rows)

    def _nll(self, logits: torch.Tensor, first_target: int) -> torch.Tensor:
        """Negative log-likelihood of target tokens ``first_target``.. from the logits predicting them."""
        targets = self.targets[first_target:].expand(logits.shape[0], -1)
        if logits.shape[1] != targets.shape[1]:
            raise RuntimeError(f"{logits.shape[1]} logits for {targets.shape[1]} target tokens")
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return -logprobs.gather(-1, targets[..., None])[..., 0].cpu()

    def _forward(self, input_ids: torch.Tensor, multipliers: torch.Tensor, keep: int, cache=None) -> torch.Tensor:
        """Logits of the last ``keep`` positions of ``input_ids`` under ``multipliers``."""
        extra = {"logits_to_keep": keep} if self.explainer._logits_to_keep and keep < input_ids.shape[1] else {}
        if cache is not None:
            extra.update({self.explainer._cache_argument: cache, "use_cache": True})
        else:
            extra["use_cache"] = False
        with manipulate(multipliers.to(input_ids.device), mode=self.mode, backend=self.explainer.backend):
            logits = self.model(input_ids=input_ids, **extra).logits
        return logits[:, -keep:]

    def _split_on_oom(self, rows: list[int], run: Callable[[list[int]], None]) -> None:
        """Run ``rows`` as one batch; if the device runs out of memory, in two halves."""
        try:
            run(rows)
        except _OOM_ERRORS:
            if len(rows) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(rows) // 2
            self._split_on_oom(rows[:half], run)
            self._split_on_oom(rows[half:], run)

    def naive(self, multipliers: torch.Tensor) -> torch.Tensor:
        out = torch.empty(multipliers.shape[0], self.n_target)

        def run(rows: list[int]) -> None:
            logits = self._forward(self.ids.expand(len(rows), -1), multipliers[rows], self.length)
            out[rows] = self._nll(logits[:, -(self.n_target + 1):-1], 0)
            self._tick(len(rows))

        # every row recomputes the whole sequence, so one batch size serves all batches
        total = multipliers.shape[0]
        size = 1
        while size < total and self._fits(size + 1, 0, self.length, NAIVE_TOKEN_BUDGET):
            size += 1
        for first in range(0, total, size):
            self._split_on_oom(list(range(first, min(first + size, total))), run)
            release_freed_memory(self.ids.device)
        return out

    def cached(self, multipliers: torch.Tensor) -> torch.Tensor:
        """Row 0 must be the unperturbed pass; its cache serves every other row's prefix."""
        if not bool((multipliers[0] == 1).all()):
            raise AtmanError("the cached engine needs the unperturbed pass as row 0")
        first_prediction = self.length - self.n_target - 1
        out = torch.empty(multipliers.shape[0], self.n_target)
        cache = DynamicCache()
        logits = self._forward(self.ids, multipliers[:1], self.n_target + 1, cache=cache)
        out[0] = self._nll(logits[:, :-1], 0)[0]
        self._tick(1)
        # batches run latest start first, so the kept prefix only ever shrinks: it is cut to the
        # current batch's start, and the memory of the positions no later batch needs is freed
        prefix = [(layer.keys, layer.values) for layer in cache.layers]
        del cache
        damped = multipliers[1:] != 1
        # a row with nothing damped is the unperturbed pass; it starts "after the end"
        starts = torch.where(damped.any(dim=1), damped.int().argmax(dim=1), self.length).tolist()

        def run(group: list[int]) -> None:
            rows = [r + 1 for r in group]
            start = min(starts[r] for r in group)
            if start >= self.length:
                out[rows] = out[0].clone()
                self._tick(len(rows))
                return
            kept = prefix[0][0].shape[-2] if prefix else 0
            if kept > start:
                for layer, (keys, values) in enumerate(prefix):
                    prefix[layer] = (keys[:, :, :start].clone(), values[:, :, :start].clone())
            # a retried half of a batch that ran out of memory may start later than what is kept:
            # recomputing from the kept length is exact too
            start = min(start, kept)
            # target predictions before ``start`` cannot see any damped key: they are the baseline's
            begin = max(start, first_prediction)
            batch_cache = _SharedPrefix(prefix, start) if start > 0 else None
            suffix = self.ids[:, start:].expand(len(rows), -1)
            logits = self._forward(suffix, multipliers[rows], self.length - begin, cache=batch_cache)
            first_target = begin - first_prediction
            out[rows, :first_target] = out[0, :first_target].clone()
            out[rows, first_target:] = self._nll(logits[:, :-1], first_target)
            self._tick(len(rows))

        def fits(count: int, start: int) -> bool:
            # while this batch runs, the unperturbed keys/values before ``start`` are held
            return self._fits(count, start, self.n_target + 1, self.token_budget, self.memory.cache(start))

        overhead = GPU_CALL_OVERHEAD if self.explainer.lm.device.type == "cuda" else CPU_CALL_OVERHEAD
        for group in _groups(starts, self.length, fits, overhead):
            self._split_on_oom(group, run)
            release_freed_memory(self.ids.device)
        return out


class _PrefixLayer(DynamicLayer):
    """One layer's unperturbed keys and values, shared by every row of a batch and never grown.

    Each call returns the prefix (broadcast, not copied, over the rows) joined to the rows' own new
    keys and values; nothing is stored, so a batch holds one layer's keys and values at a time.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows = key_states.shape[0]
        return (torch.cat([self.keys.expand(rows, -1, -1, -1), key_states], dim=-2),
                torch.cat([self.values.expand(rows, -1, -1, -1), value_states], dim=-2))


class _SharedPrefix(Cache):
    """A read-only cache: the first ``start`` positions of the unperturbed pass, for a whole batch."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]], start: int) -> None:
        super().__init__(layers=[_PrefixLayer(keys[:, :, :start], values[:, :, :start]) for keys, values in prefix])


def _groups(
    starts: list[int], length: int, fits: Callable[[int, int], bool], overhead: int = CPU_CALL_OVERHEAD
) -> list[list[int]]:
    """Rows in batches of similar first damped position, at the least total cost.

    A batch recomputes every row from its earliest start, so a batch of ``k`` rows whose earliest
    start is ``s`` costs ``overhead + k * (length - s)`` token-forwards; ``overhead`` is the fixed
    cost of one forward call in token-forwards. Sorted by start, the best split into consecutive
    batches that ``fits(rows, earliest start)`` allows is found by dynamic programming.
    """
    order = sorted(range(len(starts)), key=lambda r: -starts[r])
    begin = [min(starts[r], length - 1) for r in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n
    size = [0] * (n + 1)
    for j in range(1, n + 1):
        suffix = length - begin[j - 1]
        # the largest batch ending at row j that fits (fits is monotone in the number of rows)
        low, high = 1, min(j, MAX_GROUP_ROWS)
        while low < high:
            mid = (low + high + 1) // 2
            if fits(mid, begin[j - 1]):
                low = mid
            else:
                high = mid - 1
        for k in range(1, low + 1):
            cost = best[j - k] + overhead + k * suffix
            if cost < best[j]:
                best[j], size[j] = cost, k
    groups = []
    j = n
    while j > 0:
        groups.append(order[j - size[j]:j])
        j -= size[j]
    return groups[::-1]


def _covering(ranked: list[int], scores: list[float], positive_total: float, share: float) -> list[int]:
    """The shortest head of ``ranked`` whose scores sum to ``share`` of ``positive_total`` (at least one)."""
    held = 0.0
    for count, score in enumerate(scores, start=1):
        held += max(score, 0.0)
        if held >= share * positive_total:
            return ranked[:count]
    return ranked


def _forward_options(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether ``model.forward`` takes ``logits_to_keep``, and the name of its cache argument
    (transformers renamed ``past_key_values`` to ``cache`` in its 5.x series)."""
    forward = inspect.signature(model.forward).parameters
    return "logits_to_keep" in forward, "cache" if "cache" in forward else "past_key_values"


def _check_suppression(factor: float, mode: str, backend: str) -> None:
    """The options every AtMan explainer shares: suppression factor, variant and attention kernel."""
    if not 0.0 <= factor <= 1.0:
        raise AtmanError(f"factor must lie in [0, 1] (1 removes the unit), got {factor}")
    if mode not in MODES:
        raise AtmanError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if backend not in BACKENDS:
        raise AtmanError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _check_options(factor, kappa, mode, backend, target_granularity, postprocessing) -> None:
    _check_suppression(factor, mode, backend)
    if kappa is not None and not 0.0 < kappa <= 1.0:
        raise AtmanError(f"kappa must lie in (0, 1], got {kappa}")
    if target_granularity not in TARGET_GRANULARITIES:
        raise GranularityError(
            f"unknown target granularity {target_granularity!r}; choose one of {', '.join(TARGET_GRANULARITIES)}"
        )
    if postprocessing not in POSTPROCESSING:
        raise AtmanError(f"unknown postprocessing {postprocessing!r}; choose one of {', '.join(POSTPROCESSING)}")


def _conceptual(
    embeddings: torch.Tensor,
    units: list[Unit],
    candidates: list[int],
    multipliers: torch.Tensor,
    factor: float,
    kappa: float,
) -> None:
    """Also damp tokens similar to the suppressed unit: m_k = 1 - factor * cos(unit, k) if cos >= kappa.

    ``candidates`` are the prompt's explained tokens and the target tokens that later target tokens
    see; template and special tokens are never touched. A unit's similarity to k is the maximum
    over its tokens.
    """
    normed = torch.nn.functional.normalize(embeddings[candidates], dim=-1)
    similarity = normed @ normed.T
    index = {pos: i for i, pos in enumerate(candidates)}
    cand = torch.tensor(candidates)
    for row, unit in enumerate(units, start=1):
        sim = similarity[[index[p] for p in unit.positions]].amax(dim=0)
        sim[[index[p] for p in unit.positions]] = 0.0
        hit = sim >= kappa
        if bool(hit.any()):
            damped = (1.0 - factor * sim[hit]).clamp(min=0.0)
            positions = cand[hit]
            multipliers[row, positions] = torch.minimum(multipliers[row, positions], damped)


def _build(
    encoded: EncodedInput,
    units: list[Unit],
    delta: torch.Tensor,
    refined: set[int],
    target_granularity: str,
    *,
    model: str,
    settings: dict,
) -> Explanation:
    """Scores ``delta[unit, target token]`` as an Explanation; ``refined`` marks refined units."""
    delta = delta.double()
    prompt_idx = [i for i, u in enumerate(units) if u.kind == "prompt"]

    def item(i: int, score: float) -> Item:
        unit = units[i]
        return Item(kind=unit.kind, text=unit.text, start=unit.start, length=unit.length, score=score,
                    refined=i in refined)

    if target_granularity == "complete":
        totals = delta.sum(dim=1)
        items = tuple(item(i, float(totals[i])) for i in prompt_idx)
        spans = [TargetExplanation(TargetSpan(encoded.target, 0, len(encoded.target)), items)]
    else:
        spans = []
        target_idx = [i for i, u in enumerate(units) if u.kind == "target"]
        for t, (a, b) in enumerate(encoded.target_spans):
            items = [item(i, float(delta[i, t])) for i in prompt_idx]
            items += [item(i, float(delta[i, t])) for i in target_idx[:t]]
            spans.append(TargetExplanation(TargetSpan(encoded.target[a:b], a, b - a), tuple(items)))
    return Explanation(model=model, prompt=encoded.prompt, target=encoded.target,
                       explanations=tuple(spans), settings=settings)


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (lm.model.generation_config, lm.model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if lm.tokenizer.eos_token_id is not None:
        ids.add(int(lm.tokenizer.eos_token_id))
    return ids


def _context_length(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def explain(prompt: str, target: str | None = None, *, model: LoadedModel | None = None, **options) -> Explanation:
    """One-call explanation with the embedded default model (loaded once per process).

    Example::

        >>> explain("The capital of France is", " Paris", granularity="word").top(1)[0].text
        'capital'
    """
    from .models import load_model

    global _DEFAULT
    if model is None:
        if _DEFAULT is None:
            _DEFAULT = load_model()
        model = _DEFAULT
    explainer_keys = ("batch_size", "backend", "engine", "max_memory")
    explainer = Explainer(model, **{k: options.pop(k) for k in explainer_keys if k in options})
    return explainer.explain(prompt, target, **options)


_DEFAULT: LoadedModel | None = None
