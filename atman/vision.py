"""AtMan for images: loading vision models, and vision-transformer image classifiers.

* :class:`LoadedVisionModel` and the loaders every vision explainer shares; :class:`VisionExplainer`,
  their common base (vision-language models: :mod:`atman.vision_language`).
* :class:`ImageClassifierExplainer`: a ViT-style image classifier (ViT, DeiT, DINOv2, CLIP or SigLIP
  vision towers with a classification head). Units are tiles of the patch grid; the score of a tile
  is the rise of ``-log p(class)`` when its patch tokens are damped in every layer. It returns the
  usual :class:`~atman.explanation.Explanation`, with :class:`~atman.explanation.ImageItem` items for
  the tiles and the grid geometry in ``settings["images"]``.

Example::

    >>> explainer = ImageClassifierExplainer(load_image_classifier("tests/fixtures/tiny-vit-scenes"))
    >>> explainer.explain(image, target="red circle").top(1)[0].kind  # doctest: +SKIP
    'image'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .encoders import class_index, class_label
from .engine import EngineClient
from .errors import AtmanError, ModelLoadError, UnsupportedModelError
from .explanation import Explanation, explanation_from
from .manipulation import enable
from .models import ModelFacts
from .rows import refuse_factor, suppression_rows
from .tiles import ImageGrid, TileSpec, grid_tiles, tile_shape
from .units import ImageUnit


@dataclass
class LoadedVisionModel(ModelFacts):
    """A vision model switched to AtMan attention, its processor and a display name."""

    model: torch.nn.Module
    processor: Any
    name: str
    # "image-classification" or "vision-language": what the model does, for those that serve several kinds
    modality: str = "vision-language"


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


def load_image_classifier(path: str, *, device: str = "cpu") -> LoadedVisionModel:
    """An image classifier (``AutoModelForImageClassification``) and its image processor from a directory."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    return _load_pretrained(AutoModelForImageClassification, AutoImageProcessor, path, device, "image classifier",
                            "image-classification")


def _load_pretrained(model_class, processor_class, path: str, device: str, kind: str,
                     modality: str = "vision-language") -> LoadedVisionModel:
    try:
        model = model_class.from_pretrained(path, attn_implementation="sdpa").eval().to(device)
        processor = processor_class.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {kind} {path!r}: {exc}") from exc
    return LoadedVisionModel(model, processor, name=str(path).rstrip("/").rsplit("/", 1)[-1], modality=modality)


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
        length = _token_count(model, pixels)
        # every ViT-style tower puts its patch tokens last, after CLS / distillation / register tokens
        first_patch = length - grid.rows * grid.cols
        if first_patch < 0:
            raise UnsupportedModelError(
                f"{type(model).__name__} has {length} tokens for a {grid.rows}x{grid.cols} patch grid"
            )
        positions = [tuple(first_patch + c for c in tile.cells) for tile in tiles]
        rows = suppression_rows(length, positions, suppression.multiplier)
        logprobs = self.engine.outputs({"pixel_values": pixels}, rows,
                                       lambda out: torch.log_softmax(out.logits.float(), -1))
        index = class_index(model.config, target, logprobs.shape[1], int(logprobs[0].argmax()))
        delta = logprobs[0, index] - logprobs[1:, index]
        label = class_label(model.config, index)
        units = [ImageUnit(0, cells, tile.left, tile.top, tile.width, tile.height)
                 for cells, tile in zip(positions, tiles, strict=True)]
        return explanation_from(
            units, delta, model=self.loaded.name, prompt="", target=label,
            settings={"task": "image-classification", "class_index": index, **suppression.settings(),
                      "target_logprob": float(logprobs[0, index]),
                      "predicted": class_label(model.config, int(logprobs[0].argmax())),
                      "images": [{"width": int(pixels.shape[-1]), "height": int(pixels.shape[-2]),
                                  "rows": grid.rows, "cols": grid.cols,
                                  "tile": list(tile_shape(grid, granularity))}]},
        )


def _token_count(model: torch.nn.Module, pixels: torch.Tensor) -> int:
    """The number of tokens the vision tower's encoder sees for ``pixels``: from its embedding layer alone
    (patches plus CLS, distillation and register tokens), or one plain pass where the tower has none."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    with torch.no_grad():
        if embeddings is not None:
            try:
                out = embeddings(pixels)
            except TypeError:
                out = None
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(out, torch.Tensor) and out.ndim == 3:
                return int(out.shape[1])
        return int(model(pixel_values=pixels, output_hidden_states=True).hidden_states[0].shape[1])
