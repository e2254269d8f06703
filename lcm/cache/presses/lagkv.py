"""LagKV (arXiv 2504.04704, kvpress's LagKVPress): tokens scored against the next partition."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcm.cache.presses.base import ScorerPress, f32, finish, register
from lcm.checks import check_int


@register
@dataclasses.dataclass(frozen=True)
class LagKV(ScorerPress):
    """After `n_sink` sinks, the prompt is cut into partitions of `lag_size` tokens; each is
    scored against the next one (its "lag"): keys and values are min-max normalised by the
    lag's per-channel range, and a token scores the softmax (over its partition) of its
    channels' standard deviation, keys and values averaged. The sinks, the last full partition
    and the remainder are kept. Without `cross_scoring` a score is its rank in its partition /
    lag_size. Prompts shorter than n_sink + 2 * lag_size keep the sinks and the most recent
    tokens (kvpress's fallback)."""

    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_int("LagKV", "n_sink", self.n_sink, 0)
        check_int("LagKV", "lag_size", self.lag_size, 2)
        if not isinstance(self.cross_scoring, bool):
            raise ValueError(f"LagKV.cross_scoring={self.cross_scoring!r}; expected a bool")

    def score(self, *, keys, v, pos, valid, n, **_):
        # Row lengths are traced: every partition count up to the static slots is computed and
        # each head takes the one its length gives (kvpress scores one unpadded prompt).
        S, L, sink = pos.shape[-1], self.lag_size, self.n_sink
        length = n[..., None]  # [B, K, 1]
        fallback = jnp.where(pos < sink, 1.0, (pos - sink) / jnp.maximum(length - sink, 1))
        parts = (S - sink) // L  # static: partitions a full row has
        if parts < 2:
            return finish(fallback.astype(f32), valid, False)
        B, K = pos.shape[:2]

        def normalised_spread(x):  # [B, K, P, L, D] -> softmax over L of std over D
            ref = x[:, :, 1:]
            lo, hi = ref.min(3, keepdims=True), ref.max(3, keepdims=True)
            y = (x[:, :, :-1] - lo) / (hi - lo)
            return jax.nn.softmax(jnp.std(y, axis=-1, ddof=1), axis=-1)  # [B, K, P - 1, L]

        def blocks(x):
            x = x[:, :, sink:sink + parts * L].astype(f32)
            return x.reshape(B, K, parts, L, x.shape[-1])

        s = (normalised_spread(blocks(keys)) + normalised_spread(blocks(v))) / 2
        if not self.cross_scoring:
            s = jnp.argsort(jnp.argsort(s, axis=-1), axis=-1).astype(f32) / L
        # A row's partitions are a full row's cut at its length. Those before its last full
        # partition are scored (their lag is their own next partition, so they score as in a
        # full row); its last full partition, the remainder and the sinks score 1.
        row_parts = (length - sink) // L  # [B, K, 1]
        scored_until = sink + (row_parts - 1) * L
        lag = jnp.ones((B, K, S), f32).at[:, :, sink:sink + (parts - 1) * L].set(
            s.reshape(B, K, (parts - 1) * L))
        lag = jnp.where((pos >= sink) & (pos < scored_until), lag, 1.0)
        short = length < sink + 2 * L
        return finish(jnp.where(short, fallback, lag).astype(f32), valid, False)
