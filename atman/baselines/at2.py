"""AT2 (Cohen-Wang, Chuang and Madry, "Learning to Attribute with Attention", 2025) as a citation baseline,
through its own package (``pip install at2``, MadryLab).

AT2 learns one weight per attention head from ablation data, once per model, and then attributes a
response with one forward pass: a source's score is the weighted attention of the response tokens to
the source's tokens. Nothing of it is re-implemented here: its ``AT2Trainer`` collects the training data
(its own random ablations, its attention features) and fits its ``AT2ScoreEstimator``, and its
``AT2Attributor`` scores. What this module adds is the task it runs on: :class:`HarnessTask` is an AT2
``ContextAttributionTask`` over exactly the citation harness's prompt (ContextCite's layout in the chat
template), response and source token ranges (:func:`atman.evaluate.citation.layout`), so AT2 is scored
on the same sources as every other method. No public AT2 estimator exists for SmolLM2; the one shipped
in ``atman/baselines/data/at2-smollm2.pt`` was trained here by ``benchmarks/train_at2.py`` on contexts
disjoint from the ones it is evaluated on (see docs/evaluation.md).

The package's ``at2.utils`` asks NLTK to download ``punkt_tab`` when it is imported; offline that only
prints an error, which is swallowed here, and the sentence splitter is never used (sources come from the
harness, responses are one span).

Example::

    >>> scores = at2_scores(lm, task)               # the shipped SmolLM2 estimator
"""

from __future__ import annotations

import contextlib
import io
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AtmanError
from ..evaluate.citation import CitationTask, layout, render
from ..models import LoadedModel
from .base import BaselineUnavailableError

ESTIMATOR = "data/at2-smollm2.pt"
# AT2's attention feature extractor recomputes queries and keys with this transformers family's code
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "phi3": "phi3", "gemma3_text": "gemma3"}


def import_at2() -> Any:
    """The ``at2`` package, imported quietly; :class:`BaselineUnavailableError` when it is missing."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import at2
            import at2.tasks
    except ImportError as exc:
        raise BaselineUnavailableError(f"AT2 is not installed ({exc}); pip install at2==0.0.1") from None
    return at2


def model_type(lm: LoadedModel) -> str:
    """AT2's name for the model's architecture (its feature extractor supports these families only)."""
    kind = getattr(lm.model.config, "model_type", None)
    if kind not in MODEL_TYPES:
        raise AtmanError(f"AT2 supports {', '.join(sorted(MODEL_TYPES))} models, not {kind!r}")
    return MODEL_TYPES[kind]


def harness_task(lm: LoadedModel, task: CitationTask) -> Any:
    """An AT2 attribution task over the harness's prompt, response and source token ranges."""
    at2 = import_at2()
    lay = layout(lm.tokenizer, task)
    ranges = [(min(p), max(p) + 1) for p in lay.source_positions]

    class HarnessTask(at2.tasks.ContextAttributionTask):
        @property
        def prompt(self) -> str:
            return task.prompt()

        def apply_chat_template(self, prompt: str) -> str:
            return render(self.tokenizer, prompt)

        def _get_document_ranges(self) -> list[tuple[int, int]]:
            return [(task.context_offset, task.context_offset + len(task.sources.text))]

        def _get_source_token_ranges(self) -> list[tuple[int, int]]:
            return ranges

    made = HarnessTask(lm.model, lm.tokenizer, source_type="sentence")
    made.set_generation(task.response)
    ids = list(made.get_tokens()["input_ids"])
    if ids != list(lay.input_ids):
        raise AtmanError("AT2 tokenises the prompt and response differently from the harness")
    return made


def load_estimator(path: str | Path | None = None) -> Any:
    """An AT2 score estimator saved by its trainer (default: the shipped SmolLM2 estimator)."""
    at2 = import_at2()
    if path is None:
        with resources.as_file(resources.files("atman.baselines").joinpath(ESTIMATOR)) as shipped:
            return at2.AT2ScoreEstimator.load(shipped, device="cpu")
    return at2.AT2ScoreEstimator.load(Path(path), device="cpu")


def at2_scores(lm: LoadedModel, task: CitationTask, estimator: Any = None) -> np.ndarray:
    """AT2's score of every source for the whole response (its ``get_attribution_scores``: per-token
    scores summed over a source's tokens, averaged over the response tokens)."""
    at2 = import_at2()
    estimator = estimator if estimator is not None else load_estimator()
    attributor = at2.AT2Attributor(harness_task(lm, task), estimator)
    scores = attributor.get_attribution_scores()
    return np.asarray(scores, dtype=np.float64)
