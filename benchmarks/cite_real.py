"""Citation on the real-document sets: every method scored the same way, side by side, one context at a time.

For each context of the chosen split (:func:`atman.evaluate.cite_real.split`) every method gives one score
per sentence source for the gold response; our code then measures, for every method alike, the top-1/3/5
log-probability drop, the LDS over 32 held-out ablations, hit@1/@3 against the gold sentences, the
token-forwards (a hook on the model) and this process's CPU time. ContextCite runs once per context with
the most ablations asked for; ContextCite-32 and -64 are its fits on the first 32 and 64 of those
ablations (ContextCite draws mask i from seed i, so these are the masks a run with 32 or 64 draws) and
their cost is what the run had spent when its 32nd or 64th ablation was done, plus their own fit.

Records are appended to ``--out`` after every method, so a run cut short keeps what it measured and the
next run with the same ``--out`` skips what is there (cost ratios are taken against ContextCite-32 of the
same run only). The metric passes (held-out ablations, top-k deletions) are kept in ``--cache`` so that a
later run does not repeat them; they are not part of any method's cost.

    OMP_NUM_THREADS=1 python benchmarks/cite_real.py --split dev --only readout-removed,contextcite-64 \\
        --out docs/results/cite-real-dev.json
    python benchmarks/cite_real.py --report docs/results/cite-real-dev.json --paired-with contextcite-64
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atman import load_model
from atman.evaluate.citation import (
    CitationTask,
    HoldOut,
    MethodRun,
    OutOfProcess,
    ResponseScorer,
    count_token_forwards,
    layout,
    leave_one_out,
    passages_of,
    readout_full_top,
    readout_local_top,
    readout_refine,
    readout_screened,
    readout_suppression,
    readout_surrogate,
    run_method,
    score_method,
)
from atman.evaluate.cite_data import invented_example
from atman.evaluate.cite_real import hits, render, shortest, split, summarise

CONTEXTCITE = "contextcite-"
PLAIN = "plain-forward"


@dataclass(frozen=True)
class Case:
    """One context to cite: a real document, or an invented one (``--invented``)."""

    name: str
    set: str
    position: str
    question_id: str
    evidence: tuple[int, ...]
    task: CitationTask


def plain_forward(lm, task) -> np.ndarray:
    """One forward pass of the prompt and response as the model computes it (logits at every position):
    the unit the cost of a citation is compared with."""
    import torch

    ids = torch.tensor([layout(lm.tokenizer, task).input_ids], device=lm.device)
    with torch.no_grad():
        lm.model(input_ids=ids, use_cache=False)
    return np.zeros(len(task.sources))


_ATTNLRP: dict[int, object] = {}   # one lxt worker per loaded model, started on first use


def attnlrp_scores(lm, task) -> OutOfProcess:
    """AttnLRP at sentence level (:meth:`atman.baselines.lrp.AttnLRP.source_scores`, lxt in its own
    environment's worker process), with the worker's cost: the token-forwards charged (one forward and one
    backward pass of the whole sequence, counted as three forwards: a backward pass costs about two) and the
    worker's CPU seconds, which :func:`run_method` adds to this process's."""
    from atman.baselines.lrp import AttnLRP

    method = _ATTNLRP.get(id(lm))
    if method is None:
        method = _ATTNLRP[id(lm)] = AttnLRP(lm)
    child = method.worker_cpu_seconds()
    scores = method.source_scores(task)
    return OutOfProcess(scores, 3 * len(layout(lm.tokenizer, task).input_ids), method.worker_cpu_seconds() - child)


def methods(lm, task) -> dict[str, Callable[[], np.ndarray]]:
    """Name -> a call returning one score per source (ContextCite is run by :func:`contextcite_family`)."""
    from atman.baselines import at2, attribot

    table: dict[str, Callable[[], np.ndarray]] = {
        "leave-one-out": lambda: leave_one_out(ResponseScorer(lm, task)),
        "attribot-loo": lambda: attribot.cached_leave_one_out(lm, task),
        "attribot-hierarchical-3": lambda: attribot.hierarchical_leave_one_out(lm, task, 3),
        "at2": lambda: at2.at2_scores(lm, task),
        "attnlrp": lambda: attnlrp_scores(lm, task),
        "readout-removed": lambda: readout_suppression(lm, task),
        "readout-refine": lambda: readout_refine(lm, task, passages=True),
        "readout-passages": lambda: readout_refine(lm, task, block=0, passages=True),
        "readout-full-top-5": lambda: readout_full_top(lm, task, 5),
        "readout-full-top-3": lambda: readout_full_top(lm, task, 3),
        "readout-full-top-8": lambda: readout_full_top(lm, task, 8),
        "readout-refine+full-top-3": lambda: readout_full_top(
            lm, task, 3, base=lambda engine: readout_refine(lm, task, passages=True, engine=engine)),
        "readout-refine+full-top-5": lambda: readout_full_top(
            lm, task, 5, base=lambda engine: readout_refine(lm, task, passages=True, engine=engine)),
        "readout-local-top-5": lambda: readout_local_top(lm, task, 5),
        "readout-local-top-10": lambda: readout_local_top(lm, task, 10),
        "readout-response-removed": lambda: readout_suppression(lm, task, from_response=True),
        "readout-gradient": lambda: readout_screened(lm, task, 0),
    }
    for k in (4, 8, 16):
        table[f"readout-screened-{k}"] = lambda k=k: readout_screened(lm, task, k)
        table[f"readout-response-screened-{k}"] = lambda k=k: readout_screened(lm, task, k, from_response=True)
    for n in (64, 128, 256):
        table[f"readout-masks-{n}"] = lambda n=n: readout_surrogate(lm, task, n)
        table[f"readout-masks-{n}+singles"] = lambda n=n: readout_surrogate(lm, task, n, with_singles=True)
        table[f"readout-masks-{n}+singles+full-top-3"] = lambda n=n: readout_full_top(
            lm, task, 3, base=lambda engine: readout_surrogate(lm, task, n, with_singles=True, engine=engine))
    return table


def contextcite_family(lm, task, counts: list[int]) -> dict[int, tuple[np.ndarray, int, float, float]]:
    """ContextCite run once with ``max(counts)`` ablations; for each count its scores, token-forwards, wall
    and CPU seconds as a run with that many ablations would have spent them."""
    import copy

    from context_cite.utils import aggregate_logit_probs

    from atman.baselines.contextcite import FixedResponseModel, make_partitioner
    from atman.evaluate.citation import PROMPT_TEMPLATE, response_token_ids

    partitioner = make_partitioner(task.sources)   # imports context_cite quietly
    import context_cite

    marks: list[tuple[int, float, float]] = []
    tokenizer = copy.copy(lm.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = FixedResponseModel(lm.model, response_token_ids(lm.tokenizer, task))
    with count_token_forwards(lm.model) as counter:
        handle = lm.model.register_forward_hook(
            lambda *_: marks.append((counter.tokens, time.perf_counter(), time.process_time())))
        try:
            start, cpu = time.perf_counter(), time.process_time()
            citer = context_cite.ContextCiter(
                model, tokenizer, task.sources.ablate(), task.query, num_ablations=max(counts), batch_size=1,
                prompt_template=PROMPT_TEMPLATE, partitioner=partitioner,
                generate_kwargs={"max_new_tokens": len(model.response_ids)})
            with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*autocast.*")
                masks, logit_probs = citer._masks, citer._logit_probs   # context-cite 0.0.4's ablation data
        finally:
            handle.remove()
    if len(marks) != max(counts):
        raise RuntimeError(f"ContextCite ran {len(marks)} forward passes for {max(counts)} ablations")
    out = {}
    outputs_all = np.asarray(logit_probs)
    for n in counts:
        fit_wall, fit_cpu = time.perf_counter(), time.process_time()
        outputs = aggregate_logit_probs(outputs_all[:n])
        weights, _ = citer.solver.fit(masks[:n], outputs, outputs_all.shape[1])
        fit_wall, fit_cpu = time.perf_counter() - fit_wall, time.process_time() - fit_cpu
        tokens, wall, cpu_at = marks[n - 1]
        out[n] = (np.asarray(weights, dtype=np.float64), tokens, wall - start + fit_wall, cpu_at - cpu + fit_cpu)
    return out


def cache_path(cache: Path, lm, name: str, task) -> Path:
    digest = hashlib.sha256(f"{lm.name}\n{task.prompt()}\n{task.response}".encode()).hexdigest()[:16]
    return cache / f"{name.replace(':', '_').replace('/', '_')}-{digest}.npz"


def load_memo(path: Path) -> dict[bytes, np.ndarray]:
    if not path.exists():
        return {}
    data = np.load(path)
    return {bytes.fromhex(k): data[k] for k in data.files}


def save_memo(path: Path, memo: dict[bytes, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k.hex(): v for k, v in memo.items()})
    tmp.replace(path)


def write(out: Path, run: dict, records: list[dict]) -> None:
    """Add this run and its records to ``out`` (under a lock: several runs may share one file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(out.read_text()) if out.exists() else {"runs": [], "records": []}
        data["runs"] = [r for r in data["runs"] if r["id"] != run["id"]] + [run]
        seen = {(r["context"], r["method"]) for r in data["records"]}
        data["records"] += [r for r in records if (r["context"], r["method"]) not in seen]
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("dev", "test"), default="dev")
    parser.add_argument("--contexts", help="comma-separated context names, run in this order (default: every "
                                           "context of the split)")
    parser.add_argument("--positions", help="comma-separated positions to keep (early, middle, late)")
    parser.add_argument("--shortest", action="store_true", help="one context per question: its shortest")
    parser.add_argument("--invented", help="instead of the split: invented contexts SEED:SOURCES,... "
                                           "(atman.evaluate.cite_data.invented_example)")
    parser.add_argument("--only", help="comma-separated method names (contextcite-N for ContextCite with N ablations)")
    parser.add_argument("--holdout", type=int, default=32, help="held-out ablations for LDS")
    parser.add_argument("--out", type=Path, help="JSON file of the records (appended to)")
    cache = Path(os.environ.get("ATMAN_CACHE_DIR", Path.home() / ".cache/atman")) / "cite-real"
    parser.add_argument("--cache", type=Path, default=cache, help="folder for the metric passes")
    parser.add_argument("--report", type=Path, help="only print the tables of a JSON file this wrote")
    parser.add_argument("--methods", help="with --report: the methods to show, in order")
    parser.add_argument("--paired-with", help="with --report: paired differences against this method")
    args = parser.parse_args(argv)
    if args.report:
        data = json.loads(args.report.read_text())
        chosen = args.methods.split(",") if args.methods else None
        table = summarise(data["records"], chosen, paired_with=args.paired_with)
        print(render(table, loo=any(r["method"] == "attribot-loo" for r in data["records"]),
                     paired_with=args.paired_with))
        return 0
    if args.out is None or not args.only:
        parser.error("--out and --only are required")

    lm = load_model()
    wanted = args.only.split(",")
    documents = [Case(d.name, d.set, d.position, d.question_id, d.evidence, d.example.task)
                 for d in (shortest(split(args.split)) if args.shortest else split(args.split))]
    if args.invented:
        documents = []
        for spec in args.invented.split(","):
            seed, sources = (int(v) for v in spec.split(":"))
            ex = invented_example(seed, n_sources=sources)
            name = f"invented:{seed}:{sources}"
            documents.append(Case(name, "invented", ex.kind, name, ex.evidence, ex.task))
    if args.positions:
        documents = [d for d in documents if d.position in args.positions.split(",")]
    if args.contexts:   # in the order given
        by_name = {d.name: d for d in documents}
        documents = [by_name[name] for name in args.contexts.split(",") if name in by_name]
    existing = json.loads(args.out.read_text()) if args.out.exists() else {"records": []}
    run = {"id": f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", "model": lm.name,
           "command": " ".join(sys.argv), "load_start": os.getloadavg()}
    done = {(r["context"], r["method"]) for r in existing["records"]}
    records: list[dict] = []
    for doc in documents:
        task = doc.task
        todo = [m for m in wanted if (doc.name, m) not in done]
        if not todo:
            continue
        lay = layout(lm.tokenizer, task)
        print(f"{doc.name}: {len(task.sources)} sources, {len(lay.input_ids)} tokens", file=sys.stderr)
        scorer = ResponseScorer(lm, task, reuse_prefix=True)
        memo_file = cache_path(args.cache, lm, doc.name, task)
        scorer.remember(load_memo(memo_file))
        holdout = HoldOut.measure(scorer, args.holdout)
        save_memo(memo_file, scorer.memo)
        runs = []
        family = sorted(int(m[len(CONTEXTCITE):]) for m in todo if m.startswith(CONTEXTCITE))
        if family:
            load = os.getloadavg()
            for n, (scores, tokens, wall, cpu) in contextcite_family(lm, task, family).items():
                runs.append((f"{CONTEXTCITE}{n}", scores, tokens, wall, cpu, load))
        table = methods(lm, task)
        for name in todo:
            if name == PLAIN:
                load = os.getloadavg()
                measured = run_method(name, lm, lambda task=task: plain_forward(lm, task))
                records.append({"run": run["id"], "context": doc.name, "set": doc.set, "position": doc.position,
                                "question_id": doc.question_id, "sources": len(task.sources),
                                "tokens": len(lay.input_ids), "method": name, "token_forwards": measured.token_forwards,
                                "seconds": measured.seconds, "cpu_seconds": measured.cpu_seconds,
                                "load": [round(v, 2) for v in load]})
                continue
            if name.startswith(CONTEXTCITE):
                continue
            load = os.getloadavg()
            measured = run_method(name, lm, table[name])
            runs.append((name, measured.scores, measured.token_forwards, measured.seconds, measured.cpu_seconds, load))
        for name, scores, tokens, wall, cpu, load in runs:
            measured = score_method(MethodRun(name, np.asarray(scores), tokens, wall, cpu), scorer, holdout,
                                    doc.evidence)
            record = {"run": run["id"], "context": doc.name, "set": doc.set, "position": doc.position,
                      "question_id": doc.question_id, "sources": len(task.sources),
                      "passages": len(set(passages_of(task.sources))), "tokens": len(lay.input_ids),
                      "method": name, "token_forwards": tokens, "seconds": wall, "cpu_seconds": cpu,
                      "load": [round(v, 2) for v in load], **measured.metrics,
                      "hit1": hits(scores, doc.evidence, 1), "hit3": hits(scores, doc.evidence, 3),
                      "scores": [round(float(v), 5) for v in scores]}
            record.pop("evidence_first", None)
            records.append(record)
            print(f"  {name}: {tokens} token-forwards, {cpu:.1f} s CPU, "
                  + ", ".join(f"{k} {record[k]:.2f}" for k in ("top1_drop", "top3_drop", "lds", "hit1")),
                  file=sys.stderr)
            save_memo(memo_file, scorer.memo)
            run["load_end"] = os.getloadavg()
            write(args.out, run, records)
    table = summarise(json.loads(args.out.read_text())["records"], wanted)
    print(render(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
