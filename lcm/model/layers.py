"""The decoder layer, the one place that writes norm -> attention -> norm -> MLP, and its parts.

`decoder_layer` takes the attention step as an argument, and `run_layers` scans it over the
stacked layers carrying per-layer state, so the plain forward pass, cache prefill (with or
without a press), the decode steps, the cache formats (KIVI, Quest, DuoAttention), the
Self-Extend / ReRoPE cache and every memory kind run through the same layer:

    def attention(inputs: LayerInputs, xs, carry):   # xs: this layer's slice; carry: threaded
        out = ...                                     # [B, T, H, D] from inputs.q, .k, .v
        return out, ys, carry                         # ys: stacked over layers by run_layers
    x, ys, carry = run_layers(x, params["layers"], cfg, attention, xs=..., carry=...)

A new model feature (a norm, a soft-cap, a layer kind) is one change here.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lcm.attention import attend
from lcm.positions import apply_rope, position_attention

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in backward
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep nothing on the device: each layer's input goes to pinned host memory in the forward
    # pass and comes back for the layer's recomputation in the backward pass.
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
        offload_src="device", offload_dst="pinned_host"),
}


def identity(x, axes):
    """The `shard` of an unsharded run: x unchanged."""
    del axes
    return x


def rms_norm(x, weight, eps):
    """x [..., E] normalised by its root mean square (float32 statistics), times weight [E]."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,)) * xf.astype(x.dtype)


