"""The primitive: run a model with multipliers on the attention to chosen key positions, per batch row.

AtMan is registered with transformers' ``AttentionInterface`` (and its ``AttentionMaskInterface``, so
that causal and sliding-window masks are still built) under the name ``"atman"``. With no
manipulation active, the function is plain SDPA and the model behaves exactly as before. Inside
:func:`manipulate`, every attention layer multiplies the attention *to* key position ``k`` of batch
row ``r`` by ``multipliers[r, k]``:

* ``log-additive`` (default) adds ``log(m)`` to the scores, i.e. re-weights the softmax
  probabilities by ``m`` and renormalises. It runs inside SDPA (or FlexAttention) as an additive
  float mask, so no attention matrix is materialised by us.
* ``multiplicative`` is the paper's research variant: ``S' = (S - min_k S) * m`` on the raw scores
  before scaling and masking. It needs the raw scores and so runs on the eager path.

A query row that would lose every key (``m = 0`` on the only key it sees) gets a zero attention
output, the convention PyTorch's SDPA uses for fully masked rows, never NaN.

Two shortcuts keep the arithmetic of the unmanipulated model where they can: a manipulation whose
multipliers are all 1 runs the model's plain SDPA (causal kernels skip the masked half), and a batch
of rows that share a prefix of keys and values (:class:`SharedKeys`, handed over by the engine's
prefix cache) attends to that prefix without copying it per row: the queries of a few rows are laid
side by side against one copy of the prefix and their own keys, under a block mask.

Example::

    >>> enable(model)
    >>> m = torch.ones(2, input_ids.shape[1]); m[1, 3] = 0.1
    >>> with manipulate(m):
    ...     logits = model(input_ids.expand(2, -1)).logits
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .defaults import BACKENDS, MODES
from .errors import AtmanError, UnsupportedModelError

if TYPE_CHECKING:
    from .prefix_cache import SharedPrefix

ATTENTION_NAME = "atman"
Mode = Literal["log-additive", "multiplicative"]
Backend = Literal["sdpa", "eager", "flex_attention"]


@dataclass
class SharedKeys:
    """Keys and values of one attention call in two parts: ``prefix`` (1, kv heads, P, dim), the same for
    every row, and the rows' ``own`` (rows, kv heads, n, dim) after it. The cache hands this over
    instead of joining the two (a copy of the prefix per row); the attention call that follows takes it."""

    prefix_keys: torch.Tensor
    prefix_values: torch.Tensor
    own_keys: torch.Tensor
    own_values: torch.Tensor

    def joined(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.own_keys.shape[0]
        return (torch.cat([self.prefix_keys.expand(rows, -1, -1, -1), self.own_keys], dim=-2),
                torch.cat([self.prefix_values.expand(rows, -1, -1, -1), self.own_values], dim=-2))


@dataclass
class Manipulation:
    """One active manipulation: ``multipliers[row, key]``, how to apply them, and a call counter.

    ``prefix``: the shared-prefix cache the model runs on, if any; every attention call takes its
    keys and values from it (:meth:`atman.prefix_cache.SharedPrefix.handed`)."""

    multipliers: torch.Tensor
    mode: str = "log-additive"
    backend: str = "sdpa"
    calls: int = 0
    identity: bool = False
    prefix: SharedPrefix | None = None


_ACTIVE: ContextVar[Manipulation | None] = ContextVar("atman_manipulation", default=None)


def register() -> None:
    """Register the ``"atman"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, atman_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable(
    model: torch.nn.Module, example_inputs: dict | None = None, implementation: str | dict | None = None
) -> torch.nn.Module:
    """Switch ``model`` to the ``"atman"`` attention implementation and check that it is honoured.

    ``example_inputs`` (keyword arguments of the model's forward, batch of one) replace the default
    probe of four token ids, for models that take other inputs (``pixel_values``). ``implementation``
    may name the implementation per sub-model, e.g. ``{"text_config": "atman", "vision_config":
    "sdpa"}`` so that only a vision-language model's language model is manipulated.

    Raises :class:`UnsupportedModelError` naming the model class when its architecture does not
    route attention through transformers' AttentionInterface (AtMan would silently do nothing).
    """
    register()
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers model")
    if implementation is not None or getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
        try:
            model.set_attn_implementation(implementation or ATTENTION_NAME)
        except (ValueError, NotImplementedError) as exc:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not support custom attention implementations "
                f"(transformers' AttentionInterface), so AtMan cannot manipulate its attention: {exc}"
            ) from exc
    _check_interface_is_used(model, example_inputs)
    return model


