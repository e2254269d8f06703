"""Decoding (kvpress's DecodingPress): compression every few decode steps (a wrapper press).

The machinery that runs it inside the decode step is `lcm.cache.decoding`; this file declares
what it needs: its query buffer, the slots it keeps, the room it needs and its checks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcm.cache.presses.base import Press, register
from lcm.cache.presses.knorm import Knorm
from lcm.checks import check_int


@register
@dataclasses.dataclass(frozen=True)
class Decoding(Press):
    """Every `compression_interval` steps each head is compressed back to `target_size`
    entries with `base_press`'s scores.

    hidden_states_buffer_size (kvpress's name and default): attention scorers see the queries
    of at most the last hidden_states_buffer_size + 1 steps since the last compression (kvpress
    keeps that many hidden states between steps and appends the current one; 0: the current
    query alone), so the cache's query buffer holds min(compression_interval,
    hidden_states_buffer_size + 1) queries per layer.
    """

    base_press: Press
    compression_interval: int = 512
    target_size: int = 2048
    hidden_states_buffer_size: int = 256

    runs_at_prefill = False
    decode_kind = "periodic"

    def __post_init__(self):
        if not (isinstance(self.base_press, Press)
                and self.base_press.compresses_while_decoding):
            raise ValueError(f"Decoding.base_press={self.base_press!r}; expected a scoring "
                             f"policy or AdaKV")
        check_int("Decoding", "compression_interval", self.compression_interval, 1)
        check_int("Decoding", "target_size", self.target_size, 1)
        check_int("Decoding", "hidden_states_buffer_size", self.hidden_states_buffer_size, 0)

    @property
    def scorer(self):
        return self.base_press.scorer

    @property
    def positions(self) -> str:
        return self.base_press.positions

    @property
    def observed_steps(self) -> int:
        """Most decode steps whose queries a compression sees."""
        return min(self.compression_interval, self.hidden_states_buffer_size + 1)

    def buffer_size(self) -> int:
        """Queries buffered between compressions (0: the base press reads none)."""
        window, colsum, sink = self.base_press.needs()
        if colsum or sink is not None:
            return self.observed_steps
        return min(window, self.observed_steps)

    def kept_slots(self, num_heads: int) -> int:
        """Slots a head may hold after a compression: target_size, or with AdaKV the most one
        of `num_heads` heads can win of their num_heads * target_size (heads then hold
        different numbers of entries in a uniform cache sized for the largest)."""
        return self.base_press.head_capacity(self.target_size, num_heads)

    def check_decode(self, cache) -> None:
        inner = self.scorer
        if cache.rotation == "cache" and inner.needs().anything:
            raise ValueError(f"Decoding.base_press={inner!r} scores with attention, but the "
                             f"cache re-rotates keys (rotation='cache'); use Knorm or "
                             f"StreamingLLM, or a cache with original positions")
        if inner.positions != cache.rotation:
            raise ValueError(f"Decoding.base_press.positions={inner.positions!r} differs from "
                             f"the cache's rotation={cache.rotation!r}")
        need = self.kept_slots(cache.num_heads) + self.compression_interval
        if not isinstance(cache.length, jax.core.Tracer):  # a concrete cache: its own lengths
            need = max(need, int(jnp.max(cache.length)) + self.compression_interval
                       - int(cache.step))
        if cache.capacity < need:
            raise ValueError(f"cache.capacity={cache.capacity}; Decoding needs {need} slots "
                             f"(the longest head or target_size (with AdaKV: the most one "
                             f"head can win), plus compression_interval new tokens): prefill "
                             f"with a larger max_new_tokens")

    def decode_room(self, prompt_kept: int, max_new_tokens: int, num_heads: int) -> int:
        need = self.kept_slots(num_heads) + self.compression_interval
        return max(need, prompt_kept + min(max_new_tokens, self.compression_interval)
                   ) - prompt_kept

    def next_step(self, step):
        """The step counter after a decode step: reset to 0 when it compressed."""
        return jnp.where(step >= self.compression_interval, 0, step)

    @classmethod
    def example(cls):
        return cls(Knorm(), compression_interval=2, target_size=4, hidden_states_buffer_size=1)
