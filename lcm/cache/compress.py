"""Policies run as `score -> select(static budget) -> apply`, at prefill or on a kept prefill.

`prefill(..., policy=p)` compresses each layer as soon as it is computed. To compare several
policies on one prompt without running it again, keep what they observe:

    logits, cache, obs = prefill_observed(params, tokens, cfg, [SnapKV(0.5), Knorm(0.5)])
    small = compress(cache, SnapKV(0.5), obs, cfg)   # equals prefill(..., policy=SnapKV(0.5))

Budgets are per row (from each row's real length, with kvpress's rounding, through a host
table) and per layer (PyramidKV) or per head (AdaKV) as traced counts under one static
capacity, the largest budget: heads holding fewer entries leave empty slots.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcm.cache import attention as cattn
from lcm.cache.kv import (KVCache, expand_heads, gather_entries, pad_capacity, rotate_heads,
                          window_entries)
from lcm.cache.layouts import check_layout, make_cache, pool_layer, storage
from lcm.cache.presses.base import Press, protect_recent
from lcm.config import ModelConfig
from lcm.model import rope_tables, scan_layers
from lcm.checks import check_int
from lcm.sharding.mesh import host_array

f32 = jnp.float32


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["q_win", "q_pos", "colsum", "q_mean", "q_cov"],
                   meta_fields=["n_sink"])
@dataclasses.dataclass(frozen=True)
class Observations:
    """What a prefill keeps for later compression, stacked over layers (None when not asked).

    q_win [L, B, W, H, D] rotated queries of each row's last W tokens, q_pos [L, B, W] their
    positions (-1 before the prompt); colsum [L, B, H, T] attention summed over all queries;
    q_mean [L, B, H, D] and q_cov [L, B, H, D, D] of the un-rotated queries from n_sink on.
    """

    q_win: jax.Array | None = None
    q_pos: jax.Array | None = None
    colsum: jax.Array | None = None
    q_mean: jax.Array | None = None
    q_cov: jax.Array | None = None
    n_sink: int | None = None


def cache_heads(policy, cfg: ModelConfig) -> int:
    """Heads of the cache `policy` leaves: num_heads for per-query-head selection."""
    return cfg.num_heads if policy is not None and policy.per_query_head else cfg.num_kv_heads


def is_prefill_press(policy) -> bool:
    """Whether `policy` can run at prefill (and compress a kept prefill unless it owns its
    cache format)."""
    return isinstance(policy, Press) and policy.runs_at_prefill


def check_policy(policy, cfg: ModelConfig, prompt_len: int):
    """Raises ValueError for anything but a prefill policy; returns it."""
    if not is_prefill_press(policy):
        raise ValueError(f"policy={policy!r}; expected a policy from lcm.cache (Knorm, "
                         f"StreamingLLM, SnapKV, PyramidKV, TOVA, ObservedAttention, "
                         f"ExpectedAttention, H2O, AdaKV, Merging, KIVI, Quest, "
                         f"DuoAttention, ...: lcm.cache.PRESSES) or None")
    if policy.owns_cache:  # KIVI, Quest, DuoAttention keep their own PolicyCache
        if cfg.sliding_window is not None:
            raise ValueError(f"{type(policy).__name__} needs a model without sliding_window "
                             f"(cfg.sliding_window={cfg.sliding_window})")
        kinds = {(k.type, k.rope is None) for k in cfg.layer_kinds}
        if kinds != {("full_attention", False)} or cfg.attn_softcap is not None or (
                cfg.attn_sinks):
            raise ValueError(f"{type(policy).__name__} needs full-attention layers with RoPE, "
                             f"no attn_softcap and no attn_sinks (cfg.layer_types="
                             f"{cfg.layer_types}, nope_layers={cfg.nope_layers}, attn_softcap="
                             f"{cfg.attn_softcap}, attn_sinks={cfg.attn_sinks})")
        policy.check_model(cfg)
    return policy


def observe_layer(policy, q, qr, kr, real, lengths, *, chunk, cfg, window=None, colsum=None,
                  sink=None):
    """One layer's observations for `policy` (or for the explicit window / colsum / sink)."""
    if policy is not None:
        window, colsum, sink = policy.needs()
    obs = {}
    if window:
        obs["q_win"], obs["q_pos"] = cattn.last_queries(qr, lengths, window)
    if colsum:
        obs["colsum"] = cattn.column_sums(qr, kr, real, chunk=chunk,
                                          sliding_window=cfg.sliding_window)
    if sink is not None:
        T = q.shape[1]
        use = real & (jnp.arange(T, dtype=jnp.int32)[None] >= sink)
        count = jnp.maximum(use.sum(-1), 1).astype(f32)[:, None, None]
        qf = jnp.where(use[:, :, None, None], q.astype(f32), 0.0)
        mean = qf.sum(1) / count
        centered = jnp.where(use[:, :, None, None], qf - mean[:, None], 0.0)
        obs["q_mean"] = mean
        obs["q_cov"] = jnp.einsum("bthi,bthj->bhij", centered, centered) / count[..., None]
    return obs


