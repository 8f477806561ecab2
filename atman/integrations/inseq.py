"""AtMan as an inseq feature-attribution method: ``import atman.integrations.inseq`` registers ``"atman"``.

Example::

    >>> import atman, inseq
    >>> import atman.integrations.inseq  # registers the "atman" method with inseq
    >>> lm = atman.load_model()
    >>> model = inseq.load_model(lm.model, "atman", tokenizer=lm.tokenizer)
    >>> out = model.attribute("Ada lives in Oslo. Ada lives in", "Ada lives in Oslo. Ada lives in Oslo")
    >>> out.show()

inseq finds attribution methods by subclassing its ``FeatureAttribution`` with a ``method_name``;
it has no entry-point lookup, so the import above is what registers the method. Keyword arguments
of ``inseq.load_model(model, "atman", ...)`` besides inseq's own are :class:`atman.Explainer`
options (``kappa``, ``mode``, ``batch_size``, ...).

inseq's gradient and occlusion methods run one attribution per generated token. AtMan needs no such
loop: one explanation at token level with ``target_granularity="token"`` scores every prefix token
for every generated token at once (one batched set of forward passes, the unperturbed prefix's keys
and values reused). The method therefore runs as an inseq "final step" method: inseq hands it the
whole sequence once and splits the ``(prefix, generated)`` score matrix into its per-step outputs.

Scores are AtMan's: the rise in the generated token's cross-entropy when the attention to a prefix
token is damped (positive = evidence for it). Tokens AtMan never suppresses (special tokens such as
BOS, which belong to no unit) get NaN. Decoder-only models only; inseq's ``attributed_fn`` and
``step_scores`` do not apply (AtMan's target is fixed), and passing them raises an error.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..explainer import Explainer
from ..manipulation import enable
from ..models import LoadedModel
from ..units import encode
from . import missing

INSTALL = "pip install --no-deps inseq==0.7.1 && pip install \"atman[inseq]\" (see docs/usage.md)"

try:
    from inseq.attr.feat import PerturbationAttributionRegistry
    from inseq.attr.feat.attribution_utils import check_attribute_positions
    from inseq.attr.step_functions import get_step_function
    from inseq.data import CoarseFeatureAttributionStepOutput
except ImportError as exc:  # pragma: no cover - exercised only without inseq
    raise missing("inseq", INSTALL) from exc

METHOD_NAME = "atman"


class AtmanAttribution(PerturbationAttributionRegistry):
    """inseq's ``"atman"`` method: AtMan scores of every prefix token for every generated token.

    Example::

        >>> import inseq, atman.integrations.inseq
        >>> lm = atman.load_model()
        >>> out = inseq.load_model(lm.model, "atman", tokenizer=lm.tokenizer).attribute(
        ...     "The capital of France is", "The capital of France is Paris")
        >>> out.sequence_attributions[0].target_attributions.shape   # (prefix tokens, generated tokens)
        torch.Size([6, 1])
    """

    method_name = METHOD_NAME

    def __init__(self, attribution_model, **options: Any) -> None:
        if attribution_model.is_encoder_decoder:
            raise ValueError("the atman method explains decoder-only (causal) language models only")
        super().__init__(attribution_model, hook_to_model=False)
        self.is_final_step_method = True
        self.use_predicted_target = True
        self._previous_attention: str | None = None
        self._prompt_end: int | None = None
        self.hook()
        model = attribution_model.model
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
        self.explainer = Explainer(LoadedModel(model, attribution_model.tokenizer, name), **options)

    def hook(self, **kwargs: Any) -> None:
        """Switch the model to AtMan attention, remembering the implementation it had."""
        model = self.attribution_model.model
        current = getattr(model.config, "_attn_implementation", None)
        if current != "atman":
            self._previous_attention = current
        enable(model)
        super().hook(**kwargs)

    def unhook(self, **kwargs: Any) -> None:
        """Give the model back the attention implementation it had before."""
        if self._previous_attention is not None:
            self.attribution_model.model.set_attn_implementation(self._previous_attention)
            self._previous_attention = None
        super().unhook(**kwargs)

    def attribute(self, batch, attributed_fn, attr_pos_start: int | None = None, attr_pos_end: int | None = None,
                  *args: Any, **kwargs: Any):
        """inseq's attribution entry point; remembers where the prompt ends before inseq runs its step."""
        default = get_step_function(self.attribution_model.default_attributed_fn_id)
        if attributed_fn is not default:
            raise ValueError(
                "the atman method scores the rise in the generated token's cross-entropy; "
                "it does not take another attributed_fn"
            )
        attribution_args = kwargs.get("attribution_args") or {}
        if attribution_args:
            raise ValueError(
                f"the atman method takes its options when loading, e.g. inseq.load_model(model, 'atman', kappa=0.7); "
                f"got attribution arguments {sorted(attribution_args)}"
            )
        self._prompt_end, _ = check_attribute_positions(batch.max_generation_length, attr_pos_start, attr_pos_end)
        return super().attribute(batch, attributed_fn, attr_pos_start, attr_pos_end, *args, **kwargs)

    def attribute_step(self, attribute_fn_main_args: dict[str, Any],
                       attribution_args: dict[str, Any] | None = None) -> CoarseFeatureAttributionStepOutput:
        """Scores for the whole sequence: ``[row, prefix position, generated step]``, as inseq's final-step methods."""
        input_ids, target_ids, _, attention_mask = attribute_fn_main_args["additional_forward_args"][:4]
        ids = torch.cat([input_ids, target_ids.reshape(-1, 1)], dim=1).cpu()
        mask = attention_mask.cpu()
        length = input_ids.shape[1]
        scores = torch.full((ids.shape[0], length, length), math.nan)
        for row in range(ids.shape[0]):
            pad = int(mask[row].int().argmax())
            scores[row, pad:, pad:] = self.scores(ids[row, pad:].tolist(), self._prompt_end - pad)
        return CoarseFeatureAttributionStepOutput(source_attributions=None, target_attributions=scores,
                                                  step_scores={})

    def scores(self, ids: list[int], prompt_end: int) -> torch.Tensor:
        """``out[k, j]``: AtMan score of token ``k`` for token ``j + 1`` (NaN where not explained).

        One :meth:`atman.Explainer.explain` call at token level with ``target_granularity="token"``;
        the tokens from ``prompt_end`` on are the target. atman tokenizes the decoded prompt and target
        itself, so the ids must survive that round trip (they do for text the tokenizer produced).
        """
        tokenizer = self.attribution_model.tokenizer
        prompt = tokenizer.decode(ids[:prompt_end], skip_special_tokens=True)
        target = tokenizer.decode(ids[prompt_end:], skip_special_tokens=False)
        encoded = encode(tokenizer, prompt, target)
        if list(encoded.input_ids) != ids:
            raise ValueError(
                "atman tokenizes the prompt and the generated text apart, and gets other tokens than inseq here "
                f"({list(encoded.input_ids)} instead of {ids}); attribute text that splits at a token boundary"
            )
        explanation = self.explainer.explain(prompt, target, granularity="token", target_granularity="token")
        prompt_positions = [pos for pos, span in enumerate(encoded.prompt_spans) if span is not None]
        out = torch.full((len(ids) - 1, len(ids) - 1), math.nan)
        for step, target_explanation in enumerate(explanation.explanations):
            positions = prompt_positions + list(range(prompt_end, prompt_end + step))
            if len(positions) != len(target_explanation.items):
                raise RuntimeError("atman's token-level explanation does not line up with the token positions")
            column = prompt_end + step - 1
            for pos, item in zip(positions, target_explanation.items, strict=True):
                out[pos, column] = item.score
        return out
