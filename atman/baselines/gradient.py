"""Gradient attributions on the input embeddings, computed by Captum.

Each method differentiates f(embeddings) = log p(target | prompt) (summed over the target tokens)
with respect to the input embeddings of the whole sequence; a token's score is the attribution
summed over the embedding dimensions (for saliency: the L2 norm of the gradient, as gradients carry
no sign of evidence). Only prompt positions are read.
"""

from __future__ import annotations

import torch

from ..models import LoadedModel
from ..units import EncodedInput, Unit
from .base import Method, TokenMethod, target_logprob_from_logits


def _captum():
    try:
        import captum.attr as attr
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from .base import BaselineUnavailableError

        raise BaselineUnavailableError("gradient baselines need Captum: pip install 'captum>=0.8'") from exc
    return attr


class _EmbeddingObjective:
    """f(embeddings) -> log p(target) per row, for one encoded input."""

    def __init__(self, lm: LoadedModel, encoded: EncodedInput) -> None:
        self.lm = lm
        self.ids = torch.tensor([encoded.input_ids], device=lm.device)
        self.target_start = encoded.target_start

    def embeddings(self) -> torch.Tensor:
        with torch.no_grad():
            return self.lm.model.get_input_embeddings()(self.ids).float()

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        logits = self.lm.model(inputs_embeds=embeddings.to(self.lm.model.dtype), use_cache=False).logits
        return target_logprob_from_logits(logits, self.ids.expand(embeddings.shape[0], -1), self.target_start)


def _prompt_mask(encoded: EncodedInput, device: torch.device) -> torch.Tensor:
    """(1, L, 1) float: 1 at explainable prompt positions."""
    mask = torch.zeros(1, len(encoded.input_ids), 1, device=device)
    for pos, span in enumerate(encoded.prompt_spans):
        if span is not None:
            mask[0, pos, 0] = 1.0
    return mask


class IntegratedGradients(TokenMethod):
    """Integrated Gradients (Sundararajan et al. 2017) from a baseline of padding-token embeddings.

    Only the explainable prompt positions move along the path (from the embedding of the pad token,
    else end-of-sequence, else unknown token, to the real embedding); special tokens and the target
    keep theirs. ``steps`` Gauss-Legendre points (Captum's default rule). Not the all-zero baseline by
    default (``baseline="zeros"`` asks for it): RMS/LayerNorm of a vector near zero changes so fast that
    the path integral does not converge (benchmarks/ig_convergence.py measures both with
    :meth:`completeness`).
    Even so, on SmolLM2 the integral stays rough (the completeness gap of the last call is kept in
    ``convergence_delta`` and in the explanation's settings).

    Example::

        >>> IntegratedGradients(load_model(), steps=16).attribute(prompt, " Oslo", granularity="word")
    """

    name = "integrated-gradients"

    def __init__(self, model: LoadedModel, steps: int = 32, internal_batch_size: int = 16,
                 baseline: str = "token") -> None:
        super().__init__(model)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if baseline not in ("token", "zeros"):
            raise ValueError(f"baseline must be 'token' (the pad token's embedding) or 'zeros', got {baseline!r}")
        self.steps = steps
        self.baseline = baseline
        self.internal_batch_size = internal_batch_size
        self.convergence_delta: float | None = None
        # which embedding the path starts from: the pad, end-of-sequence or unknown token's, or zeros
        self.baseline_token: str | None = None

    def settings(self) -> dict:
        return {"steps": self.steps, "baseline_token": self.baseline_token,
                "convergence_delta": self.convergence_delta}

    def _path(self, encoded: EncodedInput) -> tuple[_EmbeddingObjective, torch.Tensor, torch.Tensor]:
        """The objective and the two ends of the path: the input's embeddings and the baseline's."""
        objective = _EmbeddingObjective(self.lm, encoded)
        inputs = objective.embeddings()
        mask = _prompt_mask(encoded, inputs.device)
        return objective, inputs, inputs * (1.0 - mask) + self._baseline_embedding(inputs.device) * mask

    def completeness(self, encoded: EncodedInput) -> dict:
        """Attribute ``encoded`` and check the completeness axiom: the attributions' ``sum`` against the
        ``difference`` f(input) - f(baseline) it should equal (f = log p(target)), and Captum's ``gap``
        between the two."""
        total = float(self.token_scores(encoded).sum())
        objective, inputs, baseline = self._path(encoded)
        with torch.no_grad():
            difference = float(objective(inputs)[0] - objective(baseline)[0])
        return {"sum": total, "difference": difference, "gap": self.convergence_delta}

    def token_scores(self, encoded: EncodedInput) -> torch.Tensor:
        objective, inputs, baseline = self._path(encoded)
        ig = _captum().IntegratedGradients(objective)
        attributions, delta = ig.attribute(inputs, baselines=baseline, n_steps=self.steps,
                                           internal_batch_size=self.internal_batch_size,
                                           return_convergence_delta=True)
        # completeness gap: sum of attributions - (f(input) - f(baseline)); large = the path integral is rough
        self.convergence_delta = float(delta[0])
        return attributions[0].sum(dim=-1)

    def _baseline_embedding(self, device: torch.device) -> torch.Tensor:
        if self.baseline == "zeros":
            self.baseline_token = "zeros"
            return torch.zeros(self.lm.model.get_input_embeddings().embedding_dim, device=device)
        tokenizer = self.lm.tokenizer
        ids = (("pad", tokenizer.pad_token_id), ("eos", tokenizer.eos_token_id), ("unk", tokenizer.unk_token_id))
        name, token = next(((n, t) for n, t in ids if t is not None), ("zeros", None))
        # recorded in the explanation's settings: the baseline is part of what IG's scores mean
        convert = getattr(tokenizer, "convert_ids_to_tokens", None)
        self.baseline_token = name if token is None or convert is None else f"{name} ({convert(token)!s})"
        if token is None:
            return torch.zeros(self.lm.model.get_input_embeddings().embedding_dim, device=device)
        with torch.no_grad():
            return self.lm.model.get_input_embeddings()(torch.tensor([token], device=device))[0].float()


