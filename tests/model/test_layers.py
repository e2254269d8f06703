"""The one decoder layer: every path runs through `lcm.model.layers.decoder_layer`, and no other
module of lcm writes norm -> attention -> norm -> MLP."""

import ast
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcm
import lcm.model.layers as layers_module
from lcm.cache import KIVI, DuoAttention, Quest, SnapKV, decode_step, extended, prefill
from lcm.cache.formats import policy_prefill
from lcm.config import AttentionConfig, ModelConfig, PositionConfig
from lcm.memory import TransformerXL, run_segments
from lcm.model import forward, init_params

LCM = Path(lcm.__file__).parent
LAYER_FILE = LCM / "model" / "layers.py"
# The parts of a layer body: only lcm/model/layers.py may use them.
LAYER_PARTS = {"project_qkv", "project_out", "mlp"}
LAYER_WEIGHTS = {"attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm"}

# A shape no other test uses, so no jitted function has this cfg cached before the patch.
CFG = ModelConfig(vocab_size=89, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=32, intermediate_size=40,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))


def _uses(tree):
    """Names read and string subscripts (p["mlp_norm"]) of a module's syntax tree."""
    names, keys = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name.split(".")[-1])
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            keys.add(node.slice.value)
    return names, keys


def test_no_module_outside_the_layer_writes_a_layer_body():
    offenders = []
    for path in sorted(LCM.rglob("*.py")):
        if path == LAYER_FILE:
            continue
        names, keys = _uses(ast.parse(path.read_text()))
        if found := (names & LAYER_PARTS) | (keys & LAYER_WEIGHTS):
            offenders.append(f"{path.relative_to(LCM.parent)}: {sorted(found)}")
    assert not offenders, "layer parts used outside lcm/model/layers.py:\n" + "\n".join(offenders)


def _doubled_residuals(original):
    """A 'new model feature' added in one place: every layer's residual branches count twice."""
    def layer(x, p, cfg, **kwargs):
        y, ys, carry = original(x, p, cfg, **kwargs)
        return x + 2 * (y - x), ys, carry
    return layer


def _all_paths(params, tokens):
    """Last-token logits of the prompt by every path, and the next token's by the decode steps."""
    B, T = tokens.shape
    nxt = tokens[:, -1]
    prompt = tokens[:, :-1]
    out = {"forward": forward(params, prompt, CFG)[:, -1],
           "forward_next": forward(params, tokens, CFG)[:, -1]}
    logits, cache = prefill(params, prompt, CFG, max_new_tokens=1)
    out["prefill"] = logits
    out["decode_step"] = decode_step(params, cache, nxt, CFG)[0]
    logits, cache = prefill(params, prompt, CFG, policy=SnapKV(0.5, window_size=2),
                            max_new_tokens=1)
    out["prefill_press"] = logits
    # Both keep the prompt exact here: KIVI's residual holds every token, Quest reads all pages;
    # DuoAttention's heads all retrieve (scores >= threshold).
    duo = DuoAttention(head_scores=np.ones((CFG.num_layers, CFG.num_kv_heads)), sink_size=1,
                       recent_size=2)
    for name, policy in (("kivi", KIVI(bits=2, group_size=32, residual_length=32)),
                         ("quest", Quest(page_size=4, token_budget=T)), ("duo", duo)):
        logits, cache = policy_prefill(params, prompt, CFG, policy=policy, max_new_tokens=1)
        out[name] = logits
        out[name + "_next"] = decode_step(params, cache, nxt, CFG)[0]
    # Self-Extend with a window past the prompt attends as plain RoPE.
    wide = dataclasses.replace(CFG, positions=PositionConfig(type="self_extend", window=64,
                                                             group_size=2))
    logits, cache = extended.prefill(params, prompt, wide, max_new_tokens=1)
    out["extended"] = logits
    out["extended_next"] = extended.decode_step(params, cache, nxt, wide)[0]
    logits, _ = run_segments(params, tokens, CFG, memory=TransformerXL(mem_len=8),
                             segment_len=4)
    out["memory"], out["memory_next"] = logits[:, -2], logits[:, -1]
    return out


def test_a_change_to_the_layer_reaches_every_path(monkeypatch):
    """Patched in one place, the layer changes every path: each agrees with the patched
    forward, which differs from the plain one (other tests hold the paths equal unpatched)."""
    params, _ = init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size, dtype=jnp.int32)
    plain = forward(params, tokens, CFG)
    monkeypatch.setattr(layers_module, "decoder_layer",
                        _doubled_residuals(layers_module.decoder_layer))
    jax.clear_caches()
    try:
        patched = _all_paths(params, tokens)
    finally:
        jax.clear_caches()
    assert np.abs(np.asarray(patched["forward_next"] - plain[:, -1])).max() > 1e-2
    for name in patched:
        want = "forward_next" if name.endswith("next") or name == "decode_step" else "forward"
        np.testing.assert_allclose(patched[name], patched[want], atol=2e-4, rtol=2e-4,
                                   err_msg=name)


if __name__ == "__main__":
    pytest.main([__file__])
