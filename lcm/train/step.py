"""One optimizer step of next-token training over the functional decoder, optionally sharded.

A batch is a dict of int32 [batch, seq] arrays: `tokens`, and optionally `segment_ids` (packed
documents; 0 marks padding), `positions` (RoPE positions, e.g. restarting per document or
PoSE-skipped) and `loss_mask` (weight of predicting each token from the ones before it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lcm.checks import is_int
from lcm.config import ModelConfig
from lcm.model import forward
from lcm.sharding import DEFAULT_RULES, LogicalSharding, logical_to_spec, param_shardings

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step changes: the step count, the params and the optimizer state."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0 with a fresh optimizer state for `params`."""
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def target_weights(batch) -> jax.Array:
    """float32 [B, T-1]: the weight of predicting tokens[:, t + 1] from tokens[:, :t + 1].

    Pairs across a document boundary (segment id changes) and padding (segment id 0) get 0;
    `loss_mask[:, t + 1]` multiplies the rest.
    """
    tokens = batch["tokens"]
    weights = jnp.ones((tokens.shape[0], tokens.shape[1] - 1), jnp.float32)
    if (seg := batch.get("segment_ids")) is not None:
        weights *= ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)).astype(jnp.float32)
    if (mask := batch.get("loss_mask")) is not None:
        weights *= mask[:, 1:].astype(jnp.float32)
    return weights


def lm_loss(params, batch, cfg: ModelConfig, *, shard=None):
    """Summed next-token cross-entropy and the number of predicted tokens: `(sum, count)`.

    batch: a dict of arrays that all have the shape of `tokens`, [B, T] with T >= 2
    (`BATCH_KEYS`; `train_step` refuses other keys):

    - `tokens` (required), int [B, T]: token ids in [0, cfg.vocab_size). Token t + 1 is
      predicted from tokens 0..t, so there are T - 1 predictions per row.
    - `segment_ids` (optional), int [B, T]: packed documents. A token attends only within its
      segment, RoPE positions restart at 0 at each segment (unless `positions` is given), and
      a prediction across a document boundary or onto padding (segment id 0) is not counted.
    - `positions` (optional), int [B, T]: the RoPE position of each token (default 0..T-1, or
      restarting per segment), e.g. PoSE-skipped positions.
    - `loss_mask` (optional), numeric or bool [B, T]: `loss_mask[:, t + 1]` weights the
      prediction of token t + 1 (0 excludes it, e.g. for prompt tokens); cast to float32.

    The weight of each prediction is the product of the two rules above
    (`target_weights(batch)`, float32 [B, T - 1]). shard: as in `lcm.model.forward`.
    Returns float32 scalars: sum = the weighted sum of -log p(token t + 1 | tokens 0..t) over
    the batch, count = the sum of the weights; the mean loss is sum / count.
    """
    tokens = batch["tokens"]
    logits = forward(params, tokens, cfg, positions=batch.get("positions"),
                     segment_ids=batch.get("segment_ids"), shard=shard)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    weights = target_weights(batch)
    return jnp.sum(nll * weights), jnp.sum(weights)


def train_step(state: TrainState, batch, cfg: ModelConfig,
               optimizer: optax.GradientTransformation, *, accumulation_steps: int = 1,
               shard=None):
    """One update from `batch`, split into `accumulation_steps` microbatches along its batch
    axis whose summed gradients are divided by the total number of predicted tokens (so the
    update equals the single-batch one). Returns `(new_state, metrics)`; metrics are float32
    scalars: loss (mean per token), tokens, grad_norm (before clipping), param_norm.
    """
    _check_batch(batch, accumulation_steps)
    def value_and_grads(params, mb):
        (s, n), g = jax.value_and_grad(
            lambda p: lm_loss(p, mb, cfg, shard=shard), has_aux=True)(params)
        return g, s, n

    if accumulation_steps == 1:
        grads, loss_sum, count = value_and_grads(state.params, batch)
    else:
        # Microbatch i takes rows i, i + A, ...: a row stays on the device that holds it.
        micro_batches = {k: jnp.moveaxis(v.reshape(v.shape[0] // accumulation_steps,
                                                   accumulation_steps, *v.shape[1:]), 1, 0)
                         for k, v in batch.items()}
        zeros = jax.tree.map(jnp.zeros_like, state.params)

        def body(carry, mb):
            g, s, n = value_and_grads(state.params, mb)
            return jax.tree.map(jnp.add, carry, (g, s, n)), None

        (grads, loss_sum, count), _ = jax.lax.scan(
            body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
            micro_batches)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / denom, "tokens": count,
               "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    return TrainState(state.step + 1, params, opt_state), metrics


def _check_batch(batch, accumulation_steps):
    if not isinstance(batch, dict) or "tokens" not in batch:
        raise ValueError(f"batch={type(batch).__name__}; expected a dict with 'tokens'")
    if unknown := sorted(set(batch) - set(BATCH_KEYS)):
        raise ValueError(f"batch has unknown keys {unknown}; expected some of {list(BATCH_KEYS)}")
    shape = batch["tokens"].shape
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(f"batch['tokens'] shape {shape}; expected [batch, seq] with seq >= 2")
    if bad := [k for k, v in batch.items() if v.shape != shape]:
        raise ValueError(f"batch keys {bad} differ in shape from tokens {shape}")
    if (not is_int(accumulation_steps) or accumulation_steps < 1
            or shape[0] % accumulation_steps):
        raise ValueError(f"accumulation_steps={accumulation_steps!r}; expected a positive int "
                         f"dividing the batch size {shape[0]}")


def state_shardings(state_shapes: TrainState, axes, mesh, optimizer,
                    rules=DEFAULT_RULES) -> TrainState:
    """NamedShardings for a TrainState: params by their logical axes, optimizer moments like
    their params, scalars (step, counts) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = param_shardings(state_shapes.params, axes, mesh, rules)
    opt = optax.tree_utils.tree_map_params(
        optimizer, lambda _, sharding: sharding, state_shapes.opt_state, params,
        transform_non_params=lambda _: replicated)
    return TrainState(replicated, params, opt)


def batch_sharding(mesh, shape, rules=DEFAULT_RULES) -> NamedSharding:
    """Batch arrays [batch, seq]: batch over data/fsdp, seq over context (by the rules)."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), shape, mesh, rules))


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, *,
                    accumulation_steps: int = 1, mesh=None, axes=None, state=None,
                    rules=DEFAULT_RULES):
    """A jitted `(state, batch) -> (state, metrics)` that donates the old state.

    With a `mesh`, pass the params' logical `axes` and a `state` (or its shapes): the state is
    sharded by the rules (`state_shardings`), activations constrained by `LogicalSharding`.
    """
    if mesh is None:
        step = functools.partial(train_step, cfg=cfg, optimizer=optimizer,
                                 accumulation_steps=accumulation_steps)
        return jax.jit(step, donate_argnums=0)
    if axes is None or state is None:
        raise ValueError("make_train_step(mesh=...) needs the params' logical axes and the "
                         "state (or its jax.eval_shape) to derive shardings")
    shardings = state_shardings(state, axes, mesh, optimizer, rules)
    step = functools.partial(train_step, cfg=cfg, optimizer=optimizer,
                             accumulation_steps=accumulation_steps,
                             shard=LogicalSharding(mesh, rules))
    return jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None),
                   donate_argnums=0)
