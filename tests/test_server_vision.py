"""A served vision-language model (the committed reference LLaVA), driven by the official Aleph Alpha client.

``create_app`` serves a loaded vision-language model through :class:`VisionLanguageService`.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("aleph_alpha_client")

from _approx import close  # noqa: E402
from _server import serving  # noqa: E402
from aleph_alpha_client import (  # noqa: E402
    Client,
    CompletionRequest,
    ControlTokenOverlap,
    EvaluationRequest,
    ExplanationRequest,
    Image,
    ImageControl,
    ImagePromptItemExplanation,
    Prompt,
    PromptGranularity,
    TargetGranularity,
    Text,
    TextControl,
    TextPromptItemExplanation,
    TokenizationRequest,
    Tokens,
)
from PIL import Image as PILImage  # noqa: E402

from atman import manipulate  # noqa: E402
from atman.errors import ContextLengthError  # noqa: E402
from atman.evaluate.image_metrics import mask_to_grid  # noqa: E402
from atman.evaluate.scenes import CAPTION_PREFIX, make_scene  # noqa: E402
from atman.rows import Suppression  # noqa: E402
from atman.server import (
    create_app,  # noqa: E402
    schemas,  # noqa: E402
)
from atman.server.base import Deadline, LimitError, Limits, Timeout  # noqa: E402
from atman.server.vision_service import VisionLanguageService  # noqa: E402
from atman.vision_language import VisionLanguageExplainer, load_vision_language  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = "tiny-llava-scenes"
MAX_PIXELS = 128 * 128
LIMITS = Limits(max_prompt_tokens=100, max_units=60, max_tokens=12, max_image_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def vlm():
    return load_vision_language(str(FIXTURES / MODEL))


@pytest.fixture(scope="module")
def service(vlm):
    return VisionLanguageService(vlm, LIMITS)


@pytest.fixture(scope="module")
def client(service):
    with serving(create_app({MODEL: service.loaded}, limits=LIMITS)) as base:
        yield Client(token="unused", host=base, total_retries=0)


def png(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scene_prompt(scene, text: str = CAPTION_PREFIX, controls=(), text_controls=()) -> Prompt:
    return Prompt([Image.from_bytes(png(scene.image), controls=list(controls)), Text(text, list(text_controls))])


def test_top_image_tile_lies_on_the_named_object(client):
    """Held-out two-object scenes: the tile ranked first lies on the object the target names (an object
    covers about a sixth of the 36 tiles: chance would put it there in ~1.3 of 8 cases)."""
    rng = np.random.default_rng(4242)
    hits = cases = 0
    for _ in range(4):
        scene = make_scene(rng, 2)
        for k, obj in enumerate(scene.objects):
            text = CAPTION_PREFIX + "".join(f" {o.name} and a" for o in scene.objects[:k])
            response = client.explain(ExplanationRequest(scene_prompt(scene, text), " " + obj.name,
                                                         prompt_granularity=PromptGranularity.Token), model=MODEL)
            image_item, text_item, target_item = response.explanations[0].items
            assert isinstance(image_item, ImagePromptItemExplanation)
            assert isinstance(text_item, TextPromptItemExplanation)
            assert len(image_item.scores) == 36
            best = max(image_item.scores, key=lambda s: s.score)
            assert (best.width, best.height) == pytest.approx((1 / 6, 1 / 6))
            row, col = round(best.top * 6), round(best.left * 6)
            hits += mask_to_grid(obj.mask, 6, 6)[row, col] > 0
            cases += 1
    assert hits >= 5, f"top tile on the object in {hits} of {cases} cases"


def test_scores_equal_the_library_and_granularity_maps_to_tiles(client, vlm):
    scene = make_scene(np.random.default_rng(31), 2)
    target = " " + scene.objects[0].name
    library = VisionLanguageExplainer(vlm).explain("<image>" + CAPTION_PREFIX, target, images=[scene.image],
                                                   granularity="word", image_granularity="token",
                                                   multiplier=0.3)
    response = client.explain(ExplanationRequest(scene_prompt(scene), target, control_factor=0.3,
                                                 prompt_granularity=PromptGranularity.Word), model=MODEL)
    image_item, text_item, target_item = response.explanations[0].items
    items = library.explanations[0].items
    expected_text = [(i.start - len("<image>"), i.length, i.score) for i in items if i.kind == "prompt"]
    assert [s.start for s in text_item.scores] == [e[0] for e in expected_text]
    assert [s.length for s in text_item.scores] == [e[1] for e in expected_text]
    assert [s.score for s in text_item.scores] == pytest.approx([e[2] for e in expected_text], abs=1e-6)
    tiles = [i for i in items if i.kind == "image"]
    assert [s.score for s in image_item.scores] == pytest.approx([t.score for t in tiles], abs=1e-6)
    assert target_item.scores == []
    # the multiplicative variant and conceptual suppression reach the library's settings too
    # contextual_control_threshold is Aleph Alpha's rule: similar tokens get the very same multiplier
    library = VisionLanguageExplainer(vlm, suppression=Suppression(kappa=0.5, similar="same", mode="multiplicative")
                                      ).explain("<image>" + CAPTION_PREFIX, target, images=[scene.image],
                                                granularity="word", image_granularity="token")
    response = client.explain(ExplanationRequest(scene_prompt(scene), target, control_log_additive=False,
                                                 contextual_control_threshold=0.5,
                                                 prompt_granularity=PromptGranularity.Word), model=MODEL)
    image_item, text_item, _ = response.explanations[0].items
    scores = [s.score for s in text_item.scores] + [s.score for s in image_item.scores]
    expected = [i.score for i in library.explanations[0].items]
    assert scores == pytest.approx(expected, abs=1e-6)
    # sentence = 3 x 3 tiles of the image, paragraph = the whole image (Aleph Alpha's tiling)
    for granularity, count in ((PromptGranularity.Sentence, 9), (PromptGranularity.Paragraph, 1)):
        image_item = client.explain(ExplanationRequest(scene_prompt(scene), target, prompt_granularity=granularity),
                                    model=MODEL).explanations[0].items[0]
        assert len(image_item.scores) == count
        assert image_item.scores[-1].left + image_item.scores[-1].width == pytest.approx(1.0)


def test_token_target_granularity_splits_the_complete_scores(client):
    """Per target token: prompt scores that sum to the complete target's, and earlier target tokens as units."""
    scene = make_scene(np.random.default_rng(17), 2)
    target = " " + scene.objects[0].name
    options = dict(prompt_granularity=PromptGranularity.Word, control_factor=0.0)
    complete = client.explain(ExplanationRequest(scene_prompt(scene), target, **options), model=MODEL)
    tokens = client.explain(ExplanationRequest(scene_prompt(scene), target, target_granularity=TargetGranularity.Token,
                                               **options), model=MODEL)
    assert [e.target for e in tokens.explanations] == target.split()
    for item in (0, 1):
        summed = np.sum([[s.score for s in e.items[item].scores] for e in tokens.explanations], axis=0)
        assert summed == pytest.approx([s.score for s in complete.explanations[0].items[item].scores], abs=1e-5)
    first, second = tokens.explanations
    assert first.items[2].scores == []
    (colour,) = second.items[2].scores
    assert (colour.start, colour.length) == (1, len(target.split()[0]))


