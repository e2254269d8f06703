"""`generate`: prefill, then decode one token per row until max_new_tokens or a stop token.

Greedy at temperature 0, otherwise sampling with temperature, top-k and top-p (nucleus). The
decode loop is a `lax.while_loop` that ends when every row has stopped, inside one jitted
program with static shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcm.cache.checks import check_chunk, check_count, check_prompt
from lcm.checks import is_int
from lcm.cache.compress import all_full, cache_heads, capacity, check_policy
from lcm.cache.decoding import (check_decode_policy, check_decode_press, decode_room,
                                with_query_buffer)
from lcm.cache.formats import owns_cache
from lcm.cache.prefill import decode_step_jit, prefill_jit
from lcm.cache.speculative import Speculative, sampling_logits, speculative_loop
from lcm.config import ModelConfig


def generate(params, cfg: ModelConfig, prompts, *, lengths=None, max_new_tokens: int,
             policy=None, stop_tokens=(), temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, key=None, chunk_size: int | None = None,
             decode_policy=None, pad_token: int = 0, speculative: Speculative | None = None,
             return_stats: bool = False):
    """Continues each prompt: `(tokens int32 [B, max_new_tokens], num_generated int32 [B])`.

    prompts [B, T] int, right-padded, with lengths [B] (default T). policy compresses the
    prompt's cache at prefill (`lcm.cache.SnapKV(0.5)`, ...); decode_policy keeps it within a
    budget while decoding (`lcm.cache.Decoding`, `H2O`, ...). A row stops after emitting one of
    `stop_tokens` (which is kept and counted); its later slots hold `pad_token`.
    temperature 0 is greedy (argmax); otherwise logits / temperature are sampled, restricted to
    the top_k most likely tokens and to the smallest set whose probability reaches top_p; `key`
    (a jax PRNG key) is then required. chunk_size: prefill's attention block.

    speculative: `lcm.cache.Speculative(draft=press, gamma=k)` decodes self-speculatively (the
    model drafts k tokens over the cache `draft` compresses, then verifies them with its full
    cache in one `extend`; `lcm.cache.speculative`): greedy output is plain greedy decoding's,
    sampling follows the same distribution. It replaces `policy` and `decode_policy`.
    return_stats=True (with speculative) adds a third output: {"rounds": [], "drafted": [B],
    "accepted": [B]}, the verification rounds and the drafts proposed / accepted per row.
    """
    checked = check_prompt(prompts, cfg, lengths, params=params)
    full_rows = all_full(lengths, prompts.shape[1])
    lengths = checked
    chunk = check_chunk(chunk_size, cfg)
    check_count("max_new_tokens", max_new_tokens, minimum=1)
    stop = check_sampling(cfg, stop_tokens, temperature, top_k, top_p, key, pad_token)
    if policy is not None:
        check_policy(policy, cfg, prompts.shape[1])
    room = max_new_tokens - 1  # the last token is returned, never fed back
    if decode_policy is not None and owns_cache(policy):
        raise ValueError(f"decode_policy={decode_policy!r} needs a KVCache; policy="
                         f"{type(policy).__name__} keeps its own cache format")
    if decode_policy is not None:
        check_decode_press(decode_policy)
        kept = (prompts.shape[1] if policy is None else
                capacity(policy, prompts.shape[1], cfg.num_layers, cache_heads(policy, cfg),
                         layout="uniform"))
        heads = cfg.num_heads if decode_policy.per_query_head else cache_heads(policy, cfg)
        room = decode_room(decode_policy, policy, kept, max_new_tokens, heads)
    if speculative is not None or return_stats:
        if not isinstance(speculative, Speculative):
            raise ValueError(f"speculative={speculative!r}; expected lcm.cache.Speculative("
                             f"draft=press, gamma=k) (return_stats needs it)")
        if policy is not None or decode_policy is not None:
            raise ValueError(f"speculative decoding keeps the full cache and drafts from "
                             f"speculative.draft; policy={policy!r} and decode_policy="
                             f"{decode_policy!r} must be None")
        check_policy(speculative.draft, cfg, prompts.shape[1])
    if key is None:
        key = jax.random.key(0)  # unused when greedy
    out = _generate(params, prompts, lengths, key, cfg=cfg, policy=policy,
                    decode_policy=decode_policy, chunk=chunk, room=room,
                    max_new_tokens=int(max_new_tokens), stop=stop,
                    temperature=float(temperature),
                    top_k=None if top_k is None else int(top_k),
                    top_p=None if top_p is None else float(top_p), pad_token=int(pad_token),
                    full_rows=full_rows, speculative=speculative)
    return out if return_stats else out[:2]


@functools.partial(jax.jit, static_argnames=(
    "cfg", "policy", "decode_policy", "chunk", "room", "max_new_tokens", "stop", "temperature",
    "top_k", "top_p", "pad_token", "full_rows", "speculative"))
def _generate(params, prompts, lengths, key, *, cfg, policy, decode_policy, chunk, room,
              max_new_tokens, stop, temperature, top_k, top_p, pad_token, full_rows,
              speculative=None):
    if speculative is not None:
        return speculative_loop(params, prompts, lengths, key, cfg=cfg, speculative=speculative,
                                chunk=chunk, max_new_tokens=max_new_tokens, stop=stop,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                pad_token=pad_token, full_rows=full_rows)
    # Decode-time policies compress every head to one capacity: the uniform layout.
    logits, cache = prefill_jit(params, prompts, lengths, cfg=cfg, policy=policy, chunk=chunk,
                             room=room, all_logits=False,
                             layout="compact" if decode_policy is None else "uniform",
                             full_rows=full_rows)
    if decode_policy is not None:
        if decode_policy.accumulates_scores and cache.score is None:
            cache = cache.replace(score=jnp.zeros(cache.pos.shape, jnp.float32))
        cache = with_query_buffer(cache, decode_policy, cfg)
        check_decode_policy(decode_policy, cache)  # at trace time: shapes and options only
    step = functools.partial(decode_step_jit, params, cfg=cfg, policy=decode_policy)
    return sampling_loop(step, cache, logits, key, max_new_tokens=max_new_tokens, stop=stop,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         pad_token=pad_token)


def sampling_loop(step, cache, logits, key, *, max_new_tokens: int, stop: tuple,
                  temperature: float, top_k, top_p, pad_token: int):
    """The decode loop shared by the generate functions, traced inside their jit:
    `(tokens int32 [B, max_new_tokens], num_generated int32 [B])`.

    logits [B, V]: the prefill's last-token logits; step(cache, tokens [B]) -> (logits,
    cache) decodes one token per row. A `lax.while_loop` samples until every row has emitted
    a stop token (kept and counted) or max_new_tokens; later slots hold pad_token.
    """
    B = logits.shape[0]
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    stop_ids = jnp.asarray(stop if stop else (-1,), jnp.int32)

    key, sub = jax.random.split(key)
    token = sample(logits, sub)
    out = jnp.full((B, max_new_tokens), pad_token, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, stop_ids)
    count = jnp.ones((B,), jnp.int32)

    def cond(state):
        i, _, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, token, out, done, count, key = state
        logits, cache = step(cache, token)
        key, sub = jax.random.split(key)
        token = jnp.where(done, pad_token, sample(logits, sub))
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_ids)
        return i + 1, cache, token, out, done, count, key

    state = (jnp.ones((), jnp.int32), cache, token, out, done, count, key)
    _, _, _, out, _, count, _ = jax.lax.while_loop(cond, body, state)
    return out, count


def sample_logits(logits, key, *, temperature: float, top_k=None, top_p=None):
    """Next tokens int32 [B] from logits [B, V]: argmax at temperature 0, else a sample of
    softmax(logits / temperature) restricted to the top_k tokens and the top_p nucleus."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = sampling_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_sampling(cfg, stop_tokens, temperature, top_k, top_p, key, pad_token):
    if isinstance(stop_tokens, (int, np.integer)):
        stop_tokens = (stop_tokens,)
    try:
        stop = tuple(int(t) for t in stop_tokens)
    except (TypeError, ValueError):
        raise ValueError(f"stop_tokens={stop_tokens!r}; expected a sequence of token ids") from None
    if any(not 0 <= t < cfg.vocab_size for t in stop):
        raise ValueError(f"stop_tokens={stop}; expected ids in [0, vocab_size={cfg.vocab_size})")
    if (isinstance(temperature, (bool, np.bool_))
            or not isinstance(temperature, (int, float, np.integer, np.floating))
            or not 0 <= temperature < float("inf")):
        raise ValueError(f"temperature={temperature!r}; expected a finite float >= 0 "
                         f"(0 is greedy)")
    if top_k is not None and (not is_int(top_k) or not 1 <= top_k <= cfg.vocab_size):
        raise ValueError(f"top_k={top_k!r}; expected None or an int in [1, {cfg.vocab_size}]")
    if top_p is not None and (isinstance(top_p, (bool, np.bool_))
                              or not isinstance(top_p, (int, float, np.integer, np.floating))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}; expected None or a float in (0, 1]")
    if temperature > 0 and key is None:
        raise ValueError("key=None; sampling (temperature > 0) needs a jax.random key")
    if not isinstance(pad_token, (int, np.integer)) or isinstance(pad_token, bool):
        raise ValueError(f"pad_token={pad_token!r}; expected an int")
    return stop
