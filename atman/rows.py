"""Rows of attention multipliers: what every AtMan client hands to the engine or to :func:`atman.manipulate`.

A *row* gives every key position of a sequence a multiplier (1 = untouched). This module owns every
rule that turns what a user asks for into multipliers, and nothing else:

* explanations: :class:`Suppression` (the one validated setting of a suppressed unit),
  :func:`suppression_rows` (row 0 untouched, one row per unit) and :func:`spread_conceptually`
  (similar tokens damped too);
* steering: :class:`TextControl`, :class:`TokenControl` and :class:`ImageControl` turned into one
  1-D row over the prompt (:func:`control_multipliers`, :func:`image_control_multipliers`), with
  Aleph Alpha's partial-overlap rule, and :func:`spread_to_similar` (contextual controls).

Two similarity rules exist and are named apart (:data:`SIMILAR_RULES`): ``"scaled"`` is the AtMan
paper's conceptual suppression (a token of similarity s >= kappa gets ``1 - (1 - m) * s``);
``"same"`` is Aleph Alpha's ``contextual_control_threshold`` (a token of similarity >= threshold gets
the very multiplier of the token it resembles).

Example::

    >>> suppression_rows(3, [[1]], 0.0).tolist()
    [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    >>> control_multipliers([(0, 4), (4, 8)], [TextControl(2, 4, 2.0)]).tolist()
    [1.5, 1.5]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .defaults import BACKENDS, DEFAULT_KAPPA, DEFAULT_MULTIPLIER, FACTOR_RENAMED, MODES
from .errors import AtmanError
from .tiles import ImageGrid

OVERLAPS = ("partial", "complete")
# how a token similar to a suppressed or controlled one is damped (see the module docstring)
SIMILAR_RULES = ("scaled", "same")


def refuse_factor(factor: object) -> None:
    """Raise for the old ``factor`` spelling, whose meaning flipped; never reinterpret it."""
    if factor is not None:
        raise AtmanError(FACTOR_RENAMED)


@dataclass(frozen=True)
class Suppression:
    """How a unit is suppressed, checked once and shared by every explainer, steering and the server.

    ``multiplier``: the attention to a suppressed unit is multiplied by it (default 0.1; 0 removes
    the unit; in the paper's notation the suppression factor f = 1 - multiplier). ``kappa``:
    conceptual suppression threshold (None = off): tokens whose input embeddings have cosine
    similarity s >= kappa to the unit's are damped too, by ``similar``'s rule (``"scaled"``, the
    paper's: to ``1 - (1 - multiplier) * s``; ``"same"``, Aleph Alpha's contextual control: to the
    multiplier itself). ``mode``: log-additive or multiplicative. ``backend``: the attention kernel
    (sdpa, eager, flex_attention).

    >>> Suppression(multiplier=0.0).settings()
    {'multiplier': 0.0, 'kappa': None, 'mode': 'log-additive'}
    """

    multiplier: float = DEFAULT_MULTIPLIER
    kappa: float | None = DEFAULT_KAPPA
    mode: str = "log-additive"
    backend: str = "sdpa"
    similar: str = "scaled"

    def __post_init__(self) -> None:
        if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, (int, float)) or not (
            math.isfinite(self.multiplier) and 0.0 <= self.multiplier <= 1.0
        ):
            raise AtmanError(
                f"multiplier must lie in [0, 1] (0 removes the unit, 1 leaves it), got {self.multiplier!r}"
            )
        if self.kappa is not None and (
            isinstance(self.kappa, bool) or not isinstance(self.kappa, (int, float))
            or not (math.isfinite(self.kappa) and 0.0 < self.kappa <= 1.0)
        ):
            raise AtmanError(f"kappa must lie in (0, 1], got {self.kappa!r}")
        if self.mode not in MODES:
            raise AtmanError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.backend not in BACKENDS:
            raise AtmanError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.similar not in SIMILAR_RULES:
            raise AtmanError(f"unknown similarity rule {self.similar!r}; choose one of {', '.join(SIMILAR_RULES)}")

    def with_options(self, *, multiplier: float | None = None, kappa: float | None | str = "default",
                     mode: str | None = None) -> Suppression:
        """A copy with per-call overrides (None / ``"default"`` keep this setting's value)."""
        return replace(self, multiplier=self.multiplier if multiplier is None else multiplier,
                       kappa=self.kappa if kappa == "default" else kappa, mode=mode or self.mode)

    def settings(self) -> dict:
        """What an Explanation records of this setting."""
        out = {"multiplier": self.multiplier, "kappa": self.kappa, "mode": self.mode}
        if self.similar != "scaled":
            out["similar"] = self.similar
        return out

    def rows(self, length: int, units: Sequence[Sequence[int]], embeddings: torch.Tensor | None = None,
             candidates: Sequence[int] = ()) -> torch.Tensor:
        """Row 0 untouched, row ``u + 1`` suppressing ``units[u]``; with ``kappa``, also the ``candidates``
        whose ``embeddings`` (one per position) resemble the unit's."""
        rows = suppression_rows(length, units, self.multiplier)
        if self.kappa is not None:
            if embeddings is None:
                raise AtmanError("conceptual suppression needs the input embeddings")
            spread_conceptually(rows, embeddings, units, candidates, self.multiplier, self.kappa, self.similar)
        return rows


def suppression_rows(length: int, units: Sequence[Sequence[int]], multiplier: float) -> torch.Tensor:
    """Row 0 untouched, row ``u + 1`` with ``multiplier`` on the positions of ``units[u]``.

    >>> suppression_rows(3, [[1], [0, 2]], 0.1).tolist()
    [[1.0, 1.0, 1.0], [1.0, 0.10000000149011612, 1.0], [0.10000000149011612, 1.0, 0.10000000149011612]]
    """
    rows = torch.ones(len(units) + 1, length)
    for row, positions in enumerate(units, start=1):
        rows[row, list(positions)] = multiplier
    return rows


def spread_conceptually(
    rows: torch.Tensor,
    embeddings: torch.Tensor,
    units: Sequence[Sequence[int]],
    candidates: Sequence[int],
    multiplier: float,
    kappa: float,
    similar: str = "scaled",
) -> None:
    """Conceptual suppression, in place: with unit u (row u + 1) also damp every candidate position k
    whose input embedding has cosine similarity s >= ``kappa`` to one of u's: to ``1 - (1 - multiplier) * s``
    (``similar="scaled"``, the paper's) or to ``multiplier`` (``"same"``, Aleph Alpha's contextual control).

    ``candidates`` are the positions that may be damped (the explained prompt tokens, target tokens
    later target tokens see, image tokens); template and special tokens are never touched. A
    unit's similarity to k is the maximum over its positions.

    >>> rows = suppression_rows(3, [[0]], 0.0)
    >>> spread_conceptually(rows, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), [[0]], [0, 1, 2], 0.0, 0.7)
    >>> rows[1].tolist()
    [0.0, 0.0, 1.0]
    """
    if similar not in SIMILAR_RULES:
        raise AtmanError(f"unknown similarity rule {similar!r}; choose one of {', '.join(SIMILAR_RULES)}")
    candidates = list(candidates)
    if not candidates:
        return
    normed = torch.nn.functional.normalize(embeddings[candidates].float(), dim=-1)
    similarity = normed @ normed.T
    index = {pos: i for i, pos in enumerate(candidates)}
    cand = torch.tensor(candidates)
    for row, positions in enumerate(units, start=1):
        own = [index[p] for p in positions if p in index]
        if not own:
            continue
        sim = similarity[own].amax(dim=0)
        sim[own] = 0.0
        hit = sim >= kappa
        if bool(hit.any()):
            if similar == "same":
                damped = torch.full_like(sim[hit], float(multiplier))
            else:
                damped = (1.0 - (1.0 - multiplier) * sim[hit]).clamp(min=0.0)
            hit_positions = cand[hit]
            rows[row, hit_positions] = torch.minimum(rows[row, hit_positions], damped)


# --- steering: controls on a prompt -> one multiplier per prompt position ------------------------

@dataclass(frozen=True)
class TextControl:
    """Multiply the attention to the prompt characters ``start .. start + length`` by ``factor``."""

    start: int
    length: int
    factor: float
    token_overlap: str = "partial"


@dataclass(frozen=True)
class TokenControl:
    """Multiply the attention to prompt token ``position`` by ``factor``."""

    position: int
    factor: float


@dataclass(frozen=True)
class ImageControl:
    """Multiply the attention to the tokens of image ``image`` under a rectangle by ``factor``.

    ``left``, ``top``, ``width``, ``height`` lie in 0..1 of the image as the model sees it (origin top
    left); the part of a rectangle outside the image covers nothing. With ``token_overlap="partial"``
    a token whose patch the rectangle covers in part gets a factor moved towards 1 by the covered
    share of its patch.
    """

    image: int
    left: float
    top: float
    width: float
    height: float
    factor: float
    token_overlap: str = "partial"


Control = TextControl | TokenControl


def check_factor(factor: float) -> None:
    """Raise unless ``factor`` is a finite number >= 0 (a control's attention multiplier)."""
    try:
        value = float(factor)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(factor, bool) or not math.isfinite(value) or value < 0:
        raise AtmanError(f"a control factor must be a finite number >= 0, got {factor!r}")


def _check_overlap(overlap: str) -> None:
    if overlap not in OVERLAPS:
        raise AtmanError(f"token_overlap must be one of {', '.join(OVERLAPS)}, got {overlap!r}")


def _overlap_factor(factor: float, share: float, overlap: str) -> float:
    """A control's factor on a token whose extent it covers by ``share`` (0 < share <= 1)."""
    return factor if overlap == "complete" else 1.0 + (factor - 1.0) * min(share, 1.0)


def control_multipliers(
    token_spans: Sequence[tuple[int, int] | None],
    controls: Sequence[Control],
    *,
    text_length: int | None = None,
) -> torch.Tensor:
    """One multiplier per prompt token (1 = untouched) from ``controls``; several on one token multiply.

    ``token_spans[i]`` is the character span of prompt token ``i`` in the prompt text, or None for a
    token that is not text (BOS, a raw token id, an image token); text controls never touch those.
    With ``token_overlap="partial"`` a token only partly covered gets ``1 + (factor - 1) * covered /
    token_length``; with ``"complete"`` any overlap applies the full factor.

    Example::

        >>> control_multipliers([(0, 4), (4, 8)], [TextControl(2, 4, 2.0)]).tolist()
        [1.5, 1.5]
    """
    multipliers = torch.ones(len(token_spans), dtype=torch.float64)
    for control in controls:
        check_factor(control.factor)
        if isinstance(control, TokenControl):
            if not 0 <= control.position < len(token_spans):
                raise AtmanError(
                    f"token control position {control.position} is outside the prompt's {len(token_spans)} tokens"
                )
            multipliers[control.position] *= control.factor
            continue
        _check_overlap(control.token_overlap)
        if control.start < 0 or control.length < 1:
            raise AtmanError(f"a text control needs start >= 0 and length >= 1, got {control.start}, {control.length}")
        end = control.start + control.length
        if text_length is not None and end > text_length:
            raise AtmanError(
                f"text control {control.start}..{end} reaches past the end of the {text_length}-character text"
            )
        for position, span in enumerate(token_spans):
            if span is None:
                continue
            a, b = span
            covered = min(b, end) - max(a, control.start)
            if covered > 0:
                multipliers[position] *= _overlap_factor(control.factor, covered / (b - a), control.token_overlap)
    return multipliers.float()


def image_control_multipliers(grid: ImageGrid, controls: Sequence[ImageControl]) -> torch.Tensor:
    """Multipliers of one image's tokens (row-major over ``grid``): each control's factor on the patches
    its rectangle covers, by the same overlap rule as text (the covered share of each patch's area).

    >>> image_control_multipliers(ImageGrid(1, 2), [ImageControl(0, 0.0, 0.0, 0.75, 1.0, 0.0)]).tolist()
    [0.0, 0.5]
    """
    out = torch.ones(grid.rows * grid.cols, dtype=torch.float64)
    for control in controls:
        check_factor(control.factor)
        _check_overlap(control.token_overlap)
        if not (all(math.isfinite(v) for v in (control.left, control.top, control.width, control.height))
                and control.width > 0 and control.height > 0):
            raise AtmanError("an image control's rectangle needs finite coordinates and a positive width and "
                             f"height, got left={control.left}, top={control.top}, width={control.width}, "
                             f"height={control.height}")
        right, bottom = control.left + control.width, control.top + control.height
        for r in range(grid.rows):
            for c in range(grid.cols):
                cover_w = min(right, (c + 1) / grid.cols) - max(control.left, c / grid.cols)
                cover_h = min(bottom, (r + 1) / grid.rows) - max(control.top, r / grid.rows)
                if cover_w > 0 and cover_h > 0:
                    share = cover_w * cover_h * grid.rows * grid.cols
                    out[r * grid.cols + c] *= _overlap_factor(control.factor, share, control.token_overlap)
    return out.float()


def spread_to_similar(
    multipliers: torch.Tensor, embeddings: torch.Tensor, candidates: Sequence[int], threshold: float
) -> torch.Tensor:
    """Give each uncontrolled candidate token the multiplier of its most similar controlled token
    (Aleph Alpha's ``contextual_control_threshold``: the ``"same"`` rule, for a 1-D control row).

    Similarity is the cosine of the input embeddings; only similarities >= ``threshold`` count.
    """
    if not 0.0 < threshold <= 1.0:
        raise AtmanError(f"contextual_control_threshold must lie in (0, 1], got {threshold}")
    out = multipliers.clone()
    candidates = list(candidates)
    controlled = [p for p in candidates if multipliers[p] != 1]
    free = [p for p in candidates if multipliers[p] == 1]
    if not controlled or not free:
        return out
    normed = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    similarity = normed[free] @ normed[controlled].T
    best, index = similarity.max(dim=1)
    for row, position in enumerate(free):
        if float(best[row]) >= threshold:
            out[position] = multipliers[controlled[int(index[row])]]
    return out