def _check_interface_is_used(model: torch.nn.Module, example_inputs: dict | None = None) -> None:
    device = next(model.parameters()).device
    if example_inputs is None:
        vocab = int(getattr(model.get_input_embeddings(), "num_embeddings", 8))
        ids = (torch.arange(4, device=device) % max(vocab - 1, 1) + 1).unsqueeze(0)
        example_inputs = {"input_ids": ids, "use_cache": False}
    try:
        with torch.no_grad(), manipulate(torch.ones(1, 1, device=device)) as state:
            model(**example_inputs)
    except Exception as exc:  # any failure here means the model cannot run under AtMan
        raise UnsupportedModelError(
            f"{type(model).__name__} fails to run with AtMan attention: {type(exc).__name__}: {exc}"
        ) from exc
    if state.calls == 0:
        raise UnsupportedModelError(
            f"{type(model).__name__} computes attention without transformers' AttentionInterface; "
            "AtMan cannot manipulate it. Use an architecture that supports attn_implementation "
            "(most causal LMs in transformers >= 5 do)."
        )


@contextmanager
def manipulate(
    multipliers: torch.Tensor, *, mode: str = "log-additive", backend: str = "sdpa",
    prefix: SharedPrefix | None = None,
) -> Iterator[Manipulation]:
    """Apply ``multipliers`` (rows x key positions, 1 = untouched) to every attention layer.

    A single row is broadcast over the batch. ``mode="multiplicative"`` always runs on the eager
    path, whatever ``backend`` says. ``prefix``: the :class:`~atman.prefix_cache.SharedPrefix` the
    model runs on, whose prefix every attention call reads once for all rows. The yielded
    :class:`Manipulation` counts the attention calls.
    """
    if mode not in MODES:
        raise AtmanError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if backend not in BACKENDS:
        raise AtmanError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if multipliers.ndim != 2:
        raise AtmanError(f"multipliers must be 2-D (rows, key positions), got shape {tuple(multipliers.shape)}")
    if not bool(torch.isfinite(multipliers).all()) or bool((multipliers < 0).any()):
        raise AtmanError("multipliers must be finite and >= 0")
    state = Manipulation(multipliers=multipliers, mode=mode, backend=backend,
                         identity=bool((multipliers == 1).all()), prefix=prefix)
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def active() -> Manipulation | None:
    """The manipulation in force in this context, if any."""
    return _ACTIVE.get()


def atman_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function with the signature of transformers' AttentionInterface."""
    state = _ACTIVE.get()
    # SDPA and FlexAttention here cannot apply attention softcapping or sinks: those go eager
    needs_eager = bool(kwargs.get("softcap")) or kwargs.get("s_aux") is not None
    shared = None
    if state is not None:
        state.calls += 1
        shared = state.prefix.handed(key, value) if state.prefix is not None else None
        if state.prefix is not None and shared is None:
            raise UnsupportedModelError(
                f"{type(module).__name__} changes its keys between the cache and the attention call, so a "
                "shared prefix cannot be handed over; run it without prefix reuse (engine='naive')")
    foldable = (FOLD_SHARE and not needs_eager and state is not None and state.mode == "log-additive"
                and state.backend == "sdpa" and (attention_mask is None or attention_mask.shape[1] == 1))
    if shared is not None and foldable:
        return _shared_prefix(module, query, shared, attention_mask, state.multipliers, dropout, scaling,
                              kwargs.get("is_causal")), None
    if shared is not None:
        key, value = shared.joined()
    # nothing manipulated (or only multipliers of 1): the model's own attention
    plain = not needs_eager and (state is None or (state.identity and state.backend == "sdpa"))
    if state is None and not plain:
        state = Manipulation(multipliers=torch.ones(1, key.shape[-2]), backend="eager")
    if state is not None:
        # checked even where the multipliers change nothing
        multipliers = _row_multipliers(state.multipliers, query.shape[0], key.shape[-2], query.device)
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    base = _additive_mask(module, attention_mask, query, key.shape[-2], kwargs.get("is_causal"))
    if state.mode == "multiplicative" or state.backend == "eager" or needs_eager:
        return _eager(module, query, key, value, base, multipliers, state.mode, dropout, scaling, kwargs)
    bias = base + torch.log(multipliers)[:, None, None, :]
    dead = torch.isneginf(bias).all(dim=-1)
    if state.backend == "flex_attention":
        out = _flex(query, key, value, bias, scaling)
    else:
        kwargs.pop("is_causal", None)
        out, _ = sdpa_attention_forward(
            module, query, key, value, bias.to(query.dtype), dropout=dropout, scaling=scaling,
            is_causal=False, **kwargs,
        )
    return _zero_dead_rows(out, dead), None


