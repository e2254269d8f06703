"""StreamingLLM (Xiao et al. 2023): attention sinks + the most recent tokens."""

from __future__ import annotations

import dataclasses

from lcm.cache.presses.base import ScorerPress, f32, finish, register
from lcm.checks import check_int


@register
@dataclasses.dataclass(frozen=True)
class StreamingLLM(ScorerPress):
    """Keeps the first `n_sink` tokens and the most recent ones. As a decode policy (with a
    token `budget`) it evicts the oldest non-sink entry whenever a head holds more."""

    n_sink: int = 4
    decode_kind = "stepwise"

    def __post_init__(self):
        super().__post_init__()
        check_int("StreamingLLM", "n_sink", self.n_sink, 0)

    def score(self, *, pos, valid, **_):
        return finish(pos.astype(f32), valid, pos < self.n_sink)

    @classmethod
    def example(cls):
        return cls(budget=12, n_sink=2)

    def decode_budget(self):
        return self.budget

    def step_scores(self, entries, probs, position, valid):
        return self.score(pos=entries["pos"], valid=valid), entries
