"""Nothing silent in segment recurrence: a catalogue of bad inputs to run_segments, the memory
helpers and the memory kinds (each a ValueError naming the argument), and NumPy scalars that
must be accepted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.config import AttentionConfig, ModelConfig
from lcm.memory import (CompressiveMemory, KNNMemory, LinearRecurrence, RecurrentMemory,
                        RetrievedBlocks, TransformerXL, init_memory_params, init_memory_state,
                        run_segments, segment_scan)
from lcm.model import init_params

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
PARAMS = init_params(CFG, jax.random.key(0))[0]
TOKENS = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
RMT = RecurrentMemory(num_mem_tokens=2)
RMT_PAIR = init_memory_params(RMT, CFG, jax.random.key(1))
XL = TransformerXL(mem_len=4)


def segments(tokens=TOKENS, cfg=CFG, *, memory=None, segment_len=3, **kw):
    return lambda: run_segments(PARAMS, tokens, cfg, memory=memory, segment_len=segment_len, **kw)


# (id, call, regex the ValueError's message must match: it names the argument or the value)
ERRORS = [
    ("memory_params_pair", segments(memory=RMT, memory_params=RMT_PAIR),
     r"memory_params is a tuple of 2; .*\(params, axes\), pass its first item"),
    ("memory_params_pair_list", segments(memory=RMT, memory_params=list(RMT_PAIR)),
     r"memory_params is a list of 2; .*pass its first item"),
    ("memory_params_array", segments(memory=RMT, memory_params=jnp.zeros((2, 32))),
     r"memory_params=ArrayImpl; expected None or the params dict"),
    ("memory_params_missing", segments(memory=RMT), r"memory=RecurrentMemory\(num_mem_tokens=2\) "
     r"has learned weights: pass memory_params"),
    ("memory_params_shapes", segments(memory=RMT, memory_params={"memory": jnp.zeros((3, 32))}),
     r"memory_params \{'memory': \(3, 32\)\} do not fit"),
    ("memory_str", segments(memory="xl"), r"memory='xl'; expected None or a memory kind"),
    ("segment_len_zero", segments(segment_len=0), r"segment_len=0; expected a positive int"),
    ("segment_len_float", segments(segment_len=3.0), r"segment_len=3.0"),
    ("segment_len_bool", segments(segment_len=True), r"segment_len=True"),
    ("tokens_empty", segments(tokens=jnp.zeros((1, 0), jnp.int32)), r"tokens has shape \(1, 0\)"),
    ("tokens_empty_batch", segments(tokens=jnp.zeros((0, 4), jnp.int32)),
     r"tokens has shape \(0, 4\)"),
    ("tokens_float", segments(tokens=TOKENS.astype(jnp.float32)), r"tokens: shape \(2, 6\), "
     r"dtype float32"),
    ("tokens_1d", segments(tokens=TOKENS[0]), r"tokens: shape \(6,\)"),
    ("token_id_vocab", segments(tokens=TOKENS.at[0, 1].set(64)), r"tokens holds id 64"),
    ("token_id_negative", segments(tokens=TOKENS.at[0, 1].set(-1)), r"tokens holds id -1"),
    ("targets_vocab", segments(targets=TOKENS.at[1, 2].set(64)), r"targets holds id 64; "
     r"expected ids in \[0, 64\)"),
    ("targets_shape", segments(targets=TOKENS[:, :3]), r"targets: shape \(2, 3\)"),
    ("start_of_sequence", segments(start_of_sequence=jnp.ones((2, 5), bool)),
     r"start_of_sequence: shape \(2, 5\)"),
    ("state", segments(memory=XL, state={"position": jnp.zeros(2, jnp.int32)}),
     r"state does not fit memory=TransformerXL\(mem_len=4\)"),
    ("bptt_segments", segments(bptt_segments=0), r"bptt_segments=0"),
    ("params_none", lambda: run_segments(None, TOKENS, CFG, memory=None, segment_len=3),
     r"params=NoneType"),
    ("params_other_cfg", segments(cfg=ModelConfig(**{**CFG.__dict__, "vocab_size": 65})),
     r"params\['embed'\] has shape \(64, 32\)"),
    ("cfg_dict", segments(cfg={"vocab_size": 64}), r"cfg=dict; expected a ModelConfig"),
    ("init_params_cfg", lambda: init_memory_params(RMT, None, jax.random.key(0)),
     r"cfg=NoneType"),
    ("init_state_batch_zero", lambda: init_memory_state(XL, CFG, 0), r"batch=0"),
    ("init_state_batch_float", lambda: init_memory_state(XL, CFG, 2.0), r"batch=2.0"),
    ("init_state_pair", lambda: init_memory_state(RMT, CFG, 2, RMT_PAIR),
     r"memory_params is a tuple of 2"),
    ("scan_bptt", lambda: segment_scan(lambda c, s: (c, s), jnp.zeros(2), jnp.zeros((3, 2)),
                                       bptt_segments=1.5), r"bptt_segments=1.5"),
    ("xl_mem_len", lambda: TransformerXL(mem_len=0), r"TransformerXL\(mem_len=0\); expected a "
     r"positive int"),
    ("rmt_tokens", lambda: RecurrentMemory(num_mem_tokens=-1), r"RecurrentMemory\("
     r"num_mem_tokens=-1\); expected an int >= 0"),
    ("linear_chunk", lambda: LinearRecurrence(chunk_size=0), r"LinearRecurrence\(chunk_size=0\)"),
    ("compressive_delta", lambda: CompressiveMemory(delta_rule="yes"),
     r"CompressiveMemory\(delta_rule='yes'\); expected a bool"),
    ("knn_k", lambda: KNNMemory(capacity=4, k=8), r"KNNMemory\(k=8\) > capacity=4"),
    ("knn_capacity", lambda: KNNMemory(capacity=0, k=1), r"KNNMemory\(capacity=0\)"),
    ("knn_shards", lambda: KNNMemory(capacity=8, k=2, shards=3), r"KNNMemory\(shards=3\) does "
     r"not divide"),
    ("knn_layers", lambda: KNNMemory(capacity=8, k=2, layers=(-1,)), r"KNNMemory\(layers="
     r"\(-1,\)\)"),
    ("knn_approx", lambda: KNNMemory(capacity=8, k=2, approx="no"), r"KNNMemory\(approx='no'\)"),
    ("blocks_multiple", lambda: RetrievedBlocks(capacity=8, block_size=3, top_k=1),
     r"RetrievedBlocks\(capacity=8\) is not a multiple of block_size=3"),
    ("blocks_top_k", lambda: RetrievedBlocks(capacity=8, block_size=4, top_k=0),
     r"RetrievedBlocks\(top_k=0\)"),
    ("blocks_boundaries", lambda: RetrievedBlocks(capacity=8, block_size=4, top_k=1,
                                                  boundaries="x"), r"boundaries='x'"),
    ("blocks_clip", lambda: RetrievedBlocks(capacity=8, block_size=4, top_k=1,
                                            clip_positions="no"), r"clip_positions='no'"),
    ("blocks_repr", lambda: RetrievedBlocks(capacity=8, block_size=4, top_k=1, repr_tokens=5),
     r"RetrievedBlocks\(repr_tokens=5\)"),
]


@pytest.mark.parametrize("call,message", [pytest.param(c, m, id=i) for i, c, m in ERRORS])
def test_bad_input_raises_a_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# (id, call, the Python-int equivalent it must equal, with the same hash: kinds are static args)
ACCEPTED = [
    ("xl", lambda: TransformerXL(mem_len=np.int64(4)), lambda: XL),
    ("rmt", lambda: RecurrentMemory(num_mem_tokens=np.int32(2)), lambda: RMT),
    ("linear", lambda: LinearRecurrence(chunk_size=np.int64(8)),
     lambda: LinearRecurrence(chunk_size=8)),
    ("knn", lambda: KNNMemory(capacity=np.int64(8), k=np.int64(2), layers=(np.int64(1),)),
     lambda: KNNMemory(capacity=8, k=2, layers=(1,))),
    ("blocks", lambda: RetrievedBlocks(capacity=np.int64(8), block_size=np.int64(4), top_k=1,
                                       repr_tokens=np.int64(2), surprise_window=np.int64(4)),
     lambda: RetrievedBlocks(capacity=8, block_size=4, top_k=1, repr_tokens=2,
                             surprise_window=4)),
]


@pytest.mark.parametrize("call,want", [pytest.param(c, w, id=i) for i, c, w in ACCEPTED])
def test_numpy_ints_are_accepted(call, want):
    got, expected = call(), want()
    assert got == expected and hash(got) == hash(expected) and repr(got) == repr(expected)


def test_run_segments_takes_numpy_ints():
    """segment_len and bptt_segments as NumPy ints (were refused) give the Python-int result."""
    tokens = TOKENS[:1, :4]
    got, _ = run_segments(PARAMS, tokens, CFG, memory=None, segment_len=np.int64(2),
                          bptt_segments=np.int64(1))
    want, _ = run_segments(PARAMS, tokens, CFG, memory=None, segment_len=2, bptt_segments=1)
    np.testing.assert_array_equal(got, want)
