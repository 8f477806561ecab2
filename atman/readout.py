"""Source scores from many readout rows at once: random multi-source masks and a sparse linear fit.

Readout suppression (:meth:`atman.engine.Engine.target_losses` with ``readout_from``) makes a row cheap:
the context is encoded once, and a row that hides any set of sources from the question and the response
costs only a pass over that tail. So a citation can afford many rows that each hide a random half of the
sources, and fit what ContextCite fits on its ablated contexts — a linear model of the response's
logit-probability in the 0/1 mask of kept sources (Cohen-Wang et al. 2024: standardised masks, LASSO)
— on these cheap rows instead of on whole forward passes of ablated contexts.

:func:`mask_scores` runs no model: it takes a function from keep-masks to the response tokens'
log-probabilities, so :class:`atman.Citer` and the evaluation harness hand it their own rows.
:class:`ReadoutPass` is readout suppression for one input on top of the engine's public pieces (the
manipulation and the shared-prefix cache): rows, and the gradient of the response's loss with respect to
the multipliers, which :func:`screened_scores` turns into a first-order score of every source at the cost
of about three tails, with exact rows for the few sources it ranks highest.

Example::

    >>> weights = np.array([2.0, 0.0, -1.0])
    >>> masks = random_masks(3, 64, seed=0)
    >>> fitted = linear_surrogate(masks, masks @ weights, n_tokens=1, alpha=1e-4)
    >>> np.round(fitted, 2).tolist()
    [2.0, 0.0, -1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from .engine import forward_options
from .errors import AtmanError
from .manipulation import manipulate
from .prefix_cache import SharedPrefix

# masks of the readout fit are drawn from these seeds on (ContextCite draws its own from 0, the
# evaluation's held-out masks from 1,000,000)
MASK_SEED = 2_000_000
# ContextCite's LASSO strength (context_cite/solver.py, LassoRegression(lasso_alpha=0.01))
LASSO_ALPHA = 0.01


def random_masks(n_sources: int, n: int, *, keep: float = 0.5, seed: int = MASK_SEED) -> np.ndarray:
    """``n`` random keep-masks (rows x sources), drawn as ContextCite draws its own: mask i from
    ``RandomState(seed + i).choice([False, True], p=[1 - keep, keep])``."""
    if not 0.0 < keep < 1.0:
        raise AtmanError(f"keep must lie in (0, 1), got {keep}")
    if n_sources < 1 or n < 1:
        raise AtmanError(f"need at least one source and one mask, got {n_sources} and {n}")
    return np.stack([np.random.RandomState(seed + i).choice([False, True], size=n_sources, p=[1 - keep, keep])
                     for i in range(n)])


def logit_prob(logprob: np.ndarray | float) -> np.ndarray:
    """log p / (1 - p) of a response from its summed token log-probabilities, as ContextCite's
    ``aggregate_logit_probs`` (``output_type="logit_prob"``) computes it."""
    lp = np.minimum(np.asarray(logprob, dtype=np.float64), -1e-12)
    return lp - np.log(-np.expm1(lp))


def lasso(x: np.ndarray, y: np.ndarray, alpha: float, *, iterations: int = 1000,
          tolerance: float = 1e-4) -> tuple[np.ndarray, float]:
    """Weights and intercept minimising ``||y - x w - b||^2 / (2 n) + alpha ||w||_1`` by cyclic coordinate
    descent: the objective and the stopping rule of scikit-learn's ``Lasso`` (which ContextCite uses),
    without the dependency."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    x_mean, y_mean = x.mean(axis=0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    squares = (xc ** 2).sum(axis=0)
    w = np.zeros(d)
    residual = yc.copy()
    threshold = alpha * n
    scale = tolerance * float(yc @ yc)
    for _ in range(iterations):
        largest_step, largest_weight = 0.0, 0.0
        for j in range(d):
            if squares[j] == 0.0:
                continue
            old = w[j]
            rho = float(xc[:, j] @ residual) + squares[j] * old
            new = np.sign(rho) * max(abs(rho) - threshold, 0.0) / squares[j]
            if new != old:
                residual -= xc[:, j] * (new - old)
                w[j] = new
            largest_step = max(largest_step, abs(new - old))
            largest_weight = max(largest_weight, abs(new))
        if largest_weight == 0.0 or largest_step / largest_weight < tolerance:
            # scikit-learn's final check: the duality gap, scaled by ||y||^2
            gap = _duality_gap(xc, yc, w, residual, alpha)
            if gap <= scale:
                break
    return w, float(y_mean - x_mean @ w)


