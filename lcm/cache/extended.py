"""KV-cache decoding for position transforms: Self-Extend, ReRoPE and leaky ReRoPE.

    logits, cache = prefill(params, tokens, cfg, lengths=lengths, max_new_tokens=16)
    logits, cache = decode_step(params, cache, next_tokens, cfg)
    tokens, num_generated = generate(params, cfg, prompts, lengths=lengths, max_new_tokens=32)

`lcm.cache.prefill` caches keys rotated at their positions, which only plain RoPE allows: these
methods score each query-key pair with one of two rotations chosen by their distance, so no
single rotation of a key serves every later query. `ExtendedCache` therefore keeps keys
un-rotated, slot n holding position n, and every decode step rotates the query and the keys for
both of the method's position schemes (`lcm.cache.extended_attention`), one softmax over the
two, as `lcm.model.forward` does; O(cache) per step. Prefill runs the model's own two-pass
attention over the prompt. Everything is jitted with static shapes, layers under `lax.scan`;
arguments are checked before tracing. Prompts are right-padded with real lengths, and each row
continues at its own position, so a batch gives what each prompt gives alone. No eviction
policies: every token stays (use `cfg.positions.type="rope"` and `lcm.cache` for those).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcm.attention import Causal, Local
from lcm.cache.extended_attention import SUPPORTED, decode_attention, step_tables
from lcm.cache.generate import check_sampling, sampling_loop
from lcm.cache.checks import check_chunk, check_count, check_prompt_lengths, check_tokens
from lcm.config import ModelConfig, PositionConfig
from lcm.model import check_params, check_token_ids, embed, run_layers, unembed
from lcm.positions import position_attention, rope_frequencies


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "pos", "next_pos"], meta_fields=["position"])
@dataclasses.dataclass(frozen=True)
class ExtendedCache:
    """Un-rotated keys and values of every token, for Self-Extend / ReRoPE decoding::

        k, v      [L, B, K, C, D]  un-rotated keys and values (compute dtype); slot n holds
                                   position n, zeros in empty slots
        pos       [B, C]           int32 position of each slot's entry, -1 where empty
        next_pos  [B]              int32 position (and slot) of each row's next token
        position  PositionConfig   the method the cache was filled under (static)

    Capacity C is static (prompt length + max_new_tokens); `decode_step` raises when a row's
    next position reaches it.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    next_pos: jax.Array
    position: PositionConfig

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        """Static slots per row."""
        return self.k.shape[3]

    def nbytes(self) -> int:
        """Bytes held by the arrays of the cache."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def replace(self, **changes) -> ExtendedCache:
        return dataclasses.replace(self, **changes)


def prefill(params, tokens, cfg: ModelConfig, *, lengths=None, chunk_size=None,
            max_new_tokens: int = 0, all_logits: bool = False):
    """Runs the prompts and returns `(logits, ExtendedCache)`.

    tokens [B, T] int (right-padded); lengths [B] int real lengths (default T). chunk_size: the
    blocks of the two-pass attention (default `cfg.attention.block_q`); no [T, T] matrix is
    built. max_new_tokens: free slots for decoding. Returns logits float32 [B, vocab] at each
    row's last real token ([B, T, vocab] with all_logits=True) and a cache of capacity
    T + max_new_tokens.
    """
    lengths = _check_prompt(tokens, cfg, lengths, params)
    chunk = check_chunk(chunk_size, cfg)
    check_count("max_new_tokens", max_new_tokens, minimum=0)
    return _prefill(params, tokens, lengths, cfg=cfg, chunk=chunk, room=int(max_new_tokens),
                    all_logits=bool(all_logits))


def decode_step(params, cache: ExtendedCache, tokens, cfg: ModelConfig):
    """Feeds one token per row: tokens [B] int -> (logits float32 [B, vocab], cache).

    The token sits at `cache.next_pos`; its key and value are written to that slot.
    """
    _check_model(cfg)
    if not isinstance(cache, ExtendedCache):
        raise ValueError(f"cache={type(cache).__name__}; expected an ExtendedCache from "
                         f"lcm.cache.extended.prefill")
    if cache.position != cfg.positions:
        raise ValueError(f"cfg.positions={cfg.positions} but the cache was filled under "
                         f"{cache.position}; decode with the cfg that ran prefill")
    expected = (cfg.num_layers, cache.next_pos.shape[0], cfg.num_kv_heads, cache.capacity,
                cfg.head_dim)
    if cache.k.shape != expected:
        raise ValueError(f"cache k shape {cache.k.shape} does not fit cfg; expected "
                         f"[num_layers, batch, num_kv_heads, capacity, head_dim] = {expected}")
    tokens = check_tokens(tokens, cache.next_pos)
    if not isinstance(cache.next_pos, jax.core.Tracer):
        top = int(np.max(np.asarray(cache.next_pos)))
        if top >= cache.capacity:
            raise ValueError(f"cache is full: next position {top} >= capacity "
                             f"{cache.capacity}; prefill with a larger max_new_tokens")
    return _decode_step(params, cache, tokens, cfg=cfg)


def generate(params, cfg: ModelConfig, prompts, *, lengths=None, max_new_tokens: int,
             policy=None, stop_tokens=(), temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, key=None, chunk_size: int | None = None,
             decode_policy=None, pad_token: int = 0):
    """Continues each prompt: `(tokens int32 [B, max_new_tokens], num_generated int32 [B])`.

    The signature and semantics of `lcm.cache.generate` (so it serves as the evaluation loop's
    `generate_fn`): prompts [B, T] int, right-padded, with lengths [B] (default T); a row stops
    after emitting one of `stop_tokens` (kept and counted), its later slots hold `pad_token`;
    temperature 0 is greedy, otherwise sampling restricted by top_k / top_p with `key`.
    `policy` and `decode_policy` must be None: this cache keeps every token.
    """
    for name, value in (("policy", policy), ("decode_policy", decode_policy)):
        if value is not None:
            raise ValueError(f"{name}={value!r}: lcm.cache.extended keeps every token and takes "
                             f"no cache policy; eviction policies run on plain RoPE "
                             f"(cfg.positions.type='rope') through lcm.cache.generate")
    lengths = _check_prompt(prompts, cfg, lengths, params)
    chunk = check_chunk(chunk_size, cfg)
    check_count("max_new_tokens", max_new_tokens, minimum=1)
    stop = check_sampling(cfg, stop_tokens, temperature, top_k, top_p, key, pad_token)
    if key is None:
        key = jax.random.key(0)  # unused when greedy
    return _generate(params, prompts, lengths, key, cfg=cfg, chunk=chunk,
                     max_new_tokens=int(max_new_tokens), stop=stop,
                     temperature=float(temperature), top_k=top_k,
                     top_p=None if top_p is None else float(top_p), pad_token=int(pad_token))


# ---------------------------------------------------------------------------- implementations

@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "room", "all_logits"))
def _prefill(params, tokens, lengths, *, cfg, chunk, room, all_logits):
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    real = positions < lengths[:, None]
    # Length-dependent RoPE (dynamic, longrope) sees the longest prompt, as lcm.cache.prefill.
    inv_freq, factor = rope_frequencies(cfg.rope, cfg.head_dim, jnp.max(lengths))
    mask = Causal() if cfg.sliding_window is None else Local(cfg.sliding_window)
    x = embed(params, tokens, cfg)

    def store(y):  # [B, T, K, D] -> [B, K, T + room, D], zeros at padding and free slots
        y = jnp.where(real[:, :, None, None], y, 0).astype(y.dtype).transpose(0, 2, 1, 3)
        return jnp.pad(y, ((0, 0), (0, 0), (0, room), (0, 0)))

    def attention(inputs, xs, carry):
        out = position_attention(inputs.q, inputs.k, inputs.v, positions=positions,
                                 inv_freq=inv_freq, attention_factor=factor, mask=mask,
                                 position=cfg.positions, impl=cfg.attention.impl,
                                 block_q=chunk, block_k=chunk)
        return out, (store(inputs.k), store(inputs.v)), carry

    x, (k, v), _ = run_layers(x, params["layers"], cfg, attention)
    if all_logits:
        logits = unembed(params, x, cfg)
    else:
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
        logits = unembed(params, last, cfg)[:, 0]
    slots = jnp.arange(T + room, dtype=jnp.int32)[None]
    pos = jnp.where(slots < lengths[:, None], slots, -1)
    return logits, ExtendedCache(k=k, v=v, pos=pos, next_pos=lengths, position=cfg.positions)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _decode_step(params, cache, tokens, *, cfg):
    position = cache.next_pos
    inv_freq, factor = rope_frequencies(cfg.rope, cfg.head_dim, jnp.max(position) + 1)
    tables = step_tables(cache.pos, position, inv_freq=inv_freq, factor=factor,
                         position=cfg.positions, sliding_window=cfg.sliding_window)
    x = embed(params, tokens[:, None], cfg)

    def attention(inputs, xs, carry):
        k_cache, v_cache = xs
        k, v = inputs.k[:, 0], inputs.v[:, 0]  # [B, K, D]
        out = decode_attention(inputs.q, k, v, k_cache, v_cache, tables,
                               position=cfg.positions)
        return out, (k, v), carry

    # The cache is only read inside the scan; the new entries are written after it, one
    # scatter per array, so a decode loop updates the cache in place.
    x, (k_new, v_new), _ = run_layers(x, params["layers"], cfg, attention,
                                      xs=(cache.k, cache.v))
    logits = unembed(params, x, cfg)[:, 0]
    rows = jnp.arange(position.shape[0])

    def write(store, new):  # new [L, B, K, D] into slot `position` of each row
        return store.at[:, rows, :, position].set(new.transpose(1, 0, 2, 3).astype(store.dtype))

    return logits, cache.replace(k=write(cache.k, k_new), v=write(cache.v, v_new),
                                 pos=cache.pos.at[rows, position].set(position),
                                 next_pos=position + 1)


@functools.partial(jax.jit, static_argnames=(
    "cfg", "chunk", "max_new_tokens", "stop", "temperature", "top_k", "top_p", "pad_token"))
def _generate(params, prompts, lengths, key, *, cfg, chunk, max_new_tokens, stop, temperature,
              top_k, top_p, pad_token):
    # The last token is returned, never fed back: max_new_tokens - 1 free slots suffice.
    logits, cache = _prefill(params, prompts, lengths, cfg=cfg, chunk=chunk,
                             room=max_new_tokens - 1, all_logits=False)
    step = functools.partial(_decode_step, params, cfg=cfg)
    return sampling_loop(step, cache, logits, key, max_new_tokens=max_new_tokens, stop=stop,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         pad_token=pad_token)


# ---------------------------------------------------------------------------- argument checks

def _check_model(cfg):
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg={type(cfg).__name__}; expected a ModelConfig")
    kind = cfg.positions.type
    if kind not in SUPPORTED:
        hint = (" use lcm.cache.prefill / decode_step / generate, whose cache holds keys "
                "rotated at their positions" if kind == "rope" else "")
        raise ValueError(f"cfg.positions.type={kind!r}; lcm.cache.extended serves "
                         f"{list(SUPPORTED)};{hint or ' other types have no KV-cache path'}")


def _check_prompt(tokens, cfg, lengths, params):
    """Validates cfg for this cache, params against it, tokens [B, T] and lengths [B]; returns
    lengths as int32."""
    _check_model(cfg)
    check_params(params, cfg)
    lengths = check_prompt_lengths(tokens, lengths)
    check_token_ids(tokens, cfg.vocab_size, lengths=lengths)
    return lengths