def budget_table(policy, length: int, num_layers: int) -> np.ndarray:
    """Entries kept per head for every real length 0..length: int32 [L, length + 1]."""
    scorer = policy.scorer
    rows = [[0] + [scorer.layer_budget(n, layer, num_layers) for n in range(1, length + 1)]
            for layer in range(num_layers)]
    return np.minimum(np.asarray(rows, np.int32), np.arange(length + 1, dtype=np.int32)[None])


def capacity(policy, length: int, num_layers: int, num_kv_heads: int, *,
             layout: str = "compact") -> int:
    """The static slots per head a policy needs for a prompt of `length` tokens (the cache's
    `capacity` before room for decoding): the largest budget; with layout="uniform", AdaKV's
    heads each get the most one head can win."""
    most = int(budget_table(policy, length, num_layers).max())
    if storage(policy, layout) == "uniform":  # a head may hold more than n_kept (AdaKV)
        most = min(length, policy.head_capacity(most, num_kv_heads))
    return max(most, 1)


def layer_slots(policy, kind: str, length: int, cfg: ModelConfig, room: int, full_rows: bool):
    """Per-layer capacities of a "layered" cache (None for other layouts): each layer's largest
    budget over the row lengths possible, just the prompt length's when `full_rows` (no row is
    padded), else any length up to it."""
    if kind != "layered":
        return None
    table = budget_table(policy, length, cfg.num_layers)
    if full_rows:
        table = table[:, -1:]
    return tuple(max(int(row.max()), 1) + room for row in table)


def all_full(lengths, length: int) -> bool:
    """Whether concrete row lengths (None: unpadded) all equal `length` (False when traced)."""
    if lengths is None:
        return True
    if isinstance(lengths, jax.core.Tracer):
        return False
    return bool(np.all(host_array(lengths) == length))


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """How a prefill stores layers of different kinds (see `window_plan`): which layers the
    press compresses, which keep only their sliding window, the one capacity every layer's
    entries are padded to before stacking, and each layer's slots when windows are kept."""

    press_all: bool  # the press compresses every layer (no layer is global)
    has_policy: bool
    keep_windows: bool  # sliding layers keep their window (a ring buffer), not every token
    capacity: int  # slots of every layer's entries before the room for decoding
    room: int  # free slots for decoding
    window_slots: tuple  # per layer: min(window, T + room) for kept windows, else None

    def pressed(self, kind) -> bool:
        return self.has_policy and (kind.window is None or self.press_all)

    def windowed(self, kind) -> bool:
        return self.keep_windows and kind.window is not None and not self.pressed(kind)

    def slots(self, slots, layout: str):
        """The cache's per-layer capacities: the press's (`layer_slots`), with kept windows in
        a "layered" cache when layout is "compact"; None for one capacity."""
        if layout != "compact" or not any(s is not None for s in self.window_slots):
            return slots
        base = slots or (self.capacity + self.room,) * len(self.window_slots)
        return tuple(b if w is None else w for b, w in zip(base, self.window_slots))


def presses_every_layer(cfg: ModelConfig) -> bool:
    """Whether a press compresses every layer: the model has no global layer (Mistral: one
    window for every layer), as kvpress does; otherwise presses skip the sliding layers."""
    return all(k.window is not None for k in cfg.layer_kinds)


def window_plan(cfg: ModelConfig, policy, length: int, room: int, *, windows: bool = True):
    """The WindowPlan of a prefill of `length` tokens with `room` free slots.

    A press compresses the global (full-attention) layers; sliding layers keep the last
    `window` entries, in `window` slots that decoding fills as a ring buffer (their bytes do not
    grow with context). A model without global layers (Mistral: one window for every layer)
    has its press compress every layer, as kvpress does. windows=False keeps every token of
    every unpressed layer (the uncompressed cache `prefill_observed` returns).
    """
    kinds = cfg.layer_kinds
    press_all = presses_every_layer(cfg)
    has_policy = policy is not None
    heads = cfg.num_heads if has_policy and policy.per_query_head else cfg.num_kv_heads
    press_cap = (min(capacity(policy, length, cfg.num_layers, heads, layout="uniform"), length)
                 if has_policy else length)
    keep = windows and (not has_policy or not press_all)
    sizes, slots = [], []
    for k in kinds:
        pressed = has_policy and (k.window is None or press_all)
        if pressed or k.window is None or not keep:
            sizes.append(press_cap if pressed else length)
            slots.append(None)
        else:
            sizes.append(min(k.window, length))
            slots.append(min(k.window, length + room))
    if keep and all(s is None for s in slots):
        keep = False
    return WindowPlan(press_all=press_all, has_policy=has_policy, keep_windows=keep,
                      capacity=max(sizes), room=room, window_slots=tuple(slots))


