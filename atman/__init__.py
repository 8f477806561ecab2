"""atman: explain transformer outputs with AtMan (attention manipulation, forward passes only)."""

from .citations import Citations, CitedSpan, Passage, Source
from .cite import Citer, cite
from .encoders import ClassifierExplainer, SimilarityExplainer, load_encoder
from .errors import (
    AtmanError,
    ContextLengthError,
    EmptyInputError,
    GranularityError,
    ModelLoadError,
    NoUnitsError,
    UnsupportedModelError,
)
from .explainer import Explainer, explain
from .explanation import Explanation, ImageItem, Item, TargetExplanation, TargetSpan
from .manipulation import enable, manipulate
from .models import LoadedModel, load_model
from .steering import Steerer, TextControl, TokenControl
from .vision import ImageClassifierExplainer, VisionLanguageExplainer, load_image_classifier, load_vision_language

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
    "TextControl",
    "TokenControl",
    "UnsupportedModelError",
    "VisionLanguageExplainer",
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
