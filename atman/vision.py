"""AtMan for images: vision-transformer classifiers and vision-language generative models.

* :class:`ImageClassifierExplainer`: a ViT-style image classifier (ViT, DeiT, DINOv2, CLIP or SigLIP
  vision towers with a classification head). Units are tiles of the patch grid; the score of a tile
  is the rise of ``-log p(class)`` when its patch tokens are damped in every layer.
* :class:`VisionLanguageExplainer`: a model whose language model attends to image tokens (LLaVA
  family and others built on transformers' ``image_token_id``). Units are text units of the prompt
  and tiles of every image; the score is the rise of the target text's cross-entropy. Only the
  language model is manipulated: the vision tower and projector run as they are.

Both return the usual :class:`~atman.explanation.Explanation`, with :class:`~atman.explanation.ImageItem`
items for the tiles and the grid geometry in ``settings["images"]``.

Example::

    >>> vlm = load_vision_language("tests/fixtures/tiny-llava-scenes")
    >>> exp = VisionLanguageExplainer(vlm).explain("<image>This is a picture of a", " red circle",
    ...                                             images=[image])
    >>> exp.top(1)[0].kind
    'image'
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .encoders import class_index, class_label
from .engine import (
    EngineClient,
    Progress,
    Suppression,
    refuse_factor,
    spread_conceptually,
    suppression_rows,
)
from .errors import AtmanError, EmptyInputError, ModelLoadError, UnsupportedModelError
from .explanation import Explanation, ImageItem, Item, TargetExplanation, TargetSpan
from .manipulation import enable
from .models import ModelFacts
from .tiles import ImageGrid, TileSpec, grid_tiles, tile_shape
from .units import GRANULARITIES, EncodedInput, choose_granularity, prompt_units

IMAGE_MARKER = "<image>"
# the language model run on the vision tower's output embeddings must reproduce the model's own
# target log-probability this closely for the fast path (vision tower once, prefix reuse) to be used
EMBEDDING_PATH_TOLERANCE = 1e-4


@dataclass
class LoadedVisionModel(ModelFacts):
    """A vision model switched to AtMan attention, its processor and a display name."""

    model: torch.nn.Module
    processor: Any
    name: str


def is_vision_language(path: str) -> bool:
    """Whether ``path`` is a local model directory whose config declares a vision-language model
    (a vision config beside a text config), e.g. the reference LLaVA in tests/fixtures."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "vision_config" in data and "text_config" in data


def _patch_size(config) -> int:
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "patch_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if not isinstance(size, int):
        raise UnsupportedModelError(f"{type(config).__name__} declares no patch_size, so its patch grid is unknown")
    return size


def _tile_items(tiles_per_image: list[list], scores: Sequence[float]) -> list[ImageItem]:
    items, k = [], 0
    for image, tiles in enumerate(tiles_per_image):
        for tile in tiles:
            items.append(ImageItem(image, tile.left, tile.top, tile.width, tile.height, float(scores[k])))
            k += 1
    return items