def check_windows(policy, cfg: ModelConfig, length: int, room, layout: str) -> None:
    """ValueError when `policy`'s compact layout cannot hold the sliding layers' windows."""
    if storage(policy, layout) == "pooled" and window_plan(cfg, policy, length,
                                                           room).keep_windows:
        raise ValueError(f"{type(policy).__name__} pools its heads' entries per layer "
                         f"(layout='compact'), which the sliding layers' windows do not fit; "
                         f"pass layout='uniform'")


def store_layer(policy, entries, kind: str, *, room: int, length: int, cfg: ModelConfig):
    """One compressed layer as its layout stores it, with `room` free slots per head for
    decoding (pooled: a pool of heads * (budget + room) slots)."""
    if kind == "pooled":
        kept = capacity(policy, length, cfg.num_layers, entries["pos"].shape[1])
        return pool_layer(entries, kept, room)
    return pad_capacity(entries, entries["pos"].shape[-1] + room)


def compress_layer(policy, entries, obs, *, layer, cfg, inv_freq, factor, score_keys=None,
                   next_pos=None, target=None):
    """Compresses one layer's entries {k, v, pos, length[, score]} [B, K, S, ...] with
    `policy`; returns entries with the policy's static capacity.

    score_keys: keys rotated at their original positions (default entries["k"]); next_pos [B]
    (default the head lengths): where decoding continues. target: a fixed per-head budget
    (decode-time compression) instead of the policy's own.
    """
    B, K, Sn = entries["pos"].shape
    keys = entries["k"] if score_keys is None else score_keys
    valid = jnp.arange(Sn, dtype=jnp.int32).reshape(1, 1, Sn) < entries["length"][..., None]
    n = entries["length"]
    inputs = dict(keys=keys, v=entries["v"], pos=entries["pos"], valid=valid, n=n, obs=obs,
                  inv_freq=inv_freq, factor=factor, sliding_window=cfg.sliding_window,
                  next_pos=n[:, 0] if next_pos is None else next_pos)
    if target is not None:
        n_keep, cap = policy.decode_target(target, n, K, Sn)
    else:
        table = jnp.asarray(budget_table(policy, Sn, cfg.num_layers))
        n_keep = table[layer][n]
        cap = min(capacity(policy, Sn, cfg.num_layers, K, layout="uniform"), Sn)
    scores, accumulated = policy.scores(**inputs)
    scores = protect_recent(scores, entries["pos"], n_keep)
    idx, keep = policy.select(scores, n_keep, cap)
    source = dict(entries)
    if accumulated is not None:
        source["score"] = accumulated
    source = policy.fold(source, keys, valid, idx, keep)
    out = gather_entries(source, idx, keep)
    if "score" in entries and "score" not in out:
        out["score"] = jnp.zeros(out["pos"].shape, f32)
    return out


# ------------------------------------------------------------------ compressing a kept prefill

def observations_for(policies):
    """(window, colsum, n_sink) covering every policy in `policies`."""
    window, colsum, sinks = 0, False, set()
    for p in policies:
        w, c, s = p.needs()
        window, colsum = max(window, w), colsum or c
        if s is not None:
            sinks.add(s)
    if len(sinks) > 1:
        raise ValueError(f"policies use ExpectedAttention with different n_sink {sorted(sinks)};"
                         f" observe them in separate prefills")
    return window, colsum, (sinks.pop() if sinks else None)


