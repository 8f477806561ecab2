"""atman: explain transformer outputs with AtMan (attention manipulation, forward passes only).

The public names are imported on first use, so that ``import atman`` (and the ``atman`` command's
``--help``) does not pay for torch and transformers until something needs them.

    >>> import atman
    >>> atman.Explainer(atman.load_model()).explain("Ada lives in Oslo. Ada lives in", " Oslo")  # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    AtmanError,
    ContextLengthError,
    EmptyInputError,
    GranularityError,
    ModelLoadError,
    NoUnitsError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from .citations import Citations, CitedSpan, Passage, Source
    from .citer import Citer, cite
    from .encoders import ClassifierExplainer, SimilarityExplainer, load_encoder
    from .explainer import Explainer, explain
    from .explanation import Explanation, ImageItem, Item, TargetExplanation, TargetSpan
    from .manipulation import enable, manipulate
    from .models import LoadedModel, load_model
    from .rows import ImageControl, TextControl, TokenControl
    from .steering import Steerer
    from .vision import ImageClassifierExplainer, load_image_classifier
    from .vision_language import VisionLanguageExplainer, VisionLanguageSteerer, load_vision_language

# public name -> the module that defines it
LAZY: dict[str, str] = {
    **dict.fromkeys(("Citations", "CitedSpan", "Passage", "Source"), ".citations"),
    **dict.fromkeys(("Citer", "cite"), ".citer"),
    **dict.fromkeys(("ClassifierExplainer", "SimilarityExplainer", "load_encoder"), ".encoders"),
    **dict.fromkeys(("Explainer", "explain"), ".explainer"),
    **dict.fromkeys(("Explanation", "ImageItem", "Item", "TargetExplanation", "TargetSpan"), ".explanation"),
    **dict.fromkeys(("enable", "manipulate"), ".manipulation"),
    **dict.fromkeys(("LoadedModel", "load_model"), ".models"),
    **dict.fromkeys(("ImageControl", "TextControl", "TokenControl"), ".rows"),
    "Steerer": ".steering",
    **dict.fromkeys(("ImageClassifierExplainer", "load_image_classifier"), ".vision"),
    **dict.fromkeys(("VisionLanguageExplainer", "VisionLanguageSteerer", "load_vision_language"), ".vision_language"),
}

__all__ = [
    "AtmanError",
    "Citations",
    "CitedSpan",
    "Citer",
    "Passage",
    "Source",
    "ClassifierExplainer",
    "ContextLengthError",
    "EmptyInputError",
    "Explainer",
    "Explanation",
    "GranularityError",
    "ImageClassifierExplainer",
    "ImageItem",
    "Item",
    "LoadedModel",
    "ModelLoadError",
    "NoUnitsError",
    "SimilarityExplainer",
    "Steerer",
    "TargetExplanation",
    "TargetSpan",
    "ImageControl",
    "TextControl",
    "TokenControl",
    "UnsupportedModelError",
    "VisionLanguageExplainer",
    "VisionLanguageSteerer",
    "cite",
    "enable",
    "explain",
    "load_encoder",
    "load_image_classifier",
    "load_model",
    "load_vision_language",
    "manipulate",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