def swiglu_mlp(x, p, *, shard=identity):
    """down(silu(x @ gate) * (x @ up)). x [B, T, E]."""
    dt = x.dtype
    gate = jnp.einsum("bte,ef->btf", x, p["w_gate"].astype(dt))
    up = jnp.einsum("bte,ef->btf", x, p["w_up"].astype(dt))
    h = shard(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
    return jnp.einsum("btf,fe->bte", h, p["w_down"].astype(dt))


def project_qkv(x, p, *, shard=identity):
    """The query, key and value projections (with Qwen2's biases), before RoPE.

    x [B, T, E] -> q [B, T, H, D], k and v [B, T, K, D]. Decoders that keep their own K/V (the
    KV cache, segment memories) reuse this and `project_out` around their attention.
    """
    dt = x.dtype

    def project(w, b):
        y = jnp.einsum("bte,ehd->bthd", x, p[w].astype(dt))
        return y + p[b].astype(dt)[None, None] if b in p else y

    q = shard(project("wq", "bq"), ("batch", "seq", "heads", "head_dim"))
    k = shard(project("wk", "bk"), ("batch", "seq", "kv_heads", "head_dim"))
    v = shard(project("wv", "bv"), ("batch", "seq", "kv_heads", "head_dim"))
    return q, k, v


def project_out(out, p, *, shard=identity):
    """The attention output projection. out [B, T, H, D] -> [B, T, E]."""
    out = shard(out, ("batch", "seq", "heads", "head_dim"))
    return jnp.einsum("bthd,hde->bte", out, p["wo"].astype(out.dtype))


def self_attention(q, k, v, *, positions, inv_freq, attention_factor, mask, attention,
                   position=None, ring_order=None):
    """The model's attention over its own tokens: RoPE (or a position method) then `attend`.

    q [B, T, H, D], k and v [B, T, K, D] before RoPE; positions [B, T]; returns [B, T, H, D].
    `attention` is an AttentionConfig (backend and block sizes); `mask` a lcm.attention Mask;
    `position` a PositionConfig (None or type "rope": RoPE as trained; others see
    `lcm.positions.position_attention`). `ring_order`: for impl "ring" / "allgather", the
    RingOrder q, k, v and positions are already in (the decoder applies it once at its input;
    the mask's segment ids stay in the original order); None lets each call permute by
    `attention.load_balance`.
    """
    if position is not None and position.type != "rope":
        return position_attention(q, k, v, positions=positions, inv_freq=inv_freq,
                                  attention_factor=attention_factor, mask=mask,
                                  position=position, impl=attention.impl,
                                  block_q=attention.block_q, block_k=attention.block_k)
    q = apply_rope(q, positions, inv_freq, attention_factor)
    k = apply_rope(k, positions, inv_freq, attention_factor)
    balance = {}
    if attention.context_parallel:
        balance["load_balance"] = attention.load_balance if ring_order is None else ring_order
    return attend(q, k, v, mask, impl=attention.impl, block_q=attention.block_q,
                  block_k=attention.block_k, **balance)

class LayerInputs(NamedTuple):
    """What a layer's attention step receives.

    h [B, T, E]: the normalised layer input; q [B, T, H, D], k and v [B, T, K, D]: its
    projections before RoPE; params: the layer's weights; index: the layer's index (an int32
    scalar under `lax.scan`, a Python int when the layers are unrolled).
    """

    h: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array
    params: dict
    index: Any


# attention(inputs, xs, carry) -> (out [B, T, H, D], ys, carry)
AttentionStep = Callable[[LayerInputs, Any, Any], tuple[jax.Array, Any, Any]]


def decoder_layer(x, p, cfg, *, attention: AttentionStep, index, xs=None, carry=None,
                  shard=identity):
    """One pre-norm decoder layer: x + attention(norm(x)), then x + MLP(norm(x)).

    x [B, T, E]; p: the layer's weights; cfg: the ModelConfig. `attention(inputs, xs, carry)`
    is the attention step (RoPE, the backend, a cache or a memory: whatever the caller needs)
    and returns `(out [B, T, H, D], ys, carry)`. Returns `(x [B, T, E], ys, carry)`.
    """
    h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q, k, v = project_qkv(h, p, shard=shard)
    out, ys, carry = attention(LayerInputs(h, q, k, v, p, index), xs, carry)
    x = x + project_out(out.astype(x.dtype), p, shard=shard)
    x = x + swiglu_mlp(rms_norm(x, p["mlp_norm"], cfg.norm_eps), p, shard=shard)
    return shard(x, ("batch", "seq", "embed")), ys, carry


def run_layers(x, layers, cfg, attention: AttentionStep, *, xs=None, carry=None, indices=None,
               unrolled: bool = False, remat: str = "none", shard=identity):
    """`decoder_layer` over stacked layers: `(x, ys, carry)`.

    layers: the layers' weights with a leading layer axis (`params["layers"]`, or a slice of
    it); xs: per-layer inputs of the attention step with the same leading axis (None for
    none); carry: state threaded from layer to layer; indices [L] int32: each layer's index
    (default 0..L-1). The layers run under `lax.scan`, so compile time does not grow with
    depth; `unrolled=True` runs a Python loop instead, for per-layer states of different
    shapes (xs then a tuple with one entry per layer, ys returned as such a tuple, indices
    Python ints). remat: "none", or a `ModelConfig.remat` policy ("full", "dots", "offload")
    that rematerialises each layer in the backward pass; the layer's input is named
    "layer_input", which "offload" moves to host memory.
    """
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    if indices is None:
        indices = (range(num_layers) if unrolled else jnp.arange(num_layers, dtype=jnp.int32))

    def layer(carried, per_layer):
        x, carry = carried
        p, layer_xs, index = per_layer
        x = checkpoint_name(x, "layer_input")  # the name remat="offload" moves to the host
        x, ys, carry = decoder_layer(x, p, cfg, attention=attention, index=index, xs=layer_xs,
                                     carry=carry, shard=shard)
        return (x, carry), ys

    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat])
    if unrolled:
        outputs = []
        for i, index in enumerate(indices):
            p = jax.tree.map(lambda a, i=i: a[i], layers)
            (x, carry), ys = layer((x, carry), (p, None if xs is None else xs[i], index))
            outputs.append(ys)
        return x, tuple(outputs), carry
    (x, carry), ys = jax.lax.scan(layer, (x, carry), (layers, xs, indices))
    return x, ys, carry
