"""ObservedAttention (H2O-style, as kvpress): attention each key received from later queries."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcm.cache.presses.base import Needs, ScorerPress, f32, finish, group, register


@register
@dataclasses.dataclass(frozen=True)
class ObservedAttention(ScorerPress):
    """Attention each key received from all later prompt queries, divided by their number.
    Gathered chunk by chunk at prefill: no [T, T] matrix."""

    def observes(self):
        return Needs(colsum=True)

    def score(self, *, pos, valid, n, obs, **_):
        B, K, S = valid.shape
        colsum = obs["colsum"].reshape(B, K, -1, S)
        # Queries that saw each key: all later prompt tokens, or (decoding) the buffered ones.
        seen_by = obs.get("seen_by", jnp.maximum(n[..., None] - pos, 1).astype(f32))
        seen_by = jnp.maximum(seen_by, 1.0)
        return finish(group(colsum / seen_by[:, :, None], self.gqa), valid, False)
