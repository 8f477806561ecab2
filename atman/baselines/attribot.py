"""AttriBoT's leave-one-out tricks as citation baselines: a port of its attributors.

AttriBoT (Liu, Kandpal and Raffel, "AttriBoT: A Bag of Tricks for Efficiently Approximating Leave-One-Out
Context Attribution", ICLR 2025; code at github.com/r-three/AttriBoT, ``context_attribution/attributor.py``
and ``kvcache.py``) approximates leave-one-out (LOO) attribution — the drop of the response's
log-likelihood when one source is deleted from the context — with a few tricks. It has no package on
PyPI and its attributors load their models by hub name, so this is a port of two of them, run on our
sources and prompt (the citation harness's layout, as every other method there):

* :func:`cached_leave_one_out` is its ``LOOAttributor`` with ``use_cache``: the full prompt's pass is
  kept; for each source the prompt without it is tokenised, the keys and values of the longest token
  prefix it shares with the full prompt are reused (its ``KVCache.get`` on all but the last prompt token)
  and only the rest and the response are computed. This is exact leave-one-out (up to float rounding).
* :func:`hierarchical_leave_one_out` is its ``HierarchicalAttributor``: cached LOO over paragraphs
  first, the top ``keep_paragraphs`` kept (ties at the cut-off kept too), the context cut to those
  paragraphs, then cached LOO over their sentences, each scored against the cut context's
  log-likelihood. AttriBoT gives the sentences of the other paragraphs no score; here they get 0.

What differs from its code: a source is deleted with :meth:`atman.evaluate.citation.Sources.ablate` (the
deletion the metrics and ContextCite use) instead of AttriBoT's context tree, and the likelihood is the
sum of the response tokens' log-probabilities read from the logits instead of the model's mean loss
times the response length (the same number). Its proxy-model tricks need a second, smaller model of the
same family and are not ported.

Example::

    >>> scores = cached_leave_one_out(lm, task)
    >>> sentence_scores = hierarchical_leave_one_out(lm, task, keep_paragraphs=3)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import AtmanError
from ..evaluate.citation import CitationTask, PrefixReuse, ResponseScorer, passages_of
from ..models import LoadedModel

DEFAULT_KEEP_PARAGRAPHS = 3


def _loo(scorer: ResponseScorer, reference: np.ndarray, removable: Sequence[Sequence[int]]) -> np.ndarray:
    """log p(response | ``reference`` mask) minus log p with each group of ``removable`` also deleted, one
    cached pass per group against the reference's keys and values."""
    n = len(scorer.response_ids)
    reuse = PrefixReuse(scorer.lm.model, scorer.prompt_ids(reference) + scorer.response_ids)
    full = float(reuse.logprobs(scorer.prompt_ids(reference) + scorer.response_ids, n).sum())
    out = np.zeros(len(removable))
    for g, members in enumerate(removable):
        keep = reference.copy()
        keep[list(members)] = False
        out[g] = full - float(reuse.logprobs(scorer.prompt_ids(keep) + scorer.response_ids, n).sum())
    return out


def cached_leave_one_out(lm: LoadedModel, task: CitationTask) -> np.ndarray:
    """Leave-one-out score of every source, with AttriBoT's key/value caching."""
    scorer = ResponseScorer(lm, task)
    n = len(task.sources)
    return _loo(scorer, np.ones(n, dtype=bool), [[s] for s in range(n)])


def hierarchical_leave_one_out(lm: LoadedModel, task: CitationTask,
                               keep_paragraphs: int = DEFAULT_KEEP_PARAGRAPHS) -> np.ndarray:
    """AttriBoT's hierarchical attribution: cached leave-one-out over paragraphs (blank-line separated
    passages), then over the sentences of the ``keep_paragraphs`` best paragraphs in the context cut to
    them; the other sentences score 0."""
    if keep_paragraphs < 1:
        raise AtmanError(f"keep_paragraphs must be at least 1, got {keep_paragraphs}")
    scorer = ResponseScorer(lm, task)
    n = len(task.sources)
    owners = passages_of(task.sources)
    paragraphs = [[s for s in range(n) if owners[s] == p] for p in sorted(set(owners))]
    full = np.ones(n, dtype=bool)
    paragraph_scores = _loo(scorer, full, paragraphs)
    cutoff = np.sort(paragraph_scores)[-min(keep_paragraphs, len(paragraphs))]
    kept = [p for p, score in enumerate(paragraph_scores) if score >= cutoff]
    pruned = np.zeros(n, dtype=bool)
    sentences = [s for p in kept for s in paragraphs[p]]
    pruned[sentences] = True
    scores = np.zeros(n)
    scores[sentences] = _loo(scorer, pruned, [[s] for s in sentences])
    return scores
