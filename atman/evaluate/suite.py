"""The evaluation suite: every method on the same examples, units and targets; metrics per example.

Plausibility runs where the ground truth is known (invented-fact QA, SQuAD), at each configured
granularity; faithfulness (deletion curves) at sentence granularity on every dataset, including the
Python texts, whose target is the model's own greedy continuation.

Example::

    >>> result = run_suite(load_model(), ["atman", "random"], SuiteConfig.quick())
    >>> sorted(result["summary"])
    ['faithfulness', 'plausibility', 'seconds']
"""

from __future__ import annotations

import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..baselines import BaselineUnavailableError, Method, get_method, sequence_logprobs
from ..baselines.base import delete_units
from ..errors import EmptyInputError
from ..explainer import Explainer
from ..models import LoadedModel
from ..units import encode, prompt_units
from .datasets import Example, context_qa, python_texts, squad_examples
from .metrics import FRACTIONS, curve_steps, faithfulness, plausibility, summarize

DEFAULT_METHODS = ("atman", "integrated-gradients", "input-x-gradient", "saliency", "feature-ablation",
                   "attention-rollout", "chefer", "occlusion", "attnlrp", "random")
ABLATION_METHODS = ("atman", "atman:multiplier=0.5", "atman:multiplier=0.01", "atman:multiplier=0.0",
                    "atman:mode=multiplicative", "atman:kappa=0.6", "atman:kappa=0.7", "atman:kappa=0.8")
FAITHFULNESS_GRANULARITY = "sentence"
# (records done, records in all, what was just done, estimated seconds left or None before any record)
Progress = Callable[[int, int, str, "float | None"], None]


@dataclass(frozen=True)
class Job:
    """One unit of the suite's work: an example of a dataset at one granularity, scored for
    plausibility (when ``plausibility``) and/or faithfulness (at the faithfulness granularity)."""

    dataset: str
    example: Example
    granularity: str
    plausibility: bool


# scores jobs with methods: (model, jobs, {spec: method}, fractions) -> records in job order
JobRunner = Callable[["LoadedModel", Sequence["Job"], Mapping[str, Method], Sequence[float]], Iterable[dict]]


@dataclass
class SuiteConfig:
    """How many examples of each dataset, at which granularities."""

    qa: int = 8
    qa_facts: int = 3
    qa_granularities: tuple[str, ...] = ("sentence", "token")
    squad: int = 5
    # token-level SQuAD (~190-token prompts) is several times the rest of the run on a CPU: opt in
    squad_granularities: tuple[str, ...] = ("sentence",)
    texts: int = 4
    max_new_tokens: int = 8
    seed: int = 0
    fractions: tuple[float, ...] = field(default=FRACTIONS)

    @classmethod
    def quick(cls) -> SuiteConfig:
        """A small run for CI (``atman evaluate --quick``): one example of each dataset, the QA prompt with
        two facts (about 70 tokens: its token level is the costliest job), a 4-token text target, and the
        deletion curves at half the units only (two thirds of their sequences fewer)."""
        return cls(qa=1, qa_facts=2, squad=1, squad_granularities=("sentence",), texts=1, max_new_tokens=4,
                   fractions=(0.5,))

    def datasets(self, lm: LoadedModel, skipped: dict[str, str] | None = None
                 ) -> list[tuple[str, Example, tuple[str, ...]]]:
        """(dataset name, example, granularities) for every example, the datasets taking turns (so that
        a run stopped early still covers each); text targets are generated here.

        A text after which the model generates nothing (it ends the text at once) has no target: it is
        left out, and ``skipped`` (if given) receives its id and the reason.
        """
        qa = [("qa", ex, self.qa_granularities) for ex in context_qa(self.qa, seed=self.seed, facts=self.qa_facts)]
        squad = [("squad", ex, self.squad_granularities) for ex in squad_examples()[:self.squad]]
        texts = []
        if self.texts:
            generator = Explainer(lm)
            for ex in python_texts(self.texts):
                # kept as token ids: decoding and re-encoding could change the tokens
                try:
                    ids = tuple(generator.generate(ex.prompt, max_new_tokens=self.max_new_tokens))
                except EmptyInputError as exc:
                    if skipped is not None:
                        skipped[ex.id] = str(exc)
                    continue
                texts.append(("texts", Example(ex.id, ex.prompt, ids, ex.gold), ()))
        turns = [qa, squad, texts]
        return [group[i] for i in range(max(map(len, turns))) for group in turns if i < len(group)]

    def jobs(self, lm: LoadedModel, skipped: dict[str, str] | None = None) -> list[Job]:
        """Every (example, granularity) the suite scores, in the order a run takes them: each example's
        plausibility granularities, then the faithfulness granularity if it is not among them."""
        return [Job(name, ex, gran, gran in grans) for name, ex, grans in self.datasets(lm, skipped)
                for gran in dict.fromkeys((*grans, FAITHFULNESS_GRANULARITY))]


