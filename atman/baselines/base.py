"""What every attribution method shares: the units AtMan uses, one verb, one result type.

A method scores the prompt units of one (prompt, target) pair and returns an :class:`Explanation`
whose items are exactly the units :meth:`atman.Explainer.plan` would suppress, so that every metric
treats every method alike. Methods that score tokens (gradients, attention) aggregate token scores
to coarser units by **summing** them; methods that perturb inputs (AtMan, occlusion, feature
ablation) perturb each unit as a whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..engine import target_logprobs
from ..errors import AtmanError
from ..explanation import Explanation, explanation_from
from ..models import LoadedModel
from ..units import EncodedInput, Unit, choose_granularity, encode, prompt_units

# target-token predictions of a batch of sequences, in token-forwards per batch
SCORE_TOKEN_BUDGET = 4096


class BaselineUnavailableError(AtmanError):
    """The method cannot run here (a package is missing or does not support the model)."""


class Method:
    """An attribution method: ``attribute(prompt, target, granularity=...)`` -> :class:`Explanation`.

    Subclasses implement :meth:`unit_scores` (one score per unit, positive = evidence for the target).

    Example::

        >>> exp = IntegratedGradients(load_model()).attribute("Ada lives in Oslo. Ada lives in", " Oslo",
        ...                                                   granularity="sentence")
        >>> [item.text for item in exp.explanations[0].items], exp.settings["method"]
        (['Ada lives in Oslo.', 'Ada lives in'], 'integrated-gradients')
    """

    name = "method"

    def __init__(self, model: LoadedModel) -> None:
        self.lm = model

    def attribute(
        self,
        prompt: str,
        target: str | Sequence[int],
        *,
        granularity: str = "auto",
        delimiter: str | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> Explanation:
        """Explain the complete ``target`` (text or token ids) at ``granularity`` (any AtMan granularity but refine)."""
        if granularity == "refine":
            raise AtmanError("granularity 'refine' is specific to AtMan; choose a plain granularity")
        encoded = encode(self.lm.tokenizer, prompt, target)
        resolved = choose_granularity(encoded) if granularity == "auto" else granularity
        units = prompt_units(encoded, resolved, delimiter=delimiter, spans=spans)
        scores = self.unit_scores(encoded, units)
        return explanation_from(units, scores, model=self.lm.name, prompt=encoded.prompt, target=encoded.target,
                                settings={"method": self.name, "granularity": resolved, **self.settings()})

    def unit_scores(self, encoded: EncodedInput, units: list[Unit]) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> dict:
        """The method's options, recorded in the explanation's settings."""
        return {}


class TokenMethod(Method):
    """A method that scores token positions; unit score = sum of its tokens' scores.

    Token scores are cached for the last input, so explaining one input at several granularities
    costs one attribution.
    """

    def __init__(self, model: LoadedModel) -> None:
        super().__init__(model)
        self._cache: tuple[tuple[int, ...], int, torch.Tensor] | None = None

    def token_scores(self, encoded: EncodedInput) -> torch.Tensor:
        """One score per position of ``encoded.input_ids`` (only prompt positions are read)."""
        raise NotImplementedError

    def unit_scores(self, encoded: EncodedInput, units: list[Unit]) -> torch.Tensor:
        key = (encoded.input_ids, encoded.target_start)
        if self._cache is None or self._cache[:2] != key:
            self._cache = (*key, self.token_scores(encoded).detach().double().cpu())
        tokens = self._cache[2]
        return torch.stack([tokens[list(unit.positions)].sum() for unit in units])


def target_logprob_from_logits(logits: torch.Tensor, ids: torch.Tensor, target_start: int) -> torch.Tensor:
    """Sum of log p(target token) over the target, per batch row; ``logits`` (B, L, V), ``ids`` (B, L)."""
    return target_logprobs(logits[:, target_start - 1:-1], ids[:, target_start:]).sum(dim=-1)


def sequence_logprobs(lm: LoadedModel, sequences: Sequence[Sequence[int]], n_target: int,
                      token_budget: int = SCORE_TOKEN_BUDGET) -> torch.Tensor:
    """log p(last ``n_target`` tokens | the tokens before) for each sequence, batched with right padding.

    Sequences may differ in length (tokens deleted); each row's target is its own last ``n_target``
    tokens. Rows are sorted by length and batched within ``token_budget`` token-forwards.
    """
    out = torch.empty(len(sequences), dtype=torch.float64)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    batch: list[int] = []

    def flush() -> None:
        width = max(len(sequences[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, :len(sequences[i])] = torch.tensor(list(sequences[i]))
            mask[row, :len(sequences[i])] = 1
        with torch.no_grad():
            logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False).logits
        for row, i in enumerate(batch):
            end = len(sequences[i])
            chosen = target_logprobs(logits[row, end - n_target - 1:end - 1], ids[row, end - n_target:end])
            out[i] = chosen.sum().double().cpu()

    for i in order:
        if batch and (len(batch) + 1) * len(sequences[i]) > token_budget:
            flush()
            batch = []
        batch.append(i)
    if batch:
        flush()
    return out


def delete_units(encoded: EncodedInput, units: Sequence[Unit]) -> list[int]:
    """``encoded.input_ids`` without the tokens of ``units`` (target and special tokens stay)."""
    gone = {pos for unit in units for pos in unit.positions}
    return [tok for pos, tok in enumerate(encoded.input_ids) if pos not in gone]