def _row_multipliers(multipliers: torch.Tensor, rows: int, keys: int, device: torch.device) -> torch.Tensor:
    """Multipliers for ``keys`` key positions; positions past the given ones (tokens generated after
    the manipulated prompt, e.g. during steered generation with a KV cache) are left untouched."""
    if multipliers.shape[1] > keys:
        raise AtmanError(
            f"multipliers cover {multipliers.shape[1]} key positions but the attention layer sees only {keys}"
        )
    if multipliers.shape[0] not in (1, rows):
        raise AtmanError(f"multipliers have {multipliers.shape[0]} rows for a batch of {rows}")
    multipliers = multipliers.to(device=device, dtype=torch.float32)
    if multipliers.shape[1] < keys:
        pad = torch.ones(multipliers.shape[0], keys - multipliers.shape[1], device=device)
        multipliers = torch.cat([multipliers, pad], dim=1)
    return multipliers.expand(rows, keys)


def _additive_mask(
    module: torch.nn.Module,
    attention_mask: torch.Tensor | None,
    query: torch.Tensor,
    k_len: int,
    is_causal: bool | None,
) -> torch.Tensor:
    """The model's own mask as float32 0 / -inf of shape (batch or 1, 1, queries, keys)."""
    q_len = query.shape[-2]
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        base = torch.zeros(1, 1, q_len, k_len, device=query.device)
        if causal and q_len > 1:
            q_pos = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
            k_pos = torch.arange(k_len, device=query.device)[None, :]
            base = base.masked_fill(k_pos > q_pos, float("-inf"))
        return base
    mask = attention_mask[:, :, :, :k_len]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=query.device).masked_fill(~mask, float("-inf"))
    mask = mask.to(torch.float32)
    return mask.masked_fill(mask <= torch.finfo(attention_mask.dtype).min / 2, float("-inf"))