def test_a_crop_maps_tiles_back_onto_the_whole_image(client):
    scene = make_scene(np.random.default_rng(5), 1)
    wide = PILImage.new("RGB", (96, 48), (235, 235, 235))
    wide.paste(scene.image, (40, 0))
    image = Image.from_bytes(png(wide))
    response = client.explain(ExplanationRequest(Prompt([image, Text.from_text(CAPTION_PREFIX)]),
                                                 " " + scene.objects[0].name,
                                                 prompt_granularity=PromptGranularity.Paragraph), model=MODEL)
    (whole,) = response.explanations[0].items[0].scores
    # centre crop: the middle 48 x 48 pixels of the 96 x 48 image
    assert (whole.left, whole.top, whole.width, whole.height) == pytest.approx((24 / 96, 0, 0.5, 1))
    in_pixels = response.with_image_prompt_items_in_pixels(Prompt([image, Text.from_text(CAPTION_PREFIX)]))
    assert in_pixels.explanations[0].items[0].scores[0].left == 24


def test_two_images_an_explicit_crop_and_a_unit_across_two_text_items(client):
    scene = make_scene(np.random.default_rng(8), 2)
    corner = Image.from_bytes(png(scene.image), cropping=aa_cropping(0, 0, 24))
    prompt = Prompt([Image.from_bytes(png(scene.image)), Text.from_text("This is a pic"), Text.from_text("ture of a"),
                     corner, Text.from_text(" and")])
    response = client.explain(ExplanationRequest(prompt, " " + scene.objects[0].name,
                                                 prompt_granularity=PromptGranularity.Sentence), model=MODEL)
    whole, first, second, cropped, last, target = response.explanations[0].items
    assert close([(s.left, s.width) for s in whole.scores[:3]], [(0, 1 / 3), (1 / 3, 1 / 3), (2 / 3, 1 / 3)])
    # 2 x 2 tiles of the 24-pixel corner crop: a sixth of the 48-pixel image
    assert close([(s.left, s.top, s.width) for s in cropped.scores[:4]],
                 [(0, 0, 1 / 6), (1 / 6, 0, 1 / 6), (1 / 3, 0, 1 / 6), (0, 1 / 6, 1 / 6)])
    # one sentence over both text items: its part in each, with its one score
    ((a,), (b,)) = first.scores, second.scores
    assert (a.start, a.length, b.start, b.length) == (0, 13, 0, 9) and a.score == b.score
    assert [(s.start, s.length) for s in last.scores] == [(0, 4)]


