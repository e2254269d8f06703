"""Declares every weight once (shape, logical axes, init) and derives params and axes from it.

Params are a plain dict pytree. Per-layer weights are stacked on a leading `layers` axis so the
decoder runs its layers under `jax.lax.scan` (compile time does not grow with depth).

    params = {
        "embed":      [vocab, embed]
        "layers": {
            "attn_norm": [layers, embed]
            "wq":        [layers, embed, heads, head_dim]      (+ "bq": [layers, heads, head_dim])
            "wk", "wv":  [layers, embed, kv_heads, head_dim]   (+ "bk", "bv" with qkv_bias)
            "q_norm", "k_norm": [layers, head_dim]             (qk_norm="rms")
            "wg":        [layers, embed, heads, head_dim]      (attn_output_gate)
            "sinks":     [layers, heads]                       (attn_sinks)
            "wo":        [layers, heads, head_dim, embed]      (+ "bo": [layers, embed], out_bias)
            "post_attn_norm", "post_mlp_norm": [layers, embed] (post_norms)
            "mlp_norm":  [layers, embed]
            "w_gate", "w_up": [layers, embed, mlp]
            "w_down":    [layers, mlp, embed]
        },
        "final_norm": [embed]
        "lm_head":    [embed, vocab]   (absent when tie_embeddings)
    }
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from lcm.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One weight: its shape, its logical axis names and how to initialise it."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # "normal" (scaled by fan-in), "ones", "zeros"
    fan_in: int = 1

    def initialize(self, key, dtype):
        if self.init == "ones":
            return jnp.ones(self.shape, dtype)
        if self.init == "zeros":
            return jnp.zeros(self.shape, dtype)
        return (jax.random.normal(key, self.shape, jnp.float32) * self.fan_in ** -0.5).astype(dtype)


def param_specs(cfg: ModelConfig) -> dict:
    """The pytree of WeightSpecs for `cfg`; `init_params` and the HF importer both follow it."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg={type(cfg).__name__}; expected a ModelConfig")
    L, E, H, K, D, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
    layers = {
        "attn_norm": WeightSpec((L, E), ("layers", "embed"), "ones"),
        "wq": WeightSpec((L, E, H, D), ("layers", "embed", "heads", "head_dim"), fan_in=E),
        "wk": WeightSpec((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), fan_in=E),
        "wv": WeightSpec((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), fan_in=E),
        "wo": WeightSpec((L, H, D, E), ("layers", "heads", "head_dim", "embed"), fan_in=H * D),
        "mlp_norm": WeightSpec((L, E), ("layers", "embed"), "ones"),
        "w_gate": WeightSpec((L, E, F), ("layers", "embed", "mlp"), fan_in=E),
        "w_up": WeightSpec((L, E, F), ("layers", "embed", "mlp"), fan_in=E),
        "w_down": WeightSpec((L, F, E), ("layers", "mlp", "embed"), fan_in=F),
    }
    norm = "ones" if cfg.norm_weight_offset == 0 else "zeros"  # Gemma scales by 1 + w
    for name in ("attn_norm", "mlp_norm"):
        layers[name] = WeightSpec((L, E), ("layers", "embed"), norm)
    if cfg.qkv_bias:
        layers["bq"] = WeightSpec((L, H, D), ("layers", "heads", "head_dim"), "zeros")
        layers["bk"] = WeightSpec((L, K, D), ("layers", "kv_heads", "head_dim"), "zeros")
        layers["bv"] = WeightSpec((L, K, D), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.out_bias:
        layers["bo"] = WeightSpec((L, E), ("layers", "embed"), "zeros")
    if cfg.qk_norm == "rms":
        layers.update(q_norm=WeightSpec((L, D), ("layers", "head_dim"), norm),
                      k_norm=WeightSpec((L, D), ("layers", "head_dim"), norm))
    if cfg.attn_sinks:  # a logit per head, starting at 0 (one more key with weight e^0)
        layers["sinks"] = WeightSpec((L, H), ("layers", "heads"), "zeros")
    if cfg.attn_output_gate:
        layers["wg"] = WeightSpec((L, E, H, D), ("layers", "embed", "heads", "head_dim"),
                                  fan_in=E)
    if cfg.post_norms:
        layers.update(post_attn_norm=WeightSpec((L, E), ("layers", "embed"), norm),
                      post_mlp_norm=WeightSpec((L, E), ("layers", "embed"), norm))
    specs = {
        "embed": WeightSpec((V, E), ("vocab", "embed")),
        "layers": layers,
        "final_norm": WeightSpec((E,), ("embed",), norm),
    }
    if not cfg.tie_embeddings:
        specs["lm_head"] = WeightSpec((E, V), ("embed", "vocab"), fan_in=E)
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, WeightSpec)


def map_specs(fn: Callable[[WeightSpec], object], specs: dict) -> dict:
    return jax.tree.map(fn, specs, is_leaf=_is_spec)


def param_axes(cfg: ModelConfig) -> dict:
    """The logical-axes pytree parallel to the params of `cfg` (tuples are leaves)."""
    return map_specs(lambda s: s.axes, param_specs(cfg))


def param_shapes(cfg: ModelConfig) -> dict:
    """`jax.ShapeDtypeStruct`s of the params of `cfg`, without allocating them."""
    return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.weight_dtype), param_specs(cfg))


def init_params(cfg: ModelConfig, key) -> tuple[dict, dict]:
    """Random params and their logical axes: `(params, axes)`.

    Weights are normal with std 1/sqrt(fan_in); norms start at one and biases at zero.
    """
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    params = jax.tree.unflatten(
        treedef, [s.initialize(k, cfg.weight_dtype) for s, k in zip(leaves, keys)])
    return params, param_axes(cfg)


def flatten_params(tree: dict, prefix: tuple[str, ...] = ()) -> dict:
    """{"layers": {"wq": x}} -> {("layers", "wq"): x}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_params(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def unflatten_params(flat: dict) -> dict:
    """The inverse of `flatten_params`."""
    out = {}
    for keys, value in flat.items():
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return out
