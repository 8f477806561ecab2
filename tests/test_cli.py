"""The command line: formats, batch files, and a clear exit code 2 for every kind of bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB
from transformers import AutoModelForCausalLM, BloomConfig

from atman import Explanation
from atman.cli import main

pytestmark = pytest.mark.slow
PROMPT = "Kira Denholm lives in Vostrand. Omar Pelle lives in Quillmere. Where does Omar live? Omar lives in"


@pytest.fixture(autouse=True)
def _model(smollm2):
    """Make sure the embedded model is converted and cached before the CLI loads it."""


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors (exit 2 with a usage line)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_json_output(capsys):
    code, out, err = run(capsys, "explain", PROMPT, "--target", " Quillmere", "-g", "sentence", "-f", "json", "-q")
    assert code == 0, err
    exp = Explanation.from_json(out)
    assert exp.top(1)[0].text == "Omar Pelle lives in Quillmere."
    assert exp.model == "SmolLM2-135M-Instruct"
    assert exp.settings["kappa"] is None  # conceptual suppression is off unless asked for


def test_conceptual_switches(capsys):
    for argv, kappa in ((["--conceptual"], 0.7), (["--kappa", "0.8"], 0.8), (["--no-conceptual"], None)):
        code, out, err = run(capsys, "explain", PROMPT, "-t", " Quillmere", "-g", "sentence", "-f", "json", "-q",
                             *argv)
        assert code == 0, err
        assert Explanation.from_json(out).settings["kappa"] == kappa


def test_explain_text_and_html_outputs(capsys, tmp_path):
    code, out, _ = run(capsys, "explain", PROMPT, "-t", " Quillmere", "-g", "sentence", "-q")
    assert code == 0 and "Omar Pelle lives in Quillmere." in out
    html = tmp_path / "report.html"
    code, _, _ = run(capsys, "explain", PROMPT, "-t", " Quillmere", "-g", "word", "-f", "html", "-o", str(html), "-q")
    assert code == 0 and html.read_text().startswith("<!DOCTYPE html>")
    # without -q a command that writes a file says what it wrote where
    data = tmp_path / "report.json"
    code, out, err = run(capsys, "explain", PROMPT, "-t", " Quillmere", "-g", "sentence", "-f", "json", "-o", str(data))
    assert code == 0 and out == "" and f"atman: wrote the explanation as JSON to {data}" in err
    # without --format the -o file's extension chooses it; --format wins over the extension
    inferred = tmp_path / "inferred.json"
    code, _, err = run(capsys, "explain", PROMPT, "-t", " Quillmere", "-g", "sentence", "-o", str(inferred))
    assert code == 0 and Explanation.from_json(inferred.read_text()).top(1)[0].text == "Omar Pelle lives in Quillmere."
    assert "as JSON" in err
    code, _, _ = run(capsys, "explain", PROMPT, "-t", " Quillmere", "-g", "sentence", "-f", "text", "-o", str(inferred),
                     "-q")
    assert code == 0 and not inferred.read_text().lstrip().startswith("{")


def test_prompt_from_file_and_options(capsys, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT)
    code, out, err = run(capsys, "explain", "--prompt-file", str(prompt_file), "-t", " Quillmere",
                         "--span", "0:12", "--span", "32:42", "--multiplier", "0", "--no-conceptual",
                         "--mode", "multiplicative", "--target-granularity", "token", "--postprocessing",
                         "absolute", "--normalize", "-f", "json", "-q")
    assert code == 0, err
    exp = Explanation.from_json(out)
    assert [i.text for i in exp.explanations[0].items] == ["Kira Denholm", "Omar Pelle"]
    assert exp.settings["multiplier"] == 0.0 and exp.settings["kappa"] is None
    assert exp.settings["mode"] == "multiplicative" and len(exp.explanations) > 1


def test_batch_keeps_going_past_bad_lines(capsys, tmp_path):
    lines = [
        json.dumps({"prompt": PROMPT, "target": " Quillmere", "granularity": "sentence"}),
        "{not json",
        json.dumps({"target": " x"}),
        json.dumps({"prompt": "", "target": " x"}),
        json.dumps({"prompt": PROMPT, "target": " x", "granularity": "chapter"}),
        json.dumps({"prompt": PROMPT, "target": " x", "colour": "red"}),
        json.dumps({"prompt": PROMPT, "target": " x", "multiplier": "high"}),
        "",
        json.dumps({"prompt": PROMPT, "max_new_tokens": 3, "granularity": "word", "conceptual": False}),
    ]
    batch = tmp_path / "in.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    out_file = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "explain", "--input", str(batch), "-o", str(out_file), "-q")
    assert code == 1
    assert "6 of 8 lines failed" in err
    results = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(results) == 8
    assert Explanation.from_dict(results[0]).top(1)[0].text == "Omar Pelle lives in Quillmere."
    assert [r.get("line") for r in results[1:7]] == [2, 3, 4, 5, 6, 7]
    assert all(r["error"] for r in results[1:7])
    assert "missing field: prompt" in results[2]["error"]
    assert results[7]["settings"]["generated_target"] is True and results[7]["settings"]["kappa"] is None


def test_batch_line_fields_and_unicode(capsys, tmp_path):
    lines = [
        {"prompt": PROMPT, "target": " Quillmere", "granularity": "sentence", "kappa": None},
        {"prompt": PROMPT, "target": " Quillmere", "granularity": "sentence", "conceptual": True},
        {"prompt": PROMPT + "\u2028 and more", "target": " Quillmere", "granularity": "sentence"},
        {"prompt": PROMPT, "target": " Quillmere", "spans": [[0, 12]]},
    ]
    batch = tmp_path / "in.jsonl"
    batch.write_text("\ufeff" + "\r\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    code, out, err = run(capsys, "explain", "--input", str(batch), "-q")
    assert code == 0, err
    results = [json.loads(line) for line in out.split("\n") if line]
    assert len(results) == 4
    assert results[0]["settings"]["kappa"] is None
    assert results[1]["settings"]["kappa"] == 0.7
    assert results[2]["prompt"].endswith("\u2028 and more")
    assert results[3]["settings"]["granularity"] == "spans"


def test_batch_from_stdin(capsys, monkeypatch):
    lines = [{"prompt": PROMPT, "target": " Quillmere", "granularity": "sentence"}, {"prompt": PROMPT, "multiplier": 7}]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(json.dumps(x) for x in lines) + "\n"))
    code, out, err = run(capsys, "explain", "--input", "-", "-q")
    results = [json.loads(line) for line in out.split("\n") if line]
    assert code == 1
    assert results[0]["target"] == " Quillmere" and "multiplier" in results[1]["error"]


def test_batch_fail_fast_stops_at_the_first_bad_line(capsys, tmp_path):
    batch = tmp_path / "in.jsonl"
    batch.write_text("\n".join([
        json.dumps({"prompt": PROMPT, "target": " Quillmere", "granularity": "sentence"}),
        json.dumps({"prompt": ""}),
        json.dumps({"prompt": PROMPT, "target": " Quillmere", "granularity": "sentence"}),
    ]))
    code, out, err = run(capsys, "explain", "--input", str(batch), "--fail-fast", "-q")
    assert code == 2
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == 2 and results[1] == {"error": "the prompt is empty", "line": 2}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "", "-t", " x"], "prompt is empty"),
        (["explain", PROMPT, "-t", ""], "target is empty"),
        (["explain", "word " * 9000, "-t", " x"], "context"),
        (["explain", "<|im_start|>", "-t", " x"], "no unit"),
        (["explain", PROMPT, "-t", " x", "-g", "delimiter"], "delimiter"),
        (["explain", PROMPT, "-t", " x", "--span", "3-4"], "START:END"),
        (["explain", PROMPT, "-t", " x", "--multiplier", "2"], "multiplier"),
        (["explain", PROMPT, "-t", " x", "--factor", "0.9"], "pass --multiplier = 1 - factor"),
        (["explain", "--prompt-file", "/no/such/file", "-t", " x"], "cannot read"),
        (["explain", PROMPT, "-t", " x", "--model", "./no/such/dir"], "no such model directory"),
        (["explain", PROMPT, "-t", " x", "--model", "/no/such/model.gguf"], "no such GGUF file"),
        (["explain", PROMPT, "-t", " x", "--batch-size", "0"], "batch-size"),
        (["explain", PROMPT, "-t", " x", "--kappa", "0.6", "--no-conceptual"], "choose one"),
        (["explain", PROMPT, "-t", " x", "-g", "word", "--span", "0:4"], "spans only apply"),
        (["explain", PROMPT, "-t", " x", "--device", "cuda:0"], "CUDA"),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, argv, message):
    code, _, err = run(capsys, *argv, "-q")
    assert code == 2
    assert message in err and "Traceback" not in err


def test_a_file_that_is_not_gguf(capsys, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"this is not a gguf file" * 10)
    code, _, err = run(capsys, "explain", PROMPT, "-t", " x", "--model", str(fake), "-q")
    assert code == 2 and "not a loadable GGUF model" in err


def test_an_architecture_that_bypasses_the_interface(capsys, tmp_path, smollm2):
    torch.manual_seed(0)
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4))
    bloom.save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    code, _, err = run(capsys, "explain", PROMPT, "-t", " x", "--model", str(tmp_path), "-q")
    assert code == 2 and "BloomForCausalLM" in err


def test_console_script_unknown_hub_id_and_stdin(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "atman.cli", "explain", PROMPT, "-t", " x", "-m",
                           "no-such-org/no-such-model"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "no-such-org/no-such-model" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(["atman", "explain", "-t", " Quillmere", "-g", "sentence", "-f", "json"], input=PROMPT + "\n",
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt"] == PROMPT


def test_demo_explains_by_sentence_then_refines_the_top_sentence(tmp_path, capsys, smollm2):
    from atman.cli import main

    report = tmp_path / "demo.html"
    assert main(["demo", "-o", str(report), "-q"]) == 0
    out = capsys.readouterr().out
    assert "Doran Vesk repairs clocks in the town of Lindhaven." in out
    # the two passes say what each shows, and the scores their unit
    assert "1 of 2: which sentence made the answer" in out and "2 of 2: the top sentence again, token by token" in out
    assert "in nats" in out and "units: sentences, the top 1 refined to tokens" in out
    page = report.read_text()
    assert "Lindhaven" in page and "which parts made the answer" in page