def test_image_control_factor_one_changes_nothing_and_zero_changes_the_distribution(client):
    scene = make_scene(np.random.default_rng(12), 2)
    expected = " " + scene.objects[0].name
    whole = dict(left=0.0, top=0.0, width=1.0, height=1.0)
    plain = client.complete(CompletionRequest(scene_prompt(scene), maximum_tokens=8), model=MODEL)
    neutral = client.complete(CompletionRequest(scene_prompt(scene, controls=[ImageControl(**whole, factor=1.0)]),
                                                maximum_tokens=8), model=MODEL)
    assert neutral.completions[0].completion == plain.completions[0].completion
    assert (CAPTION_PREFIX + plain.completions[0].completion).split() == scene.caption().split()

    def logprob(controls=(), text_controls=()) -> float:
        request = EvaluationRequest(scene_prompt(scene, controls=controls, text_controls=text_controls), expected)
        return client.evaluate(request, model=MODEL).result["log_probability"]

    base = logprob()
    assert logprob([ImageControl(**whole, factor=1.0)]) == base
    assert logprob(text_controls=[TextControl(0, len(CAPTION_PREFIX), 1.0)]) == base
    assert logprob([ImageControl(**whole, factor=0.0)]) < base - 1.0
    assert logprob(text_controls=[TextControl(0, len(CAPTION_PREFIX), 0.0)]) != pytest.approx(base)


def test_served_completion_and_evaluation_equal_the_library_steerer(client, vlm):
    """/complete and /evaluate with an image control are VisionLanguageSteerer calls a Python user can make."""
    from atman.rows import ImageControl as LibraryImageControl
    from atman.vision_language import VisionLanguageSteerer

    scene = make_scene(np.random.default_rng(14), 2)
    assert scene.image.width == scene.image.height  # the crop the server sends is the whole image
    expected = " " + scene.objects[0].name
    controls = [ImageControl(left=0.0, top=0.0, width=0.5, height=1.0, factor=0.1)]
    steerer = VisionLanguageSteerer(vlm)
    library_controls = [LibraryImageControl(0, 0.0, 0.0, 0.5, 1.0, 0.1)]
    prepared = steerer.explainer.prepare("<image>" + CAPTION_PREFIX, expected, [scene.image])
    row = steerer.multipliers(prepared, image_controls=library_controls, images=[scene.image])
    scored = steerer.score_prepared(prepared, row)
    served = client.evaluate(EvaluationRequest(scene_prompt(scene, controls=controls), expected), model=MODEL).result
    assert served["log_probability"] == pytest.approx(float(scored.log_probs.sum()), abs=1e-5)
    assert served["correct_greedy"] is bool(scored.greedy.all())
    completion = steerer.generate("<image>" + CAPTION_PREFIX, [scene.image], image_controls=library_controls,
                                  max_new_tokens=5)
    answer = client.complete(CompletionRequest(scene_prompt(scene, controls=controls), maximum_tokens=5,
                                               log_probs=0), model=MODEL).completions[0]
    assert answer.completion == completion.text
    assert [list(d.values())[0] for d in answer.log_probs] == pytest.approx(list(completion.log_probs), abs=1e-5)


