"""The engine under every explainer: rows of attention multipliers in, one output per row out.

Every AtMan client (causal-LM text, sequence classifiers, embedding similarity, image classifiers,
vision-language models, citation, steering, the server) says only what its units are and what its
output is; it builds multiplier rows (:mod:`atman.rows`) and hands them to an :class:`Engine`, which
owns the forward passes and nothing else:

* :meth:`Engine.target_losses` — teacher-forced cross-entropy of the target tokens at the end of a
  sequence, per row. The ``cached`` path runs the unperturbed pass once, keeps its keys and values,
  and recomputes each row only from its first damped position on a shared-prefix cache
  (:mod:`atman.prefix_cache`; exact: earlier positions cannot see a damped key in a causal model);
  only the target positions' logits are computed.
* :meth:`Engine.logprobs` — the log-probability of each target token (and whether it is the greedy
  choice) under one row: what scoring a continuation, evaluating a completion and steering read.
* :meth:`Engine.outputs` — any output of a full forward pass, per row (encoders, image classifiers).

All batch the rows within a memory budget (:mod:`atman.budget`) and a token budget, halve a batch
that runs out of device memory, report progress after every batch and stop when the progress
callback raises (that is how callers cancel). :func:`target_logprobs` is the one place that turns
logits into the log-probabilities of chosen tokens. Rows come from :mod:`atman.rows`, the shared
prefix from :mod:`atman.prefix_cache`, the batches of the cached path from :mod:`atman.schedule`.

The engine is kept together because its three paths (cached, naive, full outputs) share one run's
state: the budgets, the pieces a long pass is cut into, the unperturbed pass kept between calls, the
halving of a batch that runs out of memory and the progress calls that cancel it.

Example::

    >>> engine = Engine(lm.model)  # doctest: +SKIP
    >>> rows = suppression_rows(len(ids), [[3], [4, 5]], multiplier=0.1)  # doctest: +SKIP
    >>> engine.target_losses({"input_ids": torch.tensor([ids])}, torch.tensor(ids[-2:]), rows).shape  # doctest: +SKIP
    torch.Size([3, 2])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .budget import PLAIN, MemoryModel, default_budget, parse_memory, release_freed_memory
from .defaults import DEFAULT_KAPPA, DEFAULT_MULTIPLIER, ENGINES
from .errors import AtmanError
from .manipulation import manipulate
from .prefix_cache import SharedPrefix
from .rows import Suppression, refuse_factor
from .schedule import CPU_CALL_OVERHEAD, GPU_CALL_OVERHEAD, batch_groups

# token-forwards per batch: enough to keep the CPU's cores busy; a GPU wants far more rows
CPU_TOKEN_BUDGET = 8192
GPU_TOKEN_BUDGET = 131072
# the naive engine computes logits at every position (as the paper's code did): keep its batches small
NAIVE_TOKEN_BUDGET = 2048
Progress = Callable[[int, int], None]
__all__ = ["BatchRecord", "Engine", "EngineClient", "TokenLogprobs", "forward_options", "repeat_inputs",
           "target_logprobs"]


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(``targets[..., i]``) from the logits ``logits[..., i, :]`` that predict it, in float32 on the
    logits' device: the one reader of chosen tokens' log-probabilities.

    >>> target_logprobs(torch.zeros(2, 4), torch.tensor([1, 3])).tolist() == [-1.3862943649291992] * 2
    True
    """
    if logits.shape[:-1] != targets.shape:
        raise AtmanError(f"{tuple(logits.shape[:-1])} logits for {tuple(targets.shape)} target tokens")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets.to(logprobs.device).long()[..., None])[..., 0]


@dataclass(frozen=True)
class TokenLogprobs:
    """Per target token: its log-probability (``chosen``) and whether it is the model's greedy choice."""

    chosen: torch.Tensor
    greedy: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> TokenLogprobs:
        """From the logits (..., n, vocabulary) that predict ``targets`` (..., n); on the CPU."""
        chosen = target_logprobs(logits, targets)
        greedy = logits.argmax(dim=-1) == targets.to(logits.device)
        return cls(chosen=chosen.cpu(), greedy=greedy.cpu())


