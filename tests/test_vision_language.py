"""Vision-language models: the captioning LLaVA trained on synthetic scenes, and the image classifier ViT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from atman.errors import AtmanError, EmptyInputError, UnsupportedModelError
from atman.evaluate.image_metrics import mask_to_grid, precision_recall
from atman.evaluate.scenes import CAPTION_PREFIX, CLASSIFIER_CLUTTER, make_scene
from atman.explanation import ImageItem
from atman.tiles import ImageGrid, relevance_grid
from atman.vision import ImageClassifierExplainer, load_image_classifier
from atman.vision_language import VisionLanguageExplainer, load_vision_language

FIXTURES = Path(__file__).parent / "fixtures"
PROMPT = "<image>" + CAPTION_PREFIX


@pytest.fixture(scope="module")
def vlm():
    return load_vision_language(str(FIXTURES / "tiny-llava-scenes"))


@pytest.fixture(scope="module")
def explainer(vlm):
    return VisionLanguageExplainer(vlm)


def test_fixture_still_captions_held_out_scenes(vlm):
    """Two-object scenes: about 2e9 layouts, so these were not among the 192,000 training scenes
    (one-object scenes have only ~69,000 layouts, most of them seen in training)."""
    rng = np.random.default_rng(777)
    processor, model = vlm.processor, vlm.model
    right = 0
    for _ in range(30):
        scene = make_scene(rng, 2)
        enc = processor(images=scene.image, text=PROMPT, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        words = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        right += (CAPTION_PREFIX + " " + words).split() == scene.caption().split()
    assert right >= 24, f"{right} of 30 held-out captions right"


def test_relevance_points_at_the_named_object(explainer):
    """For most held-out scenes, the image tile AtMan ranks first lies on the object named by the target
    (an object covers about a sixth of the 36 tiles, so chance would put it there in ~4 of 24 cases)."""
    rng = np.random.default_rng(4242)
    hits, precisions = 0, []
    for _ in range(12):
        scene = make_scene(rng, 2)
        for k, obj in enumerate(scene.objects):
            prompt = PROMPT + "".join(f" {o.name} and a" for o in scene.objects[:k])
            exp = explainer.explain(prompt, " " + obj.name, images=[scene.image])
            grid = relevance_grid(exp.explanations[0].items, 0, ImageGrid(6, 6))
            mask = mask_to_grid(obj.mask, 6, 6)
            hits += mask.flat[int(grid.argmax())] > 0
            precisions.append(precision_recall(grid, mask)[0])
    assert hits >= 15, f"top tile on the object in {hits} of 24 cases"
    assert np.mean(precisions) > 0.2, f"mean precision {np.mean(precisions):.3f}"


def test_identities(vlm, explainer):
    """Row 0 is the plain model; multiplier 0 on a text unit equals masking it; batching changes nothing."""
    scene = make_scene(np.random.default_rng(3), 2)
    prompt, target = PROMPT, " " + scene.objects[0].name
    prepared = explainer.prepare(prompt, target, [scene.image])
    encoded = prepared.encoded
    start = encoded.target_start
    ids = torch.tensor(encoded.input_ids[start:])
    picture = next(p for p, span in enumerate(encoded.prompt_spans)
                   if span and prompt[span[0]:span[1]] == "picture")
    multipliers = torch.ones(3, len(encoded.input_ids))
    multipliers[1, picture] = 0.0
    multipliers[2, list(prepared.image_runs[0][:8])] = 0.3
    losses = explainer.losses(prepared, multipliers)

    def plain_loss(mask=None):
        inputs = dict(prepared.inputs)
        if mask is not None:
            inputs["attention_mask"] = mask
        with torch.no_grad():
            logits = vlm.model(**inputs).logits[0, start - 1:-1]
        return -torch.log_softmax(logits, -1).gather(-1, ids[:, None])[:, 0]

    torch.testing.assert_close(losses[0], plain_loss(), atol=1e-5, rtol=1e-5)
    mask = torch.ones(1, len(encoded.input_ids), dtype=torch.long)
    mask[0, picture] = 0
    torch.testing.assert_close(losses[1], plain_loss(mask), atol=1e-5, rtol=1e-5)
    single = VisionLanguageExplainer(vlm, batch_size=1).losses(prepared, multipliers)
    torch.testing.assert_close(single, losses, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(losses[2], losses[0])
    # the vision tower ran once and the prefix was reused; the full model on every row agrees
    assert explainer.fast_path
    every_row = explainer.engine.target_losses(prepared.inputs, ids, multipliers, engine="naive")
    torch.testing.assert_close(every_row, losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explainer.losses(prepared, multipliers, engine="naive"), losses, atol=1e-5, rtol=1e-5)


def test_units_map_to_words_and_image_positions(explainer, vlm):
    scene = make_scene(np.random.default_rng(8), 1)
    prompt = "picture <image> and <image>This is a picture of a"
    prepared = explainer.prepare(prompt, " " + scene.objects[0].name, [scene.image, scene.image])
    assert [len(run) for run in prepared.image_runs] == [36, 36]
    ids = prepared.encoded.input_ids
    assert all(ids[p] == vlm.model.config.image_token_id for run in prepared.image_runs for p in run)
    words = [prompt[a:b] for a, b in (s for s in prepared.encoded.prompt_spans if s)]
    assert words == ["picture", "and", "This", "is", "a", "picture", "of", "a"]
    exp = explainer.explain(prompt, " " + scene.objects[0].name, images=[scene.image, scene.image],
                            image_granularity="sentence")
    items = exp.explanations[0].items
    assert [item.text for item in items if item.kind == "prompt"] == words
    tiles = [item for item in items if isinstance(item, ImageItem)]
    assert [t.image for t in tiles] == [0] * 4 + [1] * 4
    assert (tiles[1].left, tiles[1].top, tiles[1].width, tiles[1].height) == pytest.approx((2 / 3, 0, 1 / 3, 2 / 3))
    assert exp.settings["images"][1] == {"width": 48, "height": 48, "rows": 6, "cols": 6, "tile": [4, 4]}


def test_generate_gives_a_target_that_re_tokenizes(explainer):
    scene = make_scene(np.random.default_rng(11), 1)
    caption = explainer.generate(PROMPT, [scene.image], max_new_tokens=4)
    assert caption.startswith(" ")
    exp = explainer.explain(PROMPT, caption, images=[scene.image])
    assert exp.target == caption


def test_bad_input_is_refused(explainer, vlm):
    scene = make_scene(np.random.default_rng(1), 1)
    with pytest.raises(AtmanError, match="marker"):
        explainer.explain(PROMPT, " red", images=[scene.image, scene.image])
    with pytest.raises(EmptyInputError):
        explainer.explain(PROMPT, "", images=[scene.image])
    with pytest.raises(AtmanError, match="granularity"):
        explainer.explain(PROMPT, " red", images=[scene.image], granularity="refine")
    with pytest.raises(UnsupportedModelError, match="image token"):
        VisionLanguageExplainer(load_image_classifier(str(FIXTURES / "tiny-vit-scenes")))


def test_vit_fixture_classifies_and_points_at_the_object():
    explainer = ImageClassifierExplainer(load_image_classifier(str(FIXTURES / "tiny-vit-scenes")))
    rng = np.random.default_rng(99)
    right, precisions = 0, []
    for _ in range(20):
        scene = make_scene(rng, 1, clutter=CLASSIFIER_CLUTTER)
        exp = explainer.explain(scene.image, target=scene.objects[0].name)
        right += exp.settings["predicted"] == scene.objects[0].name
        grid = relevance_grid(exp.explanations[0].items, 0, ImageGrid(6, 6))
        precisions.append(precision_recall(grid, mask_to_grid(scene.objects[0].mask, 6, 6))[0])
    assert right >= 16
    assert np.mean(precisions) > 0.4


def test_conceptual_suppression_sees_image_features(explainer, vlm):
    scene = make_scene(np.random.default_rng(21), 1)
    prepared = explainer.prepare(PROMPT, " " + scene.objects[0].name, [scene.image])
    embeds = explainer.input_embeddings(prepared)
    with torch.no_grad():
        features = vlm.model.model.multi_modal_projector(
            vlm.model.model.vision_tower(prepared.inputs["pixel_values"]).last_hidden_state[:, 1:])
    torch.testing.assert_close(embeds[list(prepared.image_runs[0])], features[0], atol=1e-5, rtol=1e-5)
    plain = explainer.explain(PROMPT, " " + scene.objects[0].name, images=[scene.image])
    spread = explainer.explain(PROMPT, " " + scene.objects[0].name, images=[scene.image], kappa=0.5)
    assert spread.settings["kappa"] == 0.5
    assert [i.score for i in spread.explanations[0].items] != [i.score for i in plain.explanations[0].items]
    with pytest.raises(AtmanError, match="kappa"):
        explainer.explain(PROMPT, " red", images=[scene.image], kappa=1.5)
