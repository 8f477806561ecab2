"""Attention-based relevance: attention rollout and Chefer et al.'s gradient-weighted relevance.

Both need the attention probabilities, so the model runs on the materialised (eager) path of the
``atman`` attention function with nothing suppressed. A token's score is the relevance that the
rows predicting the target tokens (positions ``target_start - 1`` .. ``L - 2``) assign to it, summed
over those rows.
"""

from __future__ import annotations

import torch

from ..manipulation import manipulate
from ..units import EncodedInput
from .base import TokenMethod, target_logprob_from_logits


def _attentions(lm, ids: torch.Tensor, grad: bool):
    ones = torch.ones(1, ids.shape[1])
    with manipulate(ones, backend="eager"), torch.set_grad_enabled(grad):
        out = lm.model(input_ids=ids, output_attentions=True, use_cache=False)
    if not out.attentions or any(a is None for a in out.attentions):
        from .base import BaselineUnavailableError

        raise BaselineUnavailableError(f"{type(lm.model).__name__} does not return attention probabilities")
    return out


def _target_rows(encoded: EncodedInput) -> slice:
    return slice(encoded.target_start - 1, len(encoded.input_ids) - 1)


class AttentionRollout(TokenMethod):
    """Attention rollout (Abnar & Zuidema 2020): heads averaged, 0.5 A + 0.5 I, multiplied across layers."""

    name = "attention-rollout"

    def token_scores(self, encoded: EncodedInput) -> torch.Tensor:
        ids = torch.tensor([encoded.input_ids], device=self.lm.device)
        attentions = _attentions(self.lm, ids, grad=False).attentions
        length = ids.shape[1]
        eye = torch.eye(length)
        rollout = eye
        for layer in attentions:
            mixed = 0.5 * layer[0].float().mean(dim=0).cpu() + 0.5 * eye
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            rollout = mixed @ rollout
        return rollout[_target_rows(encoded)].sum(dim=0)


class CheferRelevance(TokenMethod):
    """Chefer et al. (2021), generic attention explainability for self-attention.

    R = I; for each layer, R += mean_heads((dA * A)^+) @ R, where dA is the gradient of
    log p(target) with respect to that layer's attention probabilities (one backward pass).
    """

    name = "chefer"

    def token_scores(self, encoded: EncodedInput) -> torch.Tensor:
        ids = torch.tensor([encoded.input_ids], device=self.lm.device)
        out = _attentions(self.lm, ids, grad=True)
        objective = target_logprob_from_logits(out.logits, ids, encoded.target_start).sum()
        grads = torch.autograd.grad(objective, list(out.attentions))
        length = ids.shape[1]
        relevance = torch.eye(length)
        for attention, grad in zip(out.attentions, grads, strict=True):
            weighted = (grad[0] * attention[0]).clamp(min=0).mean(dim=0).detach().float().cpu()
            relevance = relevance + weighted @ relevance
        return relevance[_target_rows(encoded)].sum(dim=0)
