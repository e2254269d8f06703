"""Eviction policies as frozen dataclasses, with kvpress's names, parameters and defaults.

A policy is data; `lcm.cache.compress` runs it as `score -> select(static budget) -> apply`.
Every scorer takes its budget as kvpress's `compression_ratio` (the fraction removed; kept per
row: max(1, int(length * (1 - ratio)))) or as a token count `budget` per kv head (at most the
prompt). Options found in the reference implementations:

- gqa: how the query heads of a group vote for their shared kv head: "mean" (kvpress), "max",
  or "query_head": each query head selects its own entries (original SnapKV), so the cache
  holds num_heads heads (repeated K/V, group_size times the memory of the others).
- positions: "original" keeps every entry at its original RoPE position (kvpress); "cache"
  re-rotates keys to their rank in the cache, as StreamingLLM's code and kvpress's
  KeyRerotationPress do (new tokens then continue at the cache length).
- pooling ("avg" as kvpress, "max" as SnapKV's LongBench runs) and kernel_size for the
  observation-window scorers; window_size / n_sink: the protected recent window and sinks.
"""

from __future__ import annotations

import dataclasses
import math

GQA = ("mean", "max", "query_head")
POSITIONS = ("original", "cache")
POOLING = ("avg", "max")


def _int(owner, name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name}={value!r}; expected an int >= {minimum}")


