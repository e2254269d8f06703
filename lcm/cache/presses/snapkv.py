"""SnapKV (Li et al. 2024): attention of the last queries, pooled; the window is kept."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcm.cache import attention as cattn
from lcm.cache.presses.base import POOLING, Needs, ScorerPress, finish, group, pool, register
from lcm.checks import check_choice, check_int


def window_attention(q_win, q_pos, keys, pos, valid, window, sliding_window=None):
    """Softmax weights [B, K, G, w, S] of the last `window` observed queries over the entries."""
    q, qp = q_win[:, -window:], q_pos[:, -window:]
    vis = cattn.visible(qp, pos, valid, sliding_window=sliding_window)
    return cattn.attention_probs(q, keys, vis)


@register
@dataclasses.dataclass(frozen=True)
class SnapKV(ScorerPress):
    """Attention of the last `window_size` queries, pooled over `kernel_size` neighbours
    ("avg" as kvpress, "max" as SnapKV's LongBench runs); the window itself is always kept."""

    window_size: int = 64
    kernel_size: int = 5
    pooling: str = "avg"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        check_int(name, "window_size", self.window_size, 1)
        check_int(name, "kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"{name}.kernel_size={self.kernel_size}; expected an odd int (the "
                             f"pooled scores keep their length, as in kvpress and SnapKV)")
        check_choice(name, "pooling", self.pooling, POOLING)

    def observes(self):
        return Needs(window=self.window_size)

    def score(self, *, keys, pos, valid, obs, sliding_window=None, **_):
        w = self.window_size
        probs = window_attention(obs["q_win"], obs["q_pos"], keys, pos, valid, w,
                                 sliding_window)
        # Keys before the first window query are scored; the window itself is kept. (-1: the
        # prompt is shorter than the window, so every key is in it.)
        first = obs["q_pos"][:, -min(w, obs["q_pos"].shape[1])]
        prefix = valid & (pos < first[:, None, None])
        scores = jnp.where(prefix[:, :, None], probs.mean(3), 0.0)  # [B, K, G, S]
        scores = group(pool(scores, self.kernel_size, self.pooling), self.gqa)
        return finish(scores, valid, ~prefix)

    @classmethod
    def example(cls):
        return cls(0.5, window_size=4, kernel_size=3)
