"""Perturbation methods: AtMan itself, leave-one-out occlusion by deletion, and the random floor."""

from __future__ import annotations

import hashlib

import torch

from ..defaults import DEFAULT_KAPPA, DEFAULT_MULTIPLIER
from ..explainer import Explainer
from ..models import LoadedModel
from ..rows import Suppression, refuse_factor
from ..units import EncodedInput, Unit
from .base import Method, delete_units, sequence_logprobs


class AtMan(Method):
    """AtMan through :class:`atman.Explainer` (same units, complete target), with its options.

    Example::

        >>> AtMan(load_model(), multiplier=0.0).attribute(prompt, " Oslo", granularity="sentence")
    """

    name = "atman"

    def __init__(self, model: LoadedModel, multiplier: float = DEFAULT_MULTIPLIER,
                 kappa: float | None = DEFAULT_KAPPA, mode: str = "log-additive", factor: None = None) -> None:
        refuse_factor(factor)
        super().__init__(model)
        self.explainer = Explainer(model, suppression=Suppression(multiplier=multiplier, kappa=kappa, mode=mode))

    def settings(self) -> dict:
        return self.explainer.suppression.settings()

    def unit_scores(self, encoded: EncodedInput, units: list[Unit]) -> torch.Tensor:
        ex = self.explainer
        multipliers = ex.rows(encoded, units)
        losses = ex.losses(encoded, multipliers)
        return (losses[1:] - losses[0:1]).sum(dim=1).double()


class Occlusion(Method):
    """Leave-one-out: delete the unit's tokens from the input; score = drop of log p(target).

    The reference for faithfulness: it measures exactly what removing the unit does.
    """

    name = "occlusion"

    def unit_scores(self, encoded: EncodedInput, units: list[Unit]) -> torch.Tensor:
        n_target = len(encoded.input_ids) - encoded.target_start
        sequences = [list(encoded.input_ids)] + [delete_units(encoded, [unit]) for unit in units]
        logprobs = sequence_logprobs(self.lm, sequences, n_target)
        return logprobs[0] - logprobs[1:]


class Random(Method):
    """Random token scores (standard normal, seeded by the input), summed to units: the floor."""

    name = "random"

    def __init__(self, model: LoadedModel, seed: int = 0) -> None:
        super().__init__(model)
        self.seed = seed

    def settings(self) -> dict:
        return {"seed": self.seed}

    def unit_scores(self, encoded: EncodedInput, units: list[Unit]) -> torch.Tensor:
        digest = hashlib.sha256(repr((self.seed, encoded.input_ids)).encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        tokens = torch.randn(len(encoded.input_ids), generator=generator, dtype=torch.float64)
        return torch.stack([tokens[list(unit.positions)].sum() for unit in units])
