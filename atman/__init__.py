"""atman: explain transformer outputs with AtMan (attention manipulation, forward passes only)."""

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
from .explanation import Explanation, Item, TargetExplanation, TargetSpan
from .manipulation import enable, manipulate
from .models import LoadedModel, load_model
from .steering import Steerer, TextControl, TokenControl

__all__ = [
    "AtmanError",
    "ContextLengthError",
    "EmptyInputError",
    "Explainer",
    "Explanation",
    "GranularityError",
    "Item",
    "LoadedModel",
    "ModelLoadError",
    "NoUnitsError",
    "Steerer",
    "TargetExplanation",
    "TargetSpan",
    "TextControl",
    "TokenControl",
    "UnsupportedModelError",
    "enable",
    "explain",
    "load_model",
    "manipulate",
]
__version__ = "0.1.0"