def test_partial_image_control_scales_by_the_covered_share(service):
    scene = make_scene(np.random.default_rng(2), 1)
    data = base64.b64encode(png(scene.image)).decode()

    def multipliers(overlap: str) -> torch.Tensor:
        # the left half of the first column of image tokens, from top to bottom
        control = schemas.ImageControlJson(rect=schemas.Rect(left=0, top=0, width=1 / 12, height=1), factor=0.2,
                                       token_overlap=overlap)
        prompt = [schemas.ImagePromptItem(type="image", data=data, controls=[control]),
                  schemas.TextPromptItem(type="text", data=CAPTION_PREFIX)]
        vision = service.prompt(prompt)
        prepared = service.explainer.prepare_prompt(vision.text, [i.image for i in vision.images])
        run = list(prepared.image_runs[0])
        values = service.multipliers(prompt, vision, prepared, None)
        assert torch.all(values[[p for p in range(len(values)) if p not in run]] == 1)
        return values[run].reshape(6, 6)

    partial, complete = multipliers("partial"), multipliers("complete")
    assert torch.allclose(partial[:, 0], torch.full((6,), 0.6)) and torch.all(partial[:, 1:] == 1)
    assert torch.allclose(complete[:, 0], torch.full((6,), 0.2)) and torch.all(complete[:, 1:] == 1)


def test_steered_generation_with_the_cache_equals_recomputing(service, vlm):
    """The multipliers cover the prompt; keys of generated tokens are left untouched, with or without cache."""
    scene = make_scene(np.random.default_rng(9), 2)
    prepared = service.explainer.prepare_prompt("<image>" + CAPTION_PREFIX, [scene.image])
    multipliers = torch.ones(1, len(prepared.encoded.input_ids))
    multipliers[0, list(prepared.image_runs[0][:18])] = 0.05
    runs = []
    for use_cache in (True, False):
        with torch.no_grad(), manipulate(multipliers):
            runs.append(vlm.model.generate(**prepared.inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                                           return_dict_in_generate=True, output_logits=True))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits), atol=1e-4, rtol=1e-4)


def test_sampling_stop_sequences_and_tokenize(client):
    scene = make_scene(np.random.default_rng(21), 2)
    sampled = client.complete(CompletionRequest(scene_prompt(scene), maximum_tokens=6, temperature=1.5, top_k=3,
                                                top_p=0.9, n=3, log_probs=2, tokens=True), model=MODEL)
    assert len(sampled.completions) == 3
    assert all(c.completion_tokens and len(c.log_probs) == len(c.completion_tokens) for c in sampled.completions)
    stopped = client.complete(CompletionRequest(scene_prompt(scene), maximum_tokens=8, stop_sequences=[" and"]),
                              model=MODEL).completions[0]
    assert stopped.finish_reason == "stop_sequence_reached"
    assert stopped.completion == " " + scene.objects[0].name
    biased = client.complete(CompletionRequest(scene_prompt(scene), maximum_tokens=1, logit_bias={16: 100.0}),
                             model=MODEL).completions[0]
    assert biased.completion == " triangle"
    tokens = client.tokenize(TokenizationRequest("a red circle", tokens=True, token_ids=True), model=MODEL)
    assert tokens.tokens == ["a", "red", "circle"]


