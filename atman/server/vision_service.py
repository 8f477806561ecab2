"""A served vision-language model: Aleph Alpha's API with image prompt items, over AtMan.

:class:`VisionLanguageService` answers the same endpoints as :class:`~atman.server.service.ModelService`
(``explain``, ``complete``, ``evaluate``, ``tokenize``, ``detokenize``, ``tokenizer_json``, ``info``) for a
model loaded with :func:`atman.vision.load_vision_language`:

* prompts are text items and image items (``data`` = base64 image bytes, optional ``x``, ``y``, ``size``
  square crop in pixels, as ``aleph_alpha_client.Image.to_json`` sends them); an image without a crop
  is centre-cropped to a square, as Aleph Alpha's API does. Token-id items are refused (400).
* ``/explain`` scores text units and image tiles (:data:`IMAGE_TILES_PER_SIDE`), with the tiles'
  rectangles in 0..1 of the whole image as sent.
* ``/complete`` and ``/evaluate`` apply ``TextControl`` and ``ImageControl`` (rectangle in 0..1 of the
  whole image; ``factor`` = the attention multiplier; partial overlap scales the factor towards 1 by
  the covered share of each image token's cell).

Example::

    >>> from atman.server.service import Limits
    >>> from atman.vision import load_vision_language
    >>> service = VisionLanguageService(load_vision_language("tests/fixtures/tiny-llava-scenes"), Limits())
    >>> service.info().image_support
    True
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from transformers import StoppingCriteria, StoppingCriteriaList

from ..engine import DEFAULT_MULTIPLIER, Suppression
from ..errors import AtmanError, ContextLengthError, EmptyInputError
from ..explanation import Explanation, ImageItem, Item, TargetExplanation, TargetSpan
from ..manipulation import manipulate
from ..steering import TextControl, control_multipliers, spread_to_similar
from ..tiles import ImageGrid, grid_tiles
from ..units import choose_granularity, prompt_units, target_units
from ..vision import (
    IMAGE_MARKER,
    LoadedVisionModel,
    VisionLanguageExplainer,
    VisionLanguageInput,
    language_model_inputs,
)
from . import schemas
from .service import GRANULARITY_NAMES, LimitError, Limits, completion_length, piece_tokens
from .vision_schemas import ImageExplanationItem, ImageRect, ImageScore

# images larger than this many pixels are refused before they are decoded
MAX_IMAGE_PIXELS = 4096 * 4096
# Aleph Alpha's API explains MAGMA's 12 x 12 image tokens as 12 x 12 (token), 6 x 6 (word), 3 x 3
# (sentence) or 1 x 1 (paragraph) tiles. Here: token = every image token of this model's grid; the
# others cut the grid into this many tiles per side (tiles of the same share of the image as there).
IMAGE_TILES_PER_SIDE = {"word": 6, "sentence": 3, "paragraph": 1}
# without a prompt_granularity: about 30 units per image, as the API's automatic choice for text
DEFAULT_IMAGE_GRANULARITY = "word"
FINISH_REASONS = ("maximum_tokens", "end_of_text", "stop_sequence_reached")


def image_tile_spec(grid: ImageGrid, granularity: str) -> tuple[int, int]:
    """Tile size (rows, cols of image tokens) on ``grid`` for an Aleph Alpha prompt granularity.

    >>> image_tile_spec(ImageGrid(24, 24), "word"), image_tile_spec(ImageGrid(6, 6), "sentence")
    ((4, 4), (2, 2))
    >>> image_tile_spec(ImageGrid(6, 6), "token"), image_tile_spec(ImageGrid(6, 6), "paragraph")
    ((1, 1), (6, 6))
    """
    if granularity == "token":
        return 1, 1
    tiles = IMAGE_TILES_PER_SIDE[granularity]
    return max(1, round(grid.rows / tiles)), max(1, round(grid.cols / tiles))


@dataclass(frozen=True)
class PromptImage:
    """An image prompt item: the square crop the model sees, and where it lies in the image as sent."""

    image: Image.Image
    width: int
    height: int
    left: int
    top: int
    size: int

    def rect_in_image(self, left: float, top: float, width: float, height: float) -> ImageRect:
        """A rectangle in 0..1 of the crop, in 0..1 of the whole image."""
        return ImageRect(left=(self.left + left * self.size) / self.width,
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


def decode_image(item: schemas.ImageItem, index: int, max_pixels: int = MAX_IMAGE_PIXELS) -> PromptImage:
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


class _Watch(StoppingCriteria):
    """Between tokens: lets the request's deadline abort ``generate`` (the check raises), and stops once the
    new text holds a stop sequence."""

    def __init__(self, check: Callable[..., None], text: Callable[[list[int]], str], length: int,
                 stops: Sequence[str]) -> None:
        self.check, self.text, self.length = check, text, length
        self.stops = [stop for stop in stops if stop]
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.check(self.step)
        self.step += 1
        done = bool(self.stops) and any(stop in self.text(input_ids[0, self.length:].tolist())
                                        for stop in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class VisionLanguageService:
    """One served vision-language model: explanations, steered completions, evaluation and tokenization.

    A drop-in for :class:`~atman.server.service.ModelService` with image prompt items (see the module
    docstring). ``limits.max_image_pixels`` bounds the size of an image before it is decoded.

    Example::

        >>> from atman.vision import load_vision_language
        >>> service = VisionLanguageService(load_vision_language("tests/fixtures/tiny-llava-scenes"), Limits())
        >>> service.detokenize(schemas.DetokenizationRequest(model=service.name, token_ids=[5])).result
        'This'
    """

    def __init__(self, loaded: LoadedVisionModel, limits: Limits, aliases: tuple[str, ...] = ()) -> None:
        self.loaded = loaded
        self.limits = limits
        self.aliases = tuple(aliases)
        self.max_image_pixels = limits.max_image_pixels
        # one explainer per attention variant (the explainer's mode is fixed at construction)
        pieces = piece_tokens(loaded.model, limits)
        self.explainers = {mode: VisionLanguageExplainer(loaded, mode=mode, piece_tokens=pieces)
                           for mode in ("log-additive", "multiplicative")}
        self.explainer = self.explainers["log-additive"]
        self.tokenizer = self.explainer.tokenizer
        self.vocab = int(loaded.model.get_input_embeddings().num_embeddings)
        text_config = getattr(loaded.model.config, "text_config", loaded.model.config)
        self.context_length: int | None = getattr(text_config, "max_position_embeddings", None)
        eos = loaded.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    @property
    def name(self) -> str:
        return self.loaded.name

    def info(self) -> schemas.ModelInfo:
        return schemas.ModelInfo(
            name=self.name, description=f"{self.name}, served by atman (AtMan explanations and steering over "
                                        "text and images)",
            max_context_size=self.context_length, hostings=["aleph-alpha"], image_support=True,
            explanation_support=True, steering_support=True, aliases=list(self.aliases),
        )

    # --- prompts ---------------------------------------------------------------------------
    def prompt(self, prompt: str | list) -> VisionPrompt:
        """The prompt's text with ``<image>`` markers, its decoded images and where each item lies."""
        items = [schemas.TextItem(type="text", data=prompt)] if isinstance(prompt, str) else prompt
        if not items:
            raise EmptyInputError("the prompt has no items")
        text, images, places = "", [], []
        for index, item in enumerate(items):
            if isinstance(item, schemas.ImageItem):
                images.append(decode_image(item, index, self.max_image_pixels))
                places.append(("image", len(images) - 1, 0))
                text += IMAGE_MARKER
            elif isinstance(item, schemas.TextItem):
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

    def _check_length(self, tokens: int, what: str, extra: int = 0) -> None:
        if tokens > self.limits.max_prompt_tokens:
            raise LimitError(f"{what} have {tokens} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens}", 413)
        if self.context_length is not None and tokens + extra > self.context_length:
            more = f" plus {extra} to generate" if extra else ""
            raise ContextLengthError(f"{what} have {tokens} tokens{more}, more than the model's context of "
                                     f"{self.context_length} tokens")

    def multipliers(self, prompt: str | list, vision: VisionPrompt, prepared: VisionLanguageInput,
                    threshold: float | None) -> torch.Tensor:
        """One attention multiplier per prompt position from the items' text and image controls."""
        encoded = prepared.encoded
        length = encoded.target_start
        spans = list(encoded.prompt_spans[:length])
        multipliers = torch.ones(length, dtype=torch.float64)
        if not isinstance(prompt, str):
            for index, (item, (kind, first, end)) in enumerate(zip(prompt, vision.items, strict=True)):
                if kind == "text":
                    controls = []
                    for control in item.controls:
                        if control.start + control.length > end - first:
                            raise AtmanError(f"prompt item {index}: text control {control.start}.."
                                             f"{control.start + control.length} reaches past the end of its "
                                             f"{end - first}-character item")
                        controls.append(TextControl(first + control.start, control.length, control.factor,
                                                    control.token_overlap or "partial"))
                    multipliers *= control_multipliers(spans, controls).double()
                elif item.controls:
                    run = prepared.image_runs[first]
                    multipliers[list(run)] *= self._image_control_multipliers(
                        item.controls, vision.images[first], _grid(len(run)), index).double()
        multipliers = multipliers.float()
        if threshold is not None:
            embeddings = language_model_inputs(self.loaded.model, prepared.inputs)[0][0, :length].float().cpu()
            candidates = sorted({p for p, span in enumerate(spans) if span is not None}
                                | {p for run in prepared.image_runs for p in run})
            multipliers = spread_to_similar(multipliers, embeddings, candidates, threshold)
        return multipliers

    @staticmethod
    def _image_control_multipliers(controls: Sequence[schemas.ImageControl], image: PromptImage,
                                   grid: ImageGrid, index: int) -> torch.Tensor:
        """Multipliers of one image's tokens (row-major): each control's factor on the cells its rectangle
        covers; ``partial`` moves it towards 1 by the covered share of each cell."""
        out = torch.ones(grid.rows * grid.cols, dtype=torch.float64)
        for control in controls:
            rect = control.rect
            if not (0 <= rect.left <= 1 and 0 <= rect.top <= 1 and rect.width > 0 and rect.height > 0
                    and rect.left + rect.width <= 1 + 1e-9 and rect.top + rect.height <= 1 + 1e-9):
                raise AtmanError(f"prompt item {index}: an image control's rect must lie inside 0..1 with a "
                                 f"positive width and height, got {rect.model_dump()}")
            left, top, right, bottom = image.rect_in_crop(rect)
            for r in range(grid.rows):
                for c in range(grid.cols):
                    cover_w = min(right, (c + 1) / grid.cols) - max(left, c / grid.cols)
                    cover_h = min(bottom, (r + 1) / grid.rows) - max(top, r / grid.rows)
                    if cover_w <= 0 or cover_h <= 0:
                        continue
                    if (control.token_overlap or "partial") == "complete":
                        out[r * grid.cols + c] *= control.factor
                    else:
                        share = cover_w * cover_h * grid.rows * grid.cols
                        out[r * grid.cols + c] *= 1.0 + (control.factor - 1.0) * min(share, 1.0)
        return out

    # --- endpoints -------------------------------------------------------------------------
    def explain(self, request: schemas.ExplanationRequest,
                check: Callable[..., None]) -> schemas.ExplanationResponse:
        """AtMan explanation of ``request.target``: per prompt item, scores of its text units or image tiles.

        The units and rows are those of :meth:`VisionLanguageExplainer.explain`; with ``target_granularity
        "token"`` each target token gets its own explanation, the target tokens before it being units too.
        """
        vision = self.prompt(request.prompt)
        if not request.target:
            raise EmptyInputError("the target is empty")
        suppression = Suppression(
            multiplier=DEFAULT_MULTIPLIER if request.control_factor is None else request.control_factor,
            kappa=_threshold(request.contextual_control_threshold),
            mode="multiplicative" if request.control_log_additive is False else "log-additive")
        granularity = request.prompt_granularity
        delimiter = None
        if granularity is not None and granularity.type == "custom":
            if not granularity.delimiter:
                raise AtmanError("prompt_granularity 'custom' needs a non-empty delimiter")
            delimiter = granularity.delimiter
        image_granularity = DEFAULT_IMAGE_GRANULARITY if granularity is None or granularity.type == "custom" \
            else granularity.type
        per_token = request.target_granularity == "token"
        explainer = self.explainers[suppression.mode]
        prepared = explainer.prepare(vision.text, request.target, [image.image for image in vision.images])
        encoded = prepared.encoded
        self._check_length(len(encoded.input_ids), "prompt and target")
        units = []
        if any(span is not None for span in encoded.prompt_spans):
            wanted = GRANULARITY_NAMES[granularity.type] if granularity is not None else "auto"
            units = prompt_units(encoded, choose_granularity(encoded) if wanted == "auto" else wanted,
                                 delimiter=delimiter)
        tiles = [grid_tiles(grid, image_tile_spec(grid, image_granularity))
                 for grid in (_grid(len(run)) for run in prepared.image_runs)]
        later = target_units(encoded) if per_token else []
        positions = [unit.positions for unit in units] + [
            tuple(run[c] for c in tile.cells) for run, image_tiles in zip(prepared.image_runs, tiles, strict=True)
            for tile in image_tiles] + [unit.positions for unit in later]
        if len(positions) > self.limits.max_units:
            raise LimitError(f"this explanation has {len(positions)} units; this server computes at most "
                             f"{self.limits.max_units} (choose a coarser prompt_granularity)", 422)
        check()
        losses = explainer.unit_losses(prepared, positions, suppression, progress=check)
        delta = losses[1:] - losses[0:1]
        spans = [(request.target, 0, len(request.target), delta.sum(dim=1))]
        if per_token:
            spans = [(request.target[a:b], a, b - a, delta[:, t]) for t, (a, b) in enumerate(encoded.target_spans)]
        explanations = []
        for t, (text, start, length, scores) in enumerate(spans):
            items: list = [Item("prompt", u.text, u.start, u.length, float(s))
                           for u, s in zip(units, scores[:len(units)], strict=True)]
            k = len(units)
            for image, image_tiles in enumerate(tiles):
                items += [ImageItem(image, tile.left, tile.top, tile.width, tile.height, float(scores[k + j]))
                          for j, tile in enumerate(image_tiles)]
                k += len(image_tiles)
            # a target token is explained by the target tokens before it
            items += [Item("target", u.text, u.start, u.length, float(scores[k + j])) for j, u in enumerate(later[:t])]
            explanations.append(TargetExplanation(TargetSpan(text, start, length), tuple(items)))
        explanation = Explanation(model=self.name, prompt=vision.text, target=request.target,
                                  explanations=tuple(explanations), settings=suppression.settings())
        explanation = explanation.postprocessed(request.postprocessing or "none", bool(request.normalize))
        return schemas.ExplanationResponse(
            model_version=self.name,
            explanations=[_api_explanation(exp, vision) for exp in explanation.explanations],
        )

    def complete(self, request: schemas.CompletionRequest, check: Callable[..., None]) -> schemas.CompletionResponse:
        """Completion(s) with the prompt items' text and image controls in force for every generated token."""
        maximum = completion_length(request, self.limits)
        bias = request.logit_bias or {}
        bad = [t for t in bias if not 0 <= t < self.vocab]
        if bad:
            raise AtmanError(f"logit_bias token id(s) {bad[:5]} are outside the vocabulary of {self.vocab} tokens")
        vision = self.prompt(request.prompt)
        prepared = self.explainer.prepare_prompt(vision.text, [image.image for image in vision.images])
        prompt_ids = list(prepared.encoded.input_ids)
        length = len(prompt_ids)
        self._check_length(length, "the prompt", extra=maximum)
        threshold = _threshold(request.contextual_control_threshold)
        multipliers = self.multipliers(request.prompt, vision, prepared, threshold)
        mode = "multiplicative" if request.control_log_additive is False else "log-additive"
        options: dict = {"max_new_tokens": maximum, "min_new_tokens": request.minimum_tokens or None,
                         "return_dict_in_generate": True, "output_logits": True,
                         "stopping_criteria": StoppingCriteriaList([_Watch(
                             check, lambda new: self._decode(prompt_ids, new), length, request.stop_sequences or ())])}
        if bias:
            options["sequence_bias"] = {(int(token),): float(value) for token, value in bias.items()}
        if request.temperature > 0:
            options |= {"do_sample": True, "temperature": request.temperature, "top_k": request.top_k,
                        "top_p": request.top_p if 0 < request.top_p < 1 else 1.0}
        else:
            options["do_sample"] = False
        results, generated = [], 0
        for _ in range(request.n):
            check()
            with torch.no_grad(), manipulate(multipliers[None].to(self.loaded.device), mode=mode):
                out = self.loaded.model.generate(**prepared.inputs, **options)
            result, count = self._completion(out, length, request)
            results.append(result)
            generated += count
        return schemas.CompletionResponse(model_version=self.name, completions=results,
                                          num_tokens_prompt_total=length * request.n,
                                          num_tokens_generated=generated)

    def _completion(self, out, length: int, request: schemas.CompletionRequest) -> tuple[schemas.CompletionResult,
                                                                                       int]:
        """One generated sequence as the API's result: cut at the end of text or the first stop sequence."""
        new = out.sequences[0, length:].tolist()
        finish = "maximum_tokens"
        for step, token in enumerate(new):
            if token in self.eos_ids:
                new, finish = new[:step], "end_of_text"
                break
        text = self._decode(out.sequences[0, :length].tolist(), new)
        hits = [text.find(stop) for stop in request.stop_sequences or () if stop and stop in text]
        if hits:
            text, finish = text[:min(hits)], "stop_sequence_reached"
            # keep the tokens up to the one that completed the stop sequence
            while len(new) > 1 and min(hits) < len(self._decode(out.sequences[0, :length].tolist(), new[:-1])):
                new = new[:-1]
        log_probs = None
        if request.log_probs is not None:
            log_probs = []
            for step, token in enumerate(new):
                scores = torch.log_softmax(out.logits[step][0].float(), dim=-1)
                ids = torch.topk(scores, request.log_probs).indices.tolist() if request.log_probs else []
                ids += [] if token in ids else [token]
                log_probs.append({self.tokenizer.convert_ids_to_tokens(i): float(scores[i]) for i in ids})
        return schemas.CompletionResult(
            completion=text, finish_reason=finish,
            completion_tokens=self.tokenizer.convert_ids_to_tokens(new) if request.tokens else None,
            log_probs=log_probs, raw_completion=text if request.raw_completion else None,
        ), len(new)

    def _decode(self, prompt: list[int], new: list[int]) -> str:
        """The text of ``new`` as it continues ``prompt`` (decoding it alone may drop its leading space)."""
        before = self.tokenizer.decode(prompt, skip_special_tokens=True)
        after = self.tokenizer.decode(prompt + new, skip_special_tokens=True)
        return after[len(before):] if after.startswith(before) else self.tokenizer.decode(new, skip_special_tokens=True)

    def evaluate(self, request: schemas.EvaluationRequest, check: Callable[..., None]) -> schemas.EvaluationResponse:
        """Log-probability of ``completion_expected`` after the (controlled) prompt."""
        vision = self.prompt(request.prompt)
        if not request.completion_expected:
            raise EmptyInputError("completion_expected is empty")
        prepared = self.explainer.prepare(vision.text, request.completion_expected,
                                          [image.image for image in vision.images])
        encoded = prepared.encoded
        self._check_length(len(encoded.input_ids), "prompt and completion")
        threshold = _threshold(request.contextual_control_threshold)
        multipliers = self.multipliers(request.prompt, vision, prepared, threshold)
        mode = "multiplicative" if request.control_log_additive is False else "log-additive"
        check()
        with torch.no_grad(), manipulate(multipliers[None].to(self.loaded.device), mode=mode):
            logits = self.loaded.model(**prepared.inputs, use_cache=False).logits[0]
        start = encoded.target_start
        target = torch.tensor(encoded.input_ids[start:], device=logits.device)
        logprobs = torch.log_softmax(logits[start - 1:-1].float(), dim=-1)
        chosen = logprobs.gather(-1, target[:, None])[:, 0]
        if not bool(torch.isfinite(chosen).all()):
            raise AtmanError("the controls drove the model's output to non-finite values; use a smaller factor")
        total = float(chosen.sum())
        count, characters = len(target), len(request.completion_expected)
        return schemas.EvaluationResponse(
            model_version=self.name,
            result=schemas.EvaluationResult(
                log_probability=total, log_perplexity=-total, log_perplexity_per_token=-total / count,
                log_perplexity_per_character=-total / characters,
                correct_greedy=bool((logprobs.argmax(-1) == target).all()), token_count=count,
                character_count=characters, completion=request.completion_expected,
            ),
            num_tokens_prompt_total=start,
        )

    def tokenize(self, request: schemas.TokenizationRequest) -> schemas.TokenizationResponse:
        ids = [int(t) for t in self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]]
        if len(ids) > self.limits.max_prompt_tokens:
            raise LimitError(f"the text has {len(ids)} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens}", 413)
        return schemas.TokenizationResponse(
            tokens=self.tokenizer.convert_ids_to_tokens(ids) if request.tokens else None,
            token_ids=ids if request.token_ids else None,
        )

    def detokenize(self, request: schemas.DetokenizationRequest) -> schemas.DetokenizationResponse:
        bad = [t for t in request.token_ids if not 0 <= t < self.vocab]
        if bad:
            raise AtmanError(f"token id(s) {bad[:5]} are outside the vocabulary of {self.vocab} tokens")
        if len(request.token_ids) > self.limits.max_prompt_tokens:
            raise LimitError(f"{len(request.token_ids)} tokens; this server accepts at most "
                             f"{self.limits.max_prompt_tokens}", 413)
        return schemas.DetokenizationResponse(result=self.tokenizer.decode(request.token_ids))

    def tokenizer_json(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise AtmanError(f"{self.name} has no fast tokenizer to hand out")
        return backend.to_str()


def _threshold(value: float | None) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:
        raise AtmanError(f"contextual_control_threshold must lie in (0, 1], got {value}")
    return value


def _grid(tokens: int) -> ImageGrid:
    """The square grid of an image's token run (images are cropped to squares before the processor)."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise AtmanError(f"an image gives {tokens} image tokens, not a square grid; this server lays out "
                         "square grids only")
    return ImageGrid(side, side)


def _api_explanation(exp: TargetExplanation, vision: VisionPrompt) -> schemas.TargetExplanation:
    """One target's scores grouped by prompt item: text offsets relative to the item (a unit that spans two
    adjacent text items appears in both, with its one score), tile rectangles in 0..1 of the whole image."""
    items: list[schemas.TextExplanationItem | ImageExplanationItem] = []
    for kind, first, end in vision.items:
        if kind == "image":
            image = vision.images[first]
            items.append(ImageExplanationItem(type="image", scores=[
                ImageScore(rect=image.rect_in_image(i.left, i.top, i.width, i.height), score=i.score)
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
    return schemas.TargetExplanation(target=exp.target.text, items=items)
