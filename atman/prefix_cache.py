"""The shared-prefix cache: the unperturbed pass's keys and values, read by every row of a batch.

The cached engine recomputes a batch of rows only from their first damped position; the positions
before it are the unperturbed pass's. :class:`SharedPrefix` is the transformers ``Cache`` the model
runs on: each layer holds the prefix once (not one copy per row) and returns the rows' own new keys
and values. The attention function gets the prefix from the manipulation it runs under: the engine
passes the cache to :func:`atman.manipulate` (``prefix=``), and ``atman_attention`` asks it with
:meth:`SharedPrefix.handed` for the :class:`~atman.manipulation.SharedKeys` of the keys it was given.
Outside such a manipulation a layer returns prefix and own keys joined, like any cache.

Example::

    >>> cache = SharedPrefix([(keys, values)], start=3)  # doctest: +SKIP
    >>> with manipulate(rows, prefix=cache):  # doctest: +SKIP
    ...     logits = model(input_ids=suffix, past_key_values=cache, use_cache=True).logits
"""

from __future__ import annotations

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from .manipulation import SharedKeys, active


class PrefixLayer(DynamicLayer):
    """One layer's unperturbed keys and values, shared by every row of a batch.

    Without ``grow`` nothing of the rows is stored, so a batch holds one layer's keys and values at a
    time; with ``grow`` the rows' own keys and values are kept for the next call (a pass run in pieces).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, grow: bool = False) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.grow = grow
        self.own: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pending: SharedKeys | None = None
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.own is not None:
            key_states = torch.cat([self.own[0], key_states], dim=-2)
            value_states = torch.cat([self.own[1], value_states], dim=-2)
        if self.grow:
            self.own = (key_states, value_states)
        shared = SharedKeys(self.keys, self.values, key_states, value_states)
        state = active()
        if state is None or state.prefix is None:
            return shared.joined()
        # the attention call that follows reads the prefix once for every row (see atman.manipulation)
        self.pending = shared
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] + (self.own[0].shape[-2] if self.own is not None else 0)


class SharedPrefix(Cache):
    """A cache for a whole batch: the first ``start`` positions of the unperturbed pass, read-only, and
    with ``grow`` the batch's own positions after them."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]], start: int, grow: bool = False) -> None:
        super().__init__(layers=[PrefixLayer(keys[:, :, :start], values[:, :, :start], grow)
                                 for keys, values in prefix])

    def handed(self, key: torch.Tensor, value: torch.Tensor) -> SharedKeys | None:
        """The prefix and own keys of the layer that just returned ``key`` and ``value`` (once), else None."""
        for layer in self.layers:
            pending = layer.pending
            if pending is not None and pending.own_keys is key and pending.own_values is value:
                layer.pending = None
                return pending
        return None
