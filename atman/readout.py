"""Source scores from many readout rows at once: random multi-source masks and a sparse linear fit.

Readout suppression (:meth:`atman.engine.Engine.target_losses` with ``readout_from``) makes a row cheap:
the context is encoded once, and a row that hides any set of sources from the question and the response
costs only a pass over that tail. So a citation can afford many rows that each hide a random half of the
sources, and fit what ContextCite fits on its ablated contexts — a linear model of the response's
logit-probability in the 0/1 mask of kept sources (Cohen-Wang et al. 2024: standardised masks, LASSO)
— on these cheap rows instead of on whole forward passes of ablated contexts.

Nothing here runs a model: :func:`mask_scores` takes a function from keep-masks to the response tokens'
log-probabilities, so :class:`atman.Citer` and the evaluation harness hand it their own rows.

Example::

    >>> weights = np.array([2.0, 0.0, -1.0])
    >>> masks = random_masks(3, 64, seed=0)
    >>> fitted = linear_surrogate(masks, masks @ weights, n_tokens=1, alpha=1e-4)
    >>> np.round(fitted, 2).tolist()
    [2.0, 0.0, -1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import AtmanError

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
