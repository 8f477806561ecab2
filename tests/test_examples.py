"""The README tour's files exist in examples/ and say what the tour needs. tests/test_tour.py runs the
tour's lines as written; ``benchmarks/tour.py`` runs them as separate processes and records their
times, which the README renders (a command that fails stops that run)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from atman.batch import LINE_FIELDS

ROOT = Path(__file__).resolve().parent.parent


def _tour_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## A short tour")[1].split("```bash")[1].split("```")[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()
            and not line.strip().startswith("#")]


def test_every_file_the_tour_reads_is_in_the_clone():
    reads = {"--prompt-file", "--input", "--model", "--passages", "--context-file", "--messages"}
    paths = [command[i + 1] for command in _tour_commands() for i, word in enumerate(command[:-1]) if word in reads]
    local = [path for path in paths if "/" in path and not path.startswith("-")]
    assert {"examples/prompt.txt", "examples/requests.jsonl", "examples/context.txt", "examples/passages.jsonl",
            "examples/long-context.txt"} <= set(local)
    for path in local:
        assert (ROOT / path).exists(), path


def test_the_example_requests_are_valid_batch_lines():
    lines = (ROOT / "examples" / "requests.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 3
    for line in lines:
        request = json.loads(line)
        assert request["prompt"].strip() and set(request) <= set(LINE_FIELDS)
        for name, value in request.items():
            assert isinstance(value, LINE_FIELDS[name]), name


def test_the_long_context_holds_the_answer_the_tour_explains():
    context = (ROOT / "examples" / "context.txt").read_text(encoding="utf-8")
    assert "1887" in context and context.rstrip().endswith("founded in")


def test_the_tour_record_is_of_the_tour_as_written():
    """benchmarks/tour.py reads the same commands, and its record holds only commands of the tour."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("tour", ROOT / "benchmarks" / "tour.py")
    tour = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tour)
    commands = [command for _, command in tour.tour_commands((ROOT / "README.md").read_text(encoding="utf-8"))]
    assert [shlex.split(c, comments=True) for c in commands] == _tour_commands()
    record = ROOT / "benchmarks" / "results" / "tour-times.json"
    if record.exists():
        recorded = [row["command"] for row in json.loads(record.read_text(encoding="utf-8"))["rows"]]
        assert set(recorded) <= set(commands), "the tour changed: rerun python benchmarks/tour.py"
