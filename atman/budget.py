"""How many perturbations fit in one forward pass: a memory model of an inference batch.

The estimate counts what a no-grad forward pass holds at its peak: one layer's activations for
every query token, the additive attention bias and (on kernels that materialise them) the
attention scores, one layer's keys and values of every row (the shared prefix joined to the row's
suffix), and the logits with their log-softmax; plus, once per explanation, the unperturbed pass's
key/value cache. It errs on the high side, so a budget is an upper bound in practice.
"""

from __future__ import annotations

import ctypes
import math
import re

import psutil
import torch

from .errors import AtmanError

# nominal speeds for sizing pieces of work: what one float32 forward pass sustains on a CPU core or
# two, on an Apple GPU and on a data-centre GPU (a faster device merely checks more often than asked)
NOMINAL_FLOPS = {"cpu": 5e10, "mps": 5e12, "cuda": 5e13}

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
CPU_SHARE = 0.25
GPU_PLAIN_MULTIPLE = 4
PLAIN = "plain"
# between batches on a CPU, hand the memory that the C allocator keeps of freed batches back to the
# system (glibc's malloc_trim); a module switch so that benchmarks can compare both
RELEASE_BETWEEN_BATCHES = True


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory(device: torch.device) -> None:
    """After a batch on a CPU: return freed memory that glibc keeps to the system.

    Batches of changing shapes leave freed blocks that the allocator keeps for reuse but often
    cannot reuse for the next shape; without this the process's resident size grows past what is
    live, and past the memory budget. A no-op on GPUs and where the C library is not glibc.
    """
    if RELEASE_BETWEEN_BATCHES and device.type == "cpu":
        trim_allocator()


def trim_allocator() -> None:
    """Hand the memory glibc keeps of freed blocks back to the system (a no-op outside glibc)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def parse_memory(text: str | int) -> int | str:
    """``"2GB"``, ``"512MiB"``, ``"1.5g"``, a number of bytes, or ``"plain"`` (as much as one plain
    forward pass of the input being explained needs, estimated per input).

    >>> parse_memory("512MiB")
    536870912
    """
    if isinstance(text, str) and text.strip().lower() == PLAIN:
        return PLAIN
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise AtmanError(
                f"cannot read memory size {text!r}; write e.g. 2GB, 512MiB, a number of bytes or 'plain'"
            )
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
        if not math.isfinite(number):
            raise AtmanError(f"memory size {text!r} is too large to mean anything; write e.g. 2GB or 512MiB")
        value = int(number)
    if value <= 0:
        raise AtmanError(f"a memory budget must be positive, got {text!r}")
    return value


class MemoryModel:
    """Bytes a forward pass of ``rows`` x ``queries`` tokens attending to ``keys`` positions needs."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.dtype_bytes = next(model.parameters()).element_size()
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 768))
        inter = int(getattr(config, "intermediate_size", 0) or getattr(config, "ffn_dim", 0) or 4 * hidden)
        self.heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 12))
        kv_heads = int(getattr(config, "num_key_value_heads", 0) or self.heads)
        head_dim = int(getattr(config, "head_dim", 0) or hidden // self.heads)
        self.layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 12))
        self.vocab = int(getattr(config, "vocab_size", 32000))
        # live tensors inside one layer: residual, normed copy, q/k/v/out projections, two MLP branches
        self.per_query = (6 * hidden + 3 * inter) * self.dtype_bytes
        # keys and values of one position in one layer, as a cache stores them
        self.kv_per_position = 2 * kv_heads * head_dim * self.dtype_bytes
        # inside one layer, a row's keys and values are the shared prefix joined to its own suffix, and
        # grouped-query kernels may expand them to every query head
        self.per_key = 2 * (kv_heads + self.heads) * head_dim * self.dtype_bytes

    def cache(self, length: int) -> int:
        """The unperturbed pass's key/value cache over all layers, kept while the perturbations run."""
        return length * self.layers * self.kv_per_position

    def batch(self, rows: int, queries: int, keys: int, logits: int) -> int:
        """An AtMan batch: its logits are also turned into float32 log-probabilities."""
        attention = queries * keys * 4 * (1 + self.heads)  # float32 bias, plus scores where materialised
        return rows * (queries * self.per_query + attention + keys * self.per_key + logits * self.vocab * 4 * 3)

    def plain_forward(self, length: int) -> int:
        """A plain forward of one sequence: logits at every position and a key/value cache."""
        return length * (self.per_query + self.vocab * self.dtype_bytes) + self.cache(length)


def default_budget(device: torch.device, model: MemoryModel, length: int) -> int:
    """CPU: a quarter of the memory available now. GPU: a few plain forwards, within free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(0.8 * free, GPU_PLAIN_MULTIPLE * model.plain_forward(length)))
    return int(CPU_SHARE * psutil.virtual_memory().available)


def piece_tokens_for(model: torch.nn.Module, seconds: float) -> int:
    """Token-forwards that ``model`` runs in about ``seconds`` at its device's nominal speed
    (:data:`NOMINAL_FLOPS`, two operations per weight and token), rounded down to a power of two,
    at least 128: the ``piece_tokens`` of an engine whose caller wants to be able to stop it about
    that often. It depends on the model and the device type only, never on timing, so every server
    of a model cuts its work alike and gives the same results whatever its load.

    >>> piece_tokens_for(torch.nn.Linear(1000, 1000), 2.0)
    32768
    """
    if not (math.isfinite(seconds) and seconds > 0):
        raise AtmanError(f"seconds between checks must be a positive number, got {seconds!r}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skipped = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    weights = sum(p.numel() for p in model.parameters() if id(p) not in skipped)
    flops = NOMINAL_FLOPS.get(next(model.parameters()).device.type, NOMINAL_FLOPS["cuda"])
    tokens = seconds * flops / max(2 * weights, 1)
    return max(128, 2 ** int(math.log2(max(tokens, 1.0))))
