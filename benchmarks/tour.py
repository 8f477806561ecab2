"""Run the README's short tour as written and record how long each command takes, with the machine's load.

    OMP_NUM_THREADS=1 python benchmarks/tour.py --json benchmarks/results/tour-times.json

The commands are read from the README's tour block (so the record is of the lines a reader runs),
each run in a scratch directory that holds the clone's ``examples/`` and ``tests/fixtures/`` (the
files the tour reads), one after the other, with the whole process timed: starting Python and
loading the model included. ``--skip`` leaves out commands whose text contains a word (``atman
evaluate --quick`` has its own record, written by the command itself). A command that fails stops
the run with its output: the tour must work as written. The README renders its table of times from
the results file (``python docs/render.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tour_commands(readme: str) -> list[tuple[str, str]]:
    """(the comment above it, the command) for every command of the README's tour block."""
    block = readme.split("## A short tour")[1].split("```bash")[1].split("```")[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    out, comment = [], ""
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            comment = stripped.lstrip("# ").strip()
            continue
        out.append((comment, stripped))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the times and the machine's load to this results file")
    parser.add_argument("--skip", nargs="*", default=["evaluate"], help="leave out commands containing a word")
    args = parser.parse_args()
    commands = [(c, cmd) for c, cmd in tour_commands((ROOT / "README.md").read_text(encoding="utf-8"))
                if not any(word in cmd.split() for word in args.skip)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="atman-tour-") as scratch:
        for folder in ("examples", "tests/fixtures"):
            shutil.copytree(ROOT / folder, Path(scratch) / folder, symlinks=True)
        for comment, command in commands:
            load = os.getloadavg()[0]
            began = time.perf_counter()
            done = subprocess.run(command, shell=True, cwd=scratch, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - began
            if done.returncode != 0:
                print(f"failed ({done.returncode}): {command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}",
                      file=sys.stderr)
                return 1
            row = {"comment": comment, "command": command, "seconds": round(seconds, 1),
                   "load_average_at_start": round(load, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}",
                  "python": platform.python_version(), "skipped": args.skip, "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
