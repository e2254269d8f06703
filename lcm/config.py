"""Frozen, keyword-only, self-checking configs.

Every config validates itself on construction: a bad value raises ValueError naming the field, the
value and what is allowed. Configs are hashable, so they can be static arguments of `jax.jit`.
Tests shrink them with `dataclasses.replace(cfg, num_layers=2)`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16")
ARCHITECTURES = ("llama", "qwen2", "mistral")
ATTENTION_IMPLS = ("auto", "reference", "xla", "pallas")
REMAT_POLICIES = ("none", "full", "dots")
ROPE_TYPES = ("default",)


def _positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name}={value!r}; expected a positive int")


def _choice(obj, name, allowed):
    value = getattr(obj, name)
    if value not in allowed:
        raise ValueError(f"{type(obj).__name__}.{name}={value!r}; expected one of {list(allowed)}")


def _dtype_name(obj, name):
    """Normalises a dtype field (a string or a numpy/jax dtype) to its canonical name."""
    value = getattr(obj, name)
    try:
        canonical = jnp.dtype(value).name
    except TypeError:
        canonical = None
    if canonical not in DTYPES:
        raise ValueError(f"{type(obj).__name__}.{name}={value!r}; expected one of {list(DTYPES)}")
    object.__setattr__(obj, name, canonical)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary position embedding. `theta` is the base of the frequencies.

    The scaling family (linear, dynamic, yarn, longrope, llama3, ...) extends this config with
    Hugging Face's `rope_parameters` keys; only `rope_type="default"` exists so far.
    """

    theta: float = 10000.0
    rope_type: str = "default"

    def __post_init__(self):
        if not isinstance(self.theta, (int, float)) or self.theta <= 1.0:
            raise ValueError(f"RopeConfig.theta={self.theta!r}; expected a number > 1")
        object.__setattr__(self, "theta", float(self.theta))
        _choice(self, "rope_type", ROPE_TYPES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """How attention runs: the backend of `lcm.attention.attend` and its block sizes."""

    impl: str = "auto"
    block_q: int = 512
    block_k: int = 512

    def __post_init__(self):
        _choice(self, "impl", ATTENTION_IMPLS)
        _positive(self, "block_q", "block_k")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer (Llama / Qwen2 / Mistral family).

    `architecture` only decides the Hugging Face names used on export; the math is set by the
    fields (`qkv_bias` for Qwen2, `sliding_window` for Mistral).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    architecture: str = "llama"

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "intermediate_size", "max_position_embeddings")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim}; RoPE needs an even head_dim")
        if not isinstance(self.norm_eps, (int, float)) or not 0 < self.norm_eps < 1:
            raise ValueError(f"ModelConfig.norm_eps={self.norm_eps!r}; expected a float in (0, 1)")
        if self.sliding_window is not None:
            _positive(self, "sliding_window")
        if not isinstance(self.rope, RopeConfig):
            raise ValueError(f"ModelConfig.rope={self.rope!r}; expected a RopeConfig")
        if not isinstance(self.attention, AttentionConfig):
            raise ValueError(f"ModelConfig.attention={self.attention!r}; expected an "
                             f"AttentionConfig")
        _dtype_name(self, "dtype")
        _dtype_name(self, "param_dtype")
        _choice(self, "remat", REMAT_POLICIES)
        _choice(self, "architecture", ARCHITECTURES)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)
