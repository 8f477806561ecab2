"""ContextCite (Cohen-Wang et al. 2024) as a citation baseline, through its own package.

``pip install "atman[cite]"`` installs ``context-cite``. Nothing of it is re-implemented here: its
``ContextCiter`` ablates random halves of the sources, runs the model on each ablated context and fits
its LASSO surrogate. Two things make it run offline and on exactly our sources:

* the sources reach it through its partitioner interface (:class:`SourcesPartitioner`, a
  ``BaseContextPartitioner``), so its sentence splitter (NLTK's ``punkt_tab``, which its ``utils``
  module tries to download at import) is never called; an offline import only prints that the
  download failed, and that output is swallowed here;
* the response to explain is handed over as the generation of a thin model wrapper
  (:class:`FixedResponseModel`), so ContextCite explains our response instead of generating one.

Example::

    >>> scores = contextcite_scores(load_model(), task, num_ablations=32)
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from typing import Any

import numpy as np
import torch

from ..errors import AtmanError
from ..evaluate.citation import PROMPT_TEMPLATE, CitationTask, Sources, response_token_ids
from ..models import LoadedModel
from .base import BaselineUnavailableError


def _import_context_cite():
    try:
        # its utils module calls nltk.download("punkt_tab") at import; offline that prints an error
        # and returns, and the splitter it fetches is never used with our partitioner
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import context_cite
            from context_cite.context_partitioner import BaseContextPartitioner
    except ImportError as exc:
        raise BaselineUnavailableError(
            f"ContextCite is not installed ({exc}); pip install 'atman[cite]' (or context-cite==0.0.4)"
        ) from None
    return context_cite, BaseContextPartitioner


def make_partitioner(sources: Sources) -> Any:
    """A ContextCite partitioner (``BaseContextPartitioner``) over exactly ``sources``; deleting a source
    removes the same text as :meth:`atman.evaluate.citation.Sources.ablate`."""
    _, base = _import_context_cite()

    class SourcesPartitioner(base):
        def __init__(self, sources: Sources) -> None:
            super().__init__(sources.ablate())
            self._sources = sources

        @property
        def num_sources(self) -> int:
            return len(self._sources)

        def split_context(self) -> None:
            """The sources are given; there is nothing to split."""

        def get_source(self, index: int) -> str:
            return self._sources.texts[index]

        def get_context(self, mask=None) -> str:
            return self._sources.ablate(mask)

    return SourcesPartitioner(sources)


class FixedResponseModel(torch.nn.Module):
    """The model, except that ``generate`` returns the prompt followed by a given response."""

    def __init__(self, model: torch.nn.Module, response_ids: list[int]) -> None:
        super().__init__()
        self.model = model
        self.response_ids = response_ids

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, **kwargs):
        return self.model(**kwargs)

    def generate(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        response = torch.tensor([self.response_ids], device=input_ids.device)
        return torch.cat([input_ids, response], dim=1)


def contextcite_scores(lm: LoadedModel, task: CitationTask, num_ablations: int = 64, *,
                       batch_size: int = 1) -> np.ndarray:
    """ContextCite's attribution of ``task.response`` to ``task.sources`` (its ``get_attributions``),
    with ``num_ablations`` ablated contexts (its default 64) and its default LASSO solver.

    The prompt is ContextCite's own (its default template in the chat template). ``batch_size`` > 1
    runs its left-padded batches (positions then shift with the padding, as in the package).
    """
    context_cite, _ = _import_context_cite()
    tokenizer = copy.copy(lm.tokenizer)
    if batch_size > 1:
        tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = FixedResponseModel(lm.model, response_token_ids(lm.tokenizer, task))
    citer = context_cite.ContextCiter(
        model, tokenizer, task.sources.ablate(), task.query, num_ablations=num_ablations, batch_size=batch_size,
        prompt_template=PROMPT_TEMPLATE, partitioner=make_partitioner(task.sources),
        generate_kwargs={"max_new_tokens": len(model.response_ids)},
    )
    if citer.response.strip() != task.response.strip():
        raise AtmanError(f"ContextCite re-tokenised the response to {citer.response!r}")
    logging.getLogger("ContextCite").setLevel(logging.WARNING)
    # its progress bar, and its CUDA autocast, which warns and switches itself off on a CPU
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autocast.*")
        scores = citer.get_attributions(verbose=False)
    return np.asarray(scores, dtype=np.float64)