def load_image_classifier(path: str, *, device: str = "cpu") -> LoadedVisionModel:
    """An image classifier (``AutoModelForImageClassification``) and its image processor from a directory."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    return _load_pretrained(AutoModelForImageClassification, AutoImageProcessor, path, device, "image classifier")


def _load_pretrained(model_class, processor_class, path: str, device: str, kind: str) -> LoadedVisionModel:
    try:
        model = model_class.from_pretrained(path, attn_implementation="sdpa").eval().to(device)
        processor = processor_class.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {kind} {path!r}: {exc}") from exc
    return LoadedVisionModel(model, processor, name=str(path).rstrip("/").rsplit("/", 1)[-1])


class VisionExplainer(EngineClient):
    """What both vision explainers share: a loaded vision model under one suppression setting."""

    def __init__(self, loaded: LoadedVisionModel, **options) -> None:
        refuse_factor(options.pop("factor", None))
        super().__init__(loaded.model, **options)
        self.loaded = loaded



class ImageClassifierExplainer(VisionExplainer):
    """Explains an image classifier's log-probability of one class over tiles of the patch grid.

    Example::

        >>> explainer = ImageClassifierExplainer(load_image_classifier("tests/fixtures/tiny-vit-scenes"))
        >>> exp = explainer.explain(image, target="red circle", granularity="token")
        >>> render_overlay(exp, image).save("why.png")
    """

    def __init__(self, loaded: LoadedVisionModel, **options) -> None:
        super().__init__(loaded, **options)
        self.patch = _patch_size(loaded.model.config)
        self._enabled = False

    def pixel_values(self, image) -> torch.Tensor:
        """The processor's pixel values of a PIL image (or a ready tensor, passed through)."""
        if isinstance(image, torch.Tensor):
            return image if image.ndim == 4 else image[None]
        if self.loaded.processor is None:
            raise AtmanError("this model has no image processor: pass pixel values as a tensor")
        return self.loaded.processor(images=image, return_tensors="pt")["pixel_values"]

    def explain(self, image, target: int | str | None = None, *, granularity: TileSpec = "token",
                multiplier: float | None = None, factor: None = None) -> Explanation:
        """Scores of the image's tiles for class ``target`` (index or label; None = the predicted class)."""
        refuse_factor(factor)
        suppression = self.suppression.with_options(multiplier=multiplier)
        model = self.loaded.model
        pixels = self.pixel_values(image).to(self.loaded.device)
        if not self._enabled:
            enable(model, {"pixel_values": pixels})
            self._enabled = True
        grid = ImageGrid(pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch)
        tiles = grid_tiles(grid, granularity)
        with torch.no_grad():
            plain = model(pixel_values=pixels, output_hidden_states=True)
        length = plain.hidden_states[0].shape[1]
        # every ViT-style tower puts its patch tokens last, after CLS / distillation / register tokens
        first_patch = length - grid.rows * grid.cols
        if first_patch < 0:
            raise UnsupportedModelError(
                f"{type(model).__name__} has {length} tokens for a {grid.rows}x{grid.cols} patch grid"
            )
        rows = suppression_rows(length, [[first_patch + c for c in tile.cells] for tile in tiles],
                                suppression.multiplier)
        logprobs = self.engine.outputs({"pixel_values": pixels}, rows,
                                       lambda out: torch.log_softmax(out.logits.float(), -1))
        index = class_index(model.config, target, logprobs.shape[1], int(logprobs[0].argmax()))
        delta = logprobs[0, index] - logprobs[1:, index]
        label = class_label(model.config, index)
        items = tuple(_tile_items([tiles], delta.tolist()))
        return Explanation(
            model=self.loaded.name, prompt="", target=label,
            explanations=(TargetExplanation(TargetSpan(label, 0, len(label)), items),),
            settings={"task": "image-classification", "class_index": index, **suppression.settings(),
                      "target_logprob": float(logprobs[0, index]),
                      "predicted": class_label(model.config, int(logprobs[0].argmax())),
                      "images": [{"width": int(pixels.shape[-1]), "height": int(pixels.shape[-2]),
                                  "rows": grid.rows, "cols": grid.cols,
                                  "tile": list(tile_shape(grid, granularity))}]},
        )