class InputXGradient(TokenMethod):
    """Input x Gradient (Shrikumar et al. 2016): embedding times the gradient of log p(target)."""

    name = "input-x-gradient"

    def token_scores(self, encoded: EncodedInput) -> torch.Tensor:
        objective = _EmbeddingObjective(self.lm, encoded)
        return _captum().InputXGradient(objective).attribute(objective.embeddings().requires_grad_())[0].sum(dim=-1)


class Saliency(TokenMethod):
    """Gradient saliency (Simonyan et al. 2014): L2 norm of the gradient of log p(target) per token."""

    name = "saliency"

    def token_scores(self, encoded: EncodedInput) -> torch.Tensor:
        objective = _EmbeddingObjective(self.lm, encoded)
        grads = _captum().Saliency(objective).attribute(objective.embeddings().requires_grad_(), abs=False)
        return grads[0].norm(dim=-1)


class FeatureAblation(Method):
    """Captum's feature ablation: each unit's input embeddings set to zero; score = drop of log p(target)."""

    name = "feature-ablation"

    def __init__(self, model: LoadedModel, perturbations_per_eval: int = 8) -> None:
        super().__init__(model)
        self.perturbations_per_eval = perturbations_per_eval

    def unit_scores(self, encoded: EncodedInput, units: list[Unit]) -> torch.Tensor:
        objective = _EmbeddingObjective(self.lm, encoded)
        inputs = objective.embeddings()
        # one feature group per unit; every other position forms group len(units) and is left out
        groups = torch.full((1, inputs.shape[1], 1), len(units), dtype=torch.long, device=inputs.device)
        for index, unit in enumerate(units):
            groups[0, list(unit.positions), 0] = index
        groups = groups.expand_as(inputs)
        with torch.no_grad():
            attributions = _captum().FeatureAblation(objective).attribute(
                inputs, baselines=0.0, feature_mask=groups, perturbations_per_eval=self.perturbations_per_eval)
        return torch.stack([attributions[0, unit.positions[0], 0] for unit in units]).double().cpu()


__all__ = ["FeatureAblation", "InputXGradient", "IntegratedGradients", "Method", "Saliency"]
