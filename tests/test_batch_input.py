"""Batch input read line by line as bytes, resumable output files, and the line that says what was written.

A line that is not UTF-8, or JSON nested too deeply for Python's parser, is that line's error object;
``--resume`` keeps an earlier run's results (also for local batches) and redoes a last line cut off by
a kill, even inside a multi-byte character. The command-line runs use a tiny random-init Llama saved
with SmolLM2's tokenizer (fast to load and to explain)."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_model

from atman import cli
from atman.batch import (
    BatchSummary,
    answer_line,
    decode_line,
    open_results,
    parse_line,
    read_requests,
    read_results,
    sort_results,
    split_lines,
)
from atman.cli.batch import run_requests

NESTED = b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
NOT_UTF8 = b'{"prompt": "Z\xfcrich lies on the", "target": " Limmat"}'  # Latin-1, not UTF-8
GOOD = [
    {"prompt": "Ada lives in Z\u00fcrich. Bo lives in Rome. Ada lives in", "target": " Z\u00fcrich", "id": "ada",
     "granularity": "sentence"},
    {"prompt": "Bo lives in Rome. Ada lives in Oslo. Bo lives in", "target": " Rome", "granularity": "sentence"},
]


def _bytes_file(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _echo(line: str) -> dict:
    return {"prompt": parse_line(line)["prompt"]}


def _args(output: Path | None, **options) -> argparse.Namespace:
    return argparse.Namespace(output=output, quiet=False, fail_fast=False, **options)


@pytest.fixture(scope="module")
def tiny_dir(smollm2, tmp_path_factory) -> Path:
    """A tiny random-init Llama with SmolLM2's tokenizer, saved as a model directory."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=len(smollm2.tokenizer), max_position_embeddings=256).save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    return folder


# --- reading: bytes, one line at a time ------------------------------------------------------------------


def test_a_line_that_is_not_utf8_or_too_deep_is_its_own_error():
    assert decode_line(b"caf\xc3\xa9") == "caf\u00e9"
    assert answer_line(_echo, NOT_UTF8, 2) == {"error": "not valid UTF-8: byte 0xfc at byte 14 of the line",
                                              "line": 2}
    assert answer_line(_echo, NESTED, 3) == {"error": "not valid JSON: nested too deeply", "line": 3}
    assert answer_line(_echo, NESTED.decode(), 3)["error"] == "not valid JSON: nested too deeply"
    # the id of a line that cannot be decoded is unknown; a readable id is echoed
    assert answer_line(_echo, b'{"prompt": 1, "id": "q\xc3\xa9"}', 4)["id"] == "q\u00e9"


def test_bytes_are_split_at_newlines_only_with_the_bom_and_cr_removed(tmp_path):
    data = b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode() + b"\r\n\n" + NOT_UTF8 + b"\n\xe2\x80\xa8x"
    assert split_lines(data) == [json.dumps(GOOD[0]).encode(), b"", NOT_UTF8, b"\xe2\x80\xa8x"]
    assert read_requests(_bytes_file(tmp_path / "in.jsonl", [b"a", b"\xff"])) == [b"a", b"\xff"]
    with pytest.raises(ValueError, match="cannot read"):
        read_requests(tmp_path / "missing.jsonl")


def test_the_rest_of_the_batch_runs_and_the_output_line_says_what_was_written(tmp_path, capsys):
    lines = [json.dumps(GOOD[0]).encode(), NOT_UTF8, NESTED, b"", json.dumps(GOOD[1]).encode()]
    out = tmp_path / "out.jsonl"
    assert run_requests(_echo, lines, _args(out)) == 1
    results = _results(out)
    assert [r["line"] for r in results] == [1, 2, 3, 5]
    assert results[0] == {"prompt": GOOD[0]["prompt"], "line": 1, "id": "ada"}
    assert "UTF-8" in results[1]["error"] and results[2]["error"] == "not valid JSON: nested too deeply"
    err = capsys.readouterr().err
    assert f"atman: wrote 4 results (2 errors) to {out}\n" in err and "2 of 4 lines failed" in err
    assert run_requests(_echo, lines, argparse.Namespace(output=out, quiet=True, fail_fast=False)) == 1
    assert "wrote" not in capsys.readouterr().err  # -q: no status line
    assert run_requests(_echo, lines[:1], _args(None)) == 0
    assert "wrote" not in capsys.readouterr().err  # to stdout: nothing to say


def test_summary_wording():
    assert BatchSummary(1, 0, answered=1).wrote("o") == "wrote 1 result to o"
    assert BatchSummary(5, 1, answered=3, kept=2, retried=1).wrote("o") == \
        "wrote 5 results (1 error, 2 kept from the earlier run, 1 retried after a lost worker) to o"


# --- resuming ------------------------------------------------------------------------------------------------


def _cut_inside_a_character(result: dict) -> bytes:
    """A result line as a kill leaves it: cut between the two bytes of a UTF-8 character."""
    data = json.dumps(result, ensure_ascii=False).encode()
    cut = data.index("\u00fc".encode()) + 1
    assert data[cut - 1:cut + 1] == b"\xc3\xbc"
    return data[:cut]