def load_vision_language(path: str, *, device: str = "cpu") -> LoadedVisionModel:
    """A vision-language model (``AutoModelForImageTextToText``) and its processor from a directory or hub id."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return _load_pretrained(AutoModelForImageTextToText, AutoProcessor, path, device, "vision-language model")


@dataclass(frozen=True)
class EmbeddedInput:
    """The language model's input embeddings (1, positions, hidden) and the model's own target losses."""

    embeddings: torch.Tensor
    reference: torch.Tensor


@dataclass(frozen=True)
class VisionLanguageInput:
    """Processed prompt + target: the model inputs, character spans of text tokens, image token runs."""

    inputs: dict[str, Any]
    encoded: EncodedInput
    image_runs: tuple[tuple[int, ...], ...]


class VisionLanguageExplainer(VisionExplainer):
    """Explains a vision-language model's target text over text units and image tiles.

    ``<image>`` markers in the prompt place the images (in order). Text units follow
    ``granularity`` (as for causal LMs), image units ``image_granularity`` (tiles of the patch grid).

    Example::

        >>> explainer = VisionLanguageExplainer(load_vision_language("tests/fixtures/tiny-llava-scenes"))
        >>> exp = explainer.explain("<image>This is a picture of a", " red circle", images=[image])
    """

    def __init__(self, loaded: LoadedVisionModel, **options) -> None:
        super().__init__(loaded, **options)
        config = loaded.model.config
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(config, "image_token_index", None)
        self.image_token = getattr(loaded.processor, "image_token", None)
        if self.image_token_id is None or self.image_token is None:
            raise UnsupportedModelError(
                f"{type(loaded.model).__name__} declares no image token (config.image_token_id and "
                "processor.image_token), so its image positions cannot be located"
            )
        subconfigs = {name for name in ("text_config", "vision_config") if getattr(config, name, None) is not None}
        if "text_config" not in subconfigs:
            raise UnsupportedModelError(f"{type(loaded.model).__name__} has no separate language model config")
        implementation = {name: "sdpa" for name in subconfigs} | {"text_config": "atman"}
        enable(loaded.model, implementation=implementation)
        self.tokenizer = getattr(loaded.processor, "tokenizer", None)
        # whether the last explanation ran the language model on its input embeddings with prefix
        # reuse (see :meth:`losses`)
        self.fast_path: bool | None = None

    def prepare(self, prompt: str, target: str, images: Sequence) -> VisionLanguageInput:
        """Run the processor on prompt + target and locate text spans and image-token runs."""
        if not prompt.strip() and not images:
            raise EmptyInputError("the prompt is empty")
        if not target:
            raise EmptyInputError("the target is empty")
        text, origin = self._processor_text(prompt, len(images))
        full = self._process(text + target, images)
        ids = full["input_ids"][0].tolist()
        prompt_ids = self._process(text, images)["input_ids"][0].tolist()
        prompt_len = len(prompt_ids)
        if len(ids) <= prompt_len:
            raise EmptyInputError("the target has no tokens")
        if ids[:prompt_len] != prompt_ids:
            raise AtmanError("prompt and target merge into one token at their boundary; start the target "
                             "with a space or end the prompt with one")
        runs = _runs([i for i, tok in enumerate(ids) if tok == self.image_token_id])
        if len(runs) != len(images):
            raise UnsupportedModelError(
                f"found {len(runs)} runs of image tokens for {len(images)} image(s); this model's image "
                "layout (split images, tiles with separators) is not supported"
            )
        spans = self._text_spans(text + target, ids, origin, len(text), prompt_len)
        target_enc = self.tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
        target_ids = ids[prompt_len:]
        if list(target_enc["input_ids"]) == target_ids:
            target_spans = tuple((int(a), int(b)) for a, b in target_enc["offset_mapping"])
        else:
            target_spans = tuple((0, len(target)) for _ in target_ids)
        # text units are cut from the prompt with its markers blanked: no unit swallows a marker
        blanked = prompt.replace(IMAGE_MARKER, " " * len(IMAGE_MARKER))
        encoded = EncodedInput(input_ids=tuple(ids), prompt=blanked, target=target,
                               prompt_spans=tuple(spans[:prompt_len]), target_start=prompt_len,
                               target_spans=target_spans)
        return VisionLanguageInput(inputs=full, encoded=encoded, image_runs=tuple(runs))

    def prepare_prompt(self, prompt: str, images: Sequence) -> VisionLanguageInput:
        """Run the processor on the prompt alone (no target), for steered generation: the model inputs,
        the character span in ``prompt`` of every text token and the image-token runs.

        ``encoded.target_start`` is the prompt's length and ``encoded.target`` is empty.

        Example::

            >>> prepared = explainer.prepare_prompt("<image>This is a picture of a", [image])
            >>> len(prepared.image_runs[0])
            36
        """
        if not prompt.strip() and not images:
            raise EmptyInputError("the prompt is empty")
        text, origin = self._processor_text(prompt, len(images))
        inputs = self._process(text, images)
        ids = inputs["input_ids"][0].tolist()
        runs = _runs([i for i, tok in enumerate(ids) if tok == self.image_token_id])
        if len(runs) != len(images):
            raise UnsupportedModelError(
                f"found {len(runs)} runs of image tokens for {len(images)} image(s); this model's image "
                "layout (split images, tiles with separators) is not supported"
            )
        spans = self._text_spans(text, ids, origin, len(text), len(ids))
        encoded = EncodedInput(input_ids=tuple(ids), prompt=prompt.replace(IMAGE_MARKER, " " * len(IMAGE_MARKER)),
                               target="", prompt_spans=tuple(spans), target_start=len(ids), target_spans=())
        return VisionLanguageInput(inputs=inputs, encoded=encoded, image_runs=tuple(runs))

    def generate(self, prompt: str, images: Sequence, *, max_new_tokens: int = 32) -> str:
        """The model's greedy continuation of ``prompt`` (with ``<image>`` markers) and ``images``, as text."""
        if max_new_tokens < 1:
            raise AtmanError("max_new_tokens must be at least 1")
        if prompt.count(IMAGE_MARKER) != len(images):
            raise AtmanError(f"the prompt has {prompt.count(IMAGE_MARKER)} {IMAGE_MARKER} marker(s) for "
                             f"{len(images)} image(s)")
        text = prompt.replace(IMAGE_MARKER, self.image_token)
        inputs = self._process(text, images)
        with torch.no_grad():
            out = self.loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        special = set(self.tokenizer.all_special_ids)
        while new and new[-1] in special:
            new.pop()
        decoded = self.tokenizer.decode(new, skip_special_tokens=True)
        if not decoded.strip():
            raise EmptyInputError("the model generated no text after this prompt, so there is nothing to explain")
        # decoding may drop the space that separated the first new token from the prompt
        for candidate in (decoded, " " + decoded.lstrip()):
            ids = self._process(text + candidate, images)["input_ids"][0].tolist()
            if ids == inputs["input_ids"][0].tolist() + new:
                return candidate
        return decoded

    def _processor_text(self, prompt: str, n_images: int) -> tuple[str, list[tuple[int, int]]]:
        """The processor's own text (each ``<image>`` marker becomes its image token) and, per piece
        between markers, where it starts in that text and in ``prompt``."""
        markers = prompt.count(IMAGE_MARKER)
        if markers != n_images:
            raise AtmanError(f"the prompt has {markers} {IMAGE_MARKER} marker(s) for {n_images} image(s)")
        pieces = prompt.split(IMAGE_MARKER)
        text, origin = "", []
        for k, piece in enumerate(pieces):
            origin.append((len(text), sum(len(p) + len(IMAGE_MARKER) for p in pieces[:k])))
            text += piece + (self.image_token if k < len(pieces) - 1 else "")
        return text, origin

    def _process(self, text: str, images: Sequence) -> dict[str, Any]:
        kwargs = {"images": list(images)} if images else {}
        out = self.loaded.processor(text=text, return_tensors="pt", **kwargs)
        return {k: v.to(self.loaded.device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    def _text_spans(self, text: str, ids: list[int], origin, prompt_chars: int, prompt_len: int) -> list:
        """Character span in the user's prompt of every prompt token, None for image and special tokens.

        The processor expands each image token into a run; the tokenizer on the same text gives one
        token per image, so both sequences are walked together."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        plain = list(enc["input_ids"])
        offsets = list(enc["offset_mapping"])
        special = set(self.tokenizer.all_special_ids) | {self.image_token_id}
        spans: list = []
        j = 0
        for tok in ids:
            if tok == self.image_token_id:
                spans.append(None)
                if j < len(plain) and plain[j] == self.image_token_id:
                    j += 1
                continue
            if j < len(plain) and plain[j] == tok:
                a, b = offsets[j]
                j += 1
                if tok not in special and prompt_chars >= b > a:
                    spans.append(_to_prompt(int(a), int(b), origin))
                    continue
            spans.append(None)
        return spans

    def explain(
        self,
        prompt: str,
        target: str,
        *,
        images: Sequence = (),
        granularity: str = "word",
        image_granularity: TileSpec = "token",
        multiplier: float | None = None,
        kappa: float | None | str = "default",
        delimiter: str | None = None,
        progress: Progress | None = None,
        factor: None = None,
    ) -> Explanation:
        """Scores of the prompt's text units and image tiles for ``target`` (summed over its tokens).

        ``kappa`` switches conceptual suppression on: with a unit, every prompt token (text or
        image) whose language-model input embedding has cosine similarity s >= ``kappa`` to one of
        the unit's is damped too, to ``1 - (1 - multiplier) * s``.
        """
        refuse_factor(factor)
        suppression = self.suppression.with_options(multiplier=multiplier, kappa=kappa)
        if granularity not in GRANULARITIES or granularity in ("refine", "spans"):
            raise AtmanError(f"granularity {granularity!r} is not offered with images")
        prepared = self.prepare(prompt, target, images)
        encoded = prepared.encoded
        has_text = any(span is not None for span in encoded.prompt_spans)
        units = []
        if has_text:
            resolved = choose_granularity(encoded) if granularity == "auto" else granularity
            units = prompt_units(encoded, resolved, delimiter=delimiter)
        grids = [self._grid(run, image) for run, image in zip(prepared.image_runs, images, strict=True)]
        tiles = [grid_tiles(grid, image_granularity) for grid in grids]
        positions = [unit.positions for unit in units] + [
            tuple(run[c] for c in tile.cells)
            for run, image_tiles in zip(prepared.image_runs, tiles, strict=True) for tile in image_tiles]
        losses = self.unit_losses(prepared, positions, suppression, progress=progress)
        delta = (losses[1:] - losses[0:1]).sum(dim=1)
        items: list = [Item("prompt", u.text, u.start, u.length, float(d))
                       for u, d in zip(units, delta[:len(units)], strict=True)]
        items += _tile_items(tiles, delta[len(units):].tolist())
        return Explanation(
            model=self.loaded.name, prompt=prompt, target=target,
            explanations=(TargetExplanation(TargetSpan(target, 0, len(target)), tuple(items)),),
            settings={"task": "vision-language", "granularity": granularity if has_text else None,
                      "image_granularity": list(image_granularity) if isinstance(image_granularity, tuple)
                      else image_granularity,
                      **suppression.settings(),
                      "target_logprob": -float(losses[0].sum()),
                      "images": [{"width": image.width, "height": image.height, "rows": g.rows, "cols": g.cols,
                                  "tile": list(tile_shape(g, image_granularity))}
                                 for image, g in zip(images, grids, strict=True)]},
        )

    def unit_losses(self, prepared: VisionLanguageInput, positions: Sequence[Sequence[int]],
                    suppression: Suppression, *, progress: Progress | None = None) -> torch.Tensor:
        """Cross-entropy of every target token (columns): row 0 untouched, row u + 1 with the positions
        of unit u suppressed (and, with ``suppression.kappa``, their conceptual neighbours among the
        prompt's text and image tokens)."""
        encoded = prepared.encoded
        rows = suppression_rows(len(encoded.input_ids), positions, suppression.multiplier)
        embedded = self.embed(prepared)
        if suppression.kappa is not None:
            candidates = sorted({p for p, span in enumerate(encoded.prompt_spans) if span is not None}
                                | {p for run in prepared.image_runs for p in run})
            spread_conceptually(rows, embedded.embeddings[0].float().cpu(), positions, candidates,
                                suppression.multiplier, suppression.kappa)
        return self.losses(prepared, rows, mode=suppression.mode, embedded=embedded, progress=progress)

    def embed(self, prepared: VisionLanguageInput) -> EmbeddedInput:
        """One pass of the whole model: what its language model receives (image features included) and
        the model's own loss of every target token, the reference the fast path must reproduce."""
        encoded = prepared.encoded
        embeddings, logits = language_model_inputs(self.loaded.model, prepared.inputs)
        targets = torch.tensor(encoded.input_ids[encoded.target_start:], device=logits.device)
        logprobs = torch.log_softmax(logits[0, encoded.target_start - 1:-1].float(), -1)
        reference = -logprobs.gather(-1, targets[:, None])[:, 0].cpu()
        return EmbeddedInput(embeddings=embeddings, reference=reference)

    def input_embeddings(self, prepared: VisionLanguageInput) -> torch.Tensor:
        """What the language model receives: (positions, hidden) embeddings, image features included."""
        return self.embed(prepared).embeddings[0].float().cpu()

    def losses(self, prepared: VisionLanguageInput, multipliers: torch.Tensor, *, mode: str | None = None,
               engine: str | None = None, embedded: EmbeddedInput | None = None,
               progress: Progress | None = None) -> torch.Tensor:
        """Cross-entropy of every target token (columns) under every multiplier row (rows).

        The vision tower runs once: the rows run the model on the language model's input embeddings,
        with the unperturbed prefix reused (``engine="cached"``, the default). A model whose language
        model does not reproduce its own output from those embeddings alone (positions or attention
        masks that depend on more than the embeddings, bidirectional image blocks) is run on its full
        inputs for every row instead — exact, at the old cost; :attr:`fast_path` tells which was used.
        """
        encoded = prepared.encoded
        targets = torch.tensor(encoded.input_ids[encoded.target_start:])
        embedded = embedded or self.embed(prepared)
        # decided per input (a processor may mark bidirectional image blocks for some inputs only), at
        # the cost of one language-model pass; the split lies inside the first image block, which
        # catches bidirectional image attention, prefix-LM prompts and positions the embeddings lack
        first_image = prepared.image_runs[0][0] if prepared.image_runs else encoded.target_start // 2
        split = min(max(first_image + 1, 1), encoded.target_start - 1)
        self.fast_path = (encoded.target_start > 1 and not has_multimodal_positions(self.loaded.model)
                          and self.engine.reuses_prefix_exactly({"inputs_embeds": embedded.embeddings}, targets,
                                                                embedded.reference, split, EMBEDDING_PATH_TOLERANCE))
        if self.fast_path:
            return self.engine.target_losses({"inputs_embeds": embedded.embeddings}, targets, multipliers,
                                             mode=mode, engine=engine, progress=progress)
        return self.engine.target_losses(prepared.inputs, targets, multipliers, mode=mode, engine="naive",
                                         progress=progress)

    def _grid(self, run: tuple[int, ...], image) -> ImageGrid:
        """The patch grid of one image's token run: square runs are square grids; otherwise the
        image's aspect ratio decides."""
        n = len(run)
        side = math.isqrt(n)
        if side * side == n:
            return ImageGrid(side, side)
        width, height = getattr(image, "size", (1, 1))
        for rows in range(1, n + 1):
            if n % rows == 0 and abs(rows / (n // rows) - height / width) < 1e-6:
                return ImageGrid(rows, n // rows)
        raise UnsupportedModelError(f"cannot lay out {n} image tokens as a grid for a {width}x{height} image")


def has_multimodal_positions(model: torch.nn.Module) -> bool:
    """Whether the model derives rotary positions from its image layout and keeps them between calls
    (Qwen2-VL's M-RoPE ``rope_deltas``): its language model cannot be fed embeddings alone."""
    return any(hasattr(module, "rope_deltas") for module in model.modules())


def language_model_inputs(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a vision-language model once on ``inputs``; return the input embeddings its language model
    received (1, positions, hidden: text embeddings with the image features in place) and the logits."""
    decoder = model.get_decoder()
    captured: dict = {}

    def grab(_module, args, kwargs):
        captured["embeds"] = kwargs.get("inputs_embeds")

    handle = decoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
    finally:
        handle.remove()
    if captured.get("embeds") is None:
        raise UnsupportedModelError(f"{type(model).__name__} does not pass inputs_embeds to its language model, "
                                    "so its image features cannot be located")
    return captured["embeds"].detach(), logits


def _runs(positions: list[int]) -> list[tuple[int, ...]]:
    runs: list[list[int]] = []
    for pos in positions:
        if runs and runs[-1][-1] == pos - 1:
            runs[-1].append(pos)
        else:
            runs.append([pos])
    return [tuple(run) for run in runs]


def _to_prompt(a: int, b: int, origin: list[tuple[int, int]]) -> tuple[int, int]:
    """Map a span of the processor's text back into the user's prompt (markers may differ in length)."""
    for text_start, prompt_start in reversed(origin):
        if a >= text_start:
            return a - text_start + prompt_start, b - text_start + prompt_start
    return a, b
