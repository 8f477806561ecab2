"""A served vision-language model: Aleph Alpha's API with image prompt items, over AtMan.

:class:`VisionLanguageService` answers the same endpoints as :class:`~atman.server.text_service.TextService`
(``explain``, ``complete``, ``evaluate``, ``tokenize``, ``detokenize``, ``tokenizer_json``, ``info``) for a
model loaded with :func:`atman.vision.load_vision_language`:

* prompts are text items and image items (``data`` = base64 image bytes, optional ``x``, ``y``, ``size``
  square crop in pixels, as ``aleph_alpha_client.Image.to_json`` sends them); an image without a crop
  is centre-cropped to a square, as Aleph Alpha's API does. Token-id items are refused (400).
* ``/explain`` scores text units and image tiles (:data:`IMAGE_TILES_PER_SIDE`), with the tiles'
  rectangles in 0..1 of the whole image as sent.
* ``/complete`` and ``/evaluate`` apply text and image controls (rectangle in 0..1 of the whole image;
  ``factor`` = the attention multiplier; partial overlap scales the factor towards 1 by the covered
  share of each image token's cell).

Every answer is a library call (:class:`~atman.vision_language.VisionLanguageExplainer` and
:class:`~atman.vision_language.VisionLanguageSteerer`); this module reads the request's items into the
library's prompt (text with ``<image>`` markers, square crops, controls in 0..1 of each crop) and
writes the result in the API's JSON.

Example::

    >>> from atman.server.base import Limits
    >>> from atman.vision_language import load_vision_language
    >>> service = VisionLanguageService(load_vision_language("tests/fixtures/tiny-llava-scenes"), Limits())
    >>> service.info().image_support
    True
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..errors import AtmanError, EmptyInputError
from ..explanation import TargetExplanation
from ..rows import ImageControl, TextControl
from ..tiles import TileSpec, TilesPerSide
from ..vision_language import (
    IMAGE_MARKER,
    LoadedVisionModel,
    VisionLanguageExplainer,
    VisionLanguageInput,
    VisionLanguageSteerer,
)
from . import base, schemas
from .base import Capabilities, Check, Limits, Service

# images larger than this many pixels are refused before they are decoded
MAX_IMAGE_PIXELS = 4096 * 4096
# Aleph Alpha's API explains MAGMA's 12 x 12 image tokens as 12 x 12 (token), 6 x 6 (word), 3 x 3
# (sentence) or 1 x 1 (paragraph) tiles. Here: token = every image token of this model's grid; the
# others cut the grid into this many tiles per side (tiles of the same share of the image as there).
IMAGE_TILES_PER_SIDE = {"word": 6, "sentence": 3, "paragraph": 1}
# without a prompt_granularity: about 30 units per image, as the API's automatic choice for text
DEFAULT_IMAGE_GRANULARITY = "word"


def image_tile_spec(granularity: str) -> TileSpec:
    """The image tiles of an Aleph Alpha prompt granularity: every image token, or a number per side.

    >>> image_tile_spec("token"), image_tile_spec("sentence")
    ('token', TilesPerSide(count=3))
    """
    return "token" if granularity == "token" else TilesPerSide(IMAGE_TILES_PER_SIDE[granularity])


@dataclass(frozen=True)
class PromptImage:
    """An image prompt item: the square crop the model sees, and where it lies in the image as sent."""

    image: Image.Image
    width: int
    height: int
    left: int
    top: int
    size: int

    def rect_in_image(self, left: float, top: float, width: float, height: float) -> schemas.ImageRect:
        """A rectangle in 0..1 of the crop, in 0..1 of the whole image."""
        return schemas.ImageRect(left=(self.left + left * self.size) / self.width,
                         top=(self.top + top * self.size) / self.height,
                         width=width * self.size / self.width, height=height * self.size / self.height)

    def rect_in_crop(self, rect: schemas.Rect) -> tuple[float, float, float, float]:
        """A rectangle in 0..1 of the whole image, as (left, top, right, bottom) in 0..1 of the crop."""
        left = (rect.left * self.width - self.left) / self.size
        top = (rect.top * self.height - self.top) / self.size
        return left, top, left + rect.width * self.width / self.size, top + rect.height * self.height / self.size


@dataclass(frozen=True)
class VisionPrompt:
    """A prompt of text and image items as one text with ``<image>`` markers and its images.

    ``items[j]`` is ``("text", first char, end char)`` in ``text`` or ``("image", image index, 0)``.
    """

    text: str
    images: tuple[PromptImage, ...]
    items: tuple[tuple[str, int, int], ...]


def decode_image(item: schemas.ImagePromptItem, index: int, max_pixels: int = MAX_IMAGE_PIXELS) -> PromptImage:
    """The RGB square crop of an image prompt item (base64 bytes); a bad item raises :class:`AtmanError`
    naming prompt item ``index``."""
    where = f"prompt item {index} (image)"
    try:
        raw = base64.b64decode(item.data, validate=True)
    except (binascii.Error, ValueError):
        raise AtmanError(f"{where}: data is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, ValueError):
        raise AtmanError(f"{where}: data is not an image format this server can read") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise AtmanError(f"{where}: {width}x{height} pixels; this server accepts images of at most "
                         f"{max_pixels} pixels")
    try:
        image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        raise AtmanError(f"{where}: the image data is damaged or truncated") from None
    crop = (item.x, item.y, item.size)
    if crop == (None, None, None):
        size = min(width, height)
        left, top = (width - size) // 2, (height - size) // 2
    elif None in crop:
        raise AtmanError(f"{where}: a crop needs all of x, y and size")
    else:
        left, top, size = crop
        if left < 0 or top < 0 or size < 1 or left + size > width or top + size > height:
            raise AtmanError(f"{where}: crop x={left}, y={top}, size={size} does not lie inside the "
                             f"{width}x{height} image")
    return PromptImage(image.crop((left, top, left + size, top + size)), width, height, left, top, size)


class VisionLanguageService(Service):
    """One served vision-language model: explanations, steered completions, evaluation and tokenization.

    The counterpart of :class:`~atman.server.text_service.TextService` with image prompt items (see the
    module docstring). ``limits.max_image_pixels`` bounds the size of an image before it is decoded.

    Example::

        >>> from atman.vision_language import load_vision_language
        >>> service = VisionLanguageService(load_vision_language("tests/fixtures/tiny-llava-scenes"), Limits())
        >>> service.detokenize(schemas.DetokenizationRequest(model=service.name, token_ids=[5])).result
        'This'
    """

    capabilities = Capabilities(images=True)
    description = "AtMan explanations and steering over text and images"

    def __init__(self, loaded: LoadedVisionModel, limits: Limits, aliases: tuple[str, ...] = ()) -> None:
        explainer = VisionLanguageExplainer(loaded, piece_tokens=base.piece_tokens(loaded.model, limits))
        text_config = getattr(loaded.model.config, "text_config", loaded.model.config)
        super().__init__(loaded.name, limits, aliases, explainer.tokenizer,
                         int(loaded.model.get_input_embeddings().num_embeddings),
                         getattr(text_config, "max_position_embeddings", None))
        self.loaded = loaded
        self.explainer = explainer
        self.steerer = VisionLanguageSteerer(loaded, explainer=explainer)

    # --- prompts ---------------------------------------------------------------------------
    def prompt(self, prompt: str | list) -> VisionPrompt:
        """The prompt's text with ``<image>`` markers, its decoded images and where each item lies."""
        items = [schemas.TextPromptItem(type="text", data=prompt)] if isinstance(prompt, str) else prompt
        if not items:
            raise EmptyInputError("the prompt has no items")
        text, images, places = "", [], []
        for index, item in enumerate(items):
            if isinstance(item, schemas.ImagePromptItem):
                images.append(decode_image(item, index, self.limits.max_image_pixels))
                places.append(("image", len(images) - 1, 0))
                text += IMAGE_MARKER
            elif isinstance(item, schemas.TextPromptItem):
                if IMAGE_MARKER in item.data:
                    raise AtmanError(f"prompt item {index} (text) contains {IMAGE_MARKER!r}, which this server "
                                     "reserves for the places of image items")
                places.append(("text", len(text), len(text) + len(item.data)))
                text += item.data
            else:
                raise AtmanError(f"prompt item {index}: token_ids items are not supported by a vision-language "
                                 "model here; send the text instead")
        if not text.replace(IMAGE_MARKER, "").strip() and not images:
            raise EmptyInputError("the prompt is empty")
        return VisionPrompt(text, tuple(images), tuple(places))

    def controls(self, prompt: str | list, vision: VisionPrompt) -> tuple[list[TextControl], list[ImageControl]]:
        """The items' controls in the library's terms: text controls in the whole prompt text, image
        controls in 0..1 of the crop each image item sends to the model."""
        texts: list[TextControl] = []
        images: list[ImageControl] = []
        if isinstance(prompt, str):
            return texts, images
        for index, (item, (kind, first, end)) in enumerate(zip(prompt, vision.items, strict=True)):
            for control in item.controls:
                if kind == "text":
                    if control.start + control.length > end - first:
                        raise AtmanError(f"prompt item {index}: text control {control.start}.."
                                         f"{control.start + control.length} reaches past the end of its "
                                         f"{end - first}-character item")
                    texts.append(TextControl(first + control.start, control.length, control.factor,
                                             control.token_overlap or "partial"))
                    continue
                rect = control.rect
                if not (0 <= rect.left <= 1 and 0 <= rect.top <= 1 and rect.width > 0 and rect.height > 0
                        and rect.left + rect.width <= 1 + 1e-9 and rect.top + rect.height <= 1 + 1e-9):
                    raise AtmanError(f"prompt item {index}: an image control's rect must lie inside 0..1 with a "
                                     f"positive width and height, got {rect.model_dump()}")
                left, top, right, bottom = vision.images[first].rect_in_crop(rect)
                images.append(ImageControl(first, left, top, right - left, bottom - top, control.factor,
                                           control.token_overlap or "partial"))
        return texts, images

    def multipliers(self, prompt: str | list, vision: VisionPrompt, prepared: VisionLanguageInput,
                    threshold: float | None):
        """The steering row of /complete and /evaluate (:meth:`VisionLanguageSteerer.multipliers`), spread
        to similar tokens with ``contextual_control_threshold``."""
        texts, images = self.controls(prompt, vision)
        return self.steerer.multipliers(prepared, text_controls=texts, image_controls=images,
                                        images=[image.image for image in vision.images],
                                        contextual_threshold=base.contextual_threshold(threshold))

    # --- endpoints -------------------------------------------------------------------------
    def explain(self, request: schemas.ExplanationRequest, check: Check) -> schemas.ExplanationResponse:
        """AtMan explanation of ``request.target``: per prompt item, scores of its text units or image tiles
        (:meth:`VisionLanguageExplainer.plan` and :meth:`~VisionLanguageExplainer.explain_plan`)."""
        vision = self.prompt(request.prompt)
        if not request.target:
            raise EmptyInputError("the target is empty")
        suppression = base.explanation_suppression(request)
        granularity, delimiter = base.prompt_granularity(request)
        image_granularity = image_tile_spec(DEFAULT_IMAGE_GRANULARITY if granularity in (None, "custom")
                                            else granularity)
        images = [image.image for image in vision.images]
        prepared = self.explainer.prepare(vision.text, request.target, images)
        self.check_tokens(len(prepared.encoded.input_ids), "prompt and target")
        plan = self.explainer.plan(prepared, base.GRANULARITY_NAMES[granularity] if granularity else "auto",
                                   image_granularity, request.target_granularity or "complete",
                                   delimiter=delimiter, images=images)
        self.check_units(len(plan.units))
        check()
        explanation = self.explainer.explain_plan(plan, suppression=suppression, progress=check)
        explanation = explanation.postprocessed(request.postprocessing or "none", bool(request.normalize))
        return schemas.ExplanationResponse(
            model_version=self.name,
            explanations=[_api_explanation(exp, vision) for exp in explanation.explanations],
        )

    def complete(self, request: schemas.CompletionRequest, check: Check) -> schemas.CompletionResponse:
        """Completion(s) with the prompt items' text and image controls in force for every generated token."""
        maximum = base.completion_length(request, self.limits)
        if request.logit_bias:
            self.check_ids(list(request.logit_bias))
        vision = self.prompt(request.prompt)
        prepared = self.explainer.prepare_prompt(vision.text, [image.image for image in vision.images])
        length = len(prepared.encoded.input_ids)
        self.check_tokens(length, "the prompt", extra=maximum)
        multipliers = self.multipliers(request.prompt, vision, prepared, request.contextual_control_threshold)
        results, generated = [], 0
        for _ in range(request.n):
            check()
            completion = self.steerer.generate_prepared(
                prepared, multipliers, max_new_tokens=maximum, minimum_tokens=request.minimum_tokens,
                temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                stop=request.stop_sequences or (), logit_bias=request.logit_bias, top_log_probs=request.log_probs,
                mode=base.control_mode(request.control_log_additive), on_token=check)
            generated += len(completion.token_ids)
            results.append(schemas.CompletionResult(
                completion=completion.text, finish_reason=completion.finish_reason,
                completion_tokens=list(completion.tokens) if request.tokens else None,
                log_probs=[dict(d) for d in completion.top_log_probs] if completion.top_log_probs is not None
                else None,
                raw_completion=completion.text if request.raw_completion else None,
            ))
        return schemas.CompletionResponse(model_version=self.name, completions=results,
                                          num_tokens_prompt_total=length * request.n,
                                          num_tokens_generated=generated)

    def evaluate(self, request: schemas.EvaluationRequest, check: Check) -> schemas.EvaluationResponse:
        """Log-probability of ``completion_expected`` after the (controlled) prompt
        (:meth:`VisionLanguageSteerer.score_prepared`)."""
        vision = self.prompt(request.prompt)
        if not request.completion_expected:
            raise EmptyInputError("completion_expected is empty")
        prepared = self.explainer.prepare(vision.text, request.completion_expected,
                                          [image.image for image in vision.images])
        self.check_tokens(len(prepared.encoded.input_ids), "prompt and completion")
        multipliers = self.multipliers(request.prompt, vision, prepared, request.contextual_control_threshold)
        check()
        mode = base.control_mode(request.control_log_additive)
        scored = self.steerer.score_prepared(prepared, multipliers, mode=mode)
        return base.evaluation_response(self.name, scored.log_probs, scored.greedy, request.completion_expected,
                                        prepared.encoded.target_start)


