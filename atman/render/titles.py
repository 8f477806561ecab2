"""Which method produced an explanation, in words, for the headings of every view.

>>> from atman.render.titles import view_title
>>> view_title({"method": "integrated-gradients"})
'Integrated Gradients explanation'
"""

from __future__ import annotations

METHOD_NAMES = {
    "atman": "AtMan",
    "integrated-gradients": "Integrated Gradients",
    "input-x-gradient": "Input x Gradient",
    "saliency": "Saliency",
    "feature-ablation": "Feature ablation",
    "occlusion": "Occlusion",
    "random": "Random scores",
    "attention-rollout": "Attention rollout",
    "chefer": "Chefer et al.",
    "attnlrp": "AttnLRP",
}


def method_name(settings: dict[str, object]) -> str:
    """The display name of the method that produced an explanation, from its ``settings``.

    AtMan's explainers record no method; comparison methods record theirs under ``"method"``.

    >>> method_name({}), method_name({"method": "integrated-gradients"}), method_name({"method": "new-one"})
    ('AtMan', 'Integrated Gradients', 'new-one')
    """
    method = str(settings.get("method", "atman"))
    return METHOD_NAMES.get(method, method)


def view_title(settings: dict[str, object]) -> str:
    """The heading of a view: ``"<method> explanation"``.

    >>> view_title({"method": "chefer"})
    'Chefer et al. explanation'
    """
    return f"{method_name(settings)} explanation"


# what a score is, per task, for AtMan's own explainers (a comparison method's scores have its own unit)
_SCORE_UNITS = {
    "classification": "drop of log p(class), in nats, when the unit is suppressed",
    "image-classification": "drop of log p(class), in nats, when the tile is suppressed",
    "similarity": "drop of the two texts' cosine similarity when the unit is suppressed",
    "vision-language": "rise of the target's cross-entropy, in nats, when the unit is suppressed",
}
_TEXT_LM_UNIT = "rise of the target's cross-entropy, in nats, when the unit is suppressed"
# what the prompt and the target are called, per task
_PART_NAMES = {"similarity": ("sentence A", "sentence B"), "classification": ("text", "class"),
               "image-classification": ("image", "class")}
_GRANULARITY_WORDS = {"token": "tokens", "word": "words", "sentence": "sentences", "paragraph": "paragraphs",
                      "delimiter": "pieces between delimiters", "spans": "the given spans"}


def part_names(settings: dict[str, object]) -> tuple[str, str]:
    """What the two texts of a view are called: prompt and target, sentence A and B, text and class.

    >>> part_names({"task": "similarity"}), part_names({})
    (('sentence A', 'sentence B'), ('prompt', 'target'))
    """
    return _PART_NAMES.get(str(settings.get("task", "")), ("prompt", "target"))


def score_unit(settings: dict[str, object]) -> str:
    """What a score means, in words, with its unit (and what post-processing did to it).

    >>> score_unit({})
    "rise of the target's cross-entropy, in nats, when the unit is suppressed"
    >>> score_unit({"method": "integrated-gradients"})
    "Integrated Gradients attribution (the method's own scale)"
    >>> score_unit({"postprocessing": "square", "normalize": True})
    "rise of the target's cross-entropy, in nats, when the unit is suppressed; squared; scaled to 0..1"
    """
    method = str(settings.get("method", "atman"))
    if method in ("atman", "occlusion", "feature-ablation"):
        unit = _SCORE_UNITS.get(str(settings.get("task", "")), _TEXT_LM_UNIT)
    elif method == "random":
        unit = "random scores (a floor for comparisons)"
    else:
        unit = f"{method_name(settings)} attribution (the method's own scale)"
    post = {"absolute": "absolute values", "square": "squared"}.get(str(settings.get("postprocessing", "none")))
    if post:
        unit += f"; {post}"
    if settings.get("normalize"):
        unit += "; scaled to 0..1"
    return unit


