"""Images: tiles, image items, overlays, ViT-style classifiers on tiny configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageClassification,
    CLIPConfig,
    CLIPVisionConfig,
    DeiTConfig,
    Dinov2Config,
    SiglipConfig,
    SiglipVisionConfig,
    ViTConfig,
)

from atman.errors import AtmanError, GranularityError
from atman.explanation import Explanation, ImageItem, Item, TargetExplanation, TargetSpan
from atman.manipulation import enable, manipulate
from atman.render.html import render_html
from atman.render.image import heat, render_overlay, save_overlays
from atman.tiles import ImageGrid, grid_tiles, relevance_grid, tile_shape
from atman.vision import ImageClassifierExplainer, LoadedVisionModel

SIDE, PATCH = 32, 8
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=SIDE,
           patch_size=PATCH, num_labels=3)
CLASSIFIERS = {
    "vit": lambda: ViTConfig(**VIT),
    "deit": lambda: DeiTConfig(**VIT, architectures=["DeiTForImageClassificationWithTeacher"]),
    "dinov2": lambda: Dinov2Config(**VIT, num_register_tokens=0),
    "clip": lambda: CLIPConfig(vision_config=CLIPVisionConfig(**{k: v for k, v in VIT.items() if k != "num_labels"}),
                               num_labels=3),
    "siglip": lambda: SiglipConfig(
        vision_config=SiglipVisionConfig(**{k: v for k, v in VIT.items() if k != "num_labels"}), num_labels=3),
}
# the head reads only the CLS (and distillation) token: a patch no token attends to cannot reach it
CLS_POOLED = {"vit", "deit"}


def tiny_classifier(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(CLASSIFIERS[family](), attn_implementation="sdpa")
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0)  # random-init heads barely react; larger weights make differences visible
    return model.eval()


def pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def test_tiles_cover_the_grid_at_every_granularity():
    grid = ImageGrid(6, 6)
    assert [len(t.cells) for t in grid_tiles(grid, "token")] == [1] * 36
    assert len(grid_tiles(grid, "word")) == 9
    assert [len(t.cells) for t in grid_tiles(grid, "sentence")] == [16, 8, 8, 4]
    whole = grid_tiles(grid, "paragraph")
    assert len(whole) == 1 and (whole[0].left, whole[0].top, whole[0].width, whole[0].height) == (0, 0, 1, 1)
    assert tile_shape(grid, (3, 2)) == (3, 2) and len(grid_tiles(grid, (3, 2))) == 6
    assert tile_shape(grid, 5) == (5, 5)
    for spec in ("word", "sentence", (4, 1), 5):
        cells = sorted(c for t in grid_tiles(grid, spec) for c in t.cells)
        assert cells == list(range(36))
    tile = grid_tiles(ImageGrid(4, 8), "word")[5]  # second row of tiles, second tile
    assert tile.cells == (18, 19, 26, 27)
    assert (tile.left, tile.top, tile.width, tile.height) == (0.25, 0.5, 0.25, 0.5)
    with pytest.raises(GranularityError, match="unknown image granularity"):
        grid_tiles(grid, "page")
    with pytest.raises(GranularityError, match="positive"):
        grid_tiles(grid, (0, 2))


def test_relevance_grid_inverts_tiling():
    grid = ImageGrid(4, 6)
    tiles = grid_tiles(grid, (2, 3))
    items = [ImageItem(0, t.left, t.top, t.width, t.height, float(k + 1)) for k, t in enumerate(tiles)]
    items.append(ImageItem(1, 0.0, 0.0, 1.0, 1.0, 9.0))
    items.append(Item("prompt", "x", 0, 1, 5.0))
    out = relevance_grid(items, 0, grid)
    expected = np.repeat(np.repeat(np.array([[1.0, 2.0], [3.0, 4.0]]), 2, axis=0), 3, axis=1)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(relevance_grid(items, 1, grid), np.full((4, 6), 9.0))


def _image_explanation() -> Explanation:
    items = (Item("prompt", "look", 8, 4, 0.5), ImageItem(0, 0.0, 0.0, 0.5, 0.5, 2.0),
             ImageItem(0, 0.5, 0.5, 0.5, 0.5, -1.0))
    return Explanation(model="m", prompt="<image> look", target=" cat",
                       explanations=(TargetExplanation(TargetSpan(" cat", 0, 4), items),),
                       settings={"images": [{"width": 8, "height": 8, "rows": 2, "cols": 2, "tile": [1, 1]}]})


def test_image_items_round_trip_through_json():
    exp = _image_explanation()
    data = exp.to_dict()
    assert data["explanations"][0]["items"][1] == {"kind": "image", "image": 0, "left": 0.0, "top": 0.0,
                                                   "width": 0.5, "height": 0.5, "score": 2.0}
    again = Explanation.from_json(exp.to_json())
    assert again == exp
    assert exp.top(1)[0].text == "image 1, 0-50 % across, 0-50 % down"
    normalised = exp.postprocessed("absolute", normalize=True)
    assert [item.score for item in normalised.explanations[0].items] == [0.0, 1.0, pytest.approx(1 / 3)]


def test_overlay_paints_scores_where_the_items_are(tmp_path):
    exp = _image_explanation()
    image = Image.new("RGB", (8, 8), (255, 255, 255))
    values = heat(exp, (8, 8))
    assert values[0, 0] == 2.0 and values[7, 7] == -1.0 and values[0, 7] == 0.0
    overlay = np.asarray(render_overlay(exp, image)).astype(int)
    assert overlay[0, 0, 0] > overlay[0, 0, 2]  # orange: evidence for the target
    assert overlay[7, 7, 2] > overlay[7, 7, 0]  # blue: evidence against
    assert tuple(overlay[0, 7]) == (255, 255, 255)  # no item: the image itself
    paths = save_overlays(exp, [image], tmp_path / "report.html", scale=4)
    assert paths == [tmp_path / "report-image1.png"] and Image.open(paths[0]).size == (32, 32)
    html = render_html(exp, images=[image])
    assert html.count("data:image/png;base64,") == 1 and "image 1" in html
    assert "data:image/png" not in render_html(exp)
    assert '<div class="label">Prompt</div>' in html
    # an image classifier's explanation has no prompt text: no empty prompt box
    image_only = Explanation(model="m", prompt="", target="cat", explanations=(
        TargetExplanation(TargetSpan("cat", 0, 3), exp.explanations[0].items[1:]),), settings=exp.settings)
    page = render_html(image_only, images=[image])
    assert '<div class="label">Prompt</div>' not in page and page.count("data:image/png;base64,") == 1


@pytest.mark.parametrize("family", sorted(CLASSIFIERS))
def test_vit_family_identities(family):
    """m = 1 reproduces the plain model; batched rows equal single rows."""
    model = tiny_classifier(family)
    x = pixels()
    with torch.no_grad():
        plain = model(pixel_values=x, output_hidden_states=True)
        length = plain.hidden_states[0].shape[1]
        plain = plain.logits
        enable(model, {"pixel_values": x})
        rows = torch.ones(3, length)
        rows[1, length - 5] = 0.0
        rows[2, -6:] = 0.2
        with manipulate(rows) as state:
            batched = model(pixel_values=x.expand(3, -1, -1, -1)).logits
        assert state.calls == 2
        torch.testing.assert_close(batched[0], plain[0], atol=1e-5, rtol=1e-5)
        with manipulate(rows[:1], mode="multiplicative"):  # the eager path keeps attention bidirectional
            torch.testing.assert_close(model(pixel_values=x).logits, plain, atol=1e-4, rtol=1e-4)
        for r in (1, 2):
            with manipulate(rows[r:r + 1]):
                single = model(pixel_values=x).logits
            torch.testing.assert_close(batched[r], single[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(batched[2], plain[0], atol=1e-5)


@pytest.mark.parametrize("family", sorted(CLASSIFIERS))
def test_classifier_explainer_maps_tiles_to_patches(family):
    """With multiplier 0 a tile's patches are removed as keys: in CLS-pooled models, changing the pixels
    inside that tile no longer changes the output, and changing pixels elsewhere does."""
    model = tiny_classifier(family)
    explainer = ImageClassifierExplainer(LoadedVisionModel(model, None, family), multiplier=0.0)
    x = pixels()
    exp = explainer.explain(x, target=1, granularity="word")
    items = exp.explanations[0].items
    assert len(items) == 4 and all(isinstance(item, ImageItem) for item in items)
    assert exp.settings["images"] == [{"width": SIDE, "height": SIDE, "rows": 4, "cols": 4, "tile": [2, 2]}]
    assert (items[1].left, items[1].top, items[1].width, items[1].height) == (0.5, 0.0, 0.5, 0.5)
    batch_one = ImageClassifierExplainer(LoadedVisionModel(model, None, family), multiplier=0.0, batch_size=1)
    assert [i.score for i in batch_one.explain(x, target=1, granularity="word").explanations[0].items] == \
        pytest.approx([i.score for i in items], abs=1e-5)
    if family not in CLS_POOLED:
        return
    changed = x.clone()
    changed[..., :16, 16:] = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    again = explainer.explain(changed, target=1, granularity="word")
    # the top-right tile's own score: logprob under removal is unchanged, the baseline changed
    base_before, base_after = exp.settings["target_logprob"], again.settings["target_logprob"]
    assert base_before != pytest.approx(base_after, abs=1e-4)
    removed_before = base_before - items[1].score
    removed_after = base_after - again.explanations[0].items[1].score
    assert removed_before == pytest.approx(removed_after, abs=1e-5)
    other_before = base_before - items[0].score
    other_after = base_after - again.explanations[0].items[0].score
    assert other_before != pytest.approx(other_after, abs=1e-4)


def test_classifier_explainer_rejects_bad_targets():
    model = tiny_classifier("vit")
    explainer = ImageClassifierExplainer(LoadedVisionModel(model, None, "vit"))
    with pytest.raises(AtmanError, match="out of range"):
        explainer.explain(pixels(), target=3)
    with pytest.raises(AtmanError, match="unknown class"):
        explainer.explain(pixels(), target="zebra")
    with pytest.raises(AtmanError, match="no image processor"):
        explainer.explain(Image.new("RGB", (SIDE, SIDE)))
    assert explainer.explain(pixels(), target="LABEL_2").settings["class_index"] == 2
