"""The CLI package: fast parsing without torch, --version, option checks before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from atman.cli import main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "numpy")


def run_module(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "atman", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def imported(stderr: str) -> set[str]:
    """Top-level modules that ``-X importtime`` reports as imported."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("argv, code, words", [
    (["--help"], 0, "explain"),
    (["--version"], 0, "atman 0.1.0"),
    (["explain", "--help"], 0, "--granularity"),
    (["serve", "--help"], 0, "--read-timeout"),
    (["evaluate", "--help"], 0, "--ablations"),
    (["cite", "--help"], 0, "--passages"),
    (["explain", "x", "--granularity", "chapter"], 2, "invalid choice"),
    (["explain", "x", "--multiplier", "nan"], 2, "finite"),
    (["explain", "x", "--batch-size", "1" + "0" * 30], 2, "must lie in"),
])
def test_parsing_imports_no_heavy_module(argv, code, words):
    done = run_module(*argv)
    assert done.returncode == code, done.stderr[-2000:]
    assert words in done.stdout + done.stderr
    assert not imported(done.stderr) & set(HEAVY), imported(done.stderr) & set(HEAVY)


@pytest.mark.parametrize("argv, words", [
    (["serve", "--timeout", "nan"], "--timeout must be a number of seconds"),
    (["serve", "--timeout", "inf"], "--timeout must be a number of seconds"),
    (["serve", "--timeout", "1e999"], "--timeout must be a number of seconds"),
    (["serve", "--check-interval", "0"], "--check-interval must be a number of seconds"),
    (["serve", "--max-units", "0"], "--max-units must be a whole number"),
    (["serve", "--max-queue", "1e999"], "--max-queue must be a whole number"),
    (["serve", "--port", "70000"], "--port must lie in"),
])
def test_serve_rejects_bad_numbers_before_loading_anything(argv, words):
    done = run_module(*argv)
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr
    assert not imported(done.stderr) & set(HEAVY)


@pytest.mark.parametrize("value, words", [("", "empty"), ("  ", "only whitespace"), ("tok en", "whitespace")])
def test_serve_refuses_a_token_no_client_can_send(value, words):
    done = run_module("serve", env={"ATMAN_SERVER_TOKEN": value})
    assert done.returncode == 2 and words in done.stderr and "ATMAN_SERVER_TOKEN" in done.stderr


def test_output_checked_before_the_model_loads(tmp_path, capsys):
    # the model does not exist either: the output error must come first, without loading anything
    missing = tmp_path / "no" / "such" / "dir" / "out.json"
    assert main(["explain", "x", "-t", " y", "-m", str(tmp_path / "nomodel"), "-o", str(missing), "-q"]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "no directory" in err
    assert main(["explain", "x", "-t", " y", "-o", str(tmp_path), "-q"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["demo", "-o", str(missing), "-q"]) == 2
    assert "cannot write" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["evaluate", "--quick", "-o", str(blocker / "reports")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_overflowing_memory_budget_exits_2(capsys):
    assert main(["explain", "x", "-t", " y", "--max-memory", "1e999", "-q"]) == 2
    assert "too large" in capsys.readouterr().err


def test_cli_choices_agree_with_the_core():
    from atman.citer import METHODS, SOURCE_LEVELS
    from atman.cli import cite, media
    from atman.tiles import IMAGE_GRANULARITIES
    from atman.transcripts import LEVELS

    assert media.IMAGE_GRANULARITY_NAMES == tuple(IMAGE_GRANULARITIES)
    # --sources offers the transcript levels; one context takes all of them but "message"
    assert cite.SOURCE_LEVELS == LEVELS and cite.METHODS == METHODS
    assert tuple(level for level in LEVELS if level != "message") == SOURCE_LEVELS


def test_the_console_script_and_module_entry_points():
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for command in (["atman", "--version"], [sys.executable, "-m", "atman.cli", "--version"]):
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == "atman 0.1.0"


@pytest.mark.slow
def test_batch_lines_carry_line_number_and_id(tmp_path, capsys, smollm2):
    prompt = "Kira lives in Vostrand. Omar lives in Quillmere. Omar lives in"
    lines = [
        json.dumps({"id": "a", "prompt": prompt, "target": " Quillmere", "granularity": "sentence"}),
        "",
        json.dumps({"id": 7, "prompt": ""}),
        json.dumps({"id": "c", "prompt": prompt, "colour": "red"}),
        "{not json",
        json.dumps({"prompt": prompt, "target": " Quillmere", "granularity": "sentence"}),
    ]
    batch = tmp_path / "in.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    assert main(["explain", "--input", str(batch), "-q"]) == 1
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["line"], r.get("id")) for r in results] == [(1, "a"), (3, 7), (4, "c"), (5, None), (6, None)]
    assert "error" not in results[0] and results[0]["target"] == " Quillmere"
    assert all("error" in r for r in results[1:4]) and "error" not in results[4]


@pytest.mark.slow
def test_a_budget_below_one_plain_pass_is_warned(capsys, smollm2):
    prompt = "Kira lives in Vostrand. Omar lives in Quillmere. Omar lives in"
    assert main(["explain", prompt, "-t", " Quillmere", "-g", "sentence", "--max-memory", "1", "-f", "json",
                 "-q"]) == 0
    out, err = capsys.readouterr()
    assert "below one plain forward pass" in err and json.loads(out)["target"] == " Quillmere"
    assert main(["explain", prompt, "-t", " Quillmere", "-g", "sentence", "-f", "json", "-q"]) == 0
    assert "below one plain forward pass" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["atman.cli.shared", "atman.batch", "atman.cli.text", "atman.cli.media",
                                  "atman.server.security"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0 and result.attempted > 0
