"""AtMan for vision-language models: explanations over text units and image tiles, and steering.

* :class:`VisionLanguageExplainer`: a model whose language model attends to image tokens (LLaVA
  family and others built on transformers' ``image_token_id``). Units are text units of the prompt
  and tiles of every image; the score is the rise of the target text's cross-entropy. Only the
  language model is manipulated: the vision tower and projector run as they are.
  :meth:`~VisionLanguageExplainer.plan` names the units (so a caller can refuse too many before any
  pass), :meth:`~VisionLanguageExplainer.explain_plan` scores them.
* :class:`VisionLanguageSteerer`: generation and scoring of a continuation with text and image
  controls (:class:`~atman.rows.TextControl`, :class:`~atman.rows.ImageControl`) in force, the
  vision-language counterpart of :class:`atman.Steerer`.

Explanations carry :class:`~atman.explanation.ImageItem` items for the tiles and the grid geometry in
``settings["images"]``. Explainer and steerer are kept together because both read a prompt of text
and images the same way (the processor's text, the image-token runs, their grids and the language
model's input embeddings) and a split would make one import the other's internals.

Example::

    >>> vlm = load_vision_language("tests/fixtures/tiny-llava-scenes")
    >>> exp = VisionLanguageExplainer(vlm).explain("<image>This is a picture of a", " red circle",
    ...                                             images=[image])
    >>> exp.top(1)[0].kind
    'image'
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .engine import Progress, target_logprobs
from .errors import AtmanError, EmptyInputError, GranularityError, UnsupportedModelError
from .explanation import Explanation, explanation_from
from .manipulation import enable, manipulate
from .rows import (
    ImageControl,
    Suppression,
    TextControl,
    control_multipliers,
    image_control_multipliers,
    refuse_factor,
    spread_to_similar,
)
from .steering import FINISH_REASONS, Completion, Scored
from .tiles import ImageGrid, TileSpec, TilesPerSide, grid_tiles, tile_shape
from .units import (
    GRANULARITIES,
    TARGET_GRANULARITIES,
    EncodedInput,
    ImageUnit,
    choose_granularity,
    prompt_units,
    target_units,
)
from .vision import LoadedVisionModel, VisionExplainer, _load_pretrained

IMAGE_MARKER = "<image>"
# the language model run on the vision tower's output embeddings must reproduce the model's own
# target log-probability this closely for the fast path (vision tower once, prefix reuse) to be used
EMBEDDING_PATH_TOLERANCE = 1e-4
__all__ = ["EMBEDDING_PATH_TOLERANCE", "FINISH_REASONS", "IMAGE_MARKER", "EmbeddedInput", "VisionLanguageExplainer",
           "VisionLanguageInput", "VisionLanguagePlan", "VisionLanguageSteerer", "has_multimodal_positions",
           "image_grid", "language_model_inputs", "load_vision_language"]


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


@dataclass(frozen=True)
class VisionLanguagePlan:
    """What one vision-language explanation computes: the prepared input, its units (text
    :class:`~atman.units.Unit`, :class:`~atman.units.ImageUnit` tiles, target tokens), each image's grid
    and size as (width, height), and the granularities that made them."""

    prepared: VisionLanguageInput
    units: tuple
    grids: tuple[ImageGrid, ...]
    sizes: tuple[tuple[int, int], ...]
    granularity: str | None
    image_granularity: TileSpec
    target_granularity: str


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
        self._said_naive = False

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
        target_granularity: str = "complete",
        multiplier: float | None = None,
        kappa: float | None | str = "default",
        delimiter: str | None = None,
        progress: Progress | None = None,
        factor: None = None,
    ) -> Explanation:
        """Scores of the prompt's text units and image tiles for ``target`` (summed over its tokens, or
        with ``target_granularity="token"`` one explanation per target token, the target tokens before
        it being units too).

        ``kappa`` switches conceptual suppression on: with a unit, every prompt token (text or
        image) whose language-model input embedding has cosine similarity s >= ``kappa`` to one of
        the unit's is damped too, to ``1 - (1 - multiplier) * s``.
        """
        refuse_factor(factor)
        suppression = self.suppression.with_options(multiplier=multiplier, kappa=kappa)
        prepared = self.prepare(prompt, target, images)
        plan = self.plan(prepared, granularity, image_granularity, target_granularity, delimiter=delimiter,
                         images=images)
        return self.explain_plan(plan, suppression=suppression, progress=progress)

    def plan(self, prepared: VisionLanguageInput, granularity: str = "word", image_granularity: TileSpec = "token",
             target_granularity: str = "complete", *, delimiter: str | None = None,
             images: Sequence = ()) -> VisionLanguagePlan:
        """The units of a prepared input: text units at ``granularity`` (``auto`` chooses; none when the
        prompt has no text), the tiles of every image at ``image_granularity``, and with
        ``target_granularity="token"`` the target's tokens. ``images`` (for their sizes) lay out a
        non-square token run by the image's aspect ratio."""
        if granularity not in GRANULARITIES or granularity in ("refine", "spans"):
            raise AtmanError(f"granularity {granularity!r} is not offered with images")
        if target_granularity not in TARGET_GRANULARITIES:
            raise GranularityError(f"unknown target granularity {target_granularity!r}; choose one of "
                                   f"{', '.join(TARGET_GRANULARITIES)}")
        encoded = prepared.encoded
        has_text = any(span is not None for span in encoded.prompt_spans)
        units: list = []
        resolved = None
        if has_text:
            resolved = choose_granularity(encoded) if granularity == "auto" else granularity
            units = prompt_units(encoded, resolved, delimiter=delimiter)
        sizes = [getattr(image, "size", None) for image in images] or [None] * len(prepared.image_runs)
        grids = [image_grid(len(run), size) for run, size in zip(prepared.image_runs, sizes, strict=True)]
        for index, (run, grid) in enumerate(zip(prepared.image_runs, grids, strict=True)):
            units += [ImageUnit(index, tuple(run[c] for c in tile.cells), tile.left, tile.top, tile.width,
                                tile.height) for tile in grid_tiles(grid, image_granularity)]
        if target_granularity == "token":
            units += target_units(encoded)
        return VisionLanguagePlan(prepared=prepared, units=tuple(units), grids=tuple(grids),
                                  sizes=tuple(size or (0, 0) for size in sizes), granularity=resolved,
                                  image_granularity=image_granularity, target_granularity=target_granularity)

    def explain_plan(self, plan: VisionLanguagePlan, *, suppression: Suppression | None = None,
                     progress: Progress | None = None) -> Explanation:
        """Run a plan's rows and return its Explanation (``suppression``: default the explainer's)."""
        suppression = suppression or self.suppression
        prepared = plan.prepared
        encoded = prepared.encoded
        losses = self.unit_losses(prepared, [unit.positions for unit in plan.units], suppression, progress=progress)
        spec = plan.image_granularity
        return explanation_from(
            plan.units, (losses[1:] - losses[0:1]).double(), model=self.loaded.name,
            prompt=encoded.prompt, target=encoded.target,
            target_spans=encoded.target_spans if plan.target_granularity == "token" else None,
            settings={"task": "vision-language", "granularity": plan.granularity,
                      "image_granularity": spec.count if isinstance(spec, TilesPerSide)
                      else list(spec) if isinstance(spec, tuple) else spec,
                      "target_granularity": plan.target_granularity,
                      **suppression.settings(),
                      "target_logprob": -float(losses[0].sum()),
                      "images": [{"width": w, "height": h, "rows": g.rows, "cols": g.cols,
                                  "tile": list(tile_shape(g, spec))}
                                 for (w, h), g in zip(plan.sizes, plan.grids, strict=True)]})

    def unit_losses(self, prepared: VisionLanguageInput, positions: Sequence[Sequence[int]],
                    suppression: Suppression, *, progress: Progress | None = None) -> torch.Tensor:
        """Cross-entropy of every target token (columns): row 0 untouched, row u + 1 with the positions
        of unit u suppressed (and, with ``suppression.kappa``, their conceptual neighbours among the
        prompt's text and image tokens)."""
        encoded = prepared.encoded
        embedded = self.embed(prepared)
        candidates = sorted({p for p, span in enumerate(encoded.prompt_spans) if span is not None}
                            | {p for run in prepared.image_runs for p in run})
        rows = suppression.rows(len(encoded.input_ids), positions, embedded.embeddings[0].float().cpu(), candidates)
        return self.losses(prepared, rows, mode=suppression.mode, embedded=embedded, progress=progress)

    def embed(self, prepared: VisionLanguageInput) -> EmbeddedInput:
        """One pass of the whole model: what its language model receives (image features included) and
        the model's own loss of every target token, the reference the fast path must reproduce."""
        encoded = prepared.encoded
        embeddings, logits = language_model_inputs(self.loaded.model, prepared.inputs)
        targets = torch.tensor(encoded.input_ids[encoded.target_start:])
        reference = -target_logprobs(logits[0, encoded.target_start - 1:-1], targets).cpu()
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
        with self.engine.keeping_unperturbed():
            self.fast_path = (encoded.target_start > 1 and not has_multimodal_positions(self.loaded.model)
                              and self.engine.reuses_prefix_exactly({"inputs_embeds": embedded.embeddings}, targets,
                                                                    embedded.reference, split,
                                                                    EMBEDDING_PATH_TOLERANCE))
            if self.fast_path:
                # the check's pass is kept as the unperturbed pass: the rows do not run it again
                return self.engine.target_losses({"inputs_embeds": embedded.embeddings}, targets, multipliers,
                                                 mode=mode, engine=engine, progress=progress)
        if (engine or self.engine.kind) == "cached" and not self._said_naive:
            # exact, but not what was asked: said once per explainer
            warnings.warn(f"{type(self.loaded.model).__name__}'s language model does not reproduce the model's own "
                          "output from its input embeddings alone (image positions, bidirectional image blocks or a "
                          "prefix-LM prompt), so every row runs the whole model (engine 'naive': exact, slower)",
                          RuntimeWarning, stacklevel=2)
            self._said_naive = True
        return self.engine.target_losses(prepared.inputs, targets, multipliers, mode=mode, engine="naive",
                                         progress=progress)