def test_limits_and_deadline(vlm):
    scene = make_scene(np.random.default_rng(6), 1)
    data = base64.b64encode(png(scene.image)).decode()
    prompt = [schemas.ImagePromptItem(type="image", data=data),
              schemas.TextPromptItem(type="text", data=CAPTION_PREFIX)]
    explain = schemas.ExplanationRequest(model=MODEL, prompt=prompt, target=" red",
                                         prompt_granularity=schemas.CustomGranularity(type="token"))
    complete = schemas.CompletionRequest(model=MODEL, prompt=prompt, maximum_tokens=4)
    with pytest.raises(LimitError, match="computes at most 40") as caught:
        VisionLanguageService(vlm, Limits(max_units=40)).explain(explain, lambda *_: None)
    assert caught.value.status == 422
    with pytest.raises(LimitError, match="at most 30") as caught:
        VisionLanguageService(vlm, Limits(max_prompt_tokens=30)).complete(complete, lambda *_: None)
    assert caught.value.status == 413
    long = schemas.CompletionRequest(model=MODEL, prompt=prompt, maximum_tokens=100)
    with pytest.raises(ContextLengthError, match="context of 128 tokens"):
        VisionLanguageService(vlm, Limits(max_tokens=100)).complete(long, lambda *_: None)
    service = VisionLanguageService(vlm, LIMITS)
    for method, request in ((service.explain, explain), (service.complete, complete)):
        with pytest.raises(Timeout):
            method(request, Deadline(0.0))


def test_bad_images_and_unsupported_requests_answer_400(client):
    scene = make_scene(np.random.default_rng(4), 1)

    def refused(prompt: Prompt, target: str = " red", **options) -> str:
        with pytest.raises(ValueError) as caught:
            client.explain(ExplanationRequest(prompt, target, **options), model=MODEL)
        assert caught.value.args[0] == 400
        return caught.value.args[1]

    text = Text.from_text(CAPTION_PREFIX)
    assert "prompt item 0 (image): data is not valid base64" in refused(Prompt([Image("not base64!", None, []), text]))
    not_image = base64.b64encode(b"plain text, no picture").decode()
    assert "prompt item 1 (image): data is not an image" in refused(Prompt([text, Image(not_image, None, [])]))
    large = Image.from_bytes(png(PILImage.new("RGB", (200, 200))))
    assert f"at most {MAX_PIXELS} pixels" in refused(Prompt([large, text]))
    cropped = Image.from_bytes(png(scene.image), cropping=aa_cropping(40, 0, 20))
    assert "does not lie inside" in refused(Prompt([cropped, text]))
    assert "token_ids" in refused(Prompt([Image.from_bytes(png(scene.image)), Tokens([5, 6], [])]))
    outside = ImageControl(left=0.5, top=0.0, width=0.8, height=1.0, factor=0.0)
    with pytest.raises(ValueError, match="inside 0..1"):
        client.complete(CompletionRequest(scene_prompt(scene, controls=[outside]), maximum_tokens=2), model=MODEL)
    with pytest.raises(ValueError, match="presence_penalty"):
        client.complete(CompletionRequest(scene_prompt(scene), maximum_tokens=2, presence_penalty=1.0), model=MODEL)
    overlap = ImageControl(left=0, top=0, width=1, height=1, factor=0.5, token_overlap=ControlTokenOverlap.Complete)
    assert client.complete(CompletionRequest(scene_prompt(scene, controls=[overlap]), maximum_tokens=2),
                           model=MODEL).completions


def aa_cropping(x: int, y: int, size: int):
    from aleph_alpha_client.prompt import Cropping

    return Cropping(upper_left_x=x, upper_left_y=y, size=size)


def test_docstring_examples(monkeypatch):
    """The examples in the service's docstrings, run on the reference LLaVA from the repository root."""
    import doctest

    from atman.server import schemas, vision_service

    monkeypatch.chdir(FIXTURES.parent.parent)
    results = [doctest.testmod(schemas), doctest.testmod(vision_service)]
    assert all(r.failed == 0 for r in results) and results[1].attempted >= 6
