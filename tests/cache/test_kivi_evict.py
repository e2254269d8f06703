"""KIVI after an eviction policy: `KIVI(bits, evict=SnapKV(...))` equals evicting, then
quantizing the kept entries by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import PolicyCache, PyramidKV, SnapKV, decode_step, generate, prefill
from lcm.cache.presses.kivi import KIVI, kivi_prefill
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import init_params

CFG = ModelConfig(vocab_size=61, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
PARAMS = init_params(CFG, jax.random.key(0))[0]
TOKENS = jax.random.randint(jax.random.key(1), (2, 48), 0, 61, dtype=jnp.int32)
LENGTHS = jnp.asarray([48, 37])
ROOM = 5


@pytest.mark.parametrize("evict", [SnapKV(0.5, window_size=4),
                                   PyramidKV(0.4, window_size=4, beta=2)],
                         ids=lambda p: type(p).__name__)
def test_kivi_after_eviction_equals_evicting_then_quantizing_by_hand(evict):
    policy = KIVI(bits=2, group_size=8, residual_length=8, evict=evict)
    logits, cache = prefill(PARAMS, TOKENS, CFG, policy=policy, lengths=LENGTHS,
                            max_new_tokens=ROOM)
    want_logits, kept = prefill(PARAMS, TOKENS, CFG, policy=evict, lengths=LENGTHS,
                                layout="uniform")
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)  # exact prefill
    assert cache.capacity == kept.capacity + ROOM
    plain = KIVI(bits=2, group_size=8, residual_length=8)
    by_hand = []
    for layer in range(CFG.num_layers):
        k, v = kept.k[layer].transpose(0, 2, 1, 3), kept.v[layer].transpose(0, 2, 1, 3)
        by_hand.append(kivi_prefill(plain, k, v, kept.length[layer][:, 0],
                                    capacity=cache.capacity))
        got = cache.layer(layer)
        np.testing.assert_array_equal(got.length, kept.length[layer][:, 0])
        for name in ("k_codes", "v_codes"):
            np.testing.assert_array_equal(getattr(got, name), getattr(by_hand[-1], name))
        # The float fields may differ in the last bit: XLA fuses the one jitted prefill and the
        # by-hand calls differently (seen with jax 0.12.1), the codes must still agree exactly.
        for name in ("k_scale", "k_min", "v_scale", "v_min", "k_residual", "v_residual"):
            np.testing.assert_allclose(getattr(got, name), getattr(by_hand[-1], name),
                                       rtol=1e-6, atol=1e-6)
    hand = PolicyCache(jax.tree.map(lambda *x: jnp.stack(x), *by_hand), cache.next_pos, policy,
                       cache.capacity)
    token = jnp.asarray([3, 9])
    for _ in range(ROOM):
        got, cache = decode_step(PARAMS, cache, token, CFG)
        want, hand = decode_step(PARAMS, hand, token, CFG)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        token = jnp.argmax(want, -1).astype(jnp.int32)
    alone = KIVI(bits=2, group_size=8, residual_length=8)
    _, quantized = prefill(PARAMS, TOKENS, CFG, policy=alone, lengths=LENGTHS,
                           max_new_tokens=ROOM)
    # sized by the scorer's budget (+ room), not the prompt (+ room); the full-precision
    # residual window does not shrink, hence not the whole (24 + 5) / (48 + 5). PyramidKV's
    # first layer keeps 43 of 48: KIVI sizes every layer for it.
    limit = 0.75 if type(evict) is SnapKV else 1.0
    assert cache.nbytes() < limit * quantized.nbytes()


def test_kivi_eviction_generates_in_a_batch_and_checks_its_policy():
    policy = KIVI(bits=4, group_size=8, residual_length=8, evict=SnapKV(0.5, window_size=4))
    out, count = generate(PARAMS, CFG, TOKENS, lengths=LENGTHS, max_new_tokens=4, policy=policy)
    alone, _ = generate(PARAMS, CFG, TOKENS[1:, :37], max_new_tokens=4, policy=policy)
    np.testing.assert_array_equal(out[1], alone[0])
    np.testing.assert_array_equal(count, [4, 4])
    for bad in (SnapKV(0.5, positions="cache"), SnapKV(0.5, gqa="query_head"), "snapkv"):
        with pytest.raises(ValueError, match="evict"):
            KIVI(bits=2, evict=bad)
