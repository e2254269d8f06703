"""Nothing silent in the KV cache: a catalogue of bad inputs to prefill, prefill_observed,
compress, decode_step, extend, generate and the presses (each a ValueError naming the argument,
raised before tracing), and the inputs that must be accepted (NumPy integers, a compressed
cache's second compression refused)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import (TOVA, KVCache, Quest, SnapKV, Speculative, StreamingLLM, compress,
                       decode_step, extend, generate, prefill, prefill_observed)
from lcm.cache.presses.duo import DuoAttention
from lcm.cache.presses.kivi import KIVI
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import init_params

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
PARAMS = init_params(CFG, jax.random.key(0))[0]
TOKENS = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
_, CACHE = prefill(PARAMS, TOKENS, CFG, max_new_tokens=4)
_, FULL, OBS = prefill_observed(PARAMS, TOKENS, CFG, SnapKV(0.5))
SMALL = compress(FULL, SnapKV(0.5), OBS, CFG)


def call(fn, *args, **kw):
    return lambda: fn(*args, **kw)


# (id, call, regex the ValueError's message must match: it names the argument or the value)
ERRORS = [
    ("prefill_tokens_1d", call(prefill, PARAMS, TOKENS[0], CFG), r"tokens: shape \(8,\)"),
    ("prefill_tokens_float", call(prefill, PARAMS, TOKENS * 1.0, CFG), r"tokens: shape"),
    ("prefill_empty", call(prefill, PARAMS, TOKENS[:, :0], CFG), r"non-empty"),
    ("prefill_id_vocab", call(prefill, PARAMS, TOKENS + 60, CFG), r"tokens holds id 75"),
    ("prefill_id_negative", call(prefill, PARAMS, TOKENS - 1, CFG), r"holds id -1"),
    ("prefill_lengths_shape", call(prefill, PARAMS, TOKENS, CFG, lengths=jnp.array([8])),
     r"lengths: shape \(1,\)"),
    ("prefill_lengths_range", call(prefill, PARAMS, TOKENS, CFG, lengths=jnp.array([9, 3])),
     r"lengths=\[9, 3\]"),
    ("prefill_lengths_zero", call(prefill, PARAMS, TOKENS, CFG, lengths=jnp.array([0, 3])),
     r"lengths=\[0, 3\]"),
    ("prefill_room", call(prefill, PARAMS, TOKENS, CFG, max_new_tokens=-1),
     r"max_new_tokens=-1"),
    ("prefill_chunk_size", call(prefill, PARAMS, TOKENS, CFG, chunk_size=0), r"chunk_size=0"),
    ("prefill_chunk", call(prefill, PARAMS, TOKENS, CFG, prefill_chunk=0), r"prefill_chunk=0"),
    ("prefill_chunk_kivi", call(prefill, PARAMS, TOKENS, CFG, prefill_chunk=4,
                                policy=KIVI(bits=2, group_size=4, residual_length=4)),
     r"prefill_chunk=4 with policy=KIVI"),
    ("prefill_layout", call(prefill, PARAMS, TOKENS, CFG, layout="dense"), r"layout='dense'"),
    ("prefill_policy", call(prefill, PARAMS, TOKENS, CFG, policy="snapkv"), r"policy='snapkv'"),
    ("prefill_params", call(prefill, {"embed": PARAMS["embed"]}, TOKENS, CFG),
     r"params lack"),
    ("prefill_cfg", call(prefill, PARAMS, TOKENS, "cfg"), r"cfg=str"),
    ("observed_policy", call(prefill_observed, PARAMS, TOKENS, CFG, (None,)), r"policy=None"),
    ("compress_twice", call(compress, SMALL, SnapKV(0.5), OBS, CFG), r"already compressed"),
    ("compress_observations", call(compress, FULL, SnapKV(0.5), {"q_win": 1}, CFG),
     r"observations=dict"),
    ("compress_room", call(compress, FULL, SnapKV(0.5), OBS, CFG, max_new_tokens=-2),
     r"max_new_tokens=-2"),
    ("decode_tokens_shape", call(decode_step, PARAMS, CACHE, TOKENS, CFG),
     r"tokens: shape \(2, 8\)"),
    ("decode_cache", call(decode_step, PARAMS, {"k": 1}, TOKENS[:, 0], CFG),
     r"cache=dict"),
    ("decode_policy_budget", call(decode_step, PARAMS, CACHE, TOKENS[:, 0], CFG,
                                  policy=TOVA(0.5)), r"layout='uniform'|needs a token budget"),
    ("extend_tokens", call(extend, PARAMS, CACHE, TOKENS[:1], CFG), r"tokens: shape \(1, 8\)"),
    ("extend_lengths", call(extend, PARAMS, CACHE, TOKENS[:, :2], CFG,
                            lengths=jnp.array([3, 1])), r"lengths=\[3, 1\]"),
    ("extend_ids", call(extend, PARAMS, CACHE, TOKENS[:, :2] + 63, CFG), r"holds id"),
    ("generate_max_new", call(generate, PARAMS, CFG, TOKENS, max_new_tokens=0),
     r"max_new_tokens=0"),
    ("generate_tova_no_budget", call(generate, PARAMS, CFG, TOKENS, max_new_tokens=2,
                                     decode_policy=TOVA(0.5)), r"needs a token budget"),
    ("generate_streaming_no_budget", call(generate, PARAMS, CFG, TOKENS, max_new_tokens=2,
                                          decode_policy=StreamingLLM(0.5)),
     r"needs a token budget"),
    ("generate_temperature", call(generate, PARAMS, CFG, TOKENS, max_new_tokens=2,
                                  temperature=-1.0), r"temperature=-1.0"),
    ("generate_key", call(generate, PARAMS, CFG, TOKENS, max_new_tokens=2, temperature=1.0),
     r"key=None"),
    ("generate_top_k", call(generate, PARAMS, CFG, TOKENS, max_new_tokens=2, top_k=65),
     r"top_k=65"),
    ("generate_top_p", call(generate, PARAMS, CFG, TOKENS, max_new_tokens=2, top_p=0.0),
     r"top_p=0.0"),
    ("generate_stop", call(generate, PARAMS, CFG, TOKENS, max_new_tokens=2, stop_tokens=(64,)),
     r"stop_tokens=\(64,\)"),
    ("generate_speculative", call(generate, PARAMS, CFG, TOKENS, max_new_tokens=2,
                                  speculative="yes"), r"speculative='yes'"),
    ("speculative_gamma", call(Speculative, StreamingLLM(budget=4), gamma=0),
     r"Speculative.gamma=0"),
    ("snapkv_ratio", call(SnapKV, 1.5), r"compression_ratio=1.5"),
    ("snapkv_budget_and_ratio", call(SnapKV, 0.5, budget=4), r"both set"),
    ("quest_budget", call(Quest, token_budget=0), r"Quest\(token_budget=0\)"),
    ("kivi_group", call(KIVI, bits=2, group_size=0), r"KIVI\(group_size=0\)"),
    ("duo_sink", call(DuoAttention, head_scores=((1.0, 0.5), (0.2, 0.1)), threshold=None,
                      head_compression_ratio=0.5, sink_size=-1), r"sink_size=-1"),
    ("empty_cache", call(KVCache.empty, num_layers=0, batch=1, num_kv_heads=1, capacity=4,
                         head_dim=8), r"num_layers=0"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_input_raises_a_value_error_naming_it(case):
    _, fn, match = case
    with pytest.raises(ValueError, match=match):
        fn()


def test_numpy_integers_are_accepted():
    empty = KVCache.empty(num_layers=np.int64(2), batch=np.int32(1), num_kv_heads=np.int64(2),
                          capacity=np.int64(4), head_dim=np.int64(8))
    assert empty.k.shape == (2, 1, 2, 4, 8)
    assert Quest(token_budget=np.int64(8)).token_budget == 8
    assert KIVI(bits=2, group_size=np.int64(4), residual_length=np.int64(4)) == KIVI(
        bits=2, group_size=4, residual_length=4)
    small = compress(FULL, SnapKV(0.5), OBS, CFG, max_new_tokens=np.int64(2))
    assert small.capacity == SMALL.capacity + 2
    _, cache = prefill(PARAMS, TOKENS, CFG, max_new_tokens=np.int64(4))
    assert cache.capacity == CACHE.capacity