def _duality_gap(x: np.ndarray, y: np.ndarray, w: np.ndarray, residual: np.ndarray, alpha: float) -> float:
    n = x.shape[0]
    correlation = np.abs(x.T @ residual).max(initial=0.0)
    bound = alpha * n
    const = bound / correlation if correlation > bound else 1.0
    r2 = float(residual @ residual)
    return 0.5 * r2 * (1 + const ** 2) + bound * float(np.abs(w).sum()) - const * float(residual @ y)


def linear_surrogate(masks: np.ndarray, outputs: np.ndarray, n_tokens: int, *, alpha: float = LASSO_ALPHA
                     ) -> np.ndarray:
    """One weight per source of a linear model of ``outputs`` (the response's logit-probability under each
    keep-mask), fitted as ContextCite fits it: masks standardised, LASSO on ``outputs / n_tokens``, the
    weights scaled back to one unit of a mask and multiplied by ``n_tokens``."""
    x = np.asarray(masks, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(outputs):
        raise AtmanError(f"need one output per mask, got masks {x.shape} and {len(outputs)} outputs")
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    weights, _ = lasso(x / scale, np.asarray(outputs, dtype=np.float64) / n_tokens, alpha)
    return weights / scale * n_tokens


def mask_scores(logprobs: Callable[[np.ndarray], np.ndarray], n_sources: int,
                spans: Sequence[Sequence[int]], *, masks: int = 256, keep: float = 0.5, seed: int = MASK_SEED,
                singles: bool = False, alpha: float = LASSO_ALPHA) -> np.ndarray:
    """Scores (sources x spans) from ``masks`` random keep-masks and, with ``singles``, one row per source
    with only that source hidden.

    ``logprobs(keep)`` returns the response tokens' log-probabilities (rows x tokens) with the sources
    where ``keep`` is False suppressed. For each span (a set of response-token indices) the linear
    surrogate of :func:`linear_surrogate` is fitted to the span's logit-probability: a source's score is
    how much keeping it raises that logit-probability, averaged over the contexts a random half of the
    other sources make.
    """
    keeps = random_masks(n_sources, masks, keep=keep, seed=seed)
    if singles:
        keeps = np.concatenate([keeps, ~np.eye(n_sources, dtype=bool)])
    token_logprobs = np.asarray(logprobs(keeps), dtype=np.float64)
    if token_logprobs.shape[0] != keeps.shape[0]:
        raise AtmanError(f"logprobs gave {token_logprobs.shape[0]} rows for {keeps.shape[0]} masks")
    out = np.zeros((n_sources, len(spans)))
    for k, tokens in enumerate(spans):
        tokens = list(tokens)
        outputs = logit_prob(token_logprobs[:, tokens].sum(axis=1))
        out[:, k] = linear_surrogate(keeps, outputs, len(tokens), alpha=alpha)
    return out


class ReadoutPass:
    """One prompt + target with its context encoded once, unperturbed, for readout rows on the tail only.

    The positions before ``readout_from`` are run once and their keys and values kept; :meth:`losses` runs
    the tail (``readout_from`` to the end) for rows of multipliers on every key, for the tail's queries only
    (what :meth:`atman.engine.Engine.target_losses` computes with ``readout_from``); :meth:`local_losses`
    also recomputes a stretch of the context; :func:`removal_estimates` runs the tail once with autograd
    on. Exact rows cost the tail each; the estimates cost about three tails, whatever the number of sources.

    Example::

        >>> readout = ReadoutPass(lm.model, ids, readout_from=200, n_target=12)   # doctest: +SKIP
        >>> rows = torch.ones(2, len(ids)); rows[1, 10:30] = 0.0                   # doctest: +SKIP
        >>> losses = readout.losses(rows); losses[1] - losses[0]                    # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, input_ids: Sequence[int], readout_from: int, n_target: int, *,
                 mode: str = "log-additive", token_budget: int = 2048) -> None:
        length = len(input_ids)
        if not 0 < readout_from < length - n_target or n_target < 1:
            raise AtmanError(f"need 0 < readout_from < {length - n_target} (the position predicting the first "
                             f"target token) and a target, got readout_from={readout_from}, {n_target} tokens")
        self.model = model
        self.ids = torch.tensor([list(input_ids)])
        self.readout_from = readout_from
        self.n_target = n_target
        self.mode = mode
        self.token_budget = token_budget
        self.logits_to_keep, self.cache_argument = forward_options(model)
        self.device = next(model.parameters()).device
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=self.ids[:, :readout_from].to(self.device), use_cache=True,
                  **{self.cache_argument: cache})
        self.prefix = [(layer.keys, layer.values) for layer in cache.layers]
        self.token_forwards = readout_from

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def _tail(self, rows: int, multipliers: torch.Tensor, backend: str) -> torch.Tensor:
        tail = self.ids[:, self.readout_from:].expand(rows, -1).to(self.device)
        cache = SharedPrefix(self.prefix, self.readout_from)
        kwargs = {"logits_to_keep": self.n_target + 1} if self.logits_to_keep else {}
        self.token_forwards += rows * tail.shape[1]
        with manipulate(multipliers, mode=self.mode, backend=backend, prefix=cache if backend == "sdpa" else None):
            logits = self.model(input_ids=tail, use_cache=True, **{self.cache_argument: cache}, **kwargs).logits
        logits = logits[:, -(self.n_target + 1):-1].float()
        targets = self.ids[0, -self.n_target:].to(self.device)
        return -torch.log_softmax(logits, dim=-1).gather(-1, targets.expand(rows, -1)[..., None])[..., 0]

    def losses(self, rows: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each target token (columns) under each row of multipliers (rows x positions)."""
        if rows.ndim != 2 or rows.shape[1] != self.length:
            raise AtmanError(f"rows must have shape (n, {self.length}), got {tuple(rows.shape)}")
        per_call = max(1, self.token_budget // (self.length - self.readout_from))
        out = []
        with torch.no_grad():
            for first in range(0, rows.shape[0], per_call):
                chunk = rows[first:first + per_call].float()
                out.append(self._tail(chunk.shape[0], chunk.to(self.device), "sdpa").cpu())
        return torch.cat(out) if out else torch.empty(0, self.n_target)

    def local_losses(self, positions: Sequence[int], until: int, multiplier: float = 0.0) -> torch.Tensor:
        """Cross-entropy of each target token when the keys at ``positions`` are multiplied by
        ``multiplier`` for the queries from the first of them up to ``until`` (e.g. the end of their
        passage) and for the tail; the context after ``until`` keeps its unperturbed keys and values.

        Between readout suppression (only the tail loses the keys) and full suppression (every later
        position does): the rest of the source's own passage, where a later sentence refers back to it,
        loses it too, at the cost of recomputing that stretch and the tail.
        """
        start = min(positions)
        if not 0 < start < until <= self.readout_from:
            raise AtmanError(f"need 0 < {start} (first position) < until <= {self.readout_from}, got until={until}")
        row = torch.ones(1, self.length, device=self.device)
        row[0, list(positions)] = multiplier
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self.prefix):
            cache.update(keys[:, :, :start], values[:, :, :start], layer)
        with torch.no_grad(), manipulate(row[:, :until], mode=self.mode):
            self.model(input_ids=self.ids[:, start:until].to(self.device), use_cache=True,
                       **{self.cache_argument: cache})
        kept = self.prefix
        self.prefix = [(torch.cat([layer.keys, keys[:, :, until:]], dim=-2),
                        torch.cat([layer.values, values[:, :, until:]], dim=-2))
                       for layer, (keys, values) in zip(cache.layers, kept, strict=True)]
        self.token_forwards += until - start
        try:
            with torch.no_grad():
                return self._tail(1, row, "sdpa")[0].cpu()
        finally:
            self.prefix = kept


def removal_estimates(readout: ReadoutPass, sources: Sequence[Sequence[int]], spans: Sequence[Sequence[int]], *,
                      renormalised: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """First-order estimates (sources x spans) of how much removing each source from the readout raises
    each span's loss, from one pass of the tail with autograd on.

    With ``renormalised`` (default) the change of every attention row is exact where the linear
    estimate is not: removing a set of keys s from a softmax row with probabilities p re-weights the rest
    by 1 / (1 - p(s)), so a row's contribution is ``(p(s) A - B(s)) / (1 - p(s))`` with ``B(s)`` the sum of
    ``p_k dL/dp_k`` over s and ``A`` the same over the row — what attribution patching's "QK fix" does for
    attention knock-out (Kramar et al. 2024), with the queries of the unperturbed pass. Without it, the
    estimate is minus the derivative with respect to the sources' multipliers at 1 (the numerator alone),
    which underrates a source the response attends to almost entirely.
    """
    length = readout.length
    owner = torch.zeros(length, len(sources))
    for s, positions in enumerate(sources):
        owner[list(positions), s] = 1.0
    with torch.enable_grad():
        multipliers = torch.ones(1, length, device=readout.device)
        tail = readout.ids[:, readout.readout_from:].to(readout.device)
        cache = SharedPrefix(readout.prefix, readout.readout_from)
        kwargs = {"logits_to_keep": readout.n_target + 1} if readout.logits_to_keep else {}
        with manipulate(multipliers, mode=readout.mode, backend="eager"):
            out = readout.model(input_ids=tail, use_cache=True, output_attentions=True,
                                **{readout.cache_argument: cache}, **kwargs)
        probs = [p for p in out.attentions if p is not None]
        if not probs or len(probs) != len(out.attentions):
            raise AtmanError(f"{type(readout.model).__name__} does not return attention probabilities")
        logits = out.logits[:, -(readout.n_target + 1):-1].float()
        targets = readout.ids[0, -readout.n_target:].to(readout.device)
        losses = -torch.log_softmax(logits[0], dim=-1).gather(-1, targets[:, None])[:, 0]
        estimates = np.zeros((len(sources), len(spans)))
        for k, tokens in enumerate(spans):
            grads = torch.autograd.grad(losses[list(tokens)].sum(), probs, retain_graph=k < len(spans) - 1)
            total = torch.zeros(len(sources), dtype=torch.float64)
            for p, g in zip(probs, grads, strict=True):
                p, pg = p.detach()[0].float().cpu(), (p.detach() * g)[0].float().cpu()   # heads x tail x keys
                row = pg.sum(dim=-1, keepdim=True)
                share, part = p @ owner, pg @ owner                                         # heads x tail x sources
                change = share * row - part
                if renormalised:
                    change = change / (1.0 - share).clamp(min=1e-3)
                total += change.sum(dim=(0, 1)).double()
            estimates[:, k] = total.numpy()
    readout.token_forwards += 3 * (length - readout.readout_from)
    return losses.detach().cpu(), estimates


@dataclass(frozen=True)
class Screened:
    """:func:`screened_scores`' result: scores (sources x spans), the sources scored by exact rows, and the
    unperturbed loss of every target token."""

    scores: np.ndarray
    exact: list[int]
    base: torch.Tensor


def screened_scores(readout: ReadoutPass, sources: Sequence[Sequence[int]], spans: Sequence[Sequence[int]], *,
                    top: int = 8, multiplier: float = 0.0, renormalised: bool = True) -> Screened:
    """Scores (sources x spans) from the first-order estimates of :func:`removal_estimates` and exact
    readout rows for the ``top`` sources they rank highest (by their summed estimate over the spans).

    A source's estimate is scaled by ``1 - multiplier`` (the estimates are for removal); the ``top``
    sources get their exact rise of each span's loss instead, and the
    others' estimates are scaled per span by the least-squares ratio of exact to estimated scores of the
    exact ones (the gradient underrates what removing a source does when the attention to it saturates).
    """
    base, estimate = removal_estimates(readout, sources, spans, renormalised=renormalised)
    estimate = estimate * (1.0 - multiplier)
    chosen = [int(s) for s in np.argsort(-estimate.sum(axis=1), kind="stable")[:min(top, len(sources))]]
    scores = estimate.copy()
    if chosen:
        rows = torch.ones(len(chosen), readout.length)
        for r, s in enumerate(chosen):
            rows[r, list(sources[s])] = multiplier
        delta = (readout.losses(rows) - base[None]).double().numpy()
        exact = np.stack([delta[:, list(tokens)].sum(axis=1) for tokens in spans], axis=1)
        for k in range(len(spans)):
            x, y = estimate[chosen, k], exact[:, k]
            ratio = float(x @ y / (x @ x)) if float(x @ x) > 0 else 1.0
            scores[:, k] = estimate[:, k] * max(ratio, 0.0)
        scores[chosen] = exact
    return Screened(scores=scores, exact=chosen, base=base)
