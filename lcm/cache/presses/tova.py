"""TOVA (Oren et al. 2024): attention of the last query, averaged over all heads."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcm.cache.presses.base import Needs, ScorerPress, finish, register
from lcm.cache.presses.snapkv import window_attention


@register
@dataclasses.dataclass(frozen=True)
class TOVA(ScorerPress):
    """Attention of the last query averaged over all heads; the last token is kept. As a
    decode policy (with a token `budget`) it evicts the lowest-scored entry at every step."""

    decode_kind = "stepwise"

    def observes(self):
        return Needs(window=1)

    def score(self, *, keys, pos, valid, obs, sliding_window=None, **_):
        probs = window_attention(obs["q_win"], obs["q_pos"], keys, pos, valid, 1,
                                 sliding_window)
        scores = jnp.broadcast_to(probs[:, :, :, 0].mean((1, 2))[:, None], valid.shape)
        return finish(scores, valid, pos >= obs["q_pos"][:, -1][:, None, None])

    @classmethod
    def example(cls):
        return cls(budget=12)

    def decode_budget(self):
        return self.budget

    def step_scores(self, entries, probs, position, valid):
        mean = probs[:, :, :, 0].mean((1, 2))[:, None]
        return finish(jnp.broadcast_to(mean, valid.shape), valid,
                      entries["pos"] == position[:, None, None]), entries
