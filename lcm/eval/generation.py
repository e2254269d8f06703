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

kvpress's protocol (its `KVPressTextGenerationPipeline`): only the context is compressed; the
question is appended afterwards at the positions that follow the original context, then decoding
is greedy. `question_generate` runs it for one policy and `shared_prefill_generate(...,
questions=)` for several policies from one prefill of the contexts. With no policy both give the
tokens of the one-shot prompt context + question.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcm.checks import check_int, is_int
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
                            policies, stop_tokens=(), pad_token: int = 0, timings=None,
                            questions=None, question_lengths=None):
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

    questions int [B, Q] (right-padded, real lengths question_lengths [B] in [0, Q], default
    Q): kvpress's protocol. `prompts` are then the contexts: each policy compresses the
    context's cache (with room for Q + max_new_tokens - 1 entries), the question is appended
    after it (`lcm.cache.extend`, at the positions after each row's context) and decoding
    continues from the question's last token (a row with no question token continues from the
    context's). Each result equals `question_generate(..., policy=policy)`.
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
    if questions is not None:
        questions, question_lengths = check_questions(questions, question_lengths,
                                                      jnp.shape(prompts)[0], cfg)
        room += questions.shape[1]
    elif question_lengths is not None:
        raise ValueError("question_lengths given without questions")
    t0, c0 = time.perf_counter(), time.process_time()
    observed = tuple({repr(p): p for p in policies if p is not None}.values())
    logits, full, observations = prefill_observed(params, prompts, cfg, observed,
                                                  lengths=lengths)
    check_finite_logits(logits, "the prefill")
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
        first = logits
        if questions is not None:
            first, cache = append_question(params, cfg, logits, cache, questions,
                                           question_lengths)
        tokens, count = generate_from_cache(params, cfg, first, cache,
                                            max_new_tokens=max_new_tokens, stop_tokens=stop,
                                            pad_token=pad_token)
        out.append((tokens, count.block_until_ready()))
        if timings is not None:
            timings.setdefault("decode_s", []).append(time.perf_counter() - t0)
            timings.setdefault("decode_cpu_s", []).append(time.process_time() - c0)
    return out


def check_questions(questions, question_lengths, batch: int, cfg: ModelConfig | None = None):
    """questions int [batch, Q >= 1] and question_lengths [batch] in [0, Q] (None: every row
    Q) -> (int32 [batch, Q], int32 [batch]); ValueError naming the argument otherwise. Values
    are checked where they are on this host (not for arrays spread over several processes)."""
    if not isinstance(questions, jax.Array):
        questions = np.asarray(questions)
    if (questions.ndim != 2 or questions.shape[0] != batch or questions.shape[1] < 1
            or not jnp.issubdtype(questions.dtype, jnp.integer)):
        raise ValueError(f"questions: shape {questions.shape}, dtype {questions.dtype}; expected "
                         f"int [batch={batch}, Q >= 1] (right-padded question tokens)")
    Q = questions.shape[1]
    if question_lengths is None:
        question_lengths = np.full((batch,), Q, np.int32)
    if not isinstance(question_lengths, jax.Array):
        question_lengths = np.asarray(question_lengths)
    if question_lengths.shape != (batch,) or not jnp.issubdtype(question_lengths.dtype,
                                                                 jnp.integer):
        raise ValueError(f"question_lengths: shape {question_lengths.shape}, dtype "
                         f"{question_lengths.dtype}; expected int [batch={batch}]")
    if _on_host(question_lengths):
        lengths = np.asarray(question_lengths)
        if lengths.min() < 0 or lengths.max() > Q:
            raise ValueError(f"question_lengths={lengths.tolist()}; expected every length in "
                             f"[0, {Q}] (questions are right-padded to {Q})")
        if cfg is not None and _on_host(questions):
            host = np.asarray(questions)
            real = np.arange(Q)[None] < lengths[:, None]
            bad = host[real & ((host < 0) | (host >= cfg.vocab_size))]
            if bad.size:
                raise ValueError(f"questions hold token ids {sorted(set(bad.tolist()))[:8]} "
                                 f"outside the vocabulary [0, {cfg.vocab_size})")
    return jnp.asarray(questions, jnp.int32), jnp.asarray(question_lengths, jnp.int32)


def _on_host(x) -> bool:
    return not isinstance(x, jax.Array) or (not isinstance(x, jax.core.Tracer)
                                            and x.is_fully_addressable)


def question_generate(params, cfg: ModelConfig, contexts, questions, *, context_lengths=None,
                      question_lengths=None, max_new_tokens: int, policy=None, stop_tokens=(),
                      pad_token: int = 0):
    """kvpress's protocol for one cache policy: `(tokens int32 [B, max_new_tokens],
    num_generated int32 [B])`.

    contexts int [B, T] right-padded with real lengths context_lengths [B] (default T);
    questions int [B, Q] right-padded with question_lengths [B] in [0, Q] (default Q). The
    contexts are prefilled and compressed by `policy` (`lcm.cache.prefill(..., policy=)`, room
    for Q + max_new_tokens - 1 entries); the question tokens are appended after each row's
    context (positions context_length, context_length + 1, ...) without compression, and
    greedy decoding continues from the last question token's logits. A row stops after one of
    `stop_tokens` (kept and counted).

    Eviction presses (and None) append with `lcm.cache.extend`; KIVI, Quest and DuoAttention,
    which keep their own cache format, feed the question one `lcm.cache.decode_step` at a time
    (rows of different question lengths then run one row at a time). With policy None the
    tokens equal `lcm.cache.generate` on the concatenation context + question. Decode-time
    policies and models whose positions are not plain RoPE (Self-Extend, ReRoPE) raise
    ValueError.
    """
    _check_budget(max_new_tokens)
    contexts = jnp.asarray(contexts)
    if contexts.ndim != 2:
        raise ValueError(f"contexts: shape {contexts.shape}; expected int [batch, T]")
    B = contexts.shape[0]
    questions, question_lengths = check_questions(questions, question_lengths, B, cfg)
    stop = tuple(sorted({int(t) for t in stop_tokens}))
    room = questions.shape[1] + max_new_tokens - 1
    if _owns_cache(policy) and B > 1 and len(set(np.asarray(question_lengths).tolist())) > 1:
        # decode_step feeds every row at once: rows of different question lengths go alone.
        lengths = (jnp.full((B,), contexts.shape[1], jnp.int32) if context_lengths is None
                   else jnp.asarray(context_lengths))
        rows = [question_generate(params, cfg, contexts[i:i + 1], questions[i:i + 1],
                                  context_lengths=lengths[i:i + 1],
                                  question_lengths=question_lengths[i:i + 1],
                                  max_new_tokens=max_new_tokens, policy=policy,
                                  stop_tokens=stop, pad_token=pad_token)
                for i in range(B)]
        return jnp.concatenate([r[0] for r in rows]), jnp.concatenate([r[1] for r in rows])
    logits, cache = compress_context(params, cfg, contexts, context_lengths=context_lengths,
                                     policy=policy, room=room)
    logits, cache = append_question(params, cfg, logits, cache, questions, question_lengths)
    return generate_from_cache(params, cfg, logits, cache, max_new_tokens=max_new_tokens,
                               stop_tokens=stop, pad_token=pad_token)


def compress_context(params, cfg: ModelConfig, contexts, *, context_lengths=None, policy=None,
                     room: int = 0):
    """The first half of kvpress's protocol: `(logits float32 [B, vocab] at each row's last
    context token, cache)`, the contexts int [B, T] (right-padded, real lengths
    context_lengths [B]) prefilled and compressed by `policy` (None keeps every entry), with
    room for `room` more entries per head (the question and the generated tokens but the last).
    Raises ValueError for a decode-time policy or a model that is not plain RoPE."""
    from lcm.cache import is_prefill_press, prefill
    if cfg.positions.type != "rope":
        raise ValueError(f"cfg.positions.type={cfg.positions.type!r}: appending a question "
                         f"after compression needs lcm.cache's RoPE cache; without a policy, "
                         f"generate on the concatenation context + question (the same tokens)")
    if policy is not None and not is_prefill_press(policy):
        raise ValueError(f"policy={policy!r}; expected None or a prefill press from lcm.cache "
                         f"(decode-time policies are not part of kvpress's protocol here)")
    check_int(None, "room", room, 0)
    return prefill(params, contexts, cfg, policy=policy, lengths=context_lengths,
                   max_new_tokens=int(room))


def append_question(params, cfg: ModelConfig, logits, cache, questions, question_lengths=None):
    """The second half of kvpress's protocol: questions int [B, Q] (right-padded, real lengths
    question_lengths [B] in [0, Q]) appended to `cache` (from `compress_context`) after each
    row's context, nothing compressed. Returns (logits float32 [B, vocab] at each row's last
    question token, or `logits` (the context's) where a row has none; the cache). A `KVCache`
    takes the question in one `lcm.cache.extend`; the cache of KIVI, Quest or DuoAttention one
    `lcm.cache.decode_step` per token (every row must then have the same question length)."""
    from lcm.cache import decode_step, extend
    questions, question_lengths = check_questions(questions, question_lengths,
                                                  jnp.shape(logits)[0], cfg)
    from lcm.cache import PolicyCache
    if isinstance(cache, PolicyCache):
        q_host = np.asarray(question_lengths)
        if (q_host != q_host[0]).any():
            raise ValueError(f"question_lengths={q_host.tolist()}: a {type(cache.policy).__name__}"
                             f" cache takes one token per row per step; give every row the same "
                             f"question length (question_generate runs such rows one at a time)")
        for j in range(int(q_host[0])):
            logits, cache = decode_step(params, cache, questions[:, j], cfg)
        return logits, cache
    last, cache = extend(params, cache, questions, cfg, lengths=question_lengths,
                         all_logits=False)
    return jnp.where((question_lengths > 0)[:, None], last, logits), cache


def _owns_cache(policy) -> bool:
    from lcm.cache.formats import owns_cache
    return owns_cache(policy)


def check_finite_logits(logits, what: str) -> None:
    """Raises FloatingPointError naming the rows when `logits` [B, vocab] hold NaN or inf (a
    diverged model or NaN weights: greedy decoding would turn them into token 0 silently).
    Waits for `logits`; one reduction per batch."""
    finite = jnp.isfinite(logits).all(axis=-1)
    if bool(jax.device_get(finite.all())):  # a replicated scalar, also over several processes
        return
    rows = (np.flatnonzero(~np.asarray(finite)).tolist() if finite.is_fully_addressable
            else "(some)")
    raise FloatingPointError(f"{what} gave NaN or infinite logits for rows {rows} of the batch: "
                             f"the params or the inputs hold NaN / inf, or the model diverged "
                             f"(lcm.model.checked finds the first op that makes a NaN)")


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
