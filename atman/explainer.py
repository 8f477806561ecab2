"""The AtMan algorithm: one unperturbed pass, one perturbed pass per unit, scores from the losses.

Relevance of unit u for target token t = CE_t(u suppressed) - CE_t(unperturbed), where CE_t is the
cross-entropy of target token t under teacher forcing. Positive = suppressing u makes the target
less likely = evidence. Perturbations are batched, one per batch row, all through the primitive in
:mod:`atman.manipulation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .defaults import CONCEPTUAL_KAPPA, DEFAULT_KAPPA, DEFAULT_MULTIPLIER, ENGINES
from .engine import EngineClient, Progress
from .errors import AtmanError, ContextLengthError, EmptyInputError, GranularityError
from .explanation import POSTPROCESSING, Explanation, explanation_from
from .models import LoadedModel
from .rows import Suppression, refuse_factor
from .units import (
    TARGET_GRANULARITIES,
    EncodedInput,
    Unit,
    choose_granularity,
    encode,
    prompt_units,
    target_units,
)

__all__ = ["CONCEPTUAL_KAPPA", "DEFAULT_KAPPA", "DEFAULT_MULTIPLIER", "ENGINES", "Explainer", "Plan",
           "explain"]


@dataclass(frozen=True)
class Plan:
    """What one explanation computes: the encoded input, its units and one multiplier row per unit."""

    encoded: EncodedInput
    units: list[Unit]
    rows: torch.Tensor
    granularity: str


class Explainer(EngineClient):
    """Explains a causal LM's target continuation with AtMan.

    Example::

        >>> explainer = Explainer(load_model())
        >>> exp = explainer.explain("Ada lives in Oslo. Where does Ada live? Ada lives in", " Oslo",
        ...                         granularity="sentence")
        >>> exp.top(1)[0].text
        'Ada lives in Oslo.'
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        multiplier: float = DEFAULT_MULTIPLIER,
        kappa: float | None = DEFAULT_KAPPA,
        mode: str = "log-additive",
        backend: str = "sdpa",
        batch_size: int | None = None,
        engine: str = "cached",
        max_memory: int | str | None = None,
        suppression: Suppression | None = None,
        piece_tokens: int | None = None,
        factor: None = None,
    ) -> None:
        super().__init__(model.model, multiplier=multiplier, kappa=kappa, mode=mode, backend=backend,
                         batch_size=batch_size, max_memory=max_memory, engine=engine, suppression=suppression,
                         piece_tokens=piece_tokens, factor=factor)
        self.lm = model

    def explain(
        self,
        prompt: str,
        target: str | None = None,
        *,
        granularity: str = "auto",
        target_granularity: str = "complete",
        delimiter: str | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
        chat: bool = False,
        system: str | None = None,
        max_new_tokens: int = 32,
        multiplier: float | None = None,
        kappa: float | None | str = "default",
        mode: str | None = None,
        postprocessing: str = "none",
        normalize: bool = False,
        refine_from: str = "sentence",
        refine_top: int = 3,
        refine_share: float | None = None,
        progress: Progress | None = None,
        factor: None = None,
    ) -> Explanation:
        """Explain ``target`` (or the model's greedy continuation when None) given ``prompt``.

        ``granularity``: auto | token | word | sentence | paragraph | delimiter (with ``delimiter``)
        | spans (with ``spans``, (start, end) character ranges of the prompt) | refine (coarse to
        fine: explain at ``refine_from`` granularity, then at token level inside the ``refine_top``
        most relevant units only; refined items are marked ``refined``; with ``refine_share`` s, only
        the fewest top units that hold at least s of the positive relevance, at most ``refine_top``
        of them). ``target_granularity``:
        complete (one explanation summed over the target) or token (one per target token).
        ``multiplier``: the attention to a suppressed unit is multiplied by it (default: the
        explainer's, 0.1). ``kappa=None`` switches conceptual suppression off. ``progress(done,
        total)`` is called after every batch; an exception it raises cancels the explanation.
        """
        refuse_factor(factor)
        if granularity == "auto" and delimiter:
            granularity = "delimiter"
        if granularity == "auto" and spans:
            granularity = "spans"
        suppression = self.suppression.with_options(multiplier=multiplier, kappa=kappa, mode=mode)
        _check_options(target_granularity, postprocessing)
        generated = target is None
        if generated:
            target_ids = self.generate(prompt, chat=chat, system=system, max_new_tokens=max_new_tokens)
            encoded = encode(self.lm.tokenizer, prompt, target_ids, chat=chat, system=system)
        else:
            encoded = encode(self.lm.tokenizer, prompt, target, chat=chat, system=system)
        self.check_length(len(encoded.input_ids))
        settings: dict = {}
        refine = granularity == "refine"
        if refine:
            if refine_from not in ("sentence", "paragraph", "word", "delimiter", "spans"):
                raise GranularityError(f"refine_from must be a coarse text granularity, got {refine_from!r}")
            if refine_top < 1:
                raise GranularityError(f"refine_top must be at least 1, got {refine_top}")
            if refine_share is not None and not 0.0 < refine_share <= 1.0:
                raise GranularityError(f"refine_share must lie in (0, 1], got {refine_share}")
            settings.update(refine_from=refine_from, refine_top=refine_top)
            if refine_share is not None:
                settings["refine_share"] = refine_share
        plan = self.plan(encoded, refine_from if refine else granularity, target_granularity,
                         suppression.multiplier, suppression.kappa, delimiter, spans)
        # the refining stage reuses the first stage's unperturbed pass
        with self.engine.keeping_unperturbed():
            losses = self.losses(encoded, plan.rows, mode=suppression.mode, progress=progress)
            delta = losses[1:] - losses[0:1]
            if refine:
                units, delta, refined = self._refine(plan, delta, refine_top, refine_share, suppression, progress)
            else:
                units, refined = plan.units, set()
        explanation = self._explanation(encoded, units, delta, losses[0], refined, target_granularity, suppression, {
            "granularity": "refine" if refine else plan.granularity, **settings,
            "target_granularity": target_granularity, **suppression.settings(),
            "chat": chat, "system": system, "generated_target": generated,
        })
        return explanation.postprocessed(postprocessing, normalize)

    def explain_units(
        self,
        encoded: EncodedInput,
        units: Sequence[Unit],
        target_granularity: str = "complete",
        *,
        suppression: Suppression | None = None,
        progress: Progress | None = None,
    ) -> Explanation:
        """Explain ``encoded``'s target by the given prompt ``units`` (made by :mod:`atman.units`, or by a
        caller with its own idea of a unit, as the server's prompt items): one row per unit, then the
        scores as an Explanation. With ``target_granularity="token"`` the target's tokens are units too
        and each target token gets its own explanation. ``suppression``: this call's setting (default
        the explainer's)."""
        suppression = suppression or self.suppression
        _check_options(target_granularity, "none")
        units = list(units)
        if target_granularity == "token":
            units += target_units(encoded)
        self.check_length(len(encoded.input_ids))
        rows = self.rows(encoded, units, suppression)
        losses = self.losses(encoded, rows, mode=suppression.mode, progress=progress)
        return self._explanation(encoded, units, losses[1:] - losses[0:1], losses[0], set(), target_granularity,
                                 suppression, {"target_granularity": target_granularity, **suppression.settings()})

    def _explanation(self, encoded: EncodedInput, units: Sequence[Unit], delta: torch.Tensor,
                     baseline: torch.Tensor, refined: set[int], target_granularity: str, suppression: Suppression,
                     settings: dict) -> Explanation:
        return explanation_from(
            units, delta.double(), model=self.lm.name, prompt=encoded.prompt, target=encoded.target,
            settings={**settings, "target_logprob": -float(baseline.sum())},
            target_spans=encoded.target_spans if target_granularity == "token" else None, refined=refined)

    def plan(
        self,
        encoded: EncodedInput,
        granularity: str = "auto",
        target_granularity: str = "complete",
        multiplier: float | None = None,
        kappa: float | None | str = "default",
        delimiter: str | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> Plan:
        """Units and the multiplier rows that suppress them (row 0 is the unperturbed pass)."""
        resolved = choose_granularity(encoded) if granularity == "auto" else granularity
        units = prompt_units(encoded, resolved, delimiter=delimiter, spans=spans)
        if target_granularity == "token":
            units = units + target_units(encoded)
        rows = self.rows(encoded, units, self.suppression.with_options(multiplier=multiplier, kappa=kappa))
        return Plan(encoded=encoded, units=units, rows=rows, granularity=resolved)

    def rows(self, encoded: EncodedInput, units: Sequence[Unit],
             suppression: Suppression | None = None) -> torch.Tensor:
        """Row 0 unperturbed, row u + 1 suppressing ``units[u]`` (and, with ``suppression.kappa``, its
        conceptual neighbours among the prompt's text tokens and the target's); default: the explainer's
        setting."""
        suppression = suppression or self.suppression
        positions = [unit.positions for unit in units]
        if suppression.kappa is None:
            return suppression.rows(len(encoded.input_ids), positions)
        candidates = {pos for pos, span in enumerate(encoded.prompt_spans) if span is not None}
        candidates.update(u.positions[0] for u in target_units(encoded))
        return suppression.rows(len(encoded.input_ids), positions, self._embeddings(encoded), sorted(candidates))

    def _refine(
        self, plan: Plan, coarse_delta: torch.Tensor, top: int, share: float | None, suppression: Suppression,
        progress: Progress | None,
    ) -> tuple[list[Unit], torch.Tensor, set[int]]:
        """Token-level scores inside the ``top`` coarse prompt units; the other units stay coarse."""
        totals = coarse_delta.sum(dim=1)
        prompt_rows = [i for i, unit in enumerate(plan.units) if unit.kind == "prompt"]
        chosen = sorted(prompt_rows, key=lambda i: float(totals[i]), reverse=True)[:top]
        if share is not None:
            chosen = covering(chosen, [float(totals[i]) for i in chosen],
                               float(totals[prompt_rows].clamp(min=0).sum()), share)
        tokens = [unit for unit in prompt_units(plan.encoded, "token")
                  if any(unit.positions[0] in plan.units[i].positions for i in chosen)]
        rows = self.rows(plan.encoded, tokens, suppression)
        fine = self.losses(plan.encoded, rows, mode=suppression.mode, progress=progress)
        fine_delta = fine[1:] - fine[0:1]
        entries = [(plan.units[i], coarse_delta[i], False) for i in range(len(plan.units)) if i not in chosen]
        entries += [(unit, fine_delta[j], True) for j, unit in enumerate(tokens)]
        entries.sort(key=lambda e: (e[0].kind != "prompt", e[0].start))
        units = [unit for unit, _, _ in entries]
        refined = {k for k, (_, _, fine_unit) in enumerate(entries) if fine_unit}
        return units, torch.stack([row for _, row, _ in entries]), refined

    def losses(
        self,
        encoded: EncodedInput,
        multipliers: torch.Tensor,
        *,
        mode: str | None = None,
        engine: str | None = None,
        readout_from: int | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of every target token (columns) under every multiplier row (rows).

        ``engine="cached"`` reuses the unperturbed pass's keys and values for the positions before
        a row's first damped position and recomputes only the rest (exact); ``"naive"`` runs the
        full sequence for every row, as the paper's code did. ``readout_from``: see
        :meth:`atman.engine.Engine.target_losses`.
        """
        ids = torch.tensor([encoded.input_ids])
        return self.engine.target_losses({"input_ids": ids}, ids[0, encoded.target_start:], multipliers,
                                         mode=mode, engine=engine, readout_from=readout_from, progress=progress)

    def generate(
        self, prompt: str, *, chat: bool = False, system: str | None = None, max_new_tokens: int = 32
    ) -> list[int]:
        """The model's greedy continuation of ``prompt`` as token ids (without end-of-sequence)."""
        if max_new_tokens < 1:
            raise AtmanError("max_new_tokens must be at least 1")
        tokenizer = self.lm.tokenizer
        probe = encode(tokenizer, prompt, [0], chat=chat, system=system)
        ids = list(probe.input_ids[:probe.target_start])
        self.check_length(len(ids) + max_new_tokens)
        input_ids = torch.tensor([ids], device=self.lm.device)
        eos = self.lm.eos_ids
        with torch.no_grad():
            out = self.lm.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=next(iter(eos), 0),
            )
        new = [int(t) for t in out[0, len(ids):]]
        while new and new[-1] in eos:
            new.pop()
        if not new:
            raise EmptyInputError("the model generated no text after this prompt, so there is nothing to explain")
        return new

    def _embeddings(self, encoded: EncodedInput) -> torch.Tensor:
        ids = torch.tensor([encoded.input_ids], device=self.lm.device)
        with torch.no_grad():
            return self.lm.model.get_input_embeddings()(ids)[0].float().cpu()

    def check_length(self, length: int) -> None:
        """Raise :class:`ContextLengthError` when ``length`` tokens exceed the model's context."""
        limit = self.lm.context_length
        if limit is not None and length > limit:
            raise ContextLengthError(
                f"prompt and target are {length} tokens, longer than the model's context of {limit} tokens"
            )


def covering(ranked: list[int], scores: list[float], positive_total: float, share: float) -> list[int]:
    """The shortest head of ``ranked`` whose scores sum to ``share`` of ``positive_total`` (at least one)."""
    held = 0.0
    for count, score in enumerate(scores, start=1):
        held += max(score, 0.0)
        if held >= share * positive_total:
            return ranked[:count]
    return ranked


def _check_options(target_granularity: str, postprocessing: str) -> None:
    if target_granularity not in TARGET_GRANULARITIES:
        raise GranularityError(
            f"unknown target granularity {target_granularity!r}; choose one of {', '.join(TARGET_GRANULARITIES)}"
        )
    if postprocessing not in POSTPROCESSING:
        raise AtmanError(f"unknown postprocessing {postprocessing!r}; choose one of {', '.join(POSTPROCESSING)}")


def explain(prompt: str, target: str | None = None, *, model: LoadedModel | None = None, **options) -> Explanation:
    """One-call explanation with the embedded default model (loaded once per process).

    Example::

        >>> explain("The capital of France is", " Paris", granularity="word").top(1)[0].text
        'capital'
    """
    from .models import default_model

    explainer_keys = ("batch_size", "backend", "engine", "max_memory", "suppression", "piece_tokens")
    explainer = Explainer(model or default_model(), **{k: options.pop(k) for k in explainer_keys if k in options})
    return explainer.explain(prompt, target, **options)
