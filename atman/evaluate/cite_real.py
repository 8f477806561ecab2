"""Citation on the real-document sets: the development / held-out split, the metrics beyond ContextCite's,
the intervals, and the tables of docs/evaluation.md.

* :func:`split` puts each question of :func:`atman.evaluate.real_docs.real_documents` (all three positions
  of it) in the development split or the held-out one: within each set, questions ordered by the SHA-256
  of their id, the first half (rounded down) for development. Defaults are chosen on the development
  split only; the held-out split is measured once, at the end.
* Metrics of a method's scores on one context, beside ContextCite's top-k drop and LDS
  (:mod:`atman.evaluate.citation`): ``hit1``/``hit3`` (a gold sentence among the top 1 / 3) and
  ``ap_loo``, AttriBoT's measure of how well leave-one-out's important sources are recovered (the
  average precision of the method's ranking against the sources whose leave-one-out score lies more than
  :data:`OUTLIER_SD` standard deviations above the context's mean, at least the top one).
* :func:`summarise` gives means with 95 % bootstrap intervals that resample *questions* (the three
  positions of a question share question, response and gold, so they are not independent), paired
  differences against a reference method, and cost ratios to ContextCite-32: token-forwards per context
  (deterministic) and CPU time, the latter only against ContextCite-32 measured in the same run.
* :func:`render` writes the tables that docs/evaluation.md shows (through ``docs/render.py``;
  ``tests/test_docs_sync.py`` fails when a table there differs from what its results file renders).

Example::

    >>> dev = split("dev")
    >>> len(dev), len({d.question_id for d in dev})
    (27, 9)
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ..errors import AtmanError
from .citation import top_sources
from .real_docs import SETS, RealDocument, real_documents

SPLITS = ("dev", "test")
OUTLIER_SD = 2.0
REFERENCE = "contextcite-32"
LOO = "attribot-loo"
PLAIN = "plain-forward"
METRICS = ("top1_drop", "top3_drop", "top5_drop", "lds", "hit1", "hit3", "ap_loo")
ROUNDS = 2000


def split(name: str) -> list[RealDocument]:
    """The contexts of the development (``"dev"``) or held-out (``"test"``) split, in the data file's order."""
    if name not in SPLITS:
        raise AtmanError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
    documents = real_documents()
    chosen: set[str] = set()
    for set_name in SETS:
        ids = sorted({d.question_id for d in documents if d.set == set_name},
                     key=lambda q: hashlib.sha256(q.encode()).hexdigest())
        half = len(ids) // 2
        chosen.update(ids[:half] if name == "dev" else ids[half:])
    return [d for d in documents if d.question_id in chosen]


def shortest(documents: Sequence[RealDocument]) -> list[RealDocument]:
    """One context per question: the one with the fewest tokens of its three positions (the cheapest
    subset that still holds every question once)."""
    best: dict[str, RealDocument] = {}
    for d in documents:
        if d.question_id not in best or d.context_tokens < best[d.question_id].context_tokens:
            best[d.question_id] = d
    return [d for d in documents if best[d.question_id] is d]


def hits(scores: np.ndarray, gold: Sequence[int], k: int) -> float:
    """1.0 when a gold source is among the ``k`` highest scores."""
    return float(bool(set(int(i) for i in top_sources(scores, k)) & set(gold)))


def loo_outliers(loo: np.ndarray) -> list[int]:
    """Sources whose leave-one-out score lies more than :data:`OUTLIER_SD` standard deviations above the
    mean of the context's scores; the top source when none does."""
    loo = np.asarray(loo, dtype=np.float64)
    chosen = np.flatnonzero(loo > loo.mean() + OUTLIER_SD * loo.std())
    return chosen.tolist() if len(chosen) else [int(np.argmax(loo))]


def average_precision(scores: np.ndarray, relevant: Sequence[int]) -> float:
    """Average precision of the ranking by ``scores`` (ties broken by position) against ``relevant``."""
    relevant = set(relevant)
    if not relevant:
        raise AtmanError("average precision needs at least one relevant source")
    order = top_sources(scores, len(scores))
    found, total = 0, 0.0
    for rank, s in enumerate(order, start=1):
        if int(s) in relevant:
            found += 1
            total += found / rank
    return total / len(relevant)


