"""Checks at the model boundary: params that fit the config, token ids inside the vocabulary,
raised before tracing. Traced inputs (token ids inside `jit`) are checked by `checked`, through
`jax.experimental.checkify`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from lcm.config import ModelConfig
from lcm.model.params import flatten_params, param_shapes


def check_params(params, cfg: ModelConfig) -> None:
    """Raises ValueError unless `params` has every weight of `cfg` with its shape (and no
    `lm_head` when the embeddings are tied). Extra entries are allowed."""
    if not isinstance(params, dict):
        raise ValueError(f"params={type(params).__name__}; expected the dict of init_params or "
                         f"a loader (lcm.io)")
    have = flatten_params(params)
    for path, want in flatten_params(param_shapes(cfg)).items():
        name = "/".join(path)
        if path not in have:
            raise ValueError(f"params lack {name!r} (shape {tuple(want.shape)}) that cfg needs; "
                             f"params do not fit cfg")
        shape = tuple(getattr(have[path], "shape", ()))
        if shape != tuple(want.shape):
            raise ValueError(f"params[{name!r}] has shape {shape}; cfg (hidden_size="
                             f"{cfg.hidden_size}, num_heads={cfg.num_heads}, num_kv_heads="
                             f"{cfg.num_kv_heads}, head_dim={cfg.head_dim}, num_layers="
                             f"{cfg.num_layers}, vocab_size={cfg.vocab_size}) needs "
                             f"{tuple(want.shape)}")
    if cfg.tie_embeddings and ("lm_head",) in have:
        raise ValueError("params hold an 'lm_head' but cfg.tie_embeddings=True would ignore it; "
                         "set tie_embeddings=False or drop the lm_head")


def check_token_ids(tokens, vocab_size: int, name: str = "tokens", lengths=None) -> None:
    """Raises ValueError when a concrete token id lies outside [0, vocab_size); with lengths
    [B], only each row's first lengths[b] ids (right padding may hold anything)."""
    if isinstance(tokens, jax.core.Tracer) or getattr(tokens, "size", 0) == 0 or (
            isinstance(tokens, jax.Array) and not tokens.is_fully_addressable):
        return
    ids = np.asarray(tokens)
    if lengths is not None:
        if isinstance(lengths, jax.core.Tracer) or (
                isinstance(lengths, jax.Array) and not lengths.is_fully_addressable):
            return
        real = np.arange(ids.shape[1])[None] < np.asarray(lengths)[:, None]
        ids = ids[real]
        if ids.size == 0:
            return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds id {bad}; expected ids in [0, {vocab_size}) "
                         f"(cfg.vocab_size={vocab_size})")


def check_finite_params(params) -> None:
    """Raises ValueError naming the first weight that holds NaN or inf (e.g. a checkpoint saved
    after the model diverged). One reduction per weight; skipped for traced params."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if any(isinstance(x, jax.core.Tracer) for _, x in leaves):
        return
    finite = jax.device_get([jnp.isfinite(x).all() for _, x in leaves])
    for (path, x), ok in zip(leaves, finite):
        if not ok:
            name = jax.tree_util.keystr(path)
            raise ValueError(f"params{name} (shape {tuple(x.shape)}) holds NaN or inf; the "
                             f"weights are unusable (restore an earlier checkpoint)")


def checked(fn, *, errors=checkify.float_checks | checkify.user_checks):
    """`fn(params, tokens, cfg, ...)` (forward, run_segments, a train loss, lcm.cache.prefill,
    ...) with the checks that also see traced values, for debugging: token ids in
    [0, cfg.vocab_size), a `lengths=` keyword's row lengths in [1, T] and, by
    default, no NaN produced (`checkify.float_checks`: a diverging model fails at the first op
    that makes a NaN, rather than at the loss). Returns a function giving `(error, out)`; jit it
    and raise outside:

        err, logits = jax.jit(checked(forward), static_argnums=2)(params, tokens, cfg)
        err.throw()  # JaxRuntimeError naming the failed check; a no-op when all passed

    `errors`: the checkify error set (e.g. `checkify.all_checks` for out-of-bounds indexing
    too). The checks cost time: use it to find a fault, not in production."""
    @functools.wraps(fn)
    def with_token_check(params, tokens, cfg, *args, **kwargs):
        checkify.check(jnp.all((tokens >= 0) & (tokens < cfg.vocab_size)),
                       f"tokens holds an id outside [0, {cfg.vocab_size}) "
                       f"(cfg.vocab_size={cfg.vocab_size})")
        lengths = kwargs.get("lengths")
        if lengths is not None:
            T = jnp.shape(tokens)[-1]
            lengths = jnp.asarray(lengths)
            checkify.check(jnp.all((lengths >= 1) & (lengths <= T)),
                           f"lengths holds a row length outside [1, {T}] (tokens are "
                           f"right-padded to {T}): {{}}", lengths)
        return fn(params, tokens, cfg, *args, **kwargs)

    return checkify.checkify(with_token_check, errors=errors)