def settings_line(settings: dict[str, object]) -> str:
    """The settings that shaped the scores, as words.

    >>> settings_line({"granularity": "refine", "refine_from": "sentence", "refine_top": 1,
    ...                "multiplier": 0.1, "kappa": None, "mode": "log-additive"})
    'units: sentences, the top 1 refined to tokens · multiplier 0.1 · conceptual suppression off · log-additive'
    >>> settings_line({"granularity": "word", "multiplier": 0.0, "kappa": 0.7, "mode": "multiplicative"})
    'units: words · multiplier 0 (units removed) · conceptual suppression at similarity 0.7 · multiplicative'
    """
    parts = []
    granularity = settings.get("granularity")
    if granularity == "refine":
        coarse = _GRANULARITY_WORDS.get(str(settings.get("refine_from")), str(settings.get("refine_from")))
        top = settings.get("refine_top")
        share = settings.get("refine_share")
        which = f"the top {top}" + (f" holding {share:.0%} of the relevance" if share else "")
        parts.append(f"units: {coarse}, {which} refined to tokens")
    elif granularity:
        parts.append(f"units: {_GRANULARITY_WORDS.get(str(granularity), str(granularity))}")
    if settings.get("image_granularity") is not None:
        parts.append(f"image tiles: {settings['image_granularity']}")
    if settings.get("target_granularity") == "token":
        parts.append("one explanation per target token")
    if "multiplier" in settings:
        multiplier = settings["multiplier"]
        parts.append(f"multiplier {multiplier:g}" + (" (units removed)" if multiplier == 0 else ""))
    if "kappa" in settings:
        kappa = settings["kappa"]
        parts.append("conceptual suppression off" if kappa is None
                     else f"conceptual suppression at similarity {kappa:g}")
    if settings.get("mode"):
        parts.append(str(settings["mode"]))
    if settings.get("generated_target"):
        parts.append("target generated by the model")
    return " · ".join(parts)


def tile_words(item, settings: dict[str, object]) -> str:
    """An image tile in words: which image, which rows and columns of its tile grid.

    >>> class Tile: image, left, top, width, height = 0, 0.5, 0.0, 0.25, 0.25
    >>> tile_words(Tile(), {"images": [{"rows": 8, "cols": 8, "tile": [2, 2]}]})
    'image 1, tile row 1, column 3 of 4 x 4'
    >>> tile_words(Tile(), {})
    'image 1, 50-75 % across, 0-25 % down'
    """
    images = settings.get("images") or []
    grid = images[item.image] if isinstance(images, list) and item.image < len(images) else None
    if isinstance(grid, dict) and grid.get("tile") and grid.get("rows") and grid.get("cols"):
        tile_rows, tile_cols = grid["tile"]
        rows = -(-int(grid["rows"]) // int(tile_rows))
        cols = -(-int(grid["cols"]) // int(tile_cols))
        if rows == cols == 1:
            return f"image {item.image + 1}, the whole image"
        row = int(round(item.top * grid["rows"])) // int(tile_rows) + 1
        col = int(round(item.left * grid["cols"])) // int(tile_cols) + 1
        return f"image {item.image + 1}, tile row {row}, column {col} of {rows} x {cols}"

    def pct(a: float, b: float) -> str:
        return f"{round(100 * a)}-{round(100 * (a + b))} %"

    return f"image {item.image + 1}, {pct(item.left, item.width)} across, {pct(item.top, item.height)} down"


def item_label(item, settings: dict[str, object]) -> tuple[str, str, str]:
    """A ranked item as (part, text, where) for the tables of every view: the part it belongs to
    (named as :func:`part_names` does), its text (a tile in words), and where it is, so that repeated
    tokens can be told apart.

    >>> from atman.explanation import Item
    >>> item_label(Item("target", " eats", 5, 5, 0.2), {"task": "similarity"})
    ('sentence B', "' eats'", 'characters 5-10')
    """
    if item.kind == "image":
        return "image", tile_words(item, settings), f"{round(100 * item.left)} %, {round(100 * item.top)} %"
    first, second = part_names(settings)
    part = first if item.kind == "prompt" else second
    # repr() makes leading spaces and newlines of a unit visible in a one-line cell
    return part, repr(item.text), f"characters {item.start}-{item.start + item.length}"