def job_size(lm: LoadedModel, job: Job) -> int:
    """A job's size for estimating its time: prompt and target tokens times units (what a method that runs
    one pass per unit, the slowest kind, costs in token-forwards)."""
    encoded = encode(lm.tokenizer, job.example.prompt, job.example.target)
    return len(encoded.input_ids) * max(len(prompt_units(encoded, job.granularity)), 1)


class TimeLeft:
    """An estimate of the seconds that the records still to come take, from the records finished so far.

    A record still to come is estimated from the finished records of the same method, the closest kind
    first (same dataset and granularity, else same granularity, else any), as their seconds per unit of
    :func:`job_size` times its own size; a method with no finished record yet counts at the mean time of
    the records finished so far. None until a record has finished.

    >>> left = TimeLeft([("atman", "qa", "token", 100), ("atman", "qa", "token", 300)])
    >>> left.seconds() is None
    True
    >>> left.finished(2.0)
    >>> left.seconds()
    6.0
    """

    def __init__(self, pending: Sequence[tuple[str, str, str, int]]) -> None:
        # (method, dataset, granularity, size) of every record, in the order they come
        self.pending = list(pending)
        self.done: list[tuple[str, str, str, int, float]] = []

    def finished(self, seconds: float) -> None:
        """The next record (in order) finished after ``seconds``."""
        self.done.append((*self.pending[len(self.done)], float(seconds)))

    def seconds(self) -> float | None:
        if not self.done:
            return None
        mean = sum(d[4] for d in self.done) / len(self.done)
        total = 0.0
        for method, dataset, granularity, size in self.pending[len(self.done):]:
            same = [d for d in self.done if d[0] == method]
            closest = ([d for d in same if d[1:3] == (dataset, granularity)]
                       or [d for d in same if d[2] == granularity] or same)
            if closest:
                total += size * sum(d[4] for d in closest) / sum(max(d[3], 1) for d in closest)
            else:
                total += mean
        return total


def run_jobs(lm: LoadedModel, jobs: Sequence[Job], methods: Mapping[str, Method],
             fractions: Sequence[float] = FRACTIONS) -> Iterator[dict]:
    """The records of every method on every job, in this process, in job order (methods in turn)."""
    for job in jobs:
        # the methods of one job share the unperturbed sequence and often the same deletions
        known: dict[tuple[int, ...], float] = {}
        for spec, method in methods.items():
            yield score_job(lm, job, spec, method, fractions, known)


