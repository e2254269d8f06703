"""Sharded forward (and gradients) on the 8-device CPU mesh equal the unsharded ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lcm.config import AttentionConfig, ModelConfig
from lcm.model import forward, init_params
from lcm.sharding import (DEFAULT_RULES, LogicalSharding, logical_to_spec, make_mesh,
                          shard_params)

CFG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
                  head_dim=8, intermediate_size=128,
                  attention=AttentionConfig(impl="xla", block_q=16, block_k=16))
fwd = jax.jit(forward, static_argnames=("cfg", "shard"))


@pytest.fixture(scope="module")
def model():
    params, axes = init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 40), 0, CFG.vocab_size)
    segs = (jnp.arange(40)[None] >= jnp.asarray([[13], [20], [0], [39], [5], [30], [1], [25]])
            ).astype(jnp.int32)
    return params, axes, tokens, segs


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1), (1, 1, 8, 1)])
def test_sharded_forward_matches_unsharded(devices, model, shape):
    params, axes, tokens, segs = model
    want = fwd(params, tokens, CFG, segment_ids=segs)
    mesh = make_mesh(shape)
    sharded = shard_params(params, axes, mesh)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    got = fwd(sharded, jax.device_put(tokens, batch), CFG,
              segment_ids=jax.device_put(segs, batch), shard=LogicalSharding(mesh))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    if shape[2] > 1:  # tensor-parallel: the heads axis of wq is really split
        assert sharded["layers"]["wq"].sharding.spec[2] == "tensor"
        assert len(sharded["layers"]["wq"].addressable_shards[0].data.shape) == 4
        assert sharded["layers"]["wq"].addressable_shards[0].data.shape[2] == 8 // shape[2]


def test_sharded_gradients_match_unsharded(devices, model):
    params, axes, tokens, segs = model

    def loss(p, shard=None):
        logits = forward(p, tokens, CFG, segment_ids=segs, shard=shard)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                             tokens[:, 1:, None], -1))

    want = jax.jit(jax.grad(loss))(params)
    mesh = make_mesh((2, 2, 2, 1))
    got = jax.jit(jax.grad(loss), static_argnums=1)(shard_params(params, axes, mesh),
                                                    LogicalSharding(mesh))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4)


def test_logical_to_spec_rules(devices):
    mesh = make_mesh((2, 2, 2, 1))
    # Activations: batch takes data and fsdp, so embed cannot use fsdp again.
    assert logical_to_spec(("batch", "seq", "embed"), (8, 16, 64), mesh) == \
        PartitionSpec(("data", "fsdp"), None, None)
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh) == PartitionSpec("fsdp", "tensor")
    # 3 KV heads cannot split over tensor=2: replicated rather than an uneven shard.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 3, 8), mesh) == \
        PartitionSpec("fsdp", None, None)
    # batch 2 splits over data only (fsdp would need 4).
    assert logical_to_spec(("batch",), (2,), mesh) == PartitionSpec("data")
    with pytest.raises(ValueError, match="no rule"):
        logical_to_spec(("nonsense",), (4,), mesh, DEFAULT_RULES)
    with pytest.raises(ValueError, match="do not match shape"):
        logical_to_spec(("batch",), (4, 4), mesh)


def test_make_mesh_errors(devices):
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        make_mesh((4, 4, 1, 1))
    with pytest.raises(ValueError, match="has 2 axes"):
        make_mesh((4, 2), ("data", "fsdp", "tensor"))
    with pytest.raises(ValueError, match="duplicates"):
        make_mesh((4, 2), ("data", "data"))
