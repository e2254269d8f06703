"""H2O (Zhang et al. 2023): heavy hitters + recent tokens, by accumulated attention."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcm.cache.presses.base import GQA, Needs, Press, finish, group, register
from lcm.checks import check_choice, check_int


@register
@dataclasses.dataclass(frozen=True)
class H2O(Press):
    """Heavy hitters + recent tokens.

    At prefill it keeps the `recent_size` latest tokens and the `hh_size` others with the most
    attention summed over the prompt; as a decode policy it adds each step's attention to the
    scores and, when the cache holds hh_size + recent_size entries, evicts the lowest-scored
    entry outside the recent window.
    """

    hh_size: int = 4
    recent_size: int = 512
    gqa: str = "mean"

    decode_kind = "stepwise"
    accumulates_scores = True

    def __post_init__(self):
        check_int("H2O", "hh_size", self.hh_size, 0)
        check_int("H2O", "recent_size", self.recent_size, 1)
        check_choice("H2O", "gqa", self.gqa, GQA)

    def n_kept(self, length: int) -> int:
        return min(self.hh_size + self.recent_size, length)

    def observes(self):
        return Needs(colsum=True)

    def scores(self, *, pos, valid, n, obs, **_):
        """(selection scores with the recent window protected, accumulated attention)."""
        B, K, S = valid.shape
        acc = group(obs["colsum"].reshape(B, K, -1, S), self.gqa)
        recent = pos >= (n - self.recent_size)[..., None]
        return finish(acc, valid, recent), jnp.where(valid, acc, 0.0)

    def decode_budget(self):
        return self.hh_size + self.recent_size

    def step_scores(self, entries, probs, position, valid):
        entries = dict(entries, score=entries["score"] + jnp.where(
            valid, group(probs[:, :, :, 0], self.gqa), 0.0))
        recent = entries["pos"] > (position - self.recent_size)[:, None, None]
        return finish(entries["score"], valid, recent), entries

    @classmethod
    def example(cls):
        return cls(hh_size=2, recent_size=3)
