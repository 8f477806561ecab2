"""AttnLRP (Achtibat et al. 2024) through the ``lxt`` package, where it can run.

lxt 2.1 (the current release) patches transformers' model modules; it imports
``transformers.modeling_attn_mask_utils``, which transformers 5 removed, and its dependencies pin a
different torch. So on this project's stack the method raises :class:`BaselineUnavailableError`
with the reason instead of giving numbers.
"""

from __future__ import annotations

import torch

from ..models import LoadedModel
from ..units import EncodedInput
from .base import BaselineUnavailableError, TokenMethod, target_logprob_from_logits

_SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
              "Gemma3ForCausalLM": "gemma3"}


class AttnLRP(TokenMethod):
    """AttnLRP relevance of the input embeddings for log p(target) (lxt's efficient rules)."""

    name = "attnlrp"

    def __init__(self, model: LoadedModel) -> None:
        super().__init__(model)
        family = _SUPPORTED.get(type(model.model).__name__)
        if family is None:
            raise BaselineUnavailableError(f"lxt has no AttnLRP rules for {type(model.model).__name__}")
        try:
            import importlib

            from lxt.efficient import monkey_patch

            monkey_patch(importlib.import_module(f"transformers.models.{family}.modeling_{family}"))
        except ImportError as exc:
            raise BaselineUnavailableError(
                f"AttnLRP needs the lxt package, and lxt must import with this transformers version: {exc}"
            ) from exc

    def token_scores(self, encoded: EncodedInput) -> torch.Tensor:
        ids = torch.tensor([encoded.input_ids], device=self.lm.device)
        embeddings = self.lm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = self.lm.model(inputs_embeds=embeddings, use_cache=False).logits
        target_logprob_from_logits(logits, ids, encoded.target_start).sum().backward()
        return (embeddings * embeddings.grad)[0].sum(dim=-1).detach()