def run_suite(lm: LoadedModel, methods: Sequence[str], config: SuiteConfig | None = None,
              progress: Progress | None = None, on_record: Callable[[dict], None] | None = None,
              runner: JobRunner | None = None) -> dict:
    """Run every method on every example; returns {"config", "records", "summary", "unavailable", ...}.

    ``on_record`` receives each per-example record as soon as it exists (e.g. to keep a log).
    ``runner`` scores the jobs (default :func:`run_jobs`, here; :func:`atman.distributed.evaluate_runner`
    spreads them over Ray workers); it must yield the records in job order.
    """
    config = config or SuiteConfig()
    started = time.perf_counter()
    built: dict[str, Method] = {}
    unavailable: dict[str, str] = {}
    for spec in methods:
        try:
            built[spec] = get_method(spec, lm)
        except BaselineUnavailableError as exc:
            unavailable[spec] = str(exc)
    skipped: dict[str, str] = {}
    jobs = config.jobs(lm, skipped)
    total = len(jobs) * len(built)
    left = TimeLeft([(spec, job.dataset, job.granularity, size) for job in jobs
                     for size in (job_size(lm, job),) for spec in built])
    records = []
    if progress is not None:
        progress(0, total, "started", None)
    for record in (runner or run_jobs)(lm, jobs, built, config.fractions):
        records.append(record)
        left.finished(record["seconds"])
        if on_record is not None:
            on_record(record)
        if progress is not None:
            progress(len(records), total, f"{record['dataset']} {record['granularity']} {record['method']}",
                     left.seconds())
    if progress is not None:
        progress(len(records), total, "done", 0.0)
    return {
        "model": lm.name,
        "methods": list(methods),
        "unavailable": unavailable,
        "skipped": skipped,
        "config": asdict(config),
        "environment": environment(),
        "seconds": round(time.perf_counter() - started, 1),
        "method_seconds": method_seconds(records),
        "records": records,
        "summary": summarize_records(records, seed=config.seed),
    }


