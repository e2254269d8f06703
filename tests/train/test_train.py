"""lcm.train: the optimizer, the train step (accumulation, sharding, remat), metrics files."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcm.config import AttentionConfig, ModelConfig
from lcm.model import init_params, param_axes
from lcm.sharding import make_mesh
from lcm.train import (MetricsWriter, OptimizerConfig, batch_sharding, init_train_state,
                       learning_rate_schedule, lm_loss, make_optimizer, make_train_step,
                       target_weights, train_step)

CFG = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64,
                  # The dense reference: these tests are about training, and it compiles fastest.
                  attention=AttentionConfig(impl="reference"))
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=20)


def _batch(key, B=4, T=16, segments=True):
    tokens = jax.random.randint(key, (B, T), 0, CFG.vocab_size, jnp.int32)
    batch = {"tokens": tokens}
    if segments:
        seg = np.ones((B, T), np.int32)
        seg[:, T // 2:] = 2
        seg[0, -3:] = 0  # padding
        pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0)
        batch.update(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos, jnp.int32))
    return batch


def _state(params, optimizer):
    """A fresh state on copies of params: the jitted step donates (deletes) its input."""
    return init_train_state(jax.tree.map(jnp.copy, params), optimizer)


def test_optimizer_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"OptimizerConfig.warmup_steps=20 >= total_steps=20"):
        OptimizerConfig(warmup_steps=20, total_steps=20)
    with pytest.raises(ValueError, match=r"OptimizerConfig.b2=1.0; expected a number in \(0, 1\)"):
        OptimizerConfig(b2=1.0)
    with pytest.raises(ValueError, match=r"OptimizerConfig.accumulation_steps=0"):
        OptimizerConfig(accumulation_steps=0)


def test_schedule_warms_up_then_decays_to_end_ratio():
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10,
                                                      total_steps=110, end_ratio=0.1))
    lrs = np.array([float(schedule(s)) for s in range(111)])
    np.testing.assert_allclose(lrs[:11], np.arange(11) / 10, atol=1e-6)
    assert np.all(np.diff(lrs[10:]) <= 1e-7)
    np.testing.assert_allclose(lrs[110], 0.1, atol=1e-6)
    np.testing.assert_allclose(lrs[60], 0.1 + 0.9 * 0.5, atol=1e-6)  # cosine midpoint


def test_target_weights_match_numpy_statement():
    batch = _batch(jax.random.key(0))
    seg = np.asarray(batch["segment_ids"])
    loss_mask = np.random.default_rng(0).integers(0, 2, seg.shape)
    got = np.asarray(target_weights({**batch, "loss_mask": jnp.asarray(loss_mask)}))
    want = np.zeros(got.shape)
    for b in range(seg.shape[0]):
        for t in range(seg.shape[1] - 1):
            want[b, t] = float(seg[b, t + 1] == seg[b, t] and seg[b, t + 1] != 0
                               and loss_mask[b, t + 1])
    np.testing.assert_array_equal(got, want)


def test_loss_is_mean_cross_entropy_of_a_plain_forward():
    params, _ = init_params(CFG, jax.random.key(1))
    batch = _batch(jax.random.key(2), segments=False)
    total, count = jax.jit(lambda p: lm_loss(p, batch, CFG))(params)
    from lcm.model import forward

    logits = np.asarray(forward(params, batch["tokens"], CFG), np.float64)
    tokens = np.asarray(batch["tokens"])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).sum()
    assert float(count) == tokens.shape[0] * (tokens.shape[1] - 1)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


@pytest.mark.slow
def test_accumulation_matches_one_big_batch():
    params, _ = init_params(CFG, jax.random.key(3))
    batch = _batch(jax.random.key(4))
    optimizer = make_optimizer(OPT)
    one, m1 = make_train_step(CFG, optimizer)(_state(params, optimizer), batch)
    acc, m2 = make_train_step(CFG, optimizer, accumulation_steps=2)(
        _state(params, optimizer), batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(acc.params)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"accumulation_steps=3; expected a positive int "
                                         r"dividing the batch size 4"):
        train_step(_state(params, optimizer), batch, CFG, optimizer,
                   accumulation_steps=3)


@pytest.mark.slow
def test_clipping_bounds_the_update():
    params, _ = init_params(CFG, jax.random.key(5))
    batch = _batch(jax.random.key(6))
    tiny_clip = make_optimizer(dataclasses.replace(OPT, clip_norm=1e-6, weight_decay=0.0))
    inner = optax.adamw(learning_rate_schedule(OPT), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    grads = jax.jit(jax.grad(lambda p: lm_loss(p, batch, CFG)[0] / lm_loss(p, batch, CFG)[1]))(
        params)
    clipped = jax.tree.map(lambda g: g * 1e-6 / optax.tree.norm(grads), grads)
    want = optax.apply_updates(params, inner.update(clipped, inner.init(params), params)[0])
    got, _ = make_train_step(CFG, tiny_clip)(_state(params, tiny_clip), batch)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots", "offload"])
def test_remat_policies_keep_gradients(remat):
    params, _ = init_params(CFG, jax.random.key(7))
    batch = _batch(jax.random.key(8))
    cfg = dataclasses.replace(CFG, remat=remat)
    loss = lambda c: (lambda p: lm_loss(p, batch, c)[0])
    want = jax.jit(jax.grad(loss(CFG)))(params)
    got = jax.jit(jax.grad(loss(cfg)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
    # Offload: the residuals saved for the backward pass (each layer's input) live in host
    # memory; the other policies keep them in device memory.
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(cfg)))(params))
    assert ("<host>" in jaxpr) == (remat == "offload")


@pytest.mark.slow
def test_sharded_step_matches_single_device(devices):
    params, axes = init_params(CFG, jax.random.key(9))
    batch = _batch(jax.random.key(10), B=4)
    optimizer = make_optimizer(OPT)
    want, wm = make_train_step(CFG, optimizer)(_state(params, optimizer), batch)
    mesh = make_mesh((2, 2, 2, 1))
    shapes = jax.eval_shape(lambda p: init_train_state(p, optimizer), params)
    step = make_train_step(CFG, optimizer, mesh=mesh, axes=param_axes(CFG), state=shapes)
    state = _state(params, optimizer)
    sharded_batch = jax.device_put(batch, batch_sharding(mesh, batch["tokens"].shape))
    got, gm = step(state, sharded_batch)
    assert tuple(got.params["layers"]["w_up"].sharding.spec) == (None, "fsdp", "tensor")
    np.testing.assert_allclose(float(gm["loss"]), float(wm["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_training_lowers_the_loss():
    params, _ = init_params(CFG, jax.random.key(11))
    optimizer = make_optimizer(OPT)
    step = make_train_step(CFG, optimizer)
    state = _state(params, optimizer)
    batch = _batch(jax.random.key(12))
    losses = []
    for _ in range(15):  # memorise one batch
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_metrics_writer_round_trips_and_truncates(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write(step, {"loss": 1.0 / 3 * step, "tokens": 7})
    rows = writer.read()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["loss"] == 1.0 / 3 * 3  # exact: floats are written with repr
    writer.truncate_after(3)
    writer.write(4, {"loss": 9.0, "tokens": 7})
    assert [(r["step"], r["loss"]) for r in MetricsWriter(str(tmp_path)).read()][-2:] == [
        (3, 1.0), (4, 9.0)]
    with pytest.raises(ValueError, match="differ from the CSV columns"):
        writer.write(5, {"loss": 1.0})