def test_resume_keeps_what_is_done_and_redoes_a_line_cut_by_a_kill(tmp_path, capsys):
    lines = [json.dumps(GOOD[0]).encode(), b'{"prompt": 7}', json.dumps(GOOD[1]).encode(),
             json.dumps(dict(GOOD[0], id="again")).encode()]
    out = tmp_path / "out.jsonl"
    kept = {"prompt": "kept from the first run", "line": 3}
    earlier = [json.dumps({"error": "lost", "line": 2}).encode(), json.dumps(kept).encode(),
               _cut_inside_a_character({"prompt": GOOD[0]["prompt"], "line": 4, "id": "again"})]
    out.write_bytes(b"\n".join(earlier))
    with pytest.raises(UnicodeDecodeError):
        out.read_text(encoding="utf-8")
    ran: list[str] = []

    def handle(line: str) -> dict:
        ran.append(line)
        return _echo(line)

    assert run_requests(handle, lines, _args(out, resume=True)) == 1
    assert len(ran) == 3  # lines 1, 2 (its error object is tried again) and 4 (cut off); 3 is kept
    results = _results(out)
    assert [r["line"] for r in results] == [1, 2, 3, 4]  # in input order, each once
    assert results[2] == kept and results[3] == {"prompt": GOOD[0]["prompt"], "line": 4, "id": "again"}
    assert "wrote 4 results (1 error, 1 kept from the earlier run)" in capsys.readouterr().err
    ran.clear()
    assert run_requests(handle, lines, _args(out, resume=True)) == 1
    assert len(ran) == 1 and _results(out) == results  # only the error line ran again


def test_resume_keeps_only_results_of_this_input(tmp_path):
    lines = [json.dumps(GOOD[0]).encode(), b"", json.dumps(GOOD[1]).encode()]
    out = tmp_path / "out.jsonl"
    out.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "another id", "line": 1, "id": "not-ada"},  # another input's line 1
        {"prompt": "a blank line", "line": 2},
        {"prompt": "past the end", "line": 9},
        {"prompt": "kept", "line": 3}, {"prompt": "kept twice", "line": 3},
        "not an object", {"line": True},
    ]) + "\n")
    assert read_results(out, lines) == {3: {"prompt": "kept twice", "line": 3}}
    assert sorted(read_results(out)) == [1, 2, 3, 9]


def test_open_results_sorts_what_came_out_of_order_and_keeps_one_result_a_line(tmp_path):
    out = tmp_path / "out.jsonl"
    with open_results(out, {2: {"line": 2, "kept": True}}) as write:
        write({"line": 3})
        write({"error": "x", "line": 1})
        write({"line": 1})
        write({"error": "late", "line": 3})
    assert _results(out) == [{"line": 1}, {"line": 2, "kept": True}, {"line": 3}]
    out.write_bytes(b'{"line": 2}\n{"line": 1}\n{"line": 3, "text": "\xc3')
    sort_results(out)
    assert _results(out) == [{"line": 1}, {"line": 2}]


# --- the command line, locally -----------------------------------------------------------------------------------


def test_cli_batch_with_bad_bytes_and_deep_nesting_then_resume(tiny_dir, tmp_path, capsys):
    requests = _bytes_file(tmp_path / "in.jsonl", [json.dumps(GOOD[0], ensure_ascii=False).encode(), NOT_UTF8,
                                                   NESTED, json.dumps(GOOD[1]).encode()])
    out = tmp_path / "out.jsonl"
    command = ["explain", "--input", str(requests), "--model", str(tiny_dir), "-o", str(out)]
    assert cli.main(command) == 1
    err = capsys.readouterr().err
    assert f"atman: wrote 4 results (2 errors) to {out}" in err and "2 of 4 lines failed" in err
    first = _results(out)
    assert [r["line"] for r in first] == [1, 2, 3, 4]
    assert first[0]["id"] == "ada" and first[0]["target"] == " Z\u00fcrich" and "explanations" in first[3]
    assert first[1]["error"].startswith("not valid UTF-8") and first[2]["error"] == "not valid JSON: nested too deeply"

    # a kill cut the last line inside the "ü" of line 1's result; line 4 is gone
    data = out.read_bytes().split(b"\n")
    out.write_bytes(b"\n".join([data[1], data[3], _cut_inside_a_character(first[0])]))
    assert cli.main([*command, "--resume", "-q"]) == 1
    assert _results(out) == first  # the same results, each once, in input order
    assert "wrote" not in capsys.readouterr().err


def test_cli_batch_from_stdin_bytes(tiny_dir, monkeypatch, capsys):
    data = json.dumps(GOOD[1]).encode() + b"\n" + NOT_UTF8 + b"\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert cli.main(["explain", "--input", "-", "--model", str(tiny_dir), "-q"]) == 1
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert results[0]["target"] == " Rome" and results[1]["error"].startswith("not valid UTF-8")


def test_resume_needs_an_output_file_and_a_batch(tmp_path, capsys):
    requests = _bytes_file(tmp_path / "in.jsonl", [json.dumps(GOOD[1]).encode()])
    assert cli.main(["explain", "--input", str(requests), "--resume", "-q"]) == 2
    assert "--resume needs an output file (-o)" in capsys.readouterr().err
    assert cli.main(["explain", "Ada lives in", "-t", " Oslo", "--resume", "-q"]) == 2
    assert "--resume applies to --input batches" in capsys.readouterr().err
    assert cli.main(["explain", "--input", str(tmp_path / "missing.jsonl"), "-q"]) == 2
    assert "cannot read" in capsys.readouterr().err
