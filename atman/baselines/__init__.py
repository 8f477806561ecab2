"""Attribution methods behind one interface, for comparison with AtMan.

Every method is a class with one verb, ``attribute(prompt, target, granularity=...)``, returning an
:class:`atman.Explanation` over exactly the units AtMan uses. Token-level methods sum token scores
to coarser units. :func:`get_method` builds one from a spec such as ``"atman"``,
``"atman:multiplier=0.5,mode=multiplicative"`` or ``"integrated-gradients:steps=32"``.

Example::

    >>> from atman.baselines import get_method
    >>> get_method("occlusion", load_model()).attribute(prompt, " Oslo", granularity="sentence")
"""

from __future__ import annotations

from ..defaults import FACTOR_RENAMED
from ..errors import AtmanError
from ..models import LoadedModel
from .attention import AttentionRollout, CheferRelevance
from .base import BaselineUnavailableError, Method, TokenMethod, sequence_logprobs
from .gradient import FeatureAblation, InputXGradient, IntegratedGradients, Saliency
from .lrp import AttnLRP
from .perturbation import AtMan, Occlusion, Random

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    AtMan, IntegratedGradients, InputXGradient, Saliency, FeatureAblation, AttentionRollout, CheferRelevance,
    Occlusion, AttnLRP, Random,
)}
# option name -> parser of its value
_OPTIONS = {"multiplier": float, "mode": str, "steps": int, "seed": int,
            "kappa": lambda text: None if text.lower() in ("none", "off") else float(text)}


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"atman:multiplier=0.5,kappa=0.7"`` -> ``("atman", {"multiplier": 0.5, "kappa": 0.7})``.

    The old option ``factor`` (the suppression strength, whose meaning flipped) is refused.
    """
    name, _, rest = spec.strip().partition(":")
    if name not in METHODS:
        raise AtmanError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    options = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        key = key.strip()
        if key == "factor":
            raise AtmanError(f"in method {spec!r}: {FACTOR_RENAMED}")
        if not eq or key not in _OPTIONS:
            raise AtmanError(f"bad option {part!r} in method {spec!r}; options look like name=value, "
                             f"names: {', '.join(_OPTIONS)}")
        try:
            options[key] = _OPTIONS[key](value.strip())
        except ValueError:
            raise AtmanError(f"bad value for {key} in method {spec!r}: {value!r}") from None
    return name, options


def get_method(spec: str, model: LoadedModel) -> Method:
    """The method named by ``spec`` (see :func:`parse_spec`), ready for ``model``."""
    name, options = parse_spec(spec)
    try:
        return METHODS[name](model, **options)
    except TypeError:
        raise AtmanError(f"method {name!r} does not take the options {sorted(options)}") from None


__all__ = [
    "METHODS", "AtMan", "AttentionRollout", "AttnLRP", "BaselineUnavailableError", "CheferRelevance",
    "FeatureAblation", "InputXGradient", "IntegratedGradients", "Method", "Occlusion", "Random", "Saliency",
    "TokenMethod", "get_method", "parse_spec", "sequence_logprobs",
]
