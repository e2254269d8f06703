"""Generation for the evaluation loop.

`default_generate_fn(cfg)` is the KV-cache generator for the model (`lcm.cache.generate`, or
`lcm.cache.extended.generate` for Self-Extend / ReRoPE); `greedy_generate` is a forward-only
reference. Each has the signature the loop calls:

    generate_fn(params, cfg, prompts, *, lengths, max_new_tokens, policy=None, stop_tokens=(),
                temperature=0.0) -> (tokens int32 [B, max_new_tokens], num_generated int32 [B])

prompts [B, T] are right-padded with real lengths [B]; a row stops after one of `stop_tokens`
(kept and counted) or after max_new_tokens. `shared_prefill_generate` gives the same tokens for
several cache policies from one prefill (`lcm.cache.prefill_observed` + `compress`), decoding
each compressed cache with `generate_from_cache`.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcm.checks import is_int
from lcm.config import ModelConfig
from lcm.model import forward


def greedy_generate(params, cfg: ModelConfig, prompts, *, lengths, max_new_tokens: int,
                    policy=None, stop_tokens=(), temperature: float = 0.0, pad_token: int = 0):
    """Greedy decoding by recomputing the whole forward pass for every new token.

    Static shapes (one buffer [B, T + max_new_tokens]) under one jit; the causal mask keeps the
    buffer's not-yet-written slots from influencing earlier positions. O(max_new_tokens) full
    forwards, and it materialises logits [B, T + max_new_tokens, vocab]: a reference for tests
    and small models, not for long prompts (use `default_generate_fn(cfg)`).
    """
    if policy is not None:
        raise ValueError(f"policy={policy!r}: the forward-only fallback keeps no cache; cache "
                         f"policies need lcm.cache.generate")
    if temperature != 0.0:
        raise ValueError(f"temperature={temperature!r}: the forward-only fallback is greedy "
                         f"(temperature=0.0)")
    _check_budget(max_new_tokens)
    prompts = jnp.asarray(prompts, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if prompts.ndim != 2 or lengths.shape != prompts.shape[:1]:
        raise ValueError(f"prompts {prompts.shape} and lengths {lengths.shape}; expected "
                         f"[batch, seq] and [batch]")
    stop = tuple(sorted({int(t) for t in stop_tokens}))
    return _greedy(params, prompts, lengths, cfg=cfg, max_new_tokens=max_new_tokens, stop=stop,
                   pad_token=int(pad_token))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "stop", "pad_token"))
def _greedy(params, prompts, lengths, *, cfg, max_new_tokens, stop, pad_token):
    B, T = prompts.shape
    rows = jnp.arange(B)
    buf = jnp.concatenate([prompts, jnp.full((B, max_new_tokens), pad_token, jnp.int32)], 1)
    out = jnp.full((B, max_new_tokens), pad_token, jnp.int32)
    stop_ids = jnp.asarray(stop if stop else (-1,), jnp.int32)

    def body(carry):
        i, buf, out, done, count = carry
        logits = forward(params, buf, cfg)
        token = jnp.argmax(logits[rows, lengths + i - 1], axis=-1).astype(jnp.int32)
        token = jnp.where(done, pad_token, token)
        out = out.at[:, i].set(token)
        buf = buf.at[rows, lengths + i].set(token)
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_ids)
        return i + 1, buf, out, done, count

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    init = (jnp.int32(0), buf, out, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))
    _, _, out, _, count = jax.lax.while_loop(cond, body, init)
    return out, count


def default_generate_fn(cfg: ModelConfig | None = None):
    """The KV-cache generator for `cfg`: `lcm.cache.generate` for RoPE models; for Self-Extend
    and ReRoPE models `lcm.cache.extended.generate` when that module exists, else
    `greedy_generate` (forward-only, no cache). With cfg None: `lcm.cache.generate`."""
    if cfg is not None and cfg.positions.type != "rope":
        try:
            from lcm.cache.extended import generate as extended
        except ImportError:
            return greedy_generate
        return extended
    from lcm.cache import generate
    return generate


def shares_prefill(policy) -> bool:
    """Whether `policy` can compress a kept prefill (`lcm.cache.compress`): None (the full
    cache) and the eviction policies; KIVI, Quest and DuoAttention keep their own format."""
    from lcm.cache import is_prefill_press
    return policy is None or (is_prefill_press(policy) and not policy.owns_cache)


def shared_prefill_generate(params, cfg: ModelConfig, prompts, *, lengths, max_new_tokens: int,
                            policies, stop_tokens=(), pad_token: int = 0, timings=None):
    """Greedy continuations of one batch under several cache policies from ONE prefill:
    `[(tokens int32 [B, max_new_tokens], num_generated int32 [B]) per policy]`.

    `lcm.cache.prefill_observed` runs the prompts once; each policy's cache is
    `lcm.cache.compress(cache, policy, observations, cfg)` (None keeps every entry) with room for
    the generated tokens, and decoding continues from it (`generate_from_cache`). Each result
    equals `lcm.cache.generate(..., policy=policy)` at temperature 0. Every policy must pass
    `shares_prefill`. timings: a dict to which the wall and process CPU seconds of the prefill
    ("prefill_s", "prefill_cpu_s") and of each policy's compression + decoding ("decode_s",
    "decode_cpu_s": lists in policy order) are added; the prefill is waited for, so the split
    is real.
    """
    from lcm.cache import compress, prefill_observed
    policies = tuple(policies)
    for policy in policies:
        if not shares_prefill(policy):
            raise ValueError(f"policies holds {policy!r}, which keeps its own cache format; "
                             f"run it through lcm.cache.generate(policy=...)")
    _check_budget(max_new_tokens)
    stop = tuple(sorted({int(t) for t in stop_tokens}))
    room = max_new_tokens - 1  # the last token is returned, never fed back
    t0, c0 = time.perf_counter(), time.process_time()
    observed = tuple({repr(p): p for p in policies if p is not None}.values())
    logits, full, observations = prefill_observed(params, prompts, cfg, observed,
                                                  lengths=lengths)
    logits.block_until_ready()
    if timings is not None:
        timings["prefill_s"] = timings.get("prefill_s", 0.0) + time.perf_counter() - t0
        timings["prefill_cpu_s"] = timings.get("prefill_cpu_s", 0.0) + time.process_time() - c0
    out = []
    for policy in policies:
        t0, c0 = time.perf_counter(), time.process_time()
        if policy is None:
            cache = _with_room(full, room)
        else:
            cache = compress(full, policy, observations, cfg, max_new_tokens=room)
        tokens, count = generate_from_cache(params, cfg, logits, cache,
                                            max_new_tokens=max_new_tokens, stop_tokens=stop,
                                            pad_token=pad_token)
        out.append((tokens, count.block_until_ready()))
        if timings is not None:
            timings.setdefault("decode_s", []).append(time.perf_counter() - t0)
            timings.setdefault("decode_cpu_s", []).append(time.process_time() - c0)
    return out


def generate_from_cache(params, cfg: ModelConfig, logits, cache, *, max_new_tokens: int,
                        stop_tokens=(), pad_token: int = 0):
    """Greedy decoding from a prefilled cache: `(tokens int32 [B, max_new_tokens],
    num_generated int32 [B])`, as `lcm.cache.generate` at temperature 0 decodes after its
    prefill.

    logits float32 [B, vocab] at each row's last prompt token (from `lcm.cache.prefill`); cache
    the `KVCache` after the prompt, with room for max_new_tokens - 1 entries (else the decode
    steps evict the oldest). A row stops after one of `stop_tokens` (kept and counted).
    """
    _check_budget(max_new_tokens)
    stop = tuple(sorted({int(t) for t in stop_tokens}))
    return _from_cache(params, logits, cache, cfg=cfg, max_new_tokens=int(max_new_tokens),
                       stop=stop, pad_token=int(pad_token))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "stop", "pad_token"))
def _from_cache(params, logits, cache, *, cfg, max_new_tokens, stop, pad_token):
    from lcm.cache import decode_step
    B = logits.shape[0]
    stop_ids = jnp.asarray(stop if stop else (-1,), jnp.int32)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = jnp.full((B, max_new_tokens), pad_token, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, stop_ids)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, token, out, done, count = state
        logits, cache = decode_step(params, cache, token, cfg)
        token = jnp.where(done, pad_token, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_ids)
        return i + 1, cache, token, out, done, count

    state = (jnp.ones((), jnp.int32), cache, token, out, done, jnp.ones((B,), jnp.int32))
    _, _, _, out, _, count = jax.lax.while_loop(cond, body, state)
    return out, count


def _with_room(cache, room: int):
    """The full prefill cache with `room` empty slots per head after its entries."""
    if room == 0:
        return cache
    widths = [(0, 0)] * 3 + [(0, room)]
    return cache.replace(k=jnp.pad(cache.k, widths + [(0, 0)]),
                         v=jnp.pad(cache.v, widths + [(0, 0)]),
                         pos=jnp.pad(cache.pos, widths, constant_values=-1))


def _check_budget(max_new_tokens):
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected an int >= 1")


def trim_generation(tokens: np.ndarray, count: int, budget: int, stop_tokens) -> list[int]:
    """The first min(count, budget) tokens, without a final stop token."""
    ids = [int(t) for t in tokens[:min(int(count), budget)]]
    if ids and ids[-1] in stop_tokens:
        ids = ids[:-1]
    return ids
