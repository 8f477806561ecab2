"""Every rendered table in README.md and docs/ equals what its committed results file renders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _render():
    spec = importlib.util.spec_from_file_location("docs_render", ROOT / "docs" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_table_matches_its_results_file():
    render = _render()
    assert render.stale() == [], "run: python docs/render.py"


def test_tables_are_marked_and_rendered():
    render = _render()
    marked = [p for p in render.documents() if "<!-- table: " in p.read_text(encoding="utf-8")]
    assert any(p.name == "server.md" for p in marked)


def test_a_changed_number_is_caught(tmp_path):
    render = _render()
    (tmp_path / "docs").mkdir()
    (tmp_path / "r.json").write_text('{"rows": [{"factor": 0.0, "control_on": "evidence", "n": 1, '
                                     '"mean_answer_logprob": -19.351, "greedy_answer_rate": 0.05}]}')
    table = "<!-- table: steering r.json -->\n| stale |\n<!-- /table -->\n"
    (tmp_path / "README.md").write_text(table)
    assert render.stale(tmp_path) == ["README.md"]
    (tmp_path / "README.md").write_text(render.render_text(table, tmp_path))
    assert render.stale(tmp_path) == []
    assert "| 0 | evidence sentence | -19.35 | 5 % |" in (tmp_path / "README.md").read_text()
    with pytest.raises(KeyError, match="no renderer"):
        render.render_text("<!-- table: nothing r.json -->\nx\n<!-- /table -->", tmp_path)


def test_an_edited_evaluation_report_is_caught(tmp_path):
    render = _render()
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    source = ROOT / "docs" / "results" / "ig-smollm2.json"
    (results / "ig.json").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    text = (ROOT / "docs" / "results" / "ig-smollm2.md").read_text(encoding="utf-8")
    (tmp_path / "README.md").write_text("")
    (results / "ig.md").write_text(text, encoding="utf-8")
    assert render.stale(tmp_path) == []
    cell = text.split("| `integrated-gradients` | ")[1].split(" ")[0]
    (results / "ig.md").write_text(text.replace(cell, "0.123", 1), encoding="utf-8")
    assert render.stale(tmp_path) == ["docs/results/ig.md"]


def test_a_document_quoting_a_report_follows_its_json(tmp_path):
    render = _render()
    (tmp_path / "docs").mkdir()
    (tmp_path / "r.json").write_text((ROOT / "docs" / "results" / "ig-smollm2.json").read_text(encoding="utf-8"))
    block = render.render_text("<!-- table: evaluation-report r.json -->\n<!-- /table -->\n", tmp_path)
    assert "### Plausibility: qa, sentence units" in block and "# Evaluation of" not in block
    assert "`integrated-gradients`" in block


def test_a_table_inside_a_list_item_keeps_its_indentation(tmp_path):
    render = _render()
    (tmp_path / "docs").mkdir()
    (tmp_path / "r.json").write_text((ROOT / "benchmarks" / "results" / "cpu-vlm-llava.json").read_text())
    text = "- item\n\n  <!-- table: vlm-speed r.json -->\n  | stale |\n  <!-- /table -->\n"
    block = render.render_text(text, tmp_path)
    body = block.splitlines()[2:-1]
    assert body[0].startswith("  <!-- table:") and block.splitlines()[-1] == "  <!-- /table -->"
    assert all(line.startswith("  |") for line in body[1:]) and "stale" not in block


def test_a_gpu_log_fills_the_rows_its_json_lacks():
    render = _render()
    log = render._log("=== gpu-x (limit 30s) 01:00:00\n"
                      "model llama-8b (random init) (8030M parameters, bfloat16) on cuda\n"
                      "   256 tokens  plain             0.02 s (n=3)       66.0 MiB\n"
                      "   256 tokens  atman-naive       7.81 s (n=1)       66.0 MiB\n"
                      "   256 tokens  atman             1.22 s (n=3)      293.2 MiB\n=== gpu-x: exit 124 after 40s\n")
    written = {"model": "llama-8b (random init)", "rows": [
        {"tokens": 256, "method": "plain", "seconds": 0.0213, "runs": 3, "peak_bytes": 66.0 * 2**20}]}
    lines = render.gpu_token([written, log])
    assert lines[2].startswith("| Llama-3.1-8B | 256 | plain | 0.021 | 3 | 66.0 |")
    assert "| atman | 1.22 | 3 | 293.2 | 0.16x (6.4x faster) | 4.44x |" in lines[4]
