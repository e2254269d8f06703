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
from lcm.config import LayerKind
from lcm.positions import apply_rope, position_attention, rope_frequencies

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


def rms_norm(x, weight, eps, offset: float = 0.0):
    """x [..., E] normalised by its root mean square (float32 statistics), times weight [E].

    offset 0 (Llama): the normalised x is cast to x's dtype, then scaled by the weight; offset 1
    (Gemma): scaled by 1 + weight in float32, then cast, as each family's transformers code.
    weight None: no scale (Llama 4's L2 qk-norm).
    """
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is None:
        return xf.astype(x.dtype)
    shape = (1,) * (x.ndim - 1) + (-1,)
    if offset:
        return (xf * (offset + weight.astype(jnp.float32).reshape(shape))).astype(x.dtype)
    return weight.astype(x.dtype).reshape(shape) * xf.astype(x.dtype)


def norm(x, p, name, cfg):
    """The model's RMSNorm of x with the weight `p[name]`."""
    return rms_norm(x, p[name], cfg.norm_eps, cfg.norm_weight_offset)


def mlp(x, p, cfg, *, shard=identity):
    """down(act(x @ gate) * (x @ up)): SwiGLU (silu) or GeGLU (tanh GELU). x [B, T, E]."""
    dt = x.dtype
    gate = jnp.einsum("bte,ef->btf", x, p["w_gate"].astype(dt))
    up = jnp.einsum("bte,ef->btf", x, p["w_up"].astype(dt))
    act = (jax.nn.silu(gate) if cfg.mlp_activation == "silu"
           else jax.nn.gelu(gate, approximate=True))
    h = shard(act * up, ("batch", "seq", "mlp"))
    return jnp.einsum("btf,fe->bte", h, p["w_down"].astype(dt))


def project_qkv(x, p, cfg, *, shard=identity):
    """The query, key and value projections as attention sees them, before RoPE.

    x [B, T, E] -> q [B, T, H, D], k and v [B, T, K, D], with Qwen2's biases, the per-head
    qk-norm (Qwen3, Gemma 3, Llama 4) and q already scaled by
    sqrt(head_dim / query_pre_attn_scalar) (Gemma), so that every consumer's
    head_dim ** -0.5 gives the model's logits. Decoders that keep their own K/V (the KV cache,
    segment memories) receive these through `LayerInputs`.
    """
    dt = x.dtype

    def project(w, b):
        y = jnp.einsum("bte,ehd->bthd", x, p[w].astype(dt))
        return y + p[b].astype(dt)[None, None] if b in p else y

    q, k, v = project("wq", "bq"), project("wk", "bk"), project("wv", "bv")
    if cfg.qk_norm is not None:
        q = rms_norm(q, p.get("q_norm"), cfg.norm_eps, cfg.norm_weight_offset)
        k = rms_norm(k, p.get("k_norm"), cfg.norm_eps, cfg.norm_weight_offset)
    if cfg.query_pre_attn_scalar is not None:
        q = q * jnp.asarray((cfg.head_dim / cfg.query_pre_attn_scalar) ** 0.5, dt)
    q = shard(q, ("batch", "seq", "heads", "head_dim"))
    k = shard(k, ("batch", "seq", "kv_heads", "head_dim"))
    v = shard(v, ("batch", "seq", "kv_heads", "head_dim"))
    return q, k, v


def project_out(out, h, p, cfg, *, shard=identity):
    """The attention output projection. out [B, T, H, D] -> [B, T, E].

    h [B, T, E] is the layer's normalised input, read by the output gate (Qwen3-Next:
    out * sigmoid(h @ wg)).
    """
    dt = out.dtype
    if cfg.attn_output_gate:
        gate = jnp.einsum("bte,ehd->bthd", h.astype(dt), p["wg"].astype(dt))
        out = out * jax.nn.sigmoid(gate)
    out = shard(out, ("batch", "seq", "heads", "head_dim"))
    y = jnp.einsum("bthd,hde->bte", out, p["wo"].astype(dt))
    return y + p["bo"].astype(dt)[None, None] if cfg.out_bias else y


def rope_tables(cfg, seq_len):
    """Each distinct RoPE of the model's layers -> `(inv_freq, attention_factor)`.

    A layer's attention step reads its own with `tables[inputs.kind.rope]`; a layer without
    RoPE (kind.rope None) maps to `(None, 1.0)`, which `rotate` passes through. seq_len: the
    length the tables must cover (see `lcm.positions.rope_frequencies`).
    """
    tables = {}
    for kind in cfg.layer_kinds:
        if kind.rope not in tables:
            tables[kind.rope] = ((None, 1.0) if kind.rope is None
                                 else rope_frequencies(kind.rope, cfg.head_dim, seq_len))
    return tables


