"""Model names checked before anything heavy is imported: the embedded models' aliases and a slip of one.

``atman`` commands call :func:`refuse_near_alias` on ``--model`` before torch and transformers load, so
that ``--model smolm2`` fails in a fraction of a second; :func:`atman.load_model` makes the same check.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from .errors import ModelLoadError

# Names the embedded models go by, for suggestions when a name matches nothing.
EMBEDDED_MODELS = ("smollm2", "gemma3-270m")


def suggest(name: str) -> str:
    """`` (did you mean 'smollm2'?)``-style hint naming the embedded models close to ``name``."""
    stem = Path(name).name.lower().removesuffix(".gguf")
    close = difflib.get_close_matches(stem, EMBEDDED_MODELS, n=2, cutoff=0.5)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"; the embedded models are {', '.join(EMBEDDED_MODELS)}"


def edits(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of neighbours that turn ``a`` into ``b``.

    >>> edits("smolm2", "smollm2"), edits("gemma3-207m", "gemma3-270m")
    (1, 1)
    """
    rows = [list(range(len(b) + 1))]
    for i, x in enumerate(a, 1):
        row = [i]
        for j, y in enumerate(b, 1):
            row.append(min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (x != y)))
            if i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def refuse_near_alias(name: str | None, cache_dir: str | None = None, revision: str | None = None) -> None:
    """Fail at once, without the hub, on a slip of an embedded model's name (``smolm2``, ``Gemma3-270M``).

    A hub id has an owner (``owner/name``); a bare name within a typing slip of an alias is taken for
    the alias, unless it is an alias, a GGUF file or a path that exists, or the hub cache holds a model of
    that name. One slip per four letters is allowed.
    """
    if not isinstance(name, str) or "/" in name or name in EMBEDDED_MODELS or name.endswith(".gguf"):
        return
    typed = name.lower()
    close = [alias for alias in EMBEDDED_MODELS if edits(typed, alias) <= max(1, len(alias) // 4)]
    if not close or Path(name).expanduser().exists():
        return
    import huggingface_hub  # imported here: the hub client costs a third of a second
    from huggingface_hub.errors import HFValidationError

    try:
        cached = huggingface_hub.try_to_load_from_cache(name, "config.json", cache_dir=cache_dir, revision=revision)
    except HFValidationError:
        cached = None
    if isinstance(cached, str):
        return
    raise ModelLoadError(f"no model {name!r}: it is not an embedded model, a file or a directory, and a hub id "
                         f"has an owner (owner/name); did you mean {' or '.join(repr(c) for c in close)}?")
