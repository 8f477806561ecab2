"""The defaults and choices every part of atman shares, in one place and free of torch (so that the
command line can parse its options without loading a model).

>>> DEFAULT_MULTIPLIER, MODES
(0.1, ('log-additive', 'multiplicative'))
"""

from __future__ import annotations

# the attention to a suppressed unit is multiplied by this (the AtMan authors' code and Aleph Alpha's
# API use the same number: suppression_factor / control_factor = 0.1)
DEFAULT_MULTIPLIER = 0.1
# conceptual suppression is off by default: on the context-QA check it lowered sentence top-1 from
# 100 % to 90 % (docs/defaults.md). CONCEPTUAL_KAPPA is the threshold used when it is switched on.
DEFAULT_KAPPA: float | None = None
CONCEPTUAL_KAPPA = 0.7
MODES: tuple[str, ...] = ("log-additive", "multiplicative")
BACKENDS: tuple[str, ...] = ("sdpa", "eager", "flex_attention")
ENGINES: tuple[str, ...] = ("cached", "naive")
FACTOR_RENAMED = (
    "`factor` (the suppression strength: 0.9 meant attention x 0.1) has been replaced by `multiplier`, the "
    "attention multiplier itself (default 0.1; 0 removes the unit, 1 leaves it untouched), as in the AtMan "
    "authors' code and Aleph Alpha's API: pass multiplier = 1 - factor"
)