# the queries of this many rows' worth of positions, at most, lie beside one copy of a shared prefix:
# the block mask wastes the attention between different rows' own positions, kept to 1/8 of the prefix's
# (0: join the prefix to every row instead, as before; benchmarks/shared_prefix.py compares the two)
FOLD_SHARE = 8
_GQA_IN_SDPA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _shared_prefix(
    module: torch.nn.Module,
    query: torch.Tensor,
    shared: SharedKeys,
    attention_mask: torch.Tensor | None,
    multipliers: torch.Tensor,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
) -> torch.Tensor:
    """Log-additive AtMan attention of ``query`` (rows, heads, q, dim) to a prefix shared by every row
    followed by each row's own keys, without a copy of the prefix per row.

    The queries of ``g`` rows are laid end to end as one sequence against one copy of the prefix and
    the ``g`` rows' own keys; a block mask lets each row's queries see the prefix (with the row's
    multipliers) and only its own keys (with the model's mask). Exactly the attention of each row to
    the prefix joined to its own keys. Returns (rows, q, heads, dim), as transformers expects.
    """
    rows, heads, q_len, dim = query.shape
    kv_heads, prefix = shared.prefix_keys.shape[1], shared.prefix_keys.shape[-2]
    own = shared.own_keys.shape[-2]
    total = prefix + own
    multipliers = _row_multipliers(multipliers, rows, total, query.device)
    bias = _additive_mask(module, attention_mask, query, total, is_causal) + torch.log(multipliers)[:, None, None, :]
    bias = bias.expand(rows, 1, q_len, total)
    dead = torch.isneginf(bias).all(dim=-1)
    group = max(1, prefix // (FOLD_SHARE * max(own, 1)))
    gqa = heads != kv_heads
    native_gqa = gqa and _GQA_IN_SDPA and query.device.type == "cpu"
    dtype = query.dtype
    outs = []
    for first in range(0, rows, group):
        n = min(group, rows - first)
        if n == 1:
            keys = torch.cat([shared.prefix_keys, shared.own_keys[first:first + 1]], dim=-2)
            values = torch.cat([shared.prefix_values, shared.own_values[first:first + 1]], dim=-2)
            queries, mask = query[first:first + 1], bias[first:first + 1]
        else:
            own_k = shared.own_keys[first:first + n].transpose(0, 1).reshape(1, kv_heads, n * own, dim)
            own_v = shared.own_values[first:first + n].transpose(0, 1).reshape(1, kv_heads, n * own, -1)
            keys = torch.cat([shared.prefix_keys, own_k], dim=-2)
            values = torch.cat([shared.prefix_values, own_v], dim=-2)
            queries = query[first:first + n].transpose(0, 1).reshape(1, heads, n * q_len, dim)
            mask = torch.full((n * q_len, prefix + n * own), float("-inf"), device=query.device)
            mask[:, :prefix] = bias[first:first + n, 0, :, :prefix].reshape(n * q_len, prefix)
            for i in range(n):
                block = prefix + i * own
                mask[i * q_len:(i + 1) * q_len, block:block + own] = bias[first + i, 0, :, prefix:]
            mask = mask[None, None]
        if gqa and not native_gqa:
            keys, values = repeat_kv(keys, heads // kv_heads), repeat_kv(values, heads // kv_heads)
        extra = {"enable_gqa": True} if native_gqa else {}
        out = torch.nn.functional.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask.to(dtype), dropout_p=dropout if module.training else 0.0,
            scale=scaling, **extra)
        outs.append(out.reshape(heads, n, q_len, -1).transpose(0, 1) if n > 1 else out)
    out = torch.cat(outs).transpose(1, 2).contiguous()
    return _zero_dead_rows(out, dead)


def _zero_dead_rows(out: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``out`` is (batch, queries, heads, dim); ``dead`` marks (batch, 1, queries) rows with no key."""
    if not bool(dead.any()):
        return out
    return out.masked_fill(dead.expand(out.shape[0], 1, out.shape[1]).permute(0, 2, 1)[..., None], 0.0)


def _eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    base: torch.Tensor,
    multipliers: torch.Tensor,
    mode: str,
    dropout: float,
    scaling: float,
    kwargs: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rep = query.shape[1] // key.shape[1]
    key = repeat_kv(key, n_rep)
    value = repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)).to(torch.float32)
    if mode == "multiplicative":
        # (S - min) * m, shifted back by the row minimum: the same softmax as the paper's formula for
        # plain attention, and an exact identity at m = 1 under softcapping and sinks too. The minimum
        # runs over the keys the query can see, so a position never depends on later tokens (cached
        # generation equals recomputation); a row that sees no key keeps its scores
        row_min = scores.masked_fill(torch.isneginf(base), float("inf")).amin(dim=-1, keepdim=True)
        row_min = row_min.masked_fill(torch.isinf(row_min), 0.0)
        scores = row_min + (scores - row_min) * multipliers[:, None, None, :]
    scores = scores * scaling
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + base
    if mode == "log-additive":
        scores = scores + torch.log(multipliers)[:, None, None, :]
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        sink_col = sinks.to(torch.float32).reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(dead, 0.0).to(value.dtype)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


_COMPILED_FLEX = None


def _flex(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scaling: float
) -> torch.Tensor:
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, 0, q_idx, kv_idx]

    gqa = query.shape[1] != key.shape[1]
    if query.is_cuda:
        # only the compiled kernel is fused; uncompiled flex materialises the scores like eager
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
        out = _COMPILED_FLEX(query, key, value, score_mod=score_mod, scale=scaling, enable_gqa=gqa)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(query, key, value, score_mod=score_mod, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()