def compress(cache: KVCache, policy, observations: Observations, cfg: ModelConfig, *,
             max_new_tokens: int = 0, layout: str = "compact"):
    """Compresses a full prefill cache (from `prefill_observed`) with `policy`.

    Gives what `prefill(..., policy=policy, max_new_tokens=max_new_tokens, layout=layout)`
    gives, without running the prompt again; the cache and observations are left unchanged,
    so several policies can compress one prefill.
    """
    check_layout(layout)
    check_policy(policy, cfg, cache.capacity)
    check_windows(policy, cfg, cache.capacity, max_new_tokens, layout)
    if not isinstance(cache, KVCache) or cache.rotation != "original" or (
            cache.score is not None) or cache.layout != "uniform":
        raise ValueError("cache: expected the uncompressed KVCache of prefill_observed")
    if not isinstance(cache.length, jax.core.Tracer) and cache.length.is_fully_addressable:
        held, next_pos = host_array(cache.length), host_array(cache.next_pos)
        if (held != next_pos[None, :, None]).any():
            raise ValueError(f"cache holds {held.min()} to {held.max()} entries per head for "
                             f"prompts of {next_pos.tolist()} tokens: it is already compressed; "
                             f"compress takes the uncompressed cache of prefill_observed (keep "
                             f"it, and compress it once per policy)")
    if not isinstance(observations, Observations):
        raise ValueError(f"observations={type(observations).__name__}; expected the "
                         f"Observations of prefill_observed")
    if policy.owns_cache:
        raise ValueError(f"policy={policy!r} keeps its own cache format; compress takes "
                         f"eviction policies (run prefill(..., policy=...) instead)")
    window, colsum, sink = policy.needs()
    have_w = 0 if observations.q_win is None else observations.q_win.shape[2]
    if window > have_w or (colsum and observations.colsum is None) or (
            sink is not None and (observations.q_mean is None or sink != observations.n_sink)):
        raise ValueError(f"observations lack what {type(policy.scorer).__name__} needs "
                         f"(window {window}, attention sums {colsum}, moments from {sink}); "
                         f"pass the policy to prefill_observed")
    check_int(None, "max_new_tokens", max_new_tokens, 0)
    return compress_jit(cache, policy, observations, cfg=cfg, room=int(max_new_tokens),
                        layout=layout, full_rows=all_full(cache.next_pos, cache.capacity))


def to_rotation(entries, rotation, inv_freq, factor):
    """Entries whose keys are rotated at their original positions, re-expressed for `rotation`:
    "cache" stores them un-rotated (attention rotates them by rank)."""
    if rotation == "original":
        return entries
    k = rotate_heads(entries["k"], -jnp.maximum(entries["pos"], 0), inv_freq, 1.0 / factor)
    return dict(entries, k=jnp.where((entries["pos"] >= 0)[..., None], k, 0).astype(
        entries["k"].dtype))


def keep_layer(policy, plan: WindowPlan, entries, obs, *, kind, index, cfg: ModelConfig,
               inv_freq, factor, lengths, length: int, room: int, storage_kind: str):
    """One layer's stored entries after a prefill of `length` tokens: compressed by `policy`
    when the plan presses this layer kind, its window when it keeps windows, else every entry;
    padded to the plan's capacity and stored as `storage_kind` with `room` free slots.
    entries: the layer's uncompressed entries (`prompt_entries`); lengths [B]: the prompts'."""
    if policy is not None and policy.per_query_head:
        entries = expand_heads(entries, cfg.group_size)
    if plan.pressed(kind):
        entries = compress_layer(policy, entries, obs, layer=index, cfg=cfg.layer_config(kind),
                                 inv_freq=inv_freq, factor=factor, next_pos=lengths)
    elif plan.windowed(kind):  # a sliding layer keeps its window
        entries = window_entries(entries, lengths, min(kind.window, length))
        if policy is not None and policy.accumulates_scores:
            entries["score"] = jnp.zeros(entries["pos"].shape, f32)
    entries = pad_capacity(entries, plan.capacity)
    if policy is not None:
        entries = to_rotation(entries, policy.positions, inv_freq, factor)
    return store_layer(policy, entries, storage_kind, room=room, length=length, cfg=cfg)


@functools.partial(jax.jit, static_argnames=("policy", "cfg", "room", "layout", "full_rows"))
def compress_jit(cache, policy, observations, *, cfg, room, layout, full_rows):
    """`compress` traced (also inside chunked prefill)."""
    tables = rope_tables(cfg, jnp.max(cache.next_pos))
    obs_all = {name: getattr(observations, name) for name in
               ("q_win", "q_pos", "colsum", "q_mean", "q_cov")
               if getattr(observations, name) is not None}
    kind, T = storage(policy, layout), cache.capacity
    plan = window_plan(cfg, policy, T, room)

    def layer(_, xs, index, layer_kind):
        entries, obs = xs
        inv_freq, factor = tables[layer_kind.rope]
        return None, keep_layer(policy, plan, entries, obs, kind=layer_kind, index=index,
                                cfg=cfg, inv_freq=inv_freq, factor=factor,
                                lengths=cache.next_pos, length=T, room=room, storage_kind=kind)

    layers = {"k": cache.k, "v": cache.v, "pos": cache.pos, "length": cache.length}
    _, out = scan_layers(layer, (layers, obs_all), None, cfg.layer_kinds)
    return make_cache(out, next_pos=cache.next_pos, step=cache.step, rotation=policy.positions,
                      slots=plan.slots(layer_slots(policy, kind, T, cfg, room, full_rows),
                                       layout))
