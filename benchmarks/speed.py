"""AtMan against the alternatives: wall time and peak memory, side by side in one process.

    python benchmarks/speed.py --lengths 64 128 256 512 --json benchmarks/results/cpu-smollm2.json

For prompts of each length (token granularity, a short fixed target) it runs, one after another in
the same process on the same loaded model:

  plain        one forward pass of prompt + target (logits at every position)
  atman-naive  AtMan, one full forward per token (the paper's way)
  atman        AtMan, cached engine (prefix reuse, logits only at the target), default memory budget
  atman-lean   the same with --max-memory plain (the memory model's estimate of one plain forward pass)
  atman-lean-kept  atman-lean without handing freed memory back to the system between batches
               (atman.budget.RELEASE_BETWEEN_BATCHES off; on a CPU only)
  atman-sentence  the cached engine at sentence granularity: the same batches and memory budget
               with far fewer units, to measure memory at lengths where token level takes long
  captum-fa    Captum FeatureAblation through LLMAttribution (token features)
  captum-ig16  Captum LayerIntegratedGradients, 16 steps, through LLMGradientAttribution
  captum-ig50  the same, 50 steps
  captum-gxa   Captum LayerGradientXActivation through LLMGradientAttribution

Captum's integrated gradients run their steps in internal batches of at most 4,096 tokens (its
``internal_batch_size``), without which 50 steps of a 512-token prompt exceed this machine's memory.

With --architecture NAME (see architectures.py) the model is one with the named architecture and
random weights, built on the device: cost and memory depend on shapes, not weights, so larger
models can be measured without downloading them (--tokenizer gives the tokenizer directory).
A method that runs out of GPU memory is recorded as such and the run goes on.

The --reps runs go in rounds: every method once, then every method again (A B A B), so that the
methods share the machine's drift; a method whose first run takes longer than --long-run seconds
runs once. Time is the median of a method's runs; its ratios to `plain` and to `atman-naive` are
taken round by round (a single-run method against the same round) and their median reported. CPU
seconds of the process (all threads) and the load average before each run are recorded too.
Memory is the peak growth over the call: on CPU the resident set size, sampled every 2 ms against
the size just before the call (after freeing what the allocator holds); on CUDA
torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from atman import Explainer, budget, load_model
from atman.evaluate.context_qa import make_examples

TARGET = " Lindhaven"
METHODS = ("plain", "atman-naive", "atman", "atman-lean", "atman-lean-kept", "atman-sentence", "captum-fa",
           "captum-ig16", "captum-ig50", "captum-gxa")
DEFAULT_METHODS = tuple(m for m in METHODS if m != "atman-lean-kept")


def build_prompt(tokenizer, length: int) -> str:
    """A context of invented fact sentences cut to exactly ``length`` prompt tokens."""
    sentences = []
    for ex in make_examples(200, seed=length, facts=5):
        sentences.append(ex.prompt.split("\n")[0])
        text = " ".join(sentences)
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        if len(enc["input_ids"]) > length:
            end = enc["offset_mapping"][length - 1][1]
            prompt = text[:end]
            if len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) == length:
                return prompt
    raise RuntimeError(f"could not build a prompt of {length} tokens")


def _trim() -> None:
    gc.collect()
    budget.trim_allocator()


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, int, float]:
    """(seconds, peak memory growth in bytes, CPU seconds of the process) of one call."""
    _trim()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        cpu = time.process_time()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return seconds, torch.cuda.max_memory_allocated() - before, time.process_time() - cpu
    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu = time.process_time()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return seconds, peak[0] - before, cpu


def _kept(fn: Callable[[], object]) -> object:
    budget.RELEASE_BETWEEN_BATCHES = False
    try:
        return fn()
    finally:
        budget.RELEASE_BETWEEN_BATCHES = True


def methods(lm, prompt: str) -> dict[str, Callable[[], object]]:
    from captum.attr import (
        FeatureAblation,
        LayerGradientXActivation,
        LayerIntegratedGradients,
        LLMAttribution,
        LLMGradientAttribution,
        TextTokenInput,
    )

    model, tokenizer = lm.model, lm.tokenizer
    ids = torch.tensor([tokenizer(prompt + TARGET)["input_ids"]], device=lm.device)
    naive = Explainer(lm, engine="naive")
    cached = Explainer(lm, engine="cached")
    lean = Explainer(lm, engine="cached", max_memory="plain")
    internal = max(1, 4096 // ids.shape[1])
    skip = list(tokenizer.all_special_ids)
    embeddings = model.get_input_embeddings()

    def plain():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    def captum_fa():
        attr = LLMAttribution(FeatureAblation(model), tokenizer)
        return attr.attribute(TextTokenInput(prompt, tokenizer, skip_tokens=skip), target=TARGET,
                              forward_in_tokens=False)

    def captum_gradient(method, **kwargs):
        def run():
            attr = LLMGradientAttribution(method(model, embeddings), tokenizer)
            return attr.attribute(TextTokenInput(prompt, tokenizer, skip_tokens=skip), target=TARGET, **kwargs)
        return run

    return {
        "plain": plain,
        "atman-naive": lambda: naive.explain(prompt, TARGET, granularity="token"),
        "atman": lambda: cached.explain(prompt, TARGET, granularity="token"),
        "atman-lean": lambda: lean.explain(prompt, TARGET, granularity="token"),
        "atman-lean-kept": lambda: _kept(lambda: lean.explain(prompt, TARGET, granularity="token")),
        "atman-sentence": lambda: cached.explain(prompt, TARGET, granularity="sentence"),
        "captum-fa": captum_fa,
        "captum-ig16": captum_gradient(LayerIntegratedGradients, n_steps=16, internal_batch_size=internal),
        "captum-ig50": captum_gradient(LayerIntegratedGradients, n_steps=50, internal_batch_size=internal),
        "captum-gxa": captum_gradient(LayerGradientXActivation),
    }


def run_once(fn: Callable[[], object], device: torch.device) -> dict:
    """One measured call: seconds, peak memory growth, CPU seconds, the load average before it."""
    load = os.getloadavg()[0]
    try:
        seconds, memory, cpu = measure(fn, device)
    except torch.cuda.OutOfMemoryError:
        _trim()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"out_of_memory": True, "load_before": load}
    return {"seconds": seconds, "peak_bytes": memory, "cpu_seconds": cpu, "load_before": load}


def run_rounds(fns: dict[str, Callable[[], object]], names: list[str], device: torch.device, reps: int,
               long_run: float, report: Callable[[str, dict], None]) -> dict[str, list[dict | None]]:
    """``reps`` rounds of every method in turn (A B A B); a method out of memory, or whose first run took
    over ``long_run`` seconds, runs no more (None in the later rounds)."""
    runs: dict[str, list[dict | None]] = {name: [] for name in names}
    for round_ in range(reps):
        for name in names:
            first = runs[name][0] if runs[name] else None
            if round_ and (first is None or first.get("out_of_memory") or first["seconds"] > long_run):
                runs[name].append(None)
                continue
            result = run_once(fns[name], device)
            runs[name].append(result)
            report(name, result)
    return runs


def summarise(runs: list[dict | None]) -> dict:
    done = [r for r in runs if r is not None]
    if any(r.get("out_of_memory") for r in done):
        return {"seconds": None, "runs": 0, "peak_bytes": None, "out_of_memory": True}
    return {"seconds": statistics.median(r["seconds"] for r in done), "runs": len(done),
            "peak_bytes": max(r["peak_bytes"] for r in done),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in done),
            "load_before": [r["load_before"] for r in done]}


def round_ratio(runs: list[dict | None], base: list[dict | None], key: str) -> float | None:
    """Median over rounds of this method's ``key`` over the base's in the same round (a method that ran
    once is set against the base's round it ran in)."""
    ratios = [r[key] / b[key] for r, b in zip(runs, base, strict=True)
              if r is not None and b is not None and r.get(key) and b.get(key)]
    return statistics.median(ratios) if ratios else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def table(rows: list[dict]) -> list[str]:
    """The results as the Markdown table docs/performance.md shows (from a results file's ``rows``): the
    docs' own renderer (docs/render.py ``speed``), so that the two never differ."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_render", Path(__file__).resolve().parent.parent / "docs"
                                                  / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    return render.speed({"rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model to load (default: the embedded SmolLM2)")
    parser.add_argument("--architecture", default=None,
                        help="instead of --model: random weights in a named architecture (architectures.py)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for --architecture")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--long-run", type=float, default=60.0)
    parser.add_argument("--json", type=Path, help="write all measurements here (rewritten after each length)")
    parser.add_argument("--render", type=Path, metavar="RESULTS.json",
                        help="print the table of a results file, run nothing")
    args = parser.parse_args()
    if args.render:
        print("\n".join(table(json.loads(args.render.read_text())["rows"])))
        return

    if args.architecture:
        from architectures import random_model

        if not args.tokenizer:
            parser.error("--architecture needs --tokenizer")
        lm = random_model(args.architecture, args.tokenizer, device=args.device, dtype=args.dtype)
    else:
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
    device = lm.device
    machine = (f"{platform.machine()}, {psutil.cpu_count()} cores, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}; host {machine}"
    parameters = sum(p.numel() for p in lm.model.parameters())
    print(f"model {lm.name} ({parameters / 1e6:.0f}M parameters, {args.dtype}) on {device}; {machine}",
          flush=True)
    rows = []
    for length in args.lengths:
        prompt = build_prompt(lm.tokenizer, length)
        fns = methods(lm, prompt)

        def report(name: str, result: dict, length: int = length) -> None:
            shown = ("out of memory" if result.get("out_of_memory") else
                     f"{result['seconds']:9.2f} s  cpu {result['cpu_seconds']:9.2f} s  "
                     f"{result['peak_bytes'] / 2**20:9.1f} MiB")
            print(f"  {length:>4} tokens  {name:<16} {shown}  load {result['load_before']:.1f}", flush=True)

        runs = run_rounds(fns, args.methods, device, args.reps, args.long_run, report)
        for name in args.methods:
            row = {"tokens": length, "method": name, **summarise(runs[name]), "all_runs": runs[name]}
            for base in ("plain", "atman-naive"):
                if base in runs:
                    row[f"time_vs_{base}"] = round_ratio(runs[name], runs[base], "seconds")
                    row[f"cpu_vs_{base}"] = round_ratio(runs[name], runs[base], "cpu_seconds")
                    row[f"memory_vs_{base}"] = _ratio(row["peak_bytes"], max(
                        (r["peak_bytes"] for r in runs[base] if r is not None and "peak_bytes" in r), default=None))
            rows.append(row)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"model": lm.name, "parameters": parameters, "device": str(device),
                                             "machine": machine, "dtype": args.dtype, "command": " ".join(sys.argv),
                                             "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1))
    print()
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