def self_attention(q, k, v, *, positions, inv_freq, attention_factor, mask, attention,
                   position=None, ring_order=None, softcap=None, sinks=None):
    """The model's attention over its own tokens: RoPE (or a position method) then `attend`.

    q [B, T, H, D], k and v [B, T, K, D] before RoPE; positions [B, T]; returns [B, T, H, D].
    `attention` is an AttentionConfig (backend and block sizes); `mask` a lcm.attention Mask;
    `position` a PositionConfig (None or type "rope": RoPE as trained; others see
    `lcm.positions.position_attention`). `ring_order`: for impl "ring" / "allgather", the
    RingOrder q, k, v and positions are already in (the decoder applies it once at its input;
    the mask's segment ids stay in the original order); None lets each call permute by
    `attention.load_balance`. inv_freq None: a layer without RoPE. softcap: the logits' cap
    (Gemma 2) or None; sinks [H]: the layer's sink logits (gpt-oss) or None.
    """
    if position is not None and position.type != "rope":
        if softcap is not None:
            raise ValueError(f"PositionConfig(type={position.type!r}) with attn_softcap="
                             f"{softcap}: the position methods do not cap logits; use type "
                             f"'rope'")
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
                  block_k=attention.block_k, softcap=softcap, sinks=sinks, **balance)

class LayerInputs(NamedTuple):
    """What a layer's attention step receives.

    h [B, T, E]: the normalised layer input; q [B, T, H, D], k and v [B, T, K, D]: its
    projections before RoPE (see `project_qkv`); params: the layer's weights; index: the
    layer's index (an int32 scalar under `lax.scan`, a Python int when the layers are
    unrolled); kind: its `lcm.config.LayerKind` (static): `kind.mask()` is its causal mask,
    `kind.window` / `kind.chunk` what a cache must keep visible, `kind.rope` its RoPE (a key of
    `rope_tables`).
    """

    h: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array
    params: dict
    index: Any
    kind: LayerKind


# attention(inputs, xs, carry) -> (out [B, T, H, D], ys, carry)
AttentionStep = Callable[[LayerInputs, Any, Any], tuple[jax.Array, Any, Any]]


def decoder_layer(x, p, cfg, *, attention: AttentionStep, index, kind: LayerKind | None = None,
                  xs=None, carry=None, shard=identity):
    """One decoder layer: x + attention(norm(x)), then x + MLP(norm(x)).

    x [B, T, E]; p: the layer's weights; cfg: the ModelConfig; kind: the layer's LayerKind
    (default `cfg.layer_kinds[index]`, index then a Python int). `attention(inputs, xs, carry)`
    is the attention step (RoPE, the backend, a cache or a memory: whatever the caller needs)
    and returns `(out [B, T, H, D], ys, carry)`. With `cfg.post_norms` (Gemma 2/3) the
    attention and MLP outputs are normalised too before each residual add. Returns
    `(x [B, T, E], ys, carry)`.
    """
    kind = cfg.layer_kinds[index] if kind is None else kind
    h = norm(x, p, "attn_norm", cfg)
    q, k, v = project_qkv(h, p, cfg, shard=shard)
    out, ys, carry = attention(LayerInputs(h, q, k, v, p, index, kind), xs, carry)
    y = project_out(out.astype(x.dtype), h, p, cfg, shard=shard)
    x = x + (norm(y, p, "post_attn_norm", cfg) if cfg.post_norms else y)
    y = mlp(norm(x, p, "mlp_norm", cfg), p, cfg, shard=shard)
    x = x + (norm(y, p, "post_mlp_norm", cfg) if cfg.post_norms else y)
    return shard(x, ("batch", "seq", "embed")), ys, carry


