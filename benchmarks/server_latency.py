"""What the HTTP layer costs: the same requests through the server (official client) and in-process.

    OMP_NUM_THREADS=1 python benchmarks/server_latency.py --reps 5 --json benchmarks/results/server-latency-smollm2.json

Starts the server on 127.0.0.1 in this process, then times each request kind both ways, alternating,
and prints the median of each and the difference (JSON lines); ``--json`` writes them, with the
machine's load, to a results file (docs/server.md renders its table from it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time

import uvicorn
from aleph_alpha_client import (
    Client,
    CompletionRequest,
    EvaluationRequest,
    ExplanationRequest,
    Prompt,
    PromptGranularity,
    TextControl,
)

from atman import Explainer, load_model
from atman.rows import TextControl as Control
from atman.server import create_app
from atman.steering import Steerer

PROMPT = ("Tamsin Orrelby keeps bees on the island of Quellmark. Doran Vesk repairs clocks in the town of "
          "Lindhaven.\nQuestion: Where does Doran Vesk repair clocks?\n"
          "Answer: Doran Vesk repairs clocks in the town of")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="write the rows and the machine's load to this results file")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    lm = load_model(args.model)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app({args.model: lm}), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = Client(token="unused", host=f"http://127.0.0.1:{sock.getsockname()[1]}", total_retries=0)
    explainer, steerer = Explainer(lm), Steerer(lm)
    start = PROMPT.index("Lindhaven")
    kinds = {
        "explain sentence": (
            lambda: client.explain(ExplanationRequest(Prompt.from_text(PROMPT), " Lindhaven",
                                                      prompt_granularity=PromptGranularity.Sentence), args.model),
            lambda: explainer.explain(PROMPT, " Lindhaven", granularity="sentence"),
        ),
        "complete 8 tokens, 1 control": (
            lambda: client.complete(CompletionRequest(Prompt.from_text(PROMPT, [TextControl(start, 9, 0.0)]),
                                                      maximum_tokens=8), args.model),
            lambda: steerer.generate(PROMPT, [Control(start, 9, 0.0)], max_new_tokens=8),
        ),
        "evaluate": (
            lambda: client.evaluate(EvaluationRequest(Prompt.from_text(PROMPT), completion_expected=" Lindhaven"),
                                    args.model),
            lambda: steerer.score(PROMPT, " Lindhaven"),
        ),
    }
    for name, (http, direct) in kinds.items():
        http()
        direct()  # warm up both paths
        times: dict[str, list[float]] = {"http": [], "direct": []}
        for _ in range(args.reps):
            for way, call in (("http", http), ("direct", direct)):
                began = time.perf_counter()
                call()
                times[way].append(time.perf_counter() - began)
        http_ms, direct_ms = (1000 * statistics.median(times[w]) for w in ("http", "direct"))
        row = {"request": name, "model": lm.name, "reps": args.reps, "http_ms": round(http_ms, 1),
               "direct_ms": round(direct_ms, 1), "overhead_ms": round(http_ms - direct_ms, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    server.should_exit = True
    thread.join()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"model": lm.name, "reps": args.reps, "load_average_before": [round(v, 2) for v in load_before],
                       "load_average_after": [round(v, 2) for v in os.getloadavg()], "rows": rows}, out, indent=1)
            out.write("\n")


if __name__ == "__main__":
    main()
