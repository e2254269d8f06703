"""PyramidKV (Cai et al. 2024): SnapKV scores, layer budgets falling linearly with depth."""

from __future__ import annotations

import dataclasses

from lcm.cache.presses.base import register
from lcm.cache.presses.snapkv import SnapKV
from lcm.checks import check_int


@register
@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV with kvpress's `get_layer_budget(beta)`; its cache stores a capacity per layer
    ("layered" layout), so the memory is the sum of the layers' budgets."""

    beta: int = 20
    per_layer_budget = True

    def __post_init__(self):
        super().__post_init__()
        check_int("PyramidKV", "beta", self.beta, 1)

    def layer_budget(self, length: int, layer: int, num_layers: int) -> int:
        """kvpress's PyramidKVPress.get_layer_budget (floats and round, as kvpress); the
        layers' mean is length * (1 - compression_ratio), or `budget`."""
        w = self.window_size
        mean = (min(self.budget, length) if self.budget is not None
                else length * (1 - self.compression_ratio))
        min_num = mean / self.beta
        max_num = mean * 2 - min_num
        if max_num >= length - w:
            max_num = length - w
            min_num = mean * 2 - max_num
        if not (length >= max_num >= min_num >= w):
            return max(1, round(mean))
        steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
        return round(max_num - layer * steps)

    def storage(self, layout: str) -> str:
        return "uniform" if layout == "uniform" else "layered"

    @classmethod
    def example(cls):
        return cls(0.5, window_size=2, kernel_size=3, beta=2)