def image_grid(tokens: int, size: tuple[int, int] | None = None) -> ImageGrid:
    """The patch grid of an image's run of ``tokens`` image tokens: a square run is a square grid;
    otherwise the image's ``size`` (width, height) decides by its aspect ratio.

    >>> image_grid(36), image_grid(8, (400, 200))
    (ImageGrid(rows=6, cols=6), ImageGrid(rows=2, cols=4))
    """
    side = math.isqrt(tokens)
    if side * side == tokens:
        return ImageGrid(side, side)
    width, height = size or (1, 1)
    for rows in range(1, tokens + 1):
        if tokens % rows == 0 and abs(rows / (tokens // rows) - height / width) < 1e-6:
            return ImageGrid(rows, tokens // rows)
    raise UnsupportedModelError(f"cannot lay out {tokens} image tokens as a grid for a {width}x{height} image")


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


class _Watch(StoppingCriteria):
    """Between tokens: lets ``check`` abort ``generate`` (by raising), and stops once the new text holds a
    stop sequence."""

    def __init__(self, check: Callable[[int], None] | None, text: Callable[[list[int]], str], length: int,
                 stops: Sequence[str]) -> None:
        self.check, self.text, self.length = check, text, length
        self.stops = [stop for stop in stops if stop]
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.check is not None:
            self.check(self.step)
        self.step += 1
        done = bool(self.stops) and any(stop in self.text(input_ids[0, self.length:].tolist())
                                        for stop in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class VisionLanguageSteerer:
    """Generate, or score a given continuation, with text and image controls on a vision-language prompt.

    A control multiplies the attention *to* part of the prompt by its factor in every layer of the
    language model, for the prompt and every generated token (the semantics of :class:`atman.Steerer`):
    a :class:`~atman.rows.TextControl` covers characters of the prompt text (with its ``<image>``
    markers), an :class:`~atman.rows.ImageControl` a rectangle of one image as the model sees it.

    Example::

        >>> steerer = VisionLanguageSteerer(load_vision_language("tests/fixtures/tiny-llava-scenes"))
        >>> prepared = steerer.explainer.prepare_prompt("<image>This is a picture of a", [image])
        >>> row = steerer.multipliers(prepared, images=[image], image_controls=[ImageControl(0, 0, 0, 1, 1, 0.0)])
        >>> steerer.generate_prepared(prepared, row, max_new_tokens=2).text  # doctest: +SKIP
    """

    def __init__(self, loaded: LoadedVisionModel, *, mode: str = "log-additive", backend: str = "sdpa",
                 explainer: VisionLanguageExplainer | None = None) -> None:
        self.explainer = explainer or VisionLanguageExplainer(loaded, mode=mode, backend=backend)
        self.loaded = loaded
        self.mode = Suppression(mode=mode, backend=backend).mode
        self.backend = backend
        self.tokenizer = self.explainer.tokenizer
        eos = loaded.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def multipliers(self, prepared: VisionLanguageInput, *, text_controls: Sequence[TextControl] = (),
                    image_controls: Sequence[ImageControl] = (), images: Sequence = (),
                    contextual_threshold: float | None = None) -> torch.Tensor:
        """One attention multiplier per prompt position (1 = untouched): the text controls on the text
        tokens, each image control on the tokens of its image, several on one token multiplied.
        ``contextual_threshold`` (Aleph Alpha's ``contextual_control_threshold``): an uncontrolled prompt
        token whose input embedding has cosine similarity >= threshold with a controlled one gets the
        multiplier of the most similar such token."""
        encoded = prepared.encoded
        length = encoded.target_start
        spans = list(encoded.prompt_spans[:length])
        multipliers = control_multipliers(spans, text_controls, text_length=len(encoded.prompt)).double()
        sizes = [getattr(image, "size", None) for image in images] or [None] * len(prepared.image_runs)
        for control in image_controls:
            if not 0 <= control.image < len(prepared.image_runs):
                raise AtmanError(f"image control for image {control.image}: the prompt has "
                                 f"{len(prepared.image_runs)} image(s)")
        for index, run in enumerate(prepared.image_runs):
            mine = [c for c in image_controls if c.image == index]
            if mine:
                grid = image_grid(len(run), sizes[index])
                multipliers[list(run)] *= image_control_multipliers(grid, mine).double()
        multipliers = multipliers.float()
        if contextual_threshold is not None:
            embeddings = language_model_inputs(self.loaded.model, prepared.inputs)[0][0, :length].float().cpu()
            candidates = sorted({p for p, span in enumerate(spans) if span is not None}
                                | {p for run in prepared.image_runs for p in run})
            multipliers = spread_to_similar(multipliers, embeddings, candidates, contextual_threshold)
        return multipliers

    def generate(self, prompt: str, images: Sequence = (), *, text_controls: Sequence[TextControl] = (),
                 image_controls: Sequence[ImageControl] = (), contextual_threshold: float | None = None,
                 **options) -> Completion:
        """A continuation of ``prompt`` (with ``<image>`` markers) and ``images`` under the controls; the
        options are :meth:`generate_prepared`'s."""
        prepared = self.explainer.prepare_prompt(prompt, images)
        row = self.multipliers(prepared, text_controls=text_controls, image_controls=image_controls, images=images,
                               contextual_threshold=contextual_threshold)
        return self.generate_prepared(prepared, row, **options)

    def score(self, prompt: str, continuation: str, images: Sequence = (), *,
              text_controls: Sequence[TextControl] = (), image_controls: Sequence[ImageControl] = (),
              contextual_threshold: float | None = None, mode: str | None = None) -> Scored:
        """The log-probability of each token of ``continuation`` after ``prompt`` and ``images`` under the
        controls (:meth:`score_prepared`)."""
        prepared = self.explainer.prepare(prompt, continuation, images)
        row = self.multipliers(prepared, text_controls=text_controls, image_controls=image_controls, images=images,
                               contextual_threshold=contextual_threshold)
        return self.score_prepared(prepared, row, mode=mode)

    def score_prepared(self, prepared: VisionLanguageInput, multipliers: torch.Tensor | None = None, *,
                       mode: str | None = None) -> Scored:
        """Log-probability of each target token of ``prepared`` (:meth:`VisionLanguageExplainer.prepare`)
        under the prompt's ``multipliers`` (one per prompt position; None = the model itself), teacher
        forced in one pass, and whether each was the greedy choice."""
        encoded = prepared.encoded
        targets = torch.tensor(encoded.input_ids[encoded.target_start:])
        row = None
        if multipliers is not None:
            if multipliers.shape != (encoded.target_start,):
                raise AtmanError(f"need one multiplier per prompt position ({encoded.target_start}), got "
                                 f"{tuple(multipliers.shape)}")
            row = torch.cat([multipliers.float().cpu(), torch.ones(len(targets))])
        scored = self.explainer.engine.logprobs(prepared.inputs, targets, row, mode=mode or self.mode)
        if not bool(torch.isfinite(scored.chosen).all()):
            raise AtmanError("the controls drove the model's output to non-finite values; use a smaller factor")
        return Scored(log_probs=scored.chosen, greedy=scored.greedy)

    def generate_prepared(
        self,
        prepared: VisionLanguageInput,
        multipliers: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        minimum_tokens: int = 0,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        stop: Sequence[str] = (),
        logit_bias: dict[int, float] | None = None,
        top_log_probs: int | None = None,
        mode: str | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Completion:
        """A continuation of ``prepared`` (:meth:`VisionLanguageExplainer.prepare_prompt`) with the
        prompt's ``multipliers`` in force for every generated token: greedy at ``temperature`` 0, else
        sampled (``top_k``, ``top_p``); cut at the end of text or the first of ``stop``. ``on_token(step)``
        runs before every token; an exception it raises stops the generation."""
        if max_new_tokens < 1:
            raise AtmanError("max_new_tokens must be at least 1")
        mode = Suppression(mode=mode or self.mode).mode
        prompt_ids = list(prepared.encoded.input_ids)
        length = len(prompt_ids)
        row = torch.ones(length) if multipliers is None else multipliers.float()
        if row.shape != (length,):
            raise AtmanError(f"need one multiplier per prompt position ({length}), got {tuple(row.shape)}")
        options: dict = {"max_new_tokens": max_new_tokens, "min_new_tokens": minimum_tokens or None,
                         "return_dict_in_generate": True, "output_logits": True,
                         "stopping_criteria": StoppingCriteriaList([_Watch(
                             on_token, lambda new: self._decode(prompt_ids, new), length, stop)])}
        if logit_bias:
            options["sequence_bias"] = {(int(token),): float(value) for token, value in logit_bias.items()}
        if temperature > 0:
            options |= {"do_sample": True, "temperature": temperature, "top_k": top_k,
                        "top_p": top_p if 0 < top_p < 1 else 1.0}
        else:
            options["do_sample"] = False
        with torch.no_grad(), manipulate(row[None].to(self.loaded.device), mode=mode, backend=self.backend):
            out = self.loaded.model.generate(**prepared.inputs, **options)
        return self._completion(out, prompt_ids, stop, top_log_probs)

    def _completion(self, out, prompt_ids: list[int], stop: Sequence[str], top: int | None) -> Completion:
        """One generated sequence, cut at the end of text or the first stop sequence."""
        length = len(prompt_ids)
        new = out.sequences[0, length:].tolist()
        finish = FINISH_REASONS[0]
        for step, token in enumerate(new):
            if token in self.eos_ids:
                new, finish = new[:step], FINISH_REASONS[1]
                break
        text = self._decode(prompt_ids, new)
        hits = [text.find(s) for s in stop if s and s in text]
        if hits:
            text, finish = text[:min(hits)], FINISH_REASONS[2]
            # keep the tokens up to the one that completed the stop sequence
            while len(new) > 1 and min(hits) < len(self._decode(prompt_ids, new[:-1])):
                new = new[:-1]
        steps = torch.stack([out.logits[step][0] for step in range(len(new))]) if new else None
        chosen = target_logprobs(steps, torch.tensor(new)).tolist() if steps is not None else []
        tops = None
        if top is not None:
            tops = []
            for step, token in enumerate(new):
                scores = torch.log_softmax(steps[step].float(), dim=-1)
                ids = torch.topk(scores, top).indices.tolist() if top else []
                ids += [] if token in ids else [token]
                tops.append({self.tokenizer.convert_ids_to_tokens(i): float(scores[i]) for i in ids})
        return Completion(text=text, token_ids=tuple(new), tokens=tuple(self.tokenizer.convert_ids_to_tokens(new)),
                          log_probs=tuple(chosen), finish_reason=finish,
                          top_log_probs=tuple(tops) if tops is not None else None)

    def _decode(self, prompt: list[int], new: list[int]) -> str:
        """The text of ``new`` as it continues ``prompt`` (decoding it alone may drop its leading space)."""
        before = self.tokenizer.decode(prompt, skip_special_tokens=True)
        after = self.tokenizer.decode(prompt + new, skip_special_tokens=True)
        return after[len(before):] if after.startswith(before) else self.tokenizer.decode(new, skip_special_tokens=True)