def schedule(kinds) -> tuple[tuple[int, int, int], ...]:
    """How `run_layers` scans layers of several kinds: `((first, period, repeats), ...)`.

    Each segment runs `repeats` scan steps over `period` consecutive layers whose kinds repeat
    with that period, so its compiled body holds `period` layers whatever the depth. One kind:
    one segment of period 1. A periodic schedule (Gemma 3: 5 sliding then 1 full) is its
    smallest period repeated, and the leftover layers one more segment; anything else is split
    into runs of equal kinds.
    """
    kinds = tuple(kinds)
    n = len(kinds)
    for period in range(1, n // 2 + 1):
        if all(kinds[i] == kinds[i % period] for i in range(n)):
            repeats, rest = divmod(n, period)
            return ((0, period, repeats),) + (((repeats * period, rest, 1),) if rest else ())
    segments, first = [], 0
    for i in range(1, n + 1):
        if i == n or kinds[i] != kinds[first]:
            segments.append((first, 1, i - first))
            first = i
    return tuple(segments)


def scan_layers(step, xs, carry, kinds, *, first: int = 0):
    """Runs `step(carry, layer_xs, index, kind) -> (carry, ys)` over layers of several kinds.

    xs: per-layer inputs with a leading layer axis; kinds: the layers' LayerKinds (static);
    first: the index of the first layer. One `lax.scan` per segment of `schedule(kinds)`, whose
    body holds one period of the pattern, so compile time does not grow with depth. Returns
    `(carry, ys)` with ys stacked over all the layers.
    """
    all_ys = []
    for start, period, repeats in schedule(kinds):
        count = period * repeats

        def segment(a, start=start, count=count, period=period, repeats=repeats):
            a = jax.lax.slice_in_dim(a, start, start + count)
            return a if period == 1 else a.reshape((repeats, period) + a.shape[1:])

        steps = first + start + period * jnp.arange(repeats, dtype=jnp.int32)

        def body(carry, per_step, start=start, period=period):
            step_xs, index = per_step
            if period == 1:
                return step(carry, step_xs, index, kinds[start])
            outs = []
            for j in range(period):
                xj = jax.tree.map(lambda a, j=j: a[j], step_xs)
                carry, ys = step(carry, xj, index + j, kinds[start + j])
                outs.append(ys)
            return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)

        carry, ys = jax.lax.scan(body, carry, (jax.tree.map(segment, xs), steps))
        if period > 1:
            ys = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), ys)
        all_ys.append(ys)
    ys = all_ys[0] if len(all_ys) == 1 else jax.tree.map(
        lambda *a: jnp.concatenate(a), *all_ys)
    return carry, ys


def run_layers(x, layers, cfg, attention: AttentionStep, *, xs=None, carry=None, first: int = 0,
               unrolled: bool = False, remat: str = "none", shard=identity):
    """`decoder_layer` over stacked layers: `(x, ys, carry)`.

    layers: the layers' weights with a leading layer axis (`params["layers"]`, or the slice of
    it that starts at layer `first`); xs: per-layer inputs of the attention step with the same
    leading axis (None for none); carry: state threaded from layer to layer. The layers run
    under `lax.scan` (`scan_layers`: one scan per segment of `schedule(cfg.layer_kinds)`), so
    compile time does not grow with depth; ys come back stacked over all the layers.
    `unrolled=True` runs a Python loop instead, for per-layer states of different shapes (xs
    then a tuple with one entry per layer, ys returned as such a tuple, indices Python ints).
    remat: "none", or a `ModelConfig.remat` policy ("full", "dots", "offload") that
    rematerialises each layer in the backward pass; the layer's input is named "layer_input",
    which "offload" moves to host memory.
    """
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    kinds = cfg.layer_kinds[first:first + num_layers]
    if len(kinds) != num_layers:
        raise ValueError(f"run_layers: {num_layers} layers from layer {first} but cfg has "
                         f"{cfg.num_layers}")

    def layer(x, carry, p, layer_xs, index, kind):
        x = checkpoint_name(x, "layer_input")  # the name remat="offload" moves to the host
        return decoder_layer(x, p, cfg, attention=attention, index=index, kind=kind,
                             xs=layer_xs, carry=carry, shard=shard)

    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], static_argnums=(5,))
    if unrolled:
        outputs = []
        for i in range(num_layers):
            p = jax.tree.map(lambda a, i=i: a[i], layers)
            x, ys, carry = layer(x, carry, p, None if xs is None else xs[i], first + i, kinds[i])
            outputs.append(ys)
        return x, tuple(outputs), carry

    def step(carried, per_layer, index, kind):
        x, carry = carried
        p, layer_xs = per_layer
        x, ys, carry = layer(x, carry, p, layer_xs, index, kind)
        return (x, carry), ys

    (x, carry), ys = scan_layers(step, (layers, xs), (x, carry), kinds, first=first)
    return x, ys, carry
