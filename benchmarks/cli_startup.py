"""How long ``atman --help`` takes, next to importing what the CLI used to import before parsing.

    python benchmarks/cli_startup.py --reps 5

The CLI imports torch and transformers only when a command runs; before, every call (``--help``
included) imported the explainer, the manipulation and the server and evaluation sub-commands'
modules first. Runs both in fresh interpreters, alternating, and prints the medians and
their ratio (one JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "atman --help": [sys.executable, "-m", "atman", "--help"],
    "atman explain --help": [sys.executable, "-m", "atman", "explain", "--help"],
    "the old CLI's imports": [sys.executable, "-c", "import atman.explainer, atman.manipulation, atman.vision, "
                              "atman.evaluate.suite"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write the result, with the machine's load, to this results file")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.reps):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    medians = {name: round(statistics.median(values), 3) for name, values in times.items()}
    heavy = medians["the old CLI's imports"]
    result = {"median_s": medians, "help_vs_heavy_imports": round(medians["atman --help"] / heavy, 3),
              "reps": args.reps, "load_average_at_start": round(load, 2)}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=1)
            out.write("\n")


if __name__ == "__main__":
    main()
