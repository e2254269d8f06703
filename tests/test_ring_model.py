"""The decoder with its sequence sharded on `context` (ring attention) equals the unsharded one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lcm.config import AttentionConfig, ModelConfig
from lcm.model import forward, init_params
from lcm.sharding import LogicalSharding, make_mesh, shard_params

CFG = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
RING = dataclasses.replace(CFG, attention=AttentionConfig(impl="ring", block_q=8, block_k=8))


@pytest.fixture(scope="module")
def model():
    params, axes = init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, CFG.vocab_size)
    # Documents cross the shard boundaries of every mesh below.
    segs = (jnp.arange(48)[None] >= jnp.asarray([[13], [29]])).astype(jnp.int32)
    return params, axes, tokens, segs


def loss(params, tokens, segs, cfg, shard=None):
    logits = forward(params, tokens, cfg, segment_ids=segs, shard=shard)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                         tokens[:, 1:, None], -1))


def _sharded_inputs(params, axes, tokens, segs, mesh):
    sharded = shard_params(params, axes, mesh)
    spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "context"))
    return sharded, jax.device_put(tokens, spec), jax.device_put(segs, spec)


@pytest.mark.parametrize("shape", [(2, 1, 1, 4), (1, 1, 1, 8)])
def test_forward_with_context_axis_matches_unsharded(devices, model, shape):
    params, axes, tokens, segs = model
    want = jax.jit(forward, static_argnames="cfg")(params, tokens, CFG, segment_ids=segs)
    mesh = make_mesh(shape)
    p, t, s = _sharded_inputs(params, axes, tokens, segs, mesh)
    with jax.set_mesh(mesh):
        got = jax.jit(forward, static_argnames=("cfg", "shard"))(
            p, t, RING, segment_ids=s, shard=LogicalSharding(mesh))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-5, rtol=3e-5)


def test_training_gradients_with_data_fsdp_tensor_context(devices, model):
    """A training step's gradients on a 1x2x2x2 (data, fsdp, tensor, context) mesh."""
    params, axes, tokens, segs = model
    want = jax.jit(jax.grad(loss), static_argnums=3)(params, tokens, segs, CFG)
    mesh = make_mesh((1, 2, 2, 2))
    p, t, s = _sharded_inputs(params, axes, tokens, segs, mesh)
    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(loss), static_argnums=(3, 4))(p, t, s, RING, LogicalSharding(mesh))
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = want
        for key in path:
            w = w[key.key]
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_ring_without_a_mesh_names_the_fix(model):
    params, _, tokens, segs = model
    with pytest.raises(ValueError, match="axis_name='context' is not an axis of the mesh"):
        forward(params, tokens, RING, segment_ids=segs)
