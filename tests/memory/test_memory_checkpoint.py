"""Memory state saved with Orbax mid-sequence resumes bit-identically."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lcm.config import AttentionConfig, ModelConfig
from lcm.memory import (CompressiveMemory, KNNMemory, init_memory_params, init_memory_state,
                        run_segments)
from lcm.model import init_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
run = jax.jit(run_segments, static_argnames=("cfg", "memory", "segment_len"))


@pytest.mark.parametrize("memory", [CompressiveMemory(), KNNMemory(capacity=16, k=4)])
def test_orbax_checkpoint_of_memory_state_resumes_bit_identically(tmp_path, memory):
    params, _ = init_params(CFG, jax.random.key(0))
    mparams = init_memory_params(memory, CFG, jax.random.key(1))[0] or None
    tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, CFG.vocab_size, dtype=jnp.int32)
    kwargs = dict(memory=memory, segment_len=8, memory_params=mparams)
    _, state = run(params, tokens[:, :16], CFG, **kwargs)
    want, want_state = run(params, tokens[:, 16:], CFG, state=state, **kwargs)

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            init_memory_state(memory, CFG, 2, mparams))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "state", abstract)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    got, got_state = run(params, tokens[:, 16:], CFG, state=restored, **kwargs)
    np.testing.assert_array_equal(got, want)
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
        np.testing.assert_array_equal(a, b)
    assert int(got_state["position"][0]) == 32