def _api_explanation(exp: TargetExplanation, vision: VisionPrompt) -> schemas.TargetExplanationJson:
    """One target's scores grouped by prompt item: text offsets relative to the item (a unit that spans two
    adjacent text items appears in both, with its one score), tile rectangles in 0..1 of the whole image."""
    items: list[schemas.TextExplanationItem | schemas.ImageExplanationItem] = []
    for kind, first, end in vision.items:
        if kind == "image":
            image = vision.images[first]
            items.append(schemas.ImageExplanationItem(type="image", scores=[
                schemas.ImageScore(rect=image.rect_in_image(i.left, i.top, i.width, i.height), score=i.score)
                for i in exp.items if i.kind == "image" and i.image == first]))
            continue
        scores = []
        for i in (i for i in exp.items if i.kind == "prompt"):
            a, b = max(i.start, first), min(i.start + i.length, end)
            if b > a:
                scores.append(schemas.TextScore(start=a - first, length=b - a, score=i.score))
        items.append(schemas.TextExplanationItem(type="text", scores=scores))
    items.append(schemas.TextExplanationItem(type="target", scores=[
        schemas.TextScore(start=i.start, length=i.length, score=i.score) for i in exp.items if i.kind == "target"]))
    return schemas.TargetExplanationJson(target=exp.target.text, items=items)