def forward_options(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether ``model.forward`` takes ``logits_to_keep``, and the name of its cache argument
    (transformers renamed ``past_key_values`` to ``cache`` in its 5.x series)."""
    forward = inspect.signature(model.forward).parameters
    return "logits_to_keep" in forward, "cache" if "cache" in forward else "past_key_values"


OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if cls
)


@dataclass(frozen=True)
class BatchRecord:
    """One forward pass the engine ran: batch rows, recomputed positions, positions reused from the
    unperturbed pass, and the memory budget it ran under (bytes)."""

    rows: int
    queries: int
    reused: int
    budget: int


class Engine:
    """Forward passes of multiplier rows through one model, batched within a memory budget.

    ``batch_size`` fixes the rows per forward pass (default: as many as the budgets allow;
    ``token_budget`` caps rows x recomputed positions per pass);
    ``max_memory``: bytes, a size such as ``"2GB"``, or ``"plain"`` (what one plain forward pass of
    the input needs); default a quarter of free RAM on a CPU, a few plain passes on a GPU.
    ``piece_tokens``: the most token-forwards :meth:`target_losses` runs between two calls of its
    progress callback (default: no limit beyond the batches). A longer pass — the unperturbed pass
    of a long prompt, or rows recomputing a long suffix — is cut into pieces that continue each
    other's cache (the same attention, up to float rounding), so that a caller who cancels by
    raising from the callback (a deadline, a client gone) is obeyed within one piece.
    :func:`atman.budget.piece_tokens_for` picks the number for a time between checks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        suppression: Suppression | None = None,
        batch_size: int | None = None,
        max_memory: int | str | None = None,
        engine: str = "cached",
        token_budget: int | None = None,
        piece_tokens: int | None = None,
    ) -> None:
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise AtmanError(f"batch_size must be at least 1, got {batch_size}")
        if piece_tokens is not None and (isinstance(piece_tokens, bool) or piece_tokens < 1):
            raise AtmanError(f"piece_tokens must be at least 1, got {piece_tokens}")
        if engine not in ENGINES:
            raise AtmanError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        self.model = model
        self.suppression = suppression or Suppression()
        self.batch_size = batch_size
        self.max_memory = parse_memory(max_memory) if max_memory is not None else None
        self.kind = engine
        self.tokens_per_batch = token_budget
        self.piece_tokens = piece_tokens
        self.logits_to_keep, self.cache_argument = forward_options(model)
        self.memory = MemoryModel(model)
        # what the engine has run so far: forward passes and token-forwards (rows x recomputed
        # positions); with ``trace`` set to a list, one BatchRecord per forward pass is appended
        self.forward_calls = 0
        self.token_forwards = 0
        self.trace: list[BatchRecord] | None = None
        # inside keeping_unperturbed(): the last input's unperturbed losses and keys/values
        self._kept: list[_Kept] | None = None

    @contextmanager
    def keeping_unperturbed(self) -> Iterator[None]:
        """Within this block the cached engine runs the unperturbed pass of an input once: later calls
        of :meth:`target_losses` on the same inputs and targets (a coarse-to-fine second stage) reuse its
        losses and keys/values. They are held until the block ends (the memory of one KV cache)."""
        outer = self._kept
        if outer is None:
            self._kept = []
        try:
            yield
        finally:
            if outer is None:
                self._kept = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def budget(self, length: int) -> int:
        """Bytes a batch may use for a sequence of ``length`` tokens."""
        if self.max_memory == PLAIN:
            return self.memory.plain_forward(length)
        return self.max_memory or default_budget(self.device, self.memory, length)

    def token_budget(self) -> int:
        """Rows x recomputed positions per forward pass: the one given, else a CPU's or a GPU's default."""
        if self.tokens_per_batch is not None:
            return self.tokens_per_batch
        return GPU_TOKEN_BUDGET if self.device.type == "cuda" else CPU_TOKEN_BUDGET

    def target_losses(
        self,
        inputs: Mapping[str, torch.Tensor],
        targets: torch.Tensor,
        rows: torch.Tensor,
        *,
        mode: str | None = None,
        engine: str | None = None,
        readout_from: int | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of each of the last ``len(targets)`` tokens (columns) under each row (rows).

        ``inputs``: the model's sequence inputs for one sequence — ``input_ids`` (1, L) or
        ``inputs_embeds`` (1, L, H), plus any other (1, L, ...) per-position tensors; for the naive
        engine any other model input too (repeated for every row). ``rows``: (rows, L) multipliers.
        ``engine="cached"`` needs row 0 untouched. ``readout_from`` p: positions before p are always
        computed unperturbed (their keys and values come from the unperturbed pass) and only the
        queries from p on see the multipliers — the attention of the readout to the units, not of
        the rest of the context (cached engine only).
        """
        run = _Run(self, inputs, targets, rows, mode or self.suppression.mode, progress)
        engine = engine or self.kind
        if engine not in ENGINES:
            raise AtmanError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if readout_from is not None and engine != "cached":
            raise AtmanError("readout_from needs the cached engine")
        with torch.no_grad():
            if engine == "naive":
                return run.naive()
            return run.cached(readout_from)

    def logprobs(
        self,
        inputs: Mapping[str, torch.Tensor],
        targets: torch.Tensor,
        row: torch.Tensor | None = None,
        *,
        mode: str | None = None,
    ) -> TokenLogprobs:
        """Log-probability of each of the last ``len(targets)`` tokens of ``inputs`` (teacher forced), and
        whether each is the greedy choice, in one forward pass under ``row`` (one multiplier per key
        position; None = the model itself). ``inputs`` are the model's inputs for one sequence, as for
        :meth:`target_losses` (any other model input, such as pixel values, goes along)."""
        sequence = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if sequence is None:
            raise AtmanError("logprobs needs input_ids or inputs_embeds")
        length = int(sequence.shape[1])
        rows = torch.ones(1, length) if row is None else row.reshape(1, -1).float()
        run = _Run(self, inputs, targets, rows, mode or self.suppression.mode, None)
        with torch.no_grad():
            logits = run.forward(run.inputs, rows, run.n_target + 1)
        return TokenLogprobs.from_logits(logits[0, :-1], run.targets)

    def reuses_prefix_exactly(self, inputs: Mapping[str, torch.Tensor], targets: torch.Tensor,
                              reference: torch.Tensor, split: int, tolerance: float = 1e-4) -> bool:
        """Whether running ``inputs`` in two pieces, the second on the first's cache, reproduces
        ``reference`` (the model's own loss of each target token) within ``tolerance`` (relative).

        The cached engine is exact only for models in which a position never depends on later ones
        and positions follow from the cache length; a model with bidirectional spans (image blocks,
        prefix-LM prompts) or positions computed from more than the sequence fails this check. Inside
        :meth:`keeping_unperturbed`, a pass that passes is kept as the unperturbed pass of these inputs,
        so the rows that follow do not run it again.
        """
        run = _Run(self, inputs, targets, torch.ones(1, next(iter(inputs.values())).shape[1]),
                   self.suppression.mode, None)
        if not 0 < split < run.length - run.n_target:
            raise AtmanError(f"split must lie inside the prompt (1..{run.length - run.n_target - 1}), got {split}")
        cache = DynamicCache()
        with torch.no_grad():
            head = {k: v[:, :split] for k, v in run.sequence.items()}
            run.forward(head, run.rows[:, :split], 1, cache=cache)
            logits = run.forward(run.sliced(split, 1), run.rows, run.n_target + 1, cache=cache)
        losses = run.nll(logits[:, :-1], 0)[0]
        reference = reference.reshape(-1).cpu()
        exact = bool(((losses - reference).abs() <= tolerance * (1.0 + reference.abs())).all())
        if exact:
            run.keep(losses, cache)
        return exact

    def outputs(
        self,
        inputs: Mapping[str, torch.Tensor],
        rows: torch.Tensor,
        head: Callable[[object], torch.Tensor],
        *,
        mode: str | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """``head(model output)`` of a full forward pass under every row, concatenated over batches.

        ``inputs`` are the model's inputs for one example (batch of one); every tensor is repeated
        along dim 0 for the rows of a batch (per-image tensors are stacked in batch order by every
        processor we know). ``head`` returns one (batch rows, ...) tensor per batch. Batches keep
        within ``batch_size``, the token budget and ``max_memory``.
        """
        length = rows.shape[1]
        run = _Run(self, inputs, None, rows, mode or self.suppression.mode, progress)
        out: list[torch.Tensor | None] = [None] * rows.shape[0]

        def one(batch: list[int]) -> None:
            self._record(len(batch), length, 0, run.budget)
            with manipulate(rows[batch].to(self.device), mode=run.mode, backend=self.suppression.backend):
                result = head(self.model(**repeat_inputs(run.inputs, len(batch)))).float().cpu()
            for k, r in enumerate(batch):
                out[r] = result[k]
            run.tick(len(batch))

        with torch.no_grad():
            run.in_batches(run.even_batches(self.token_budget(), logits=1), one)
        return torch.stack(out)  # type: ignore[arg-type]

    def _record(self, rows: int, queries: int, reused: int, budget: int) -> None:
        """Count one forward pass (and trace it when tracing)."""
        self.forward_calls += 1
        self.token_forwards += rows * queries
        if self.trace is not None:
            self.trace.append(BatchRecord(int(rows), int(queries), int(reused), int(budget)))


class EngineClient:
    """What every explainer holds: one :class:`Suppression` setting and the :class:`Engine` that runs
    its rows. Subclasses say what their units and their score are.

    ``multiplier``, ``kappa``, ``mode``, ``backend`` build the setting (or pass ``suppression``);
    ``batch_size``, ``max_memory``, ``engine`` ("cached" or "naive") and ``piece_tokens`` configure the
    engine.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        multiplier: float = DEFAULT_MULTIPLIER,
        kappa: float | None = DEFAULT_KAPPA,
        mode: str = "log-additive",
        backend: str = "sdpa",
        batch_size: int | None = None,
        max_memory: int | str | None = None,
        engine: str = "cached",
        suppression: Suppression | None = None,
        piece_tokens: int | None = None,
        factor: None = None,
    ) -> None:
        refuse_factor(factor)
        self.suppression = suppression or Suppression(multiplier=multiplier, kappa=kappa, mode=mode, backend=backend)
        self.engine = Engine(model, suppression=self.suppression, batch_size=batch_size, max_memory=max_memory,
                             engine=engine, piece_tokens=piece_tokens)

    @property
    def multiplier(self) -> float:
        return self.suppression.multiplier

    @property
    def kappa(self) -> float | None:
        return self.suppression.kappa

    @property
    def mode(self) -> str:
        return self.suppression.mode


def repeat_inputs(inputs: Mapping[str, object], count: int) -> dict[str, object]:
    """One example's model inputs repeated ``count`` times along the batch dimension."""
    return {k: torch.cat([v] * count) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@dataclass(frozen=True)
class _Kept:
    """An unperturbed pass kept by :meth:`Engine.keeping_unperturbed`."""

    sequence: dict[str, torch.Tensor]
    targets: torch.Tensor
    losses: torch.Tensor
    prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...]


class _Run:
    """The forward passes of one call, batched within the budgets."""

    def __init__(self, engine: Engine, inputs: Mapping[str, torch.Tensor], targets: torch.Tensor | None,
                 rows: torch.Tensor, mode: str, progress: Progress | None) -> None:
        if rows.ndim != 2 or rows.shape[0] < 1:
            raise AtmanError(f"multiplier rows must be 2-D with at least one row, got shape {tuple(rows.shape)}")
        Suppression(mode=mode, backend=engine.suppression.backend)
        self.engine = engine
        self.model = engine.model
        device = engine.device
        self.inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        self.rows = rows
        self.length = rows.shape[1]
        self.mode = mode
        self.progress = progress
        self.done = 0
        self.budget = engine.budget(self.length)
        if targets is not None:
            self.targets = targets.to(device).long().reshape(-1)
            self.n_target = int(self.targets.shape[0])
            if not 0 < self.n_target < self.length:
                raise AtmanError(f"{self.n_target} target tokens for a sequence of {self.length}")
            self.sequence = {k: v for k, v in self.inputs.items()
                             if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[1] == self.length}
            if not self.sequence:
                raise AtmanError(f"no sequence input of length {self.length} (input_ids or inputs_embeds)")

    def recall(self) -> _Kept | None:
        """The unperturbed pass of these very inputs and targets, if the engine keeps one."""
        for kept in self.engine._kept or ():
            if (kept.targets.shape == self.targets.shape and torch.equal(kept.targets, self.targets)
                    and kept.sequence.keys() == self.sequence.keys()
                    and all(kept.sequence[k].shape == v.shape and torch.equal(kept.sequence[k], v)
                            for k, v in self.sequence.items())):
                return kept
        return None

    def tick(self, rows: int) -> None:
        self.done += rows
        if self.progress is not None:
            self.progress(self.done, self.rows.shape[0])

    def split_on_oom(self, rows: list[int], run: Callable[[list[int]], None]) -> None:
        """Run ``rows`` as one batch; if the device runs out of memory, in two halves."""
        try:
            run(rows)
        except OOM_ERRORS:
            if len(rows) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(rows) // 2
            self.split_on_oom(rows[:half], run)
            self.split_on_oom(rows[half:], run)

    def fits(self, count: int, start: int, logits: int, token_budget: int, held: int = 0) -> bool:
        """May ``count`` rows recomputing positions ``start``.. run as one batch, beside ``held`` bytes?"""
        if self.engine.batch_size is not None:
            return count <= self.engine.batch_size
        queries = self.length - start
        return (count * queries <= token_budget
                and held + self.engine.memory.batch(count, queries, self.length, logits) <= self.budget)

    def nll(self, logits: torch.Tensor, first_target: int) -> torch.Tensor:
        """Negative log-likelihood of target tokens ``first_target``.. from the logits predicting them."""
        targets = self.targets[first_target:].expand(logits.shape[0], -1)
        return -target_logprobs(logits, targets).cpu()

    def sliced(self, start: int, count: int, stop: int | None = None) -> dict[str, torch.Tensor]:
        """The sequence inputs of positions ``start``..``stop`` (default: the end), for ``count`` rows
        (views, not copies)."""
        return {k: v[:, start:stop].expand(count, *([-1] * (v.ndim - 1))) for k, v in self.sequence.items()}

    def piece(self, count: int) -> int:
        """Positions per forward call for a batch of ``count`` rows (the whole sequence without a piece limit)."""
        limit = self.engine.piece_tokens
        return self.length if limit is None else max(1, limit // max(count, 1))

    def pieced(self, count: int, start: int) -> bool:
        """Whether ``count`` rows recomputing positions ``start``.. run in more than one piece."""
        return self.piece(count) < self.length - start

    def check(self) -> None:
        """Let the progress callback stop the work between two pieces of one pass."""
        if self.progress is not None:
            self.progress(self.done, self.rows.shape[0])

    def forward_pieces(self, start: int, multipliers: torch.Tensor, keep: int, cache=None) -> torch.Tensor:
        """Logits of the last ``keep`` positions of the sequence, recomputed from ``start`` for the rows of
        ``multipliers``, in pieces of at most ``piece_tokens`` token-forwards that continue ``cache``
        (which must then grow: a DynamicCache, or a SharedPrefix made with ``grow=True``)."""
        count = multipliers.shape[0]
        size = self.piece(count)
        if size >= self.length - start:
            return self.forward(self.sliced(start, count), multipliers, keep, cache=cache)
        if cache is None:
            cache = DynamicCache()
        first_kept = self.length - keep
        parts = []
        for begin in range(start, self.length, size):
            stop = min(begin + size, self.length)
            kept = stop - max(begin, first_kept) if stop > first_kept else 0
            logits = self.forward(self.sliced(begin, count, stop), multipliers[:, :stop], max(kept, 1), cache=cache)
            if kept:
                parts.append(logits[:, -kept:])
            if stop < self.length:
                self.check()
        return torch.cat(parts, dim=1)

    def forward(self, inputs: dict, multipliers: torch.Tensor, keep: int, cache=None) -> torch.Tensor:
        """Logits of the last ``keep`` positions of ``inputs`` under ``multipliers``."""
        first = next(v for v in inputs.values() if isinstance(v, torch.Tensor))
        queries = first.shape[1]
        reused = cache.get_seq_length() if cache is not None else 0
        self.engine._record(first.shape[0], queries, reused, self.budget)
        extra = {"logits_to_keep": keep} if self.engine.logits_to_keep and keep < queries else {}
        if cache is not None:
            extra.update({self.engine.cache_argument: cache, "use_cache": True})
        else:
            extra["use_cache"] = False
        prefix = cache if isinstance(cache, SharedPrefix) else None
        with manipulate(multipliers.to(self.engine.device), mode=self.mode,
                        backend=self.engine.suppression.backend, prefix=prefix):
            logits = self.model(**inputs, **extra).logits
        return logits[:, -keep:]

    def in_batches(self, groups: list[list[int]], run: Callable[[list[int]], None]) -> None:
        """Run each group of rows as one batch (halved on running out of memory), freeing memory after each."""
        for group in groups:
            self.split_on_oom(group, run)
            release_freed_memory(self.engine.device)

    def even_batches(self, token_budget: int, logits: int) -> list[list[int]]:
        """Consecutive rows in batches of the largest size that fits whole-sequence passes."""
        total = self.rows.shape[0]
        size = 1
        while size < total and self.fits(size + 1, 0, logits, token_budget):
            size += 1
        return [list(range(first, min(first + size, total))) for first in range(0, total, size)]

    def keep(self, losses: torch.Tensor, cache: DynamicCache) -> None:
        """Hold this unperturbed pass (losses, keys and values) while the engine keeps one."""
        if self.engine._kept is not None:
            prefix = tuple((layer.keys, layer.values) for layer in cache.layers)
            self.engine._kept[:] = [_Kept(self.sequence, self.targets, losses.clone(), prefix)]

    def naive(self) -> torch.Tensor:
        """Every row recomputes the whole sequence with logits at every position, as the paper's code did.

        This is the yardstick of the cached engine's speed (``atman explain --engine naive``,
        benchmarks/speed.py): keep its cost the paper's, or every ratio measured against it changes meaning.
        """
        out = torch.empty(self.rows.shape[0], self.n_target)

        def run(batch: list[int]) -> None:
            inputs = repeat_inputs(self.inputs, len(batch))
            logits = self.forward(inputs, self.rows[batch], self.length)
            out[batch] = self.nll(logits[:, -(self.n_target + 1):-1], 0)
            self.tick(len(batch))

        self.in_batches(self.even_batches(NAIVE_TOKEN_BUDGET, self.length), run)
        return out

    def cached(self, readout_from: int | None) -> torch.Tensor:
        """Row 0 must be untouched; its keys and values serve every other row's prefix."""
        rows = self.rows
        if not bool((rows[0] == 1).all()):
            raise AtmanError("the cached engine needs the unperturbed pass as row 0")
        if readout_from is not None and not 0 <= readout_from <= self.length - self.n_target:
            raise AtmanError(f"readout_from must lie in [0, {self.length - self.n_target}], got {readout_from}")
        first_prediction = self.length - self.n_target - 1
        out = torch.empty(rows.shape[0], self.n_target)
        kept = self.recall()
        if kept is not None:
            out[0] = kept.losses
            prefix = list(kept.prefix)
        else:
            cache = DynamicCache()
            logits = self.forward_pieces(0, rows[:1], self.n_target + 1, cache)
            out[0] = self.nll(logits[:, :-1], 0)[0]
            prefix = [(layer.keys, layer.values) for layer in cache.layers]
            self.keep(out[0], cache)
            del cache
        self.tick(1)
        # batches run latest start first, so the kept prefix only ever shrinks: it is cut to the
        # current batch's start, and the memory of the positions no later batch needs is freed
        damped = rows[1:] != 1
        # a row with nothing damped is the unperturbed pass; it starts "after the end"
        starts = torch.where(damped.any(dim=1), damped.int().argmax(dim=1), self.length)
        if readout_from is not None:
            starts = torch.where(starts < self.length, starts.clamp(min=readout_from), starts)
        starts_list = starts.tolist()

        def run(group: list[int]) -> None:
            batch = [r + 1 for r in group]
            start = min(starts_list[r] for r in group)
            if start >= self.length:
                out[batch] = out[0].clone()
                self.tick(len(batch))
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
            batch_cache = SharedPrefix(prefix, start, grow=self.pieced(len(batch), start)) if start > 0 else None
            logits = self.forward_pieces(start, rows[batch], self.length - begin, batch_cache)
            first_target = begin - first_prediction
            out[batch, :first_target] = out[0, :first_target].clone()
            out[batch, first_target:] = self.nll(logits[:, :-1], first_target)
            self.tick(len(batch))

        def fits(count: int, start: int) -> bool:
            # while this batch runs, the unperturbed keys/values before ``start`` are held, and a batch
            # run in pieces keeps its rows' own keys and values from one piece to the next
            if self.engine.piece_tokens is not None and count > self.engine.piece_tokens:
                return False
            held = self.engine.memory.cache(start)
            if self.pieced(count, start):
                held += count * self.engine.memory.cache(self.length - start)
            return self.fits(count, start, self.n_target + 1, self.engine.token_budget(), held)

        overhead = GPU_CALL_OVERHEAD if self.engine.device.type == "cuda" else CPU_CALL_OVERHEAD
        self.in_batches(batch_groups(starts_list, self.length, fits, overhead), run)
        return out
