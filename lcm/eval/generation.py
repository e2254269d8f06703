"""Generation for the evaluation loop: `lcm.cache.generate` when present, else a forward-only
greedy fallback.

Both have one signature, the one the loop calls:

    generate_fn(params, cfg, prompts, *, lengths, max_new_tokens, policy=None, stop_tokens=(),
                temperature=0.0) -> (tokens int32 [B, max_new_tokens], num_generated int32 [B])

prompts [B, T] are right-padded with real lengths [B]; a row stops after one of `stop_tokens`
(kept and counted) or after max_new_tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcm.config import ModelConfig
from lcm.model import forward


def greedy_generate(params, cfg: ModelConfig, prompts, *, lengths, max_new_tokens: int,
                    policy=None, stop_tokens=(), temperature: float = 0.0, pad_token: int = 0):
    """Greedy decoding by recomputing the whole forward pass for every new token.

    Static shapes (one buffer [B, T + max_new_tokens]) under one jit; the causal mask keeps the
    buffer's not-yet-written slots from influencing earlier positions. O(max_new_tokens) full
    forwards, and it materialises logits [B, T + max_new_tokens, vocab]: a reference for tests
    and small models, not for long prompts (use `lcm.cache.generate`).
    """
    if policy is not None:
        raise ValueError(f"policy={policy!r}: the forward-only fallback keeps no cache; cache "
                         f"policies need lcm.cache.generate")
    if temperature != 0.0:
        raise ValueError(f"temperature={temperature!r}: the forward-only fallback is greedy "
                         f"(temperature=0.0)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected an int >= 1")
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


def default_generate_fn():
    """`lcm.cache.generate` if that module is installed, else `greedy_generate`."""
    try:
        from lcm.cache import generate
    except ImportError:
        return greedy_generate
    return generate


def trim_generation(tokens: np.ndarray, count: int, budget: int, stop_tokens) -> list[int]:
    """The first min(count, budget) tokens, without a final stop token."""
    ids = [int(t) for t in tokens[:min(int(count), budget)]]
    if ids and ids[-1] in stop_tokens:
        ids = ids[:-1]
    return ids
