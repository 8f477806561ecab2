"""The result of an explanation: plain data, no torch.

The JSON shape follows Aleph Alpha's explanation response so that a server can return it as is::

    {"model": "...", "prompt": "...", "target": "...",
     "explanations": [{"target": {"text": "...", "start": 0, "length": 5},
                       "items": [{"kind": "prompt", "text": "...", "start": 0, "length": 12,
                                  "score": 0.83}, ...]}],
     "settings": {...}}

``start``/``length`` are character offsets into the prompt (kind ``prompt``) or into the target
(kind ``target``). Image units are items of kind ``image``: the index of the image in the input and
a rectangle in 0-1 image coordinates, as Aleph Alpha's image items::

    {"kind": "image", "image": 0, "left": 0.25, "top": 0.5, "width": 0.125, "height": 0.125, "score": 0.4}

A positive score is evidence for the target: suppressing that unit made the
target less likely (its cross-entropy rose).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

POSTPROCESSING = ("none", "absolute", "square")
ITEM_KINDS = ("prompt", "target", "image")


@dataclass(frozen=True)
class Item:
    """One explained unit: where it is, what it says, how much it mattered."""

    kind: str
    text: str
    start: int
    length: int
    score: float
    refined: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": self.kind, "text": self.text, "start": self.start, "length": self.length,
                "score": self.score}
        if self.refined:
            data["refined"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Item:
        return cls(kind=data["kind"], text=data["text"], start=int(data["start"]),
                   length=int(data["length"]), score=float(data["score"]),
                   refined=bool(data.get("refined", False)))


@dataclass(frozen=True)
class ImageItem:
    """One explained image tile: image ``image`` of the input, the rectangle ``left``, ``top``,
    ``width``, ``height`` in 0-1 image coordinates (origin top left) and its score.

    Example::

        >>> ImageItem(image=0, left=0.0, top=0.5, width=0.25, height=0.25, score=1.5).text
        'image 1 [0.00, 0.50, 0.25 x 0.25]'
    """

    image: int
    left: float
    top: float
    width: float
    height: float
    score: float
    kind: str = "image"

    @property
    def text(self) -> str:
        """A short label for tables: which image, which rectangle."""
        return f"image {self.image + 1} [{self.left:.2f}, {self.top:.2f}, {self.width:.2f} x {self.height:.2f}]"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "image", "image": self.image, "left": self.left, "top": self.top, "width": self.width,
                "height": self.height, "score": self.score}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageItem:
        return cls(image=int(data["image"]), left=float(data["left"]), top=float(data["top"]),
                   width=float(data["width"]), height=float(data["height"]), score=float(data["score"]))


def item_from_dict(data: dict[str, Any]) -> Item | ImageItem:
    """An :class:`Item` or, for kind ``image``, an :class:`ImageItem`."""
    return ImageItem.from_dict(data) if data.get("kind") == "image" else Item.from_dict(data)


@dataclass(frozen=True)
class TargetSpan:
    """The part of the target that an explanation is about (all of it, or one target token)."""

    text: str
    start: int
    length: int


@dataclass(frozen=True)
class TargetExplanation:
    """Scores of every unit for one target span, in prompt order then target order."""

    target: TargetSpan
    items: tuple[Item | ImageItem, ...]

    def top(self, k: int = 5, kind: str | None = None) -> list[Item | ImageItem]:
        """The ``k`` items with the highest score (optionally only of one kind)."""
        pool = [item for item in self.items if kind is None or item.kind == kind]
        return sorted(pool, key=lambda item: item.score, reverse=True)[:k]

    @property
    def scores(self) -> list[float]:
        return [item.score for item in self.items]


@dataclass(frozen=True)
class Explanation:
    """Why a model produced ``target`` after ``prompt``.

    Example::

        >>> exp = explain("Ada lives in Oslo. Where does Ada live? Ada lives in", target=" Oslo",
        ...               granularity="sentence")
        >>> exp.top(1)[0].text
        'Ada lives in Oslo.'
        >>> Explanation.from_json(exp.to_json()) == exp
        True
    """

    model: str
    prompt: str
    target: str
    explanations: tuple[TargetExplanation, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def top(self, k: int = 5, kind: str | None = None, index: int = 0) -> list[Item | ImageItem]:
        """The ``k`` highest-scoring items of the ``index``-th target explanation."""
        return self.explanations[index].top(k, kind)

    def postprocessed(self, postprocessing: str = "none", normalize: bool = False) -> Explanation:
        """Scores transformed as Aleph Alpha's API does: absolute or square, then min -> 0, max -> 1."""
        if postprocessing not in POSTPROCESSING:
            raise ValueError(f"postprocessing must be one of {', '.join(POSTPROCESSING)}, got {postprocessing!r}")
        out = []
        for exp in self.explanations:
            scores = [_post(s, postprocessing) for s in exp.scores]
            if normalize and scores:
                low, high = min(scores), max(scores)
                span = high - low
                scores = [(s - low) / span if span > 0 else 0.0 for s in scores]
            items = tuple(replace(item, score=s) for item, s in zip(exp.items, scores, strict=True))
            out.append(replace(exp, items=items))
        settings = dict(self.settings, postprocessing=postprocessing, normalize=normalize)
        return replace(self, explanations=tuple(out), settings=settings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": self.prompt,
            "target": self.target,
            "explanations": [
                {"target": asdict(exp.target), "items": [item.to_dict() for item in exp.items]}
                for exp in self.explanations
            ],
            "settings": dict(self.settings),
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Explanation:
        explanations = tuple(
            TargetExplanation(
                target=TargetSpan(**{k: exp["target"][k] for k in ("text", "start", "length")}),
                items=tuple(item_from_dict(item) for item in exp["items"]),
            )
            for exp in data["explanations"]
        )
        return cls(model=data["model"], prompt=data["prompt"], target=data["target"],
                   explanations=explanations, settings=dict(data.get("settings", {})))

    @classmethod
    def from_json(cls, text: str) -> Explanation:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Explanation:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def _repr_html_(self) -> str:
        from .render.html import render_fragment

        return render_fragment(self)


def _post(score: float, how: str) -> float:
    if how == "absolute":
        return abs(score)
    if how == "square":
        return score * score
    return score
