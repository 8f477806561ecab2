"""Plausibility and faithfulness metrics, and their summaries over examples.

Plausibility compares unit scores x with gold labels y (1 = the unit overlaps a gold span):

* ``precision`` (the AtMan paper's): sum(x+ * y) / sum(x+), the share of positive relevance mass on gold;
* ``recall`` (the paper's): sum(x+ / max(x+) * y) / sum(y);
* ``ap``: ranking average precision (mean over gold units of the precision at their rank);
* ``top1``: 1 if the highest-scoring unit is gold.

x+ = max(x, 0): positive scores are evidence for the target in every method's convention.

Faithfulness deletes units in the order of the scores and tracks log p(target):

* ``aopc_morf``: mean drop of log p(target) when the most relevant units are deleted first (higher = better);
* ``aopc_lerf``: the same, least relevant first (lower = better);
* ``abpc``: aopc_morf - aopc_lerf, the area between the two deletion curves (higher = better);
* ``insertion``: mean of log p(target | only the most relevant units kept) - log p(target | all), (higher = better).

Example::

    >>> plausibility([0.1, 2.0, -1.0], [False, True, False])["top1"]
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

PLAUSIBILITY = ("ap", "precision", "recall", "top1")
FAITHFULNESS = ("aopc_morf", "aopc_lerf", "abpc", "insertion")
# fractions of the units deleted (or kept) at the points of a curve
FRACTIONS = (0.2, 0.4, 0.6, 0.8)


def plausibility(scores: Sequence[float], gold: Sequence[bool]) -> dict[str, float]:
    """The four plausibility metrics of one example (``gold`` must hold at least one True)."""
    x = np.asarray(scores, dtype=float)
    y = np.asarray(gold, dtype=bool)
    if x.shape != y.shape or x.ndim != 1 or not len(x):
        raise ValueError("scores and gold must be non-empty sequences of the same length")
    if not y.any():
        raise ValueError("plausibility needs at least one gold unit")
    positive = np.clip(x, 0.0, None)
    mass = positive.sum()
    precision = float((positive * y).sum() / mass) if mass > 0 else 0.0
    recall = float((positive / positive.max() * y).sum() / y.sum()) if mass > 0 else 0.0
    # stable sort: ties keep text order, so a method that scores everything alike gains nothing
    order = np.argsort(-x, kind="stable")
    ranked = y[order]
    hits = np.cumsum(ranked)
    ap = float((hits[ranked] / (np.flatnonzero(ranked) + 1)).mean())
    return {"ap": ap, "precision": precision, "recall": recall, "top1": float(y[order[0]])}


def curve_steps(n_units: int, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """How many units are deleted at each curve point: rounded fractions of ``n_units``, within 1..n-1."""
    return sorted({min(max(1, round(f * n_units)), n_units - 1) for f in fractions}) if n_units > 1 else []


def faithfulness(full: float, morf: dict[int, float], lerf: dict[int, float], steps: Sequence[int],
                 n_units: int) -> dict[str, float]:
    """Metrics from log p(target) with all units (``full``) and after deleting k units (``morf``/``lerf``).

    Keeping the top k units is deleting the bottom n - k, so insertion reads ``lerf[n - k]``.
    """
    aopc_morf = float(np.mean([full - morf[k] for k in steps]))
    aopc_lerf = float(np.mean([full - lerf[k] for k in steps]))
    insertion = float(np.mean([lerf[n_units - k] - full for k in steps]))
    return {"aopc_morf": aopc_morf, "aopc_lerf": aopc_lerf, "abpc": aopc_morf - aopc_lerf, "insertion": insertion}


def summarize(values: Sequence[float], seed: int = 0, resamples: int = 2000) -> dict[str, float]:
    """Mean, interquartile mean and a percentile-bootstrap 95 % interval of the mean."""
    data = np.asarray(values, dtype=float)
    if not len(data):
        raise ValueError("nothing to summarize")
    out = {"n": int(len(data)), "mean": float(data.mean()), "iqm": float(stats.trim_mean(data, 0.25))}
    if len(data) > 1 and np.ptp(data) > 0:
        boot = stats.bootstrap((data,), np.mean, confidence_level=0.95, n_resamples=resamples,
                               method="percentile", random_state=np.random.default_rng(seed))
        out["low"], out["high"] = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    else:
        out["low"] = out["high"] = out["mean"]
    return out
