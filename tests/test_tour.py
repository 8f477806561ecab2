"""The README's tour, run as written (in-process, in a scratch folder that sees the clone's examples/ and
tests/fixtures/), each line checked for what its comment promises.

`atman evaluate --quick`, the tour's last line, is left out: it runs for minutes and keeps its own record
(benchmarks/results/evaluate-quick.json); the suite's parts are tested in tests/test_evaluate.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_examples import _tour_commands

from atman import Explanation
from atman.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    where = tmp_path_factory.mktemp("tour")
    (where / "examples").symlink_to(ROOT / "examples")
    (where / "tests").mkdir()
    (where / "tests" / "fixtures").symlink_to(ROOT / "tests" / "fixtures")
    return where


def _run(command: list[str], where: Path, capsys) -> str:
    """Run one tour line; its standard output (a failing line fails the test with its error output)."""
    if command[0] == "python":
        done = subprocess.run([sys.executable, *command[1:]], cwd=where, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout
    assert command[0] == "atman"
    capsys.readouterr()
    code = main(command[1:])
    out, err = capsys.readouterr()
    assert code == 0, f"{' '.join(command)}\n{err}"
    return out


def _top(out: str) -> str:
    """The first row of an explanation's "top items" table."""
    return next(line for line in out.split("top items")[1].splitlines() if line.lstrip().startswith("1 "))


def _close(a, b, tol: float = 1e-4) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, abs_tol=tol)
    return a == b


def test_the_tour_runs_as_written(smollm2, ray_session, scratch, capsys, monkeypatch):
    monkeypatch.chdir(scratch)
    commands = _tour_commands()
    assert commands[-1] == ["atman", "evaluate", "--quick"]
    commands = commands[:-1]
    assert len(commands) == 12, "the tour changed: say here what each new line must show"
    outs = []
    for command in commands:
        if "--ray" in command:
            local = (scratch / "results.jsonl").read_text(encoding="utf-8").splitlines()
        outs.append(_run(command, scratch, capsys))
        if "--ray" in command:
            on_ray = (scratch / "results.jsonl").read_text(encoding="utf-8").splitlines()
            assert _close([json.loads(x) for x in on_ray], [json.loads(x) for x in local]), \
                "the Ray batch differs from the local batch"

    # which sentence made the model answer " Lindhaven"? -- the sentence that says so, first
    assert "Doran Vesk repairs clocks in Lindhaven." in _top(outs[0])
    # the greedy continuation, per generated token, as JSON
    explanation = Explanation.from_json((scratch / "explanation.json").read_text(encoding="utf-8"))
    assert explanation.settings["target_granularity"] == "token" and explanation.target
    # the chat model's report
    assert (scratch / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    # one result per request line, none an error
    requests = (ROOT / "examples" / "requests.jsonl").read_text(encoding="utf-8").splitlines()
    results = [json.loads(line) for line in (scratch / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(results) == len(requests) and not any("error" in r for r in results)
    # refine: the tokens inside the most relevant sentences, the answer's sentence among them
    assert "1887" in outs[4]
    # the sentence pair and the image
    assert "sentence B" in _top(outs[5]) and "'eats'" in _top(outs[5]), outs[5]
    assert (scratch / "scene.png").stat().st_size > 0
    assert (scratch / "why.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    # citations: the passage that states the founding year (p2) comes first for the first sentence
    cited = outs[8]
    assert "They were founded in 1887." in cited and "[p2:1]" in cited
    first_row = next(line for line in cited.splitlines() if "[p" in line)
    assert "[p2:" in first_row, cited
    # the 4,000-token context: each sentence of the response rests first on the sentence that states it
    rows = [line for line in outs[9].splitlines() if "] +" in line]
    firsts = [rows[0], next(r for r in rows if "Its first director was" in r)]
    assert "[24:2] +" in firsts[0] and "[20:4] +" in firsts[1], outs[9]
    # another method through the same command, on its own scale, with the words ranked
    assert outs[11].startswith("Integrated Gradients explanation") and "units: words" in outs[11]
    assert "prompt" in _top(outs[11]), outs[11]
