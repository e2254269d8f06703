"""Log-likelihood and perplexity of documents longer than one forward fits.

    logp = loglikelihood(params, cfg, tokens, lengths=lengths, chunk=512)   # [B, T - 1]
    ppl = perplexity(params, cfg, tokens, lengths=lengths)                  # [B]

Three ways to run a document, one keyword each:

- default: the KV cache. The document runs `chunk` tokens at a time through
  `lcm.cache.extend` inside one jitted `lax.scan`; each chunk's logits [B, chunk, vocab] become
  log-probs (a logsumexp and a gather) before the next chunk runs, so [T, vocab] logits never
  exist. The cache holds every token (sliding-window layers keep their window), so the result
  equals the one-shot forward's `log_softmax` + gather.
- `policy=`: a decode-time press with a token budget (`StreamingLLM(budget=n)`, `TOVA(budget=n)`,
  `H2O`), run one token at a time as `decode_step(..., policy=)` runs it: each token is
  predicted from the entries the press has kept so far, then the press evicts down to its
  budget. `StreamingLLM(budget=n, n_sink=s)` is the StreamingLLM paper's perplexity setting
  (sink tokens plus a window of recent ones; `positions="cache"` re-rotates keys by their rank
  in the cache as the paper does).
- `memory=`: a memory kind from `lcm.memory`, run `chunk` tokens per segment by
  `lcm.memory.run_segments(..., targets=)`, which computes the log-probs segment by segment.

Rows are right-padded: `lengths [B]` says how many tokens of each row are real.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lcm.cache.chunked import empty_cache
from lcm.cache.checks import check_model, check_row_lengths
from lcm.cache.compress import window_plan
from lcm.cache.decoding import check_decode_press, with_query_buffer
from lcm.cache.extend import extend_layers
from lcm.cache.prefill import mapped_decode_step
from lcm.checks import check_int
from lcm.config import ModelConfig
from lcm.memory import Memory, run_segments
from lcm.model import check_params, check_token_ids

DEFAULT_CHUNK = 512


def loglikelihood(params, cfg: ModelConfig, tokens, *, lengths=None,
                  chunk: int = DEFAULT_CHUNK, policy=None, memory=None,
                  memory_params=None) -> jax.Array:
    """The log-probability of each token given the tokens before it.

    params: the model's params (a loaded model or `lcm.model.init_params`); cfg: its
    ModelConfig. tokens [B, T] int, right-padded, T >= 2. lengths [B] int in [2, T]: the real
    tokens of each row (default T for every row).
    chunk: tokens run per step (default 512); the logits held at a time are [B, chunk, vocab]
    float32. policy: a decode-time press with a token budget (see the module docstring; runs
    one token at a time, `chunk` is then unused). memory: a memory kind from `lcm.memory`
    (segments of `chunk` tokens), with memory_params from `lcm.memory.init_memory_params` when
    the kind has weights. policy and memory exclude each other.

    Returns float32 [B, T - 1]: entry [b, t] is log p(tokens[b, t + 1] | tokens[b, :t + 1]);
    entries t >= lengths[b] - 1 (predicting padding) are 0.
    Length-dependent RoPE (dynamic NTK, LongRoPE) uses tables for the longest row, as a
    forward over the batch does when some row is unpadded.
    """
    tokens, lengths = _check(params, cfg, tokens, lengths)
    check_int(None, "chunk", chunk, 1)
    if policy is not None and memory is not None:
        raise ValueError(f"policy={policy!r} and memory={memory!r}: pass one of them (policy "
                         f"runs a KV cache with a decode-time press, memory a memory kind)")
    if memory is not None:
        if not isinstance(memory, Memory):
            raise ValueError(f"memory={memory!r}; expected None or a memory kind from "
                             f"lcm.memory (TransformerXL, RecurrentMemory, ...)")
        memory.check(cfg)
        memory.check_segment(int(chunk))
        return memory_loglik_jit(params, tokens, lengths, memory_params, cfg=cfg,
                                 chunk=int(chunk), memory=memory)
    if memory_params is not None:
        raise ValueError("memory_params is given without memory=; pass the memory kind too")
    check_model(cfg)
    if policy is not None:
        _check_policy(policy, cfg)
        return policy_loglik_jit(params, tokens, lengths, cfg=cfg, policy=policy)
    return cache_loglik_jit(params, tokens, lengths, cfg=cfg, chunk=int(chunk))


def perplexity(params, cfg: ModelConfig, tokens, *, lengths=None, chunk: int = DEFAULT_CHUNK,
               policy=None, memory=None, memory_params=None) -> jax.Array:
    """exp of the mean negative log-likelihood over each row's predicted tokens: float32 [B].

    Row b averages its lengths[b] - 1 predictions (tokens 1 .. lengths[b] - 1 given the ones
    before them); padding is excluded. The arguments are `loglikelihood`'s.
    """
    logp = loglikelihood(params, cfg, tokens, lengths=lengths, chunk=chunk, policy=policy,
                         memory=memory, memory_params=memory_params)
    B, T = jnp.shape(tokens)
    count = (T if lengths is None else jnp.asarray(lengths)) - 1
    count = jnp.broadcast_to(jnp.asarray(count, jnp.float32), (B,))
    return jnp.exp(-logp.sum(-1) / count)


# -------------------------------------------------------------------------------- checks

def _check(params, cfg, tokens, lengths):
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg={type(cfg).__name__}; expected a ModelConfig (the params' "
                         f"config; note the order: params, cfg, tokens)")
    check_params(params, cfg)
    tokens = jnp.asarray(tokens) if not hasattr(tokens, "ndim") else tokens
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: shape {tokens.shape}, dtype {tokens.dtype}; expected int "
                         f"[batch, seq]")
    B, T = tokens.shape
    if B == 0 or T < 2:
        raise ValueError(f"tokens has shape {tokens.shape}; expected [batch >= 1, seq >= 2] "
                         f"(a token is predicted from the ones before it)")
    lengths = check_row_lengths(lengths, B, T, minimum=2)  # two tokens predict one
    check_token_ids(tokens, cfg.vocab_size, lengths=lengths)
    # The padding's ids are never read: set to 0, any id (even outside the vocabulary) is fine.
    tokens = jnp.where(jnp.arange(T)[None] < lengths[:, None], tokens, 0)
    return tokens.astype(jnp.int32), lengths


def _check_policy(policy, cfg):
    if check_decode_press(policy) != "stepwise":
        raise ValueError(f"policy={policy!r}; expected a press that evicts at every decode step "
                         f"with a token budget: StreamingLLM(budget=n), TOVA(budget=n) or H2O")
    if any(k.window is not None or k.chunk is not None for k in cfg.layer_kinds):
        raise ValueError("policy= runs on models whose layers all attend globally; this cfg has "
                         "sliding-window or chunked layers (pass policy=None: their windows are "
                         "kept by the default cache)")


# ------------------------------------------------------------------------- implementations

def _target_logp(logits, targets):
    """log_softmax(logits)[targets] without materializing the log-softmax: logits [B, n, V]
    float32, targets [B, n] int -> [B, n]."""
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def cache_loglik_jit(params, tokens, lengths, *, cfg, chunk):
    """`loglikelihood` with the KV cache: tokens [B, T] int32, lengths [B] int32 -> [B, T - 1].

    The T - 1 inputs (every token but the last) run `chunk` at a time through `extend` into a
    cache that keeps them all (sliding layers keep their window); only [B, chunk, vocab] logits
    exist at a time."""
    B, T = tokens.shape
    N = T - 1
    n = -(-N // chunk)
    inputs = jnp.pad(tokens[:, :-1], ((0, 0), (0, n * chunk - N)))
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, n * chunk - N)))
    real_inputs = lengths - 1
    plan = window_plan(cfg, None, N, 0)
    cache = empty_cache(cfg, B, N, plan.slots(None, "compact"))
    rope_length = jnp.max(lengths)  # the tables a forward over the whole document uses

    def body(cache, i):
        counts = jnp.clip(real_inputs - i * chunk, 0, chunk).astype(jnp.int32)
        piece = jax.lax.dynamic_slice_in_dim(inputs, i * chunk, chunk, axis=1)
        want = jax.lax.dynamic_slice_in_dim(targets, i * chunk, chunk, axis=1)
        logits, cache = extend_layers(params, cache, piece, counts, cfg=cfg, logits="all",
                                      rope_length=rope_length)
        return cache, _target_logp(logits, want)

    _, logp = jax.lax.scan(body, cache, jnp.arange(n))
    logp = logp.transpose(1, 0, 2).reshape(B, n * chunk)[:, :N]
    return jnp.where(jnp.arange(N)[None] < real_inputs[:, None], logp, 0.0)


@functools.partial(jax.jit, static_argnames=("cfg", "policy"))
def policy_loglik_jit(params, tokens, lengths, *, cfg, policy):
    """`loglikelihood` with a stepwise decode press: one `decode_step(..., policy=)` per token
    inside a `lax.scan`, from an empty uniform cache of budget + 1 slots (room for the
    incoming token before the press evicts)."""
    B, T = tokens.shape
    N = T - 1
    cache = empty_cache(cfg, B, policy.decode_budget() + 1, None).replace(
        rotation=policy.positions)
    if policy.accumulates_scores:
        cache = cache.replace(score=jnp.zeros(cache.pos.shape, jnp.float32))
    cache = with_query_buffer(cache, policy, cfg)

    def body(cache, t):
        logits, cache = mapped_decode_step(params, cache, tokens[:, t], cfg=cfg, policy=policy)
        return cache, _target_logp(logits[:, None], tokens[:, t + 1, None])[:, 0]

    _, logp = jax.lax.scan(body, cache, jnp.arange(N))
    return jnp.where(jnp.arange(N)[None] < lengths[:, None] - 1, logp.T, 0.0)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "memory"))
def memory_loglik_jit(params, tokens, lengths, memory_params, *, cfg, chunk, memory):
    """`loglikelihood` through `run_segments(..., targets=)`: the whole document (its last
    token too, which kinds reading the next token need) in segments of `chunk` tokens. The
    kinds are causal, so a row's padding (id 0 by now) only reaches positions after it."""
    T = tokens.shape[1]
    real = jnp.arange(T)[None] < lengths[:, None]
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    logp, _ = run_segments(params, tokens, cfg, memory=memory, segment_len=chunk,
                           memory_params=memory_params, targets=targets)
    return jnp.where(real[:, 1:], logp[:, :-1], 0.0)
