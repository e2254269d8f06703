"""Merging (kvpress's MergingPress): evicted values folded into their closest kept entry."""

from __future__ import annotations

import dataclasses

from lcm.cache.merge import merge_values
from lcm.cache.presses.base import WrapperPress, register
from lcm.cache.presses.knorm import Knorm
from lcm.checks import check_number


@register
@dataclasses.dataclass(frozen=True)
class Merging(WrapperPress):
    """The inner press selects; each evicted value is averaged into the kept entry whose key
    has the highest cosine similarity, weighted by that similarity and by the values' norms
    (`lcm.cache.merge`)."""

    similarity_threshold: float = 0.0
    merge_fraction: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_number("Merging", "similarity_threshold", self.similarity_threshold, 0.0, 1.0)
        check_number("Merging", "merge_fraction", self.merge_fraction, 0.0, 1.0, lo_open=True)

    def fold(self, source, keys, valid, idx, keep):
        return dict(source, v=merge_values(self, keys, source["v"], valid, idx, keep))

    @classmethod
    def example(cls):
        return cls(Knorm(0.5))
