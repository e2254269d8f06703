"""The press protocol: what a KV-cache policy declares, and the machinery's defaults.

A press is a frozen dataclass. The machinery (`lcm.cache.compress`, `lcm.cache.decoding`,
`lcm.cache.formats`) runs it as observe -> score -> select (static budget) -> store, at prefill
and while decoding, and asks the press, never its class, what to do:

- `needs()`: what prefill must observe for it (a window of queries, attention column sums,
  query moments);
- `score(keys=, v=, pos=, valid=, n=, obs=, ...)`: float32 [B, K, S], higher is kept; empty
  slots -inf, protected entries +inf (`finish`);
- `n_kept(length)` / `layer_budget(length, layer, num_layers)`: the budget per head;
- `select`, `fold`, `storage`, `head_capacity`: how kept entries are chosen and stored
  (AdaKV, Merging, PyramidKV override them);
- decoding: a press that evicts at every step defines `decode_budget()` and `step_scores`; a
  periodic one (`Decoding`) sets decode_kind = "periodic" and its own methods;
- cache formats (KIVI, Quest, DuoAttention) set owns_cache = True and run their own layer
  state (`lcm.cache.formats`).

A new press is one file: a dataclass deriving `ScorerPress` with a `score`, decorated with
`@register`; one parametrized test then runs it through prefill, compress, decode and
generate (tests/cache/test_presses.py).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcm.attention import Causal, attend
from lcm.checks import check_choice, check_int, check_number

f32 = jnp.float32
INF = jnp.inf
GQA = ("mean", "max", "query_head")
POSITIONS = ("original", "cache")
POOLING = ("avg", "max")

# name -> press class, filled by @register (lcm.cache.presses imports every press module).
PRESSES: dict[str, type] = {}


def register(cls):
    """Class decorator: lists a press in `PRESSES` (by class name) for configs and tests."""
    if cls.__name__ in PRESSES and PRESSES[cls.__name__] is not cls:
        raise ValueError(f"a press named {cls.__name__!r} is registered already")
    PRESSES[cls.__name__] = cls
    return cls


# ----------------------------------------------------------------------------- the protocol

class Needs(NamedTuple):
    """What a press observes at prefill: the last `window` queries (rotated), attention summed
    over all queries (`colsum`), query mean and covariance from position `moments_from` on."""

    window: int = 0
    colsum: bool = False
    moments_from: int | None = None

    @property
    def anything(self) -> bool:
        """Whether the press reads queries at all (otherwise keys, values, positions only)."""
        return bool(self.window or self.colsum or self.moments_from is not None)


class Press:
    """Every cache policy derives from this; the defaults describe a plain eviction press."""

    runs_at_prefill = True      # usable as prefill(..., policy=...)
    owns_cache = False          # keeps its own cache format (KIVI, Quest, DuoAttention)
    decode_kind = None          # None, "stepwise" (evicts every step) or "periodic"
    plain_selection = False     # each kv head keeps n_kept entries unchanged (KIVI can follow)
    compresses_while_decoding = False  # can be Decoding's base press
    per_layer_budget = False    # budgets differ by layer (PyramidKV)
    accumulates_scores = False  # keeps per-entry scores in the cache (H2O)
    positions = "original"

    @property
    def scorer(self) -> Press:
        """The press whose scores select (a wrapper's inner press)."""
        return self

    @property
    def per_query_head(self) -> bool:
        """Whether each query head selects its own entries (the cache holds num_heads heads)."""
        return getattr(self.scorer, "gqa", None) == "query_head"

    def needs(self) -> Needs:
        """What prefill must observe for this press (a wrapper: its inner press's)."""
        return self.observes() if self.scorer is self else self.scorer.needs()

    def observes(self) -> Needs:
        """What this press's own `score` reads."""
        return Needs()

    def n_kept(self, length: int) -> int:
        raise NotImplementedError

    def layer_budget(self, length: int, layer: int, num_layers: int) -> int:
        """Entries kept per head in `layer` from a prompt of `length` tokens."""
        return self.n_kept(length)

    def scores(self, **inputs):
        """(scores [B, K, S], per-entry accumulators to store or None)."""
        if self.scorer is not self:
            return self.scorer.scores(**inputs)
        return self.score(**inputs), None

    def score(self, **inputs):
        raise NotImplementedError(f"{type(self).__name__} has no score")

    def select(self, scores, n_keep, cap):
        """Top `n_keep` [B, K] entries per head within a static capacity: (idx, keep)."""
        return select(scores, n_keep, cap)

    def fold(self, source: dict, keys, valid, idx, keep) -> dict:
        """The entries to gather from (Merging folds evicted values into kept ones)."""
        return source

    def storage(self, layout: str) -> str:
        """The layout this press's cache gets: "uniform", "layered" or "pooled"."""
        return "uniform"

    def head_capacity(self, n_kept: int, num_heads: int) -> int:
        """The most entries one head can hold when every head's budget is n_kept."""
        return n_kept

    def decode_target(self, target: int, n, num_heads: int, slots: int):
        """(entries kept per head [B, K], static capacity) of a decode-time compression to
        `target` entries per head."""
        return jnp.minimum(n, target), min(target, slots)

    # Stepwise decoding (decode_kind == "stepwise"): keep decode_budget() entries per head.
    def decode_budget(self) -> int | None:
        return None

    def step_scores(self, entries: dict, probs, position, valid):
        """(scores [B, K, C] of the entries after a decode step, entries): probs [B, K, G, 1, C]
        is the step's attention."""
        raise NotImplementedError(f"{type(self).__name__} does not evict while decoding")

    @classmethod
    def example(cls) -> Press:
        """A small instance for the registry's tests."""
        return cls()


@dataclasses.dataclass(frozen=True)
class ScorerPress(Press):
    """Base of the scoring presses: a budget (kvpress's compression_ratio, the fraction
    removed, or a token count per kv head) and the shared options:

    - gqa: how the query heads of a group vote for their kv head: "mean" (kvpress), "max", or
      "query_head" (each query head selects its own entries, original SnapKV; the cache then
      holds num_heads heads).
    - positions: "original" keeps every entry at its original RoPE position (kvpress);
      "cache" re-rotates keys to their rank in the cache (StreamingLLM's code, kvpress's
      KeyRerotationPress).
    """

    compression_ratio: float = 0.0
    _: dataclasses.KW_ONLY
    budget: int | None = None
    gqa: str = "mean"
    positions: str = "original"

    plain_selection = True
    compresses_while_decoding = True

    def __post_init__(self):
        name = type(self).__name__
        check_number(name, "compression_ratio", self.compression_ratio, 0.0, 1.0, hi_open=True)
        if self.budget is not None:
            check_int(name, "budget", self.budget, 1)
            if self.compression_ratio:
                raise ValueError(f"{name}: compression_ratio={self.compression_ratio} and budget="
                                 f"{self.budget} both set; give one (a ratio or a token count)")
        check_choice(name, "gqa", self.gqa, GQA)
        check_choice(name, "positions", self.positions, POSITIONS)

    def n_kept(self, length: int) -> int:
        """Entries kept per kv head from a prompt of `length` tokens (kvpress's rounding)."""
        if self.budget is not None:
            return min(self.budget, length)
        return max(1, int(length * (1 - self.compression_ratio)))

    @classmethod
    def example(cls) -> Press:
        return cls(0.5)


@dataclasses.dataclass(frozen=True)
class WrapperPress(Press):
    """A press around a scoring press (`press`), whose scores, budget and positions it uses
    and whose selection or storage it changes (AdaKV, Merging)."""

    press: Press

    def __post_init__(self):
        if not (isinstance(self.press, Press) and self.press.plain_selection
                and not self.press.per_layer_budget):
            raise ValueError(f"{type(self).__name__}.press={self.press!r}; expected a scoring "
                             f"policy (Knorm, SnapKV, TOVA, ObservedAttention, "
                             f"ExpectedAttention, StreamingLLM, ...)")

    @property
    def scorer(self) -> Press:
        return self.press

    @property
    def positions(self) -> str:
        return self.press.positions

    def n_kept(self, length: int) -> int:
        return self.press.n_kept(length)


# ------------------------------------------------------------------- shared scoring helpers

def finish(scores, valid, protect):
    """Scores with empty slots at -inf and protected entries at +inf."""
    return jnp.where(valid, jnp.where(protect, INF, scores), -INF)


def group(x, gqa: str):
    """[B, K, G, S] -> [B, K, S] by the press's GQA vote ("query_head": G is 1)."""
    return x.max(2) if gqa == "max" else x.mean(2)


def pool(x, kernel: int, kind: str):
    """1-D pooling along the last axis, 'same' length, zero padding counted (torch's
    avg_pool1d(padding=k//2) default)."""
    if kernel == 1:
        return x
    dims, strides = (1,) * (x.ndim - 1) + (kernel,), (1,) * x.ndim
    pad = ((0, 0),) * (x.ndim - 1) + ((kernel // 2, kernel // 2),)
    if kind == "max":
        return jax.lax.reduce_window(x, -INF, jax.lax.max, dims, strides, pad)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad) / kernel


def protect_recent(scores, pos, n_keep):
    """Where a head protects (+inf) more entries than it keeps, keep its most recent ones."""
    protected = jnp.isposinf(scores)
    over = protected.sum(-1) > n_keep
    recent = jnp.where(protected, pos.astype(f32), -INF)
    return jnp.where(over[..., None], recent, scores)


def select(scores, n_keep, cap):
    """Top `n_keep` [B, K] entries per head by scores [B, K, S] within a static capacity:
    (idx [B, K, cap] int32, keep [B, K, cap] bool), kept ones first and in slot order."""
    vals, idx = jax.lax.top_k(scores, cap)
    rank = jnp.arange(cap, dtype=jnp.int32).reshape(1, 1, cap)
    keep = (rank < n_keep[..., None]) & (vals > -INF)
    return compact(idx, keep)


def compact(idx, keep):
    """Kept picks first, in slot order: (idx, keep) sorted by slot with the unkept last."""
    key = jnp.where(keep, idx, jnp.iinfo(jnp.int32).max)
    order = jnp.argsort(key, axis=-1)
    return jnp.take_along_axis(idx, order, -1), jnp.take_along_axis(keep, order, -1)


class CacheFormat(Press):
    """Base of the presses that keep their own cache format (KIVI, Quest, DuoAttention): the
    model runs against a `lcm.cache.PolicyCache` whose layers are the press's states.

    `evict`: an eviction press applied before storing (KIVI after SnapKV), or None; `unrolled`:
    the layers' states differ in shape (they then run as a Python loop, not a scan).
    """

    owns_cache = True
    evict = None
    unrolled = False

    def check_model(self, cfg) -> None:
        """Raises ValueError if the press cannot run on the model `cfg`."""

    def prefill_attention(self, q, k, v, *, layer, cfg, chunk):
        """The prompt's attention in `layer` (q, k rotated): exact causal attention, as KIVI's
        and Quest's reference code prefill."""
        return attend(q, k, v, Causal(), impl=cfg.attention.impl, block_q=chunk, block_k=chunk)

    def prefill_state(self, k, v, lengths, *, capacity: int, layer):
        """One layer's state from the prompt's rotated keys and values [B, T, K, D]."""
        raise NotImplementedError

    def decode_layer(self, state, q, k, v, *, layer):
        """Appends k, v [B, K, D] and attends with q [B, 1, H, D]: (out, state)."""
        raise NotImplementedError