def _bootstrap(values: dict[str, list[float]], rounds: int = ROUNDS, seed: int = 0) -> tuple[float, float, float]:
    """Mean over all values and the 95 % interval of that mean when clusters (questions) are resampled."""
    clusters = list(values)
    sums = np.array([sum(values[c]) for c in clusters])
    counts = np.array([len(values[c]) for c in clusters])
    mean = float(sums.sum() / counts.sum())
    if len(clusters) < 2:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(clusters), size=(rounds, len(clusters)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    return mean, float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def with_loo_precision(records: list[dict]) -> list[dict]:
    """The records with ``ap_loo`` added where the context has a leave-one-out record."""
    loo = {r["context"]: np.asarray(r["scores"]) for r in records if r["method"] == LOO}
    out = []
    for r in records:
        r = dict(r)
        if r["context"] in loo and "scores" in r:
            r["ap_loo"] = average_precision(np.asarray(r["scores"]), loo_outliers(loo[r["context"]]))
        out.append(r)
    return out


def summarise(records: list[dict], methods: Sequence[str] | None = None, paired_with: str | None = None,
              contexts: Sequence[str] | None = None) -> dict:
    """Per method: mean and question-bootstrap interval of every metric, cost ratios to ContextCite-32,
    and with ``paired_with`` the interval of the per-context difference (method minus that one).

    ``contexts`` restricts to those contexts (default: every context of the records)."""
    records = with_loo_precision(records)
    if contexts is not None:
        keep = set(contexts)
        records = [r for r in records if r["context"] in keep]
    names = list(methods) if methods is not None else list(dict.fromkeys(r["method"] for r in records))
    by = {(r["context"], r["method"]): r for r in records}
    reference_runs = {(r["context"], r["run"]): r for r in records if r["method"] == REFERENCE}
    plain_runs = {(r["context"], r["run"]): r for r in records if r["method"] == PLAIN}
    table = {}
    for name in names:
        rows = [r for r in records if r["method"] == name]
        if not rows:
            continue
        entry: dict = {"contexts": len(rows), "questions": len({r["question_id"] for r in rows})}
        for metric in METRICS:
            grouped: dict[str, list[float]] = defaultdict(list)
            for r in rows:
                if metric in r:
                    grouped[r["question_id"]].append(float(r[metric]))
            if sum(len(v) for v in grouped.values()) == len(rows):
                entry[metric] = _bootstrap(grouped)
            if paired_with and metric in entry:
                diffs: dict[str, list[float]] = defaultdict(list)
                for r in rows:
                    other = by.get((r["context"], paired_with))
                    if other is not None and metric in other:
                        diffs[r["question_id"]].append(float(r[metric]) - float(other[metric]))
                if diffs:
                    entry[f"{metric}_diff"] = _bootstrap(diffs)
        tokens: dict[str, list[float]] = defaultdict(list)
        cpu: dict[str, list[float]] = defaultdict(list)
        plain: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            same_plain = plain_runs.get((r["context"], r["run"]))
            if same_plain is not None:
                plain[r["question_id"]].append(r["cpu_seconds"] / same_plain["cpu_seconds"])
            ref = by.get((r["context"], REFERENCE))
            if ref is not None:
                tokens[r["question_id"]].append(r["token_forwards"] / ref["token_forwards"])
            same_run = reference_runs.get((r["context"], r["run"]))
            if same_run is not None:
                cpu[r["question_id"]].append(r["cpu_seconds"] / same_run["cpu_seconds"])
        if tokens:
            entry["token_ratio"] = _bootstrap(tokens)
        if cpu:
            entry["cpu_ratio"] = _bootstrap(cpu)
            entry["cpu_ratio_contexts"] = sum(len(v) for v in cpu.values())
        if plain:
            entry["plain_ratio"] = _bootstrap(plain)
        entry["token_forwards"] = float(np.mean([r["token_forwards"] for r in rows]))
        entry["plain_forwards"] = float(np.mean([r["token_forwards"] / r["tokens"] for r in rows]))
        table[name] = entry
    return table


def _cell(value: tuple[float, float, float] | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    mean, lo, hi = value
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _ratio(entry: dict, key: str) -> str:
    return f"{entry[key][0]:.2f}x" if key in entry else "–"


LABELS = {"top1_drop": "top-1 drop", "top3_drop": "top-3 drop", "top5_drop": "top-5 drop", "lds": "LDS",
          "ap_loo": "mAP vs LOO"}


def render(table: dict, *, loo: bool = False, paired_with: str | None = None) -> str:
    """The markdown table of :func:`summarise`'s output (``loo``: with the mAP column; ``paired_with``:
    a second table of paired differences). A cost column no method has (no ContextCite-32 or plain
    forward in the run) is left out."""
    header = ["method", "top-1 drop", "top-3 drop", "top-5 drop", "LDS", "hit@1", "hit@3"]
    header += ["mAP vs LOO"] if loo else []
    header += ["plain forwards"]
    ratios = [(key, label) for key, label in (("token_ratio", "tokens vs CC-32"), ("cpu_ratio", "CPU time vs CC-32"),
                                              ("plain_ratio", "CPU time vs a forward"))
              if any(key in e for e in table.values())]
    header += [label for _, label in ratios]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, e in table.items():
        cells = [name] + [_cell(e.get(m)) for m in ("top1_drop", "top3_drop", "top5_drop", "lds")]
        cells += [f"{e[m][0]:.2f}" if m in e else "–" for m in ("hit1", "hit3")]
        cells += [_cell(e.get("ap_loo"))] if loo else []
        cells += [f"{e['plain_forwards']:.2f}"] + [_ratio(e, key) for key, _ in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    if paired_with:
        metrics = ["top1_drop", "top3_drop", "top5_drop", "lds"] + (["ap_loo"] if loo else [])
        lines += ["", f"Paired differences, method minus {paired_with} (mean [95 % interval], questions "
                      "resampled):", "",
                  "| method | " + " | ".join(LABELS[m] for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
        for name, e in table.items():
            if name == paired_with or not any(f"{m}_diff" in e for m in metrics):
                continue
            lines.append(f"| {name} | " + " | ".join(_cell(e.get(f"{m}_diff")) for m in metrics) + " |")
    return "\n".join(lines)


RELIED = 1.0   # nats: a gold sentence "carries" the response when removing it alone costs at least this


def reliance(records: list[dict], gold: dict[str, Sequence[int]], methods: Sequence[str],
             threshold: float = RELIED) -> list[str]:
    """Where hit@1 is won and lost: per context, how much the response rests on one gold sentence alone
    (the largest leave-one-out drop among the gold sentences, from the ``attribot-loo`` record) beside the
    largest drop of any sentence, and each method's hit@1; then each method's hit@1 over the contexts
    where some gold sentence's own drop reaches ``threshold`` nats and over the others.

    ``gold`` maps a context's name to its gold sentence indices; only contexts with a leave-one-out
    record are shown."""
    by = {(r["context"], r["method"]): r for r in records}
    contexts = [c for c in dict.fromkeys(r["context"] for r in records) if (c, LOO) in by]
    if not contexts:
        raise AtmanError(f"no context of the records has a {LOO} record")
    lines = ["| context | gold sentences | largest drop of a gold sentence | largest drop of any | "
             + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 4)]
    carried: dict[bool, list[str]] = {True: [], False: []}
    for c in contexts:
        loo = np.asarray(by[(c, LOO)]["scores"], dtype=np.float64)
        best = max(float(loo[i]) for i in gold[c])
        carried[best >= threshold].append(c)
        marks = ["hit" if by[(c, m)]["hit1"] else "·" for m in methods]
        lines.append(f"| `{c}` | {len(gold[c])} | {best:.2f} | {float(loo.max()):.2f} | " + " | ".join(marks) + " |")
    for flag, label in ((True, f"≥ {threshold:g}"), (False, f"< {threshold:g}")):
        chosen = carried[flag]
        if not chosen:
            continue
        rates = [f"{np.mean([by[(c, m)]['hit1'] for c in chosen]):.2f}" for m in methods]
        lines.append(f"| **hit@1, gold drop {label} nat ({len(chosen)} contexts)** | | | | " + " | ".join(rates) + " |")
    return lines
