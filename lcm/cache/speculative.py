"""Lossless self-speculative decoding: the model drafts over a compressed cache and verifies
with its full cache (TriForce, MagicDec).

    tokens, n = generate(params, cfg, prompts, max_new_tokens=64,
                         speculative=Speculative(draft=StreamingLLM(budget=256), gamma=4))

One prefill keeps the full cache and what `draft` (any eviction press that runs at prefill)
observes; `compress` then gives the draft's cache. Each round:

1. the draft (the same weights, reading the compressed cache) proposes `gamma` tokens, one
   decode step each: each step reads budget + generated entries instead of the whole context;
2. one `extend` of the full cache by the last emitted token and the gamma drafts gives the
   target's logits at gamma + 1 positions;
3. greedy: the drafts are accepted up to the first that differs from the target's argmax, and
   the target's token at that point is emitted too, so a round emits 1 to gamma + 1 tokens,
   exactly the tokens plain greedy decoding gives. With temperature > 0, draft token d with
   draft probability q(d) and target probability p(d) is accepted with probability
   min(1, p(d) / q(d)); the first rejected one is replaced by a sample of max(0, p - q)
   (normalised), and when all are accepted a bonus token is sampled from the target: the
   standard speculative sampling rule, whose output follows the target distribution (the same
   temperature, top-k and top-p applied to both);
4. both caches drop the entries of rejected tokens (`truncate`); the draft cache keeps the
   accepted ones, so it holds the press's selection of the prompt plus everything generated.

Both caches are sized with room for every generated token plus one round, so nothing is
evicted while generating; the full cache keeps every prompt token of every layer (sliding
layers included, read through their window), the draft cache what the press keeps (sliding
layers their window). Rows accept different numbers of tokens per round; shapes stay static
inside one jitted `lax.while_loop`. Greedy output equals plain greedy decoding token for token
as long as no two logits tie within float32 rounding (the verify step attends to the same
entries as decoding, in a different order of sums).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcm.cache.compress import compress_jit, observations_for
from lcm.cache.extend import extend_layers
from lcm.cache.kv import KVCache
from lcm.cache.prefill import prefill_jit
from lcm.cache.presses.base import Press
from lcm.checks import check_int

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Speculative:
    """Self-speculative decoding for `generate`: `draft`, a prefill press whose compressed cache
    the model drafts from (`StreamingLLM(budget=n)`, `SnapKV(0.9)`, ...); `gamma`, the tokens
    drafted per round."""

    draft: Press
    gamma: int = 4

    def __post_init__(self):
        if not isinstance(self.draft, Press) or not self.draft.runs_at_prefill or (
                self.draft.owns_cache):
            raise ValueError(f"Speculative.draft={self.draft!r}; expected an eviction press "
                             f"that runs at prefill (StreamingLLM(budget=n), SnapKV(0.9), ...)")
        check_int("Speculative", "gamma", self.gamma, 1)


def truncate(cache: KVCache, next_pos) -> KVCache:
    """A uniform cache without the entries at positions >= next_pos [B] (the last ones
    written, since nothing was evicted after them); next_pos becomes `next_pos`."""
    valid = jnp.arange(cache.capacity, dtype=jnp.int32)[None, None, None] < cache.length[..., None]
    drop = valid & (cache.pos >= next_pos[None, :, None, None])
    length = cache.length - drop.sum(-1).astype(jnp.int32)
    keep = jnp.arange(cache.capacity, dtype=jnp.int32)[None, None, None] < length[..., None]
    changes = dict(k=jnp.where(keep[..., None], cache.k, 0).astype(cache.k.dtype),
                   v=jnp.where(keep[..., None], cache.v, 0).astype(cache.v.dtype),
                   pos=jnp.where(keep, cache.pos, -1), length=length, next_pos=next_pos)
    if cache.score is not None:
        changes["score"] = jnp.where(keep, cache.score, 0.0)
    return cache.replace(**changes)


def sampling_logits(logits, *, temperature: float, top_k=None, top_p=None):
    """logits [B, V] / temperature restricted to the top_k tokens and the top_p nucleus (-inf
    elsewhere): the distribution `sample_logits` samples from, as float32 logits."""
    logits = logits.astype(f32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[
            jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return logits


def speculative_loop(params, prompts, lengths, key, *, cfg, speculative, chunk,
                     max_new_tokens, stop, temperature, top_k, top_p, pad_token, full_rows):
    """generate's body with `speculative` (traced inside generate's jit): `(tokens [B,
    max_new_tokens], num_generated [B], stats)`; see `speculative_decode`."""
    logits, full, small = speculative_caches(
        params, prompts, lengths, cfg=cfg, draft=speculative.draft, chunk=chunk,
        room=max_new_tokens + speculative.gamma + 2, full_rows=full_rows)
    return speculative_decode(params, full, small, logits, key, cfg=cfg,
                              gamma=speculative.gamma, max_new_tokens=max_new_tokens, stop=stop,
                              temperature=temperature, top_k=top_k, top_p=top_p,
                              pad_token=pad_token)


def speculative_caches(params, prompts, lengths, *, cfg, draft, chunk, room, full_rows):
    """One prefill: `(last-token logits [B, V], full cache, draft cache)`, both uniform with
    `room` free slots per head (generated tokens + one round)."""
    logits, full, obs = prefill_jit(params, prompts, lengths, cfg=cfg, policy=None, chunk=chunk,
                                    room=0, all_logits=False,
                                    observe=observations_for((draft,)))
    small = compress_jit(full, draft, obs, cfg=cfg, room=room, layout="uniform",
                         full_rows=full_rows)
    return logits, full.grow(room), small


def speculative_decode(params, full, small, logits, key, *, cfg, gamma, max_new_tokens, stop,
                       temperature, top_k, top_p, pad_token):
    """The rounds of draft, verify, accept and roll back from the prefill's caches and logits
    (`speculative_caches`): `(tokens [B, max_new_tokens], num_generated [B], stats)` with
    stats {"rounds": [], "drafted": [B], "accepted": [B]} (drafts proposed and accepted per
    row while the row was running). Traced inside a jit."""
    B = logits.shape[0]
    greedy = temperature == 0.0
    dist = functools.partial(sampling_logits, temperature=temperature or 1.0, top_k=top_k,
                             top_p=top_p)
    stop_ids = jnp.asarray(stop if stop else (-1,), jnp.int32)
    width = max_new_tokens + gamma + 1

    def pick(logits, key):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, dist(logits), axis=-1).astype(jnp.int32)

    key, sub = jax.random.split(key)
    first = pick(logits, sub)
    state = dict(full=full, small=small, pending=jnp.stack([first, first], 1),
                 pcount=jnp.ones((B,), jnp.int32), last=first,
                 out=jnp.full((B, width), pad_token, jnp.int32).at[:, 0].set(first),
                 count=jnp.ones((B,), jnp.int32), done=jnp.isin(first, stop_ids), key=key,
                 rounds=jnp.zeros((), jnp.int32), drafted=jnp.zeros((B,), jnp.int32),
                 accepted=jnp.zeros((B,), jnp.int32))

    def running(s):
        return ~s["done"] & (s["count"] < max_new_tokens)

    def cond(s):
        return jnp.any(running(s))

    def body(s):
        active = running(s)
        act = active.astype(jnp.int32)
        key, *subs = jax.random.split(s["key"], gamma + 3)
        # 1. Draft: the pending tokens (the last emitted one, after the last accepted draft
        # when the draft cache lacks it), then gamma - 1 single steps.
        pending = jnp.where(s["pcount"][:, None] == 2, s["pending"],
                            jnp.stack([s["last"], s["last"]], 1))
        d_logits, small = extend_layers(params, s["small"], pending, s["pcount"] * act,
                                        cfg=cfg, logits="last")
        drafts, q_logits = [], []
        for i in range(gamma):
            if i:
                d_logits, small = extend_layers(params, small, drafts[-1][:, None], act,
                                                cfg=cfg, logits="last")
            q_logits.append(d_logits)
            drafts.append(pick(d_logits, subs[i]))
        drafts = jnp.stack(drafts, 1)  # [B, gamma]
        # 2. Verify: the full cache extended by the last token and the drafts.
        fed = jnp.concatenate([s["last"][:, None], drafts], 1)
        p_logits, full = extend_layers(params, s["full"], fed, (gamma + 1) * act, cfg=cfg)
        # 3. Accept.
        if greedy:
            target = jnp.argmax(p_logits, axis=-1).astype(jnp.int32)  # [B, gamma + 1]
            ok = drafts == target[:, :gamma]
            n_ok = jnp.cumprod(ok, axis=1).sum(1).astype(jnp.int32)
            final = jnp.take_along_axis(target, n_ok[:, None], 1)[:, 0]
        else:
            p = jax.nn.softmax(dist(p_logits.reshape(B * (gamma + 1), -1)), -1).reshape(
                B, gamma + 1, -1)
            q = jax.nn.softmax(dist(jnp.stack(q_logits, 1).reshape(B * gamma, -1)), -1
                               ).reshape(B, gamma, -1)
            pd = jnp.take_along_axis(p[:, :gamma], drafts[..., None], -1)[..., 0]
            qd = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
            u = jax.random.uniform(subs[gamma], (B, gamma))
            ok = u * qd < pd  # accept with probability min(1, p / q)
            n_ok = jnp.cumprod(ok, axis=1).sum(1).astype(jnp.int32)
            p_at = jnp.take_along_axis(p, n_ok[:, None, None], 1)[:, 0]  # [B, V]
            q_at = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros_like(q[:, :1])], 1),
                                       n_ok[:, None, None], 1)[:, 0]  # zeros: the bonus
            residual = jnp.maximum(p_at - q_at, 0.0)
            residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_at)
            final = jax.random.categorical(subs[gamma + 1], jnp.log(residual), axis=-1
                                           ).astype(jnp.int32)
        # 4. Emit d_1..d_a and the final token, up to a stop token and max_new_tokens.
        emitted = jnp.concatenate([drafts, jnp.zeros((B, 1), jnp.int32)], 1)
        emitted = jnp.where(jnp.arange(gamma + 1)[None] == n_ok[:, None], final[:, None],
                            emitted)
        n_new = n_ok + 1
        is_stop = jnp.isin(emitted, stop_ids) & (jnp.arange(gamma + 1)[None] < n_new[:, None])
        first_stop = jnp.argmax(is_stop, axis=1)
        n_new = jnp.where(is_stop.any(1), first_stop + 1, n_new)
        n_new = jnp.minimum(n_new, max_new_tokens - s["count"]) * act
        idx = s["count"][:, None] + jnp.arange(gamma + 1)[None]
        write = jnp.arange(gamma + 1)[None] < n_new[:, None]
        rows = jnp.arange(B)[:, None]
        out = s["out"].at[rows, jnp.where(write, idx, width)].set(emitted, mode="drop")
        done = s["done"] | (active & is_stop.any(1) & (first_stop < n_new))
        # 5. Roll both caches back to the tokens kept: the last emitted one is not in them.
        last = jnp.take_along_axis(emitted, jnp.maximum(n_new - 1, 0)[:, None], 1)[:, 0]
        last = jnp.where(active, last, s["last"])
        new_pos = s["full"].next_pos + n_new * act  # the position of `last`
        full = truncate(full, new_pos)
        small = truncate(small, jnp.minimum(new_pos, small.next_pos))
        behind = new_pos - small.next_pos  # 2 when the last accepted draft is missing
        pcount = jnp.where(active, behind + 1, s["pcount"]).astype(jnp.int32)
        before = jnp.take_along_axis(emitted, jnp.maximum(n_new - 2, 0)[:, None], 1)[:, 0]
        pending = jnp.stack([jnp.where(pcount == 2, before, last), last], 1)
        return dict(full=full, small=small, pending=pending, pcount=pcount, last=last, out=out,
                    count=s["count"] + n_new, done=done, key=key, rounds=s["rounds"] + 1,
                    drafted=s["drafted"] + gamma * act,
                    accepted=s["accepted"] + jnp.minimum(n_ok, n_new) * act)

    s = jax.lax.while_loop(cond, body, state)
    stats = {"rounds": s["rounds"], "drafted": s["drafted"], "accepted": s["accepted"]}
    return s["out"][:, :max_new_tokens], s["count"], stats