def method_seconds(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per method, in the order the methods first appear: its explanations and their seconds in all.

    >>> method_seconds([{"method": "atman", "seconds": 2.0}, {"method": "random", "seconds": 0.5},
    ...                 {"method": "atman", "seconds": 1.0}])
    {'atman': {'explanations': 2, 'seconds': 3.0}, 'random': {'explanations': 1, 'seconds': 0.5}}
    """
    out: dict[str, dict[str, float]] = {}
    for r in records:
        slot = out.setdefault(r["method"], {"explanations": 0, "seconds": 0.0})
        slot["explanations"] += 1
        slot["seconds"] = round(slot["seconds"] + r["seconds"], 3)
    return out


def score_job(lm: LoadedModel, job: Job, spec: str, method: Method, fractions: Sequence[float] = FRACTIONS,
              known: dict[tuple[int, ...], float] | None = None) -> dict:
    """The record of one method on one job: its units, seconds and metrics (plausibility where the job
    has ground truth at this granularity, faithfulness at the faithfulness granularity).

    ``known``: log p(target) of token sequences of this job already computed (by another method's
    deletion curve), read and filled in; a sequence is then run once per job, not once per method."""
    ex = job.example
    encoded = encode(lm.tokenizer, ex.prompt, ex.target)
    units = prompt_units(encoded, job.granularity)
    t0 = time.perf_counter()
    explanation = method.attribute(ex.prompt, ex.target, granularity=job.granularity)
    seconds = time.perf_counter() - t0
    items = explanation.explanations[0].items
    if [(i.start, i.length) for i in items] != [(u.start, u.length) for u in units]:
        raise RuntimeError(f"{spec} explained other units than the suite's")
    scores = [i.score for i in items]
    metrics: dict[str, float] = {}
    if ex.gold and job.plausibility:
        gold = [any(u.start < b and a < u.start + u.length for a, b in ex.gold) for u in units]
        metrics.update(plausibility(scores, gold))
    if job.granularity == FAITHFULNESS_GRANULARITY and len(units) > 1:
        metrics.update(_faithfulness(lm, encoded, units, scores, fractions, {} if known is None else known))
    return {"dataset": job.dataset, "granularity": job.granularity, "example": ex.id, "method": spec,
            "units": len(units), "seconds": round(seconds, 3), "metrics": metrics}


def _faithfulness(lm: LoadedModel, encoded, units, scores, fractions, known: dict) -> dict[str, float]:
    n = len(units)
    steps = curve_steps(n, fractions)
    morf_order = sorted(range(n), key=lambda i: -scores[i])
    lerf_order = sorted(range(n), key=lambda i: scores[i])
    lerf_steps = sorted(set(steps) | {n - k for k in steps})
    sequences = [list(encoded.input_ids)]
    sequences += [delete_units(encoded, [units[i] for i in morf_order[:k]]) for k in steps]
    sequences += [delete_units(encoded, [units[i] for i in lerf_order[:k]]) for k in lerf_steps]
    keys = [tuple(seq) for seq in sequences]
    missing = list(dict.fromkeys(key for key in keys if key not in known))
    if missing:
        found = sequence_logprobs(lm, missing, len(encoded.input_ids) - encoded.target_start).tolist()
        known.update(zip(missing, found, strict=True))
    logprobs = [known[key] for key in keys]
    morf = dict(zip(steps, logprobs[1:1 + len(steps)], strict=True))
    lerf = dict(zip(lerf_steps, logprobs[1 + len(steps):], strict=True))
    return faithfulness(logprobs[0], morf, lerf, steps, n)


def summarize_records(records: list[dict], seed: int = 0) -> dict:
    """{"plausibility"|"faithfulness": {dataset: {granularity: {method: {metric: summary}}}},
    "seconds": {dataset: {granularity: {method: mean seconds per explanation}}}}."""
    from .metrics import FAITHFULNESS, PLAUSIBILITY

    grouped: dict = defaultdict(list)
    for r in records:
        for metric, value in r["metrics"].items():
            grouped[(r["dataset"], r["granularity"], r["method"], metric)].append(value)
    out: dict = {"plausibility": {}, "faithfulness": {}, "seconds": {}}
    for (dataset, gran, method, metric), values in grouped.items():
        kind = "plausibility" if metric in PLAUSIBILITY else "faithfulness" if metric in FAITHFULNESS else None
        if kind is None:
            continue
        slot = out[kind].setdefault(dataset, {}).setdefault(gran, {}).setdefault(method, {})
        slot[metric] = summarize(values, seed=seed)
    seconds: dict = defaultdict(list)
    for r in records:
        seconds[(r["dataset"], r["granularity"], r["method"])].append(r["seconds"])
    for (dataset, gran, method), values in seconds.items():
        out["seconds"].setdefault(dataset, {}).setdefault(gran, {})[method] = float(np.mean(values))
    return out


def environment() -> dict[str, object]:
    """What this process runs on: torch's version, Python's, the machine's architecture and torch's threads
    (written at the head of a record log, so a merged report names the machine that made the records)."""
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads()}


def split_log(lines: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """A record log's environment lines (``{"environment": {...}}``) and its records."""
    environments, records = [], []
    for line in lines:
        if set(line) == {"environment"}:
            environments.append(line["environment"])
        else:
            records.append(line)
    return environments, records


def merged_environment(environments: Sequence[dict]) -> dict[str, object]:
    """The environment of a merged report: the logs' own, each field's distinct values joined when the logs
    differ, and "not recorded" for a field no log holds (a log written before logs carried it).

    >>> merged_environment([{"torch": "2.11.0+cu130", "threads": 16}, {"torch": "2.11.0+cu130", "threads": 8}])
    {'torch': '2.11.0+cu130', 'python': 'not recorded', 'machine': 'not recorded', 'threads': '16 / 8'}
    """
    out: dict[str, object] = {}
    for key in ("torch", "python", "machine", "threads"):
        values = list(dict.fromkeys(e[key] for e in environments if key in e))
        out[key] = values[0] if len(values) == 1 else " / ".join(map(str, values)) if values else "not recorded"
    return out


def merge_records(logs: Sequence[Sequence[dict]]) -> list[dict]:
    """Records of several runs as one: a method's records come from the last log that holds it, and
    only (dataset, granularity, example) groups that every method finished are kept (fair pairs)."""
    by_method: dict[str, list[dict]] = {}
    for log in logs:
        for method in dict.fromkeys(r["method"] for r in log):
            by_method[method] = [r for r in log if r["method"] == method]
    groups: dict = defaultdict(dict)
    for method, records in by_method.items():
        for r in records:
            groups[(r["dataset"], r["granularity"], r["example"])][method] = r
    return [group[m] for group in groups.values() if len(group) == len(by_method) for m in by_method]
