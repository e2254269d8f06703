"""Nothing silent at the model boundary: a catalogue of bad inputs to forward, init_params, the
configs and the position helpers (each a ValueError naming the argument), and NumPy scalars that
must be accepted (every such call raises or returns before tracing); and `checked`, which sees
traced token ids and NaN inside jit (one tiny forward compiled)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from lcm.config import AttentionConfig, ModelConfig, PositionConfig, RopeConfig
from lcm.model import checked, forward, init_params
from lcm.positions import alibi_slopes, rope_frequencies
from lcm.sharding import make_mesh

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
PARAMS = init_params(CFG, jax.random.key(0))[0]
TOKENS = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
BASE = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=8, intermediate_size=48)


def fwd(params=PARAMS, tokens=TOKENS, cfg=CFG, **kw):
    return lambda: forward(params, tokens, cfg, **kw)


def config(**changes):
    return lambda: ModelConfig(**{**BASE, **changes})


def without(name):
    return {k: v for k, v in PARAMS.items() if k != name}


# (id, call, regex the ValueError's message must match: it names the argument or the value)
ERRORS = [
    ("tokens_empty", fwd(tokens=jnp.zeros((1, 0), jnp.int32)), r"tokens has shape \(1, 0\)"),
    ("tokens_empty_batch", fwd(tokens=jnp.zeros((0, 4), jnp.int32)), r"tokens has shape \(0, 4\)"),
    ("tokens_float", fwd(tokens=TOKENS.astype(jnp.float32)), r"tokens: shape \(2, 6\), dtype "
     r"float32; expected int"),
    ("tokens_1d", fwd(tokens=TOKENS[0]), r"tokens: shape \(6,\)"),
    ("tokens_list", fwd(tokens=[[1, 2]]), r"tokens: shape None"),
    ("token_id_vocab", fwd(tokens=TOKENS.at[1, 3].set(64)), r"tokens holds id 64; expected ids "
     r"in \[0, 64\)"),
    ("token_id_huge", fwd(tokens=TOKENS.at[1, 3].set(10**6)), r"tokens holds id 1000000"),
    ("token_id_negative", fwd(tokens=TOKENS.at[0, 0].set(-1)), r"tokens holds id -1"),
    ("params_no_embed", fwd(params=without("embed")), r"params lack 'embed'"),
    ("params_no_layers", fwd(params=without("layers")), r"params lack 'layers/"),
    ("params_list", fwd(params=[PARAMS]), r"params=list; expected the dict"),
    ("params_pair", fwd(params=(PARAMS, {})), r"params=tuple"),
    ("params_other_heads", fwd(cfg=dataclasses.replace(CFG, num_heads=8, num_kv_heads=4,
                                                       head_dim=4)),
     r"params\['layers/w[qkvo]'\] has shape \(.*\); cfg .*num_heads=8.* needs"),
    ("params_tied_with_head", fwd(cfg=dataclasses.replace(CFG, tie_embeddings=True)),
     r"'lm_head' but cfg.tie_embeddings=True"),
    ("params_other_vocab", fwd(cfg=dataclasses.replace(CFG, vocab_size=65)),
     r"params\['embed'\] has shape \(64, 32\)"),
    ("cfg_dict", fwd(cfg=dict(BASE)), r"cfg=dict; expected a ModelConfig"),
    ("positions_shape", fwd(positions=TOKENS[:, :2]), r"positions: shape \(2, 2\)"),
    ("positions_list", fwd(positions=[[0]]), r"positions: shape None"),
    ("segment_ids_float", fwd(segment_ids=TOKENS.astype(jnp.float32)),
     r"segment_ids: shape \(2, 6\), dtype float32"),
    ("init_params_cfg", lambda: init_params(None, jax.random.key(0)), r"cfg=NoneType"),
    ("num_heads_zero", config(num_heads=0), r"ModelConfig.num_heads=0; expected a positive int"),
    ("num_heads_multiple", config(num_heads=3), r"num_heads=3 must be a multiple of "
     r"num_kv_heads=2"),
    ("head_dim_odd", config(head_dim=7), r"head_dim=7; RoPE needs an even head_dim"),
    ("vocab_bool", config(vocab_size=True), r"vocab_size=True"),
    ("vocab_float", config(vocab_size=64.0), r"vocab_size=64.0"),
    ("norm_eps", config(norm_eps=2.0), r"norm_eps=2.0; expected a float in \(0, 1\)"),
    ("norm_eps_nan", config(norm_eps=float("nan")), r"norm_eps=nan"),
    ("dtype", config(dtype="int8"), r"dtype='int8'; expected one of"),
    ("attention_str", config(attention="xla"), r"attention='xla'; expected an AttentionConfig"),
    ("remat", config(remat="x"), r"remat='x'"),
    ("impl", lambda: AttentionConfig(impl="flash"), r"AttentionConfig.impl='flash'"),
    ("block_q", lambda: AttentionConfig(block_q=0), r"AttentionConfig.block_q=0"),
    ("position_type", lambda: PositionConfig(type="x"), r"PositionConfig.type='x'"),
    ("leak", lambda: PositionConfig(type="leaky_rerope", window=4, leak=float("inf")),
     r"PositionConfig.leak=inf"),
    ("rope_theta", lambda: RopeConfig(theta=-1), r"RopeConfig.theta=-1"),
    ("rope_required", lambda: RopeConfig(rope_type="linear"), r"rope_type='linear' requires "
     r"\['factor'\]"),
    ("rope_head_dim", lambda: rope_frequencies(RopeConfig(), 7), r"head_dim=7"),
    ("alibi_heads_zero", lambda: alibi_slopes(0), r"num_heads=0"),
    ("alibi_heads_float", lambda: alibi_slopes(4.0), r"num_heads=4.0"),
    ("mesh_shape", lambda: make_mesh((1, 1, 1, 2.0), devices=jax.devices()[:2]),
     r"shape=\(1, 1, 1, 2.0\); expected positive ints"),
]


@pytest.mark.parametrize("call,message", [pytest.param(c, m, id=i) for i, c, m in ERRORS])
def test_bad_input_raises_a_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# (id, call that must give the same as the Python-int one)
ACCEPTED = [
    ("config_numpy_ints", lambda: ModelConfig(**{**BASE, "vocab_size": np.int64(64),
                                                 "num_heads": np.int32(4)}),
     lambda: ModelConfig(**BASE)),
    ("config_numpy_eps", lambda: ModelConfig(**BASE, norm_eps=np.float64(1e-5)),
     lambda: ModelConfig(**BASE, norm_eps=1e-5)),
    ("attention_numpy_blocks", lambda: AttentionConfig(block_q=np.int64(8)),
     lambda: AttentionConfig(block_q=8)),
    ("rope_numpy_head_dim", lambda: rope_frequencies(RopeConfig(), np.int64(8))[0].tolist(),
     lambda: rope_frequencies(RopeConfig(), 8)[0].tolist()),
    ("alibi_numpy_heads", lambda: alibi_slopes(np.int64(4)).tolist(),
     lambda: alibi_slopes(4).tolist()),
    ("mesh_numpy_shape", lambda: make_mesh((1, 1, 1, np.int64(2)),
                                           devices=jax.devices()[:2]).shape,
     lambda: make_mesh((1, 1, 1, 2), devices=jax.devices()[:2]).shape),
]


@pytest.mark.parametrize("call,want", [pytest.param(c, w, id=i) for i, c, w in ACCEPTED])
def test_numpy_scalars_are_accepted(call, want):
    got, expected = call(), want()
    assert got == expected
    if isinstance(got, (ModelConfig, AttentionConfig)):  # jit static arguments: same hash
        assert hash(got) == hash(expected)


def test_checked_sees_traced_row_lengths_of_prefill():
    """jit(prefill) cannot check traced lengths (a length past T gives NaN logits): under
    `checked` a length outside [1, T] is reported with its value."""
    from lcm.cache import prefill
    run = jax.jit(checked(prefill), static_argnums=2)
    err, (logits, _) = run(PARAMS, TOKENS, CFG, lengths=jnp.array([6, 4]))
    err.throw()
    assert np.isfinite(np.asarray(logits)).all()
    for bad in ([6, 9], [0, 4]):
        err, _ = run(PARAMS, TOKENS, CFG, lengths=jnp.array(bad))
        with pytest.raises(checkify.JaxRuntimeError, match=r"row length outside \[1, 6\]"):
            err.throw()


def test_checked_sees_traced_token_ids_and_nan():
    """Inside jit the ids are traced (check_token_ids cannot see them): `checked` reports an id
    outside the vocabulary and a NaN made by the model; one compile for the three calls."""
    run = jax.jit(checked(forward), static_argnums=2)
    err, logits = run(PARAMS, TOKENS, CFG)
    err.throw()  # nothing failed
    assert logits.shape == (2, 6, 64)
    err, _ = run(PARAMS, TOKENS.at[1, 2].set(64), CFG)
    with pytest.raises(checkify.JaxRuntimeError, match=r"tokens holds an id outside \[0, 64\)"):
        err.throw()
    bad = {**PARAMS, "embed": PARAMS["embed"].at[3].set(jnp.nan)}
    err, _ = run(bad, TOKENS, CFG)
    with pytest.raises(checkify.JaxRuntimeError, match=r"nan generated by primitive"):
        err.throw()
