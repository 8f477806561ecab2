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
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import missing

if TYPE_CHECKING:
    import pandas as pd
    from captum.attr import LLMAttributionResult

POSTPROCESSING = ("none", "absolute", "square")
ITEM_KINDS = ("prompt", "target", "image")
FRAME_COLUMNS = ("method", "target_index", "target", "target_start", "target_end", "kind", "text", "start", "end",
                 "score", "refined")
IMAGE_COLUMNS = ("image", "left", "top", "width", "height")
PANDAS_INSTALL = 'pip install "atman[pandas]"'
CAPTUM_INSTALL = 'pip install "atman[captum]"'


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
        'image 1, 0-25 % across, 50-75 % down'
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
        """A short label for tables: which image, which part of it (views that know the tile grid name the
        tile's row and column, :func:`atman.render.titles.tile_words`)."""
        def share(a: float, b: float) -> str:
            return f"{round(100 * a)}-{round(100 * (a + b))} %"

        return f"image {self.image + 1}, {share(self.left, self.width)} across, {share(self.top, self.height)} down"

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

    def save(self, path: str | Path, *, title: str | None = None, images: Sequence[Any] | None = None) -> list[Path]:
        """Write the explanation in the format its file name's extension says; returns the files written.

        ``.json``: the JSON of :meth:`to_json` (:meth:`load` reads it back). ``.html`` / ``.htm``: the
        self-contained report of :meth:`to_html`. ``.png``: for image explanations, the relevance
        overlay of each input image; an Explanation holds scores, not pixels, so the images must be
        given (PIL images in input order). One image is written to ``path``, several to
        ``<stem>-image<N>.png`` beside it.

        Example::

            >>> exp.save("why.html")
            [PosixPath('why.html')]
            >>> Explanation.load(exp.save("why.json")[0]) == exp
            True
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            if images is not None or title is not None:
                raise ValueError("a .json explanation holds scores only; title and images belong to .html or .png")
            path.write_text(self.to_json(indent=1), encoding="utf-8")
            return [path]
        if suffix in (".html", ".htm"):
            path.write_text(self.to_html(title=title, images=images), encoding="utf-8")
            return [path]
        if suffix == ".png":
            return self._save_png(path, images)
        raise ValueError(f"cannot tell the format of {path.name!r} by its extension; use .json, .html or .png")

    def _save_png(self, path: Path, images: Sequence[Any] | None) -> list[Path]:
        if not any(item.kind == "image" for exp in self.explanations for item in exp.items):
            raise ValueError("a .png is an image overlay, and this explanation has no image units; "
                             "save it as .html or .json")
        if not images:
            raise ValueError("saving a .png needs the input images (images=[PIL image, ...]): "
                             "an explanation holds scores, not pixels")
        from .render.image import render_overlay, save_overlays

        if len(images) == 1:
            render_overlay(self, images[0]).save(path)
            return [path]
        return save_overlays(self, list(images), path)

    def to_html(self, title: str | None = None, images: Sequence[Any] | None = None) -> str:
        """The explanation as one self-contained HTML document (the report ``atman explain -f html`` writes).

        ``images`` (PIL images in input order) add relevance overlays for image explanations.

        Example::

            >>> html = exp.to_html(title="Why Oslo?")
            >>> html.startswith("<!DOCTYPE html>")
            True
        """
        from .render.html import render_html

        return render_html(self, title=title, images=images)

    def to_frame(self) -> pd.DataFrame:
        """The scores as a pandas DataFrame: one row per unit and target explanation.

        Columns: ``method`` (atman, or the comparison method that produced it), ``target_index``,
        ``target`` (the explained target span's text), ``target_start`` / ``target_end`` (its
        characters in the target), ``kind`` (prompt, target or image), ``text``, ``start`` / ``end``
        (characters in the prompt, or in the target for kind target; empty for image units),
        ``score`` and ``refined``; image explanations add ``image``, ``left``, ``top``, ``width``,
        ``height``. Needs pandas (``pip install "atman[pandas]"``).

        Example::

            >>> df = exp.to_frame()
            >>> df.sort_values("score", ascending=False).head(3)[["text", "score"]]
        """
        try:
            import pandas as pd
        except ImportError:
            raise missing("pandas", PANDAS_INSTALL) from None
        has_images = any(item.kind == "image" for exp in self.explanations for item in exp.items)
        method = self.settings.get("method", "atman")
        rows = []
        for index, exp in enumerate(self.explanations):
            span = exp.target
            for item in exp.items:
                row = {"method": method, "target_index": index, "target": span.text, "target_start": span.start,
                       "target_end": span.start + span.length, "kind": item.kind, "text": item.text}
                if isinstance(item, ImageItem):
                    row.update(start=None, end=None, score=item.score, refined=False)
                else:
                    row.update(start=item.start, end=item.start + item.length, score=item.score,
                               refined=item.refined)
                if has_images:
                    image = isinstance(item, ImageItem)
                    row.update({key: getattr(item, key) if image else None
                                for key in ("image", "left", "top", "width", "height")})
                rows.append(row)
        columns = list(FRAME_COLUMNS) + (list(IMAGE_COLUMNS) if has_images else [])
        frame = pd.DataFrame(rows, columns=columns)
        int_columns = ["start", "end"] + (["image"] if has_images else [])
        return frame.astype({name: "Int64" for name in int_columns})

    def to_captum(self) -> LLMAttributionResult:
        """The scores as Captum's ``LLMAttributionResult``, so that its plots work on AtMan results.

        ``input_tokens`` are the prompt's units (tokens, words, sentences... as explained; image
        units by their label), ``output_tokens`` the target's explained spans: one per target token
        for ``target_granularity="token"`` (then ``token_attr`` holds one row of prompt-unit scores
        per target token), else the whole target (``token_attr`` is None). ``seq_attr`` is the score
        of each prompt unit for the whole target: the sum of its per-token scores, which for raw
        (not postprocessed) scores is AtMan's complete-target score. Scores of earlier target tokens
        for later ones have no place in Captum's result and are left out. Needs captum
        (``pip install "atman[captum]"``).

        Example::

            >>> result = exp.to_captum()
            >>> fig, ax = result.plot_seq_attr()
        """
        try:
            from captum.attr import LLMAttributionResult
        except ImportError:
            raise missing("captum", CAPTUM_INSTALL) from None
        inputs = [item for item in self.explanations[0].items if item.kind != "target"]
        rows = [[item.score for item in exp.items if item.kind != "target"] for exp in self.explanations]
        if any(len(row) != len(inputs) for row in rows):
            raise ValueError("the target explanations do not share one set of prompt units")
        per_token = self.settings.get("target_granularity") == "token"
        seq_attr = [sum(column) for column in zip(*rows, strict=True)]
        return LLMAttributionResult(
            input_tokens=[item.text for item in inputs],
            output_tokens=[exp.target.text for exp in self.explanations],
            seq_attr=seq_attr,
            token_attr=rows if per_token else None,
        )

    @classmethod
    def load(cls, path: str | Path) -> Explanation:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def _repr_html_(self) -> str:
        from .render.html import render_fragment

        return render_fragment(self)


def explanation_from(
    units: Sequence[Any],
    delta: Any,
    *,
    model: str,
    prompt: str,
    target: str,
    settings: dict,
    target_spans: Sequence[tuple[int, int]] | None = None,
    refined: Sequence[int] | set[int] = (),
) -> Explanation:
    """The one way scores become an :class:`Explanation`.

    ``units[u]`` is an explained unit: kind ``prompt`` or ``target`` with ``text``, ``start`` and
    ``length`` (a :class:`~atman.units.Unit`), or kind ``image`` with ``image``, ``left``, ``top``,
    ``width`` and ``height`` (a :class:`~atman.units.ImageUnit`). ``delta[u]`` is its score: one number,
    or one per target token (nested sequences or a tensor of shape units x target tokens).

    Without ``target_spans`` the explanation is of the complete target: one item per unit, its score
    summed over the target's tokens (target units are items too: the units of a second text, as in a
    similarity explanation). With ``target_spans`` (the (start, end) of each
    target token in ``target``) each token gets its own explanation: every prompt and image unit, and
    the target units before it (the ``j``-th target unit is the ``j``-th target token). ``refined`` are
    the indices of units marked as refined (coarse-to-fine). Scores must be finite.

    >>> from atman.units import Unit
    >>> exp = explanation_from([Unit("prompt", (0,), 0, 3, "Ada")], [[0.5, 0.25]], model="m",
    ...                        prompt="Ada", target=" Oslo", settings={})
    >>> exp.explanations[0].items[0].score
    0.75
    """
    rows = delta.tolist() if hasattr(delta, "tolist") else [list(r) if isinstance(r, Sequence) else r
                                                          for r in delta]
    if len(rows) != len(units):
        raise ValueError(f"{len(rows)} scores for {len(units)} units")
    rows = [row if isinstance(row, list) else [row] for row in rows]
    if not all(math.isfinite(v) for row in rows for v in row):
        from .errors import AtmanError

        raise AtmanError("the explanation produced non-finite scores (a multiplier of 0 with the multiplicative "
                         "variant can do this); use a multiplier above 0")
    marked = set(refined)

    def item(u: int, score: float) -> Item | ImageItem:
        unit = units[u]
        if unit.kind == "image":
            return ImageItem(image=unit.image, left=unit.left, top=unit.top, width=unit.width,
                             height=unit.height, score=score)
        return Item(kind=unit.kind, text=unit.text, start=unit.start, length=unit.length, score=score,
                    refined=u in marked)

    context = [u for u, unit in enumerate(units) if unit.kind != "target"]
    if target_spans is None:
        items = tuple(item(u, math.fsum(rows[u])) for u in range(len(units)))
        spans = (TargetExplanation(TargetSpan(target, 0, len(target)), items),)
    else:
        later = [u for u, unit in enumerate(units) if unit.kind == "target"]
        spans = tuple(
            TargetExplanation(TargetSpan(target[a:b], a, b - a),
                              tuple(item(u, rows[u][t]) for u in context + later[:t]))
            for t, (a, b) in enumerate(target_spans))
    return Explanation(model=model, prompt=prompt, target=target, explanations=spans, settings=settings)


def _post(score: float, how: str) -> float:
    if how == "absolute":
        return abs(score)
    if how == "square":
        return score * score
    return score