def _number(owner, name, value, lo, hi, *, lo_open=False, hi_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{owner}.{name}={value!r}; expected a number in {interval}")


def _choice(owner, name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r}; expected one of {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class Scorer:
    """Base of the scoring policies: a budget (ratio or token count) and the shared options."""

    compression_ratio: float = 0.0
    _: dataclasses.KW_ONLY
    budget: int | None = None
    gqa: str = "mean"
    positions: str = "original"

    def __post_init__(self):
        name = type(self).__name__
        _number(name, "compression_ratio", self.compression_ratio, 0.0, 1.0, hi_open=True)
        if self.budget is not None:
            _int(name, "budget", self.budget, 1)
            if self.compression_ratio:
                raise ValueError(f"{name}: compression_ratio={self.compression_ratio} and budget="
                                 f"{self.budget} both set; give one (a ratio or a token count)")
        _choice(name, "gqa", self.gqa, GQA)
        _choice(name, "positions", self.positions, POSITIONS)

    def n_kept(self, length: int) -> int:
        """Entries kept per kv head from a prompt of `length` tokens (kvpress's rounding)."""
        if self.budget is not None:
            return min(self.budget, length)
        return max(1, int(length * (1 - self.compression_ratio)))


@dataclasses.dataclass(frozen=True)
class Knorm(Scorer):
    """Keeps the keys of smallest L2 norm (Devoto et al. 2024): score -||k||."""


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Scorer):
    """Attention sinks + the most recent tokens (Xiao et al. 2023)."""

    n_sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        _int("StreamingLLM", "n_sink", self.n_sink, 0)


@dataclasses.dataclass(frozen=True)
class SnapKV(Scorer):
    """Attention of the last `window_size` queries, pooled over `kernel_size` neighbours; the
    window itself is always kept (Li et al. 2024)."""

    window_size: int = 64
    kernel_size: int = 5
    pooling: str = "avg"

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        _int(name, "window_size", self.window_size, 1)
        _int(name, "kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"{name}.kernel_size={self.kernel_size}; expected an odd int (the "
                             f"pooled scores keep their length, as in kvpress and SnapKV)")
        _choice(name, "pooling", self.pooling, POOLING)


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV scores with layer budgets falling linearly with depth (Cai et al. 2024):
    kvpress's `get_layer_budget` with `beta`."""

    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        _int("PyramidKV", "beta", self.beta, 1)

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


@dataclasses.dataclass(frozen=True)
class TOVA(Scorer):
    """Attention of the last query, averaged over all heads (Oren et al. 2024); the last token
    is kept. As a decode policy it evicts the lowest-scored entry at every step."""


@dataclasses.dataclass(frozen=True)
class ObservedAttention(Scorer):
    """Attention each key received from all later prompt queries, divided by their number
    (H2O-style, as kvpress). Gathered chunk by chunk at prefill: no [T, T] matrix."""


@dataclasses.dataclass(frozen=True)
class ExpectedAttention(Scorer):
    """Expected attention of future queries (Devoto et al. 2025, kvpress): query mean and
    covariance, averaged RoPE over `n_future_positions`, times ||v||; sinks kept."""

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _int("ExpectedAttention", "n_future_positions", self.n_future_positions, 1)
        _int("ExpectedAttention", "n_sink", self.n_sink, 0)
        _number("ExpectedAttention", "epsilon", self.epsilon, 0.0, math.inf, hi_open=True)


@dataclasses.dataclass(frozen=True)
class H2O:
    """Heavy hitters + recent tokens (Zhang et al. 2023): accumulated attention scores.

    At prefill it keeps the `recent_size` latest tokens and the `hh_size` others with the most
    attention summed over the prompt; as a decode policy it adds each step's attention to the
    scores and, when the cache holds hh_size + recent_size entries, evicts the lowest-scored
    entry outside the recent window.
    """

    hh_size: int = 4
    recent_size: int = 512
    gqa: str = "mean"

    def __post_init__(self):
        _int("H2O", "hh_size", self.hh_size, 0)
        _int("H2O", "recent_size", self.recent_size, 1)
        _choice("H2O", "gqa", self.gqa, GQA)

    positions = "original"

    def n_kept(self, length: int) -> int:
        return min(self.hh_size + self.recent_size, length)


@dataclasses.dataclass(frozen=True)
class AdaKV:
    """Head-wise budgets (Feng et al. 2024, kvpress's AdaKVPress): the inner scorer's scores
    compete across the kv heads of a layer for heads * n_kept slots, each head first getting
    its top alpha_safeguard * n_kept.

    Unlike kvpress (which masks keys and keeps the full cache), heads really hold different
    numbers of entries: each layer's heads share one pool of heads * n_kept slots (+ room for
    decoding), so the memory is the budget (`lcm.cache.layouts`). `capacity_factor` caps what
    one head may win at capacity_factor * n_kept (the surplus goes to the next-best entries of
    other heads); with `layout="uniform"` every head is sized for the most one head can win,
    min(prompt, heads * n_kept - (heads - 1) * n_safe), or that cap.
    """

    press: Scorer
    alpha_safeguard: float = 0.20
    capacity_factor: float | None = None

    def __post_init__(self):
        if not isinstance(self.press, Scorer) or isinstance(self.press, PyramidKV):
            raise ValueError(f"AdaKV.press={self.press!r}; expected a scoring policy (Knorm, "
                             f"SnapKV, TOVA, ObservedAttention, ExpectedAttention, StreamingLLM)")
        _number("AdaKV", "alpha_safeguard", self.alpha_safeguard, 0.0, 1.0)
        if self.capacity_factor is not None:
            _number("AdaKV", "capacity_factor", self.capacity_factor, 1.0, math.inf,
                    hi_open=True)

    @property
    def positions(self) -> str:
        return self.press.positions


@dataclasses.dataclass(frozen=True)
class Merging:
    """Evicted entries folded into their most similar kept neighbour (kvpress MergingPress):
    each evicted value is averaged into the kept entry whose key has the highest cosine
    similarity, weighted by that similarity and by the values' norms."""

    press: Scorer
    similarity_threshold: float = 0.0
    merge_fraction: float = 1.0

    def __post_init__(self):
        if not isinstance(self.press, Scorer) or isinstance(self.press, PyramidKV):
            raise ValueError(f"Merging.press={self.press!r}; expected a scoring policy")
        _number("Merging", "similarity_threshold", self.similarity_threshold, 0.0, 1.0)
        _number("Merging", "merge_fraction", self.merge_fraction, 0.0, 1.0, lo_open=True)

    @property
    def positions(self) -> str:
        return self.press.positions


@dataclasses.dataclass(frozen=True)
class Decoding:
    """Compression while decoding (kvpress DecodingPress): every `compression_interval` steps
    each head is compressed back to `target_size` entries with `base_press`'s scores.

    hidden_states_buffer_size (kvpress's name and default): attention scorers see the queries
    of at most the last hidden_states_buffer_size + 1 steps since the last compression (kvpress
    keeps that many hidden states between steps and appends the current one; 0: the current
    query alone), so the cache's query buffer holds min(compression_interval,
    hidden_states_buffer_size + 1) queries per layer.
    """

    base_press: Scorer | AdaKV
    compression_interval: int = 512
    target_size: int = 2048
    hidden_states_buffer_size: int = 256

    def __post_init__(self):
        if not isinstance(self.base_press, (Scorer, AdaKV)):
            raise ValueError(f"Decoding.base_press={self.base_press!r}; expected a scoring "
                             f"policy or AdaKV")
        _int("Decoding", "compression_interval", self.compression_interval, 1)
        _int("Decoding", "target_size", self.target_size, 1)
        _int("Decoding", "hidden_states_buffer_size", self.hidden_states_buffer_size, 0)

    @property
    def observed_steps(self) -> int:
        """Most decode steps whose queries a compression sees."""
        return min(self.compression_interval, self.hidden_states_buffer_size + 1)


POLICIES = {cls.__name__: cls for cls in (Knorm, StreamingLLM, SnapKV, PyramidKV, TOVA,
                                          ObservedAttention, ExpectedAttention, H2O, AdaKV,
                                          Merging)}
DECODE_POLICIES = ("Decoding", "H2O", "TOVA", "StreamingLLM")


def policy_from_name(name: str, **kwargs):
    """A policy by its class name (`policy_from_name("SnapKV", compression_ratio=0.5)`), for
    configs; unknown names raise ValueError listing the choices."""
    if name not in POLICIES:
        raise ValueError(f"policy={name!r}; expected one of {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)
