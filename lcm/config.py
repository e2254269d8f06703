"""Frozen, keyword-only, self-checking configs.

Every config validates itself on construction: a bad value raises ValueError naming the field, the
value and what is allowed. Configs are hashable, so they can be static arguments of `jax.jit`.
Tests shrink them with `dataclasses.replace(cfg, num_layers=2)`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from lcm.checks import check_choice, check_int

__all__ = ["ModelConfig", "AttentionConfig", "RopeConfig", "PositionConfig", "LayerKind",
           "dtype_name", "DTYPES", "ARCHITECTURES", "LAYER_TYPES", "QK_NORMS", "MLP_ACTIVATIONS",
           "ATTENTION_IMPLS", "CONTEXT_PARALLEL_IMPLS", "MODEL_LOAD_BALANCE", "REMAT_POLICIES",
           "ROPE_TYPES", "POSITION_TYPES"]

DTYPES = ("float32", "bfloat16", "float16")
ARCHITECTURES = ("llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3", "phi3", "ministral")
# ModelConfig.layer_types entries, spelled as transformers' `layer_types`.
LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
QK_NORMS = ("rms", "l2")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
# The backends of lcm.attention.attend (its IMPLS; a test keeps the two equal).
ATTENTION_IMPLS = ("auto", "reference", "xla", "pallas", "ring", "allgather", "ring_pallas")
# Those that split the sequence over the mesh's context axis (lcm.attention.attend's
# CONTEXT_PARALLEL_IMPLS).
CONTEXT_PARALLEL_IMPLS = ("ring", "allgather", "ring_pallas")
# Orders a model can apply at its input inside jit ("mask_aware" needs a concrete mask).
MODEL_LOAD_BALANCE = ("none", "zigzag", "striped")
REMAT_POLICIES = ("none", "full", "dots", "offload")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
POSITION_TYPES = ("rope", "nope", "alibi", "self_extend", "rerope", "leaky_rerope")


def _positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        check_int(type(obj).__name__, name, value, 1)
        # NumPy ints pass; store a Python int so equal configs hash and print alike.
        object.__setattr__(obj, name, int(value))


def _choice(obj, name, allowed):
    check_choice(type(obj).__name__, name, getattr(obj, name), allowed)


def dtype_name(value, argument: str = "dtype") -> str:
    """The canonical name of a float dtype given as a string or a numpy/jax dtype.

    Raises ValueError naming `argument` unless it is one of DTYPES.
    """
    try:
        canonical = jnp.dtype(value).name
    except TypeError:
        canonical = None
    if canonical not in DTYPES:
        raise ValueError(f"{argument}={value!r}; expected one of {list(DTYPES)}")
    return canonical


def _dtype_name(obj, name):
    """Normalises a dtype field in place (frozen dataclass) to its canonical name."""
    canonical = dtype_name(getattr(obj, name), f"{type(obj).__name__}.{name}")
    object.__setattr__(obj, name, canonical)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary position embedding and its scaling family, with Hugging Face's keys and defaults.

    Fields are transformers' `rope_parameters` keys (`theta` is `rope_theta`); `from_hf` reads a
    config.json dict, `to_hf` writes the `rope_parameters` block back. Each rope_type reads only
    some fields (`RopeConfig.READS`); setting one it does not read raises, so a forgotten
    `rope_type` cannot silently give the default. `lcm.positions.rope_frequencies` turns a
    RopeConfig into `(inv_freq, attention_factor)`:

    - default: inv_freq[i] = theta ** (-2i / dim).
    - linear (position interpolation): default / factor.
    - dynamic (NTK): theta grows with the sequence length past `max_position_embeddings`.
    - yarn: interpolation (÷ factor) ramped in over the dims between `beta_fast` and `beta_slow`
      rotations in `original_max_position_embeddings`; attention factor 0.1 ln(factor) + 1, or
      DeepSeek's mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set, or
      `attention_factor`.
    - longrope: per-pair `short_factor` up to `original_max_position_embeddings`, `long_factor`
      past it; attention factor sqrt(1 + ln factor / ln original) unless `attention_factor`.
    - llama3 (Llama 3.1): long wavelengths ÷ factor, short ones kept, a smooth band between, set
      by `low_freq_factor` / `high_freq_factor` and `original_max_position_embeddings`.
    - proportional: the first partial_rotary_factor of the pairs rotate with exponents over the
      whole head, the others have frequency 0; all ÷ factor (1 when None).

    `max_position_embeddings` is the model's top-level value, which transformers reads for dynamic
    (always) and for yarn/longrope when `factor` is None (factor = max_position_embeddings /
    original_max_position_embeddings); keep it equal to ModelConfig.max_position_embeddings.
    `partial_rotary_factor` < 1 rotates only the leading int(head_dim * partial_rotary_factor)
    features (proportional aside).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    partial_rotary_factor: float = 1.0

    # rope_type -> the fields it reads besides theta, rope_type and partial_rotary_factor
    # (not a dataclass field: no annotation).
    READS = {
        "default": (),
        "linear": ("factor",),
        "dynamic": ("factor", "max_position_embeddings"),
        "yarn": ("factor", "original_max_position_embeddings", "max_position_embeddings",
                 "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                 "truncate"),
        "longrope": ("factor", "original_max_position_embeddings", "max_position_embeddings",
                     "attention_factor", "short_factor", "long_factor"),
        "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
                   "high_freq_factor"),
        "proportional": ("factor",),
    }

    def __post_init__(self):
        _choice(self, "rope_type", ROPE_TYPES)
        kind = self.rope_type
        reads = {"theta", "rope_type", "partial_rotary_factor", *self.READS[kind]}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            unset = value is None if f.default is None else value == f.default
            if f.name not in reads and not unset:
                users = [t for t, names in self.READS.items() if f.name in names]
                raise ValueError(f"RopeConfig.{f.name}={value!r} is not read by rope_type={kind!r};"
                                 f" it is read by rope_type in {users}")
        self._number("theta", above=1.0)
        self._number("factor", at_least=1.0 if kind != "proportional" else None, above=0.0,
                     optional=True)
        for name in ("original_max_position_embeddings", "max_position_embeddings"):
            value = getattr(self, name)
            if value is None:
                continue
            if (not hasattr(value, "__index__") or isinstance(value, bool)
                    or type(value).__name__ == "bool_" or value <= 0):
                raise ValueError(f"RopeConfig.{name}={value!r}; expected a positive int or None")
            object.__setattr__(self, name, value.__index__())
        self._number("attention_factor", above=0.0, optional=True)
        self._number("beta_fast", above=0.0)
        self._number("beta_slow", above=0.0)
        if self.beta_fast < self.beta_slow:
            raise ValueError(f"RopeConfig.beta_fast={self.beta_fast} < beta_slow={self.beta_slow}"
                             f"; expected beta_fast >= beta_slow (defaults 32 and 1)")
        self._number("mscale", optional=True)
        self._number("mscale_all_dim", optional=True)
        if not isinstance(self.truncate, bool):
            raise ValueError(f"RopeConfig.truncate={self.truncate!r}; expected a bool")
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is None:
                continue
            if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__")
                    or len(value) == 0 or not all(self._finite(v) and v > 0 for v in value)):
                raise ValueError(f"RopeConfig.{name}={value!r}; expected a non-empty sequence of "
                                 f"positive numbers (one per rotated pair)")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if (self.short_factor is not None and self.long_factor is not None
                and len(self.short_factor) != len(self.long_factor)):
            raise ValueError(f"RopeConfig.short_factor has {len(self.short_factor)} entries but "
                             f"long_factor has {len(self.long_factor)}; expected one per pair")
        self._number("low_freq_factor", above=0.0, optional=True)
        self._number("high_freq_factor", above=0.0, optional=True)
        if (self.low_freq_factor is not None and self.high_freq_factor is not None
                and self.high_freq_factor <= self.low_freq_factor):
            raise ValueError(f"RopeConfig.high_freq_factor={self.high_freq_factor} <= "
                             f"low_freq_factor={self.low_freq_factor}; expected high > low")
        self._number("partial_rotary_factor", above=0.0)
        if self.partial_rotary_factor > 1.0:
            raise ValueError(f"RopeConfig.partial_rotary_factor={self.partial_rotary_factor}; "
                             f"expected a number in (0, 1]")
        self._check_required()

    def _number(self, name, *, above=None, at_least=None, optional=False):
        value = getattr(self, name)
        if value is None and optional:
            return
        if not self._finite(value) or (above is not None and value <= above) or (
                at_least is not None and value < at_least):
            bound = (f" >= {at_least}" if at_least is not None else
                     f" > {above}" if above is not None else "")
            raise ValueError(f"RopeConfig.{name}={value!r}; expected a number{bound}"
                             f"{' or None' if optional else ''}")
        object.__setattr__(self, name, float(value))

    def _check_required(self):
        kind = self.rope_type
        required = {
            "linear": ("factor",), "dynamic": ("factor", "max_position_embeddings"),
            "yarn": ("original_max_position_embeddings",),
            "longrope": ("original_max_position_embeddings", "short_factor", "long_factor"),
            "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
                       "high_freq_factor"),
        }.get(kind, ())
        if missing := [name for name in required if getattr(self, name) is None]:
            raise ValueError(f"RopeConfig: rope_type={kind!r} requires {missing}; they are None")
        if kind in ("yarn", "longrope") and self.factor is None and (
                self.max_position_embeddings is None):
            raise ValueError(f"RopeConfig.factor=None; rope_type={kind!r} requires factor, or "
                             f"max_position_embeddings to derive it as max_position_embeddings / "
                             f"original_max_position_embeddings")

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf(cls, config: dict, *, layer_type: str | None = None) -> RopeConfig:
        """The RopeConfig of a transformers config.json dict, read where transformers reads it.

        Accepts the transformers-5 `rope_parameters` block and the 4.x `rope_theta` +
        `rope_scaling` form (with the legacy `type` key); `rope_scaling` wins when both are set,
        and a `rope_theta` inside the block wins over the top-level one, as in transformers.
        Top-level keys read too: `max_position_embeddings` (dynamic; yarn/longrope without a
        factor; the default `original_max_position_embeddings`), `partial_rotary_factor`, and
        `original_max_position_embeddings`, which overrides the block's (Phi-3 style), as
        transformers does when it builds the rotary embedding. Keys a type does not read are
        ignored (transformers warns); unknown types and missing keys raise ValueError.
        A `rope_parameters` block nested per layer type (Gemma 3: {"full_attention": {...},
        "sliding_attention": {...}}) gives the block of `layer_type`.
        """
        if not isinstance(config, dict):
            raise ValueError(f"config={type(config).__name__}; expected a config.json dict")
        block, scaling = config.get("rope_parameters"), config.get("rope_scaling")
        for name, value in (("rope_parameters", block), ("rope_scaling", scaling)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name}={value!r}; expected a JSON object or null")
        raw, where = dict(scaling or block or {}), "rope_scaling" if scaling else "rope_parameters"
        if nested := [k for k, v in raw.items() if isinstance(v, dict)]:
            if layer_type is None or not isinstance(raw.get(layer_type), dict):
                raise ValueError(f"{where} is nested per layer type ({nested}); pass "
                                 f"layer_type= one of them (got {layer_type!r})")
            raw, where = dict(raw[layer_type]), f"{where}[{layer_type!r}]"
        if "mrope_section" in raw:
            raise ValueError(f"{where} has mrope_section={raw['mrope_section']!r}; multimodal "
                             f"RoPE is not supported")
        kind = raw["rope_type"] if "rope_type" in raw else raw.get("type", "default")
        if kind not in ROPE_TYPES:
            hint = " ('su' is Phi-3's old name for 'longrope')" if kind == "su" else ""
            raise ValueError(f"rope_type={kind!r} is not supported{hint}; expected one of "
                             f"{list(ROPE_TYPES)}")
        kwargs = {"rope_type": kind,
                  "theta": raw["rope_theta"] if "rope_theta" in raw
                  else config.get("rope_theta", cls.theta)}
        prf = raw["partial_rotary_factor"] if "partial_rotary_factor" in raw else config.get(
            "partial_rotary_factor")
        if prf is not None:
            kwargs["partial_rotary_factor"] = prf
        reads, max_pos = cls.READS[kind], config.get("max_position_embeddings")

        def need(key):
            if key not in raw:
                raise ValueError(f"{where} lacks {key!r}, which rope_type={kind!r} requires")
            return raw[key]

        if kind in ("linear", "dynamic", "llama3", "yarn"):
            kwargs["factor"] = need("factor")  # yarn: present but null means "derive it"
        elif kind in ("longrope", "proportional"):
            kwargs["factor"] = raw.get("factor")
        if "original_max_position_embeddings" in reads:
            orig = config.get("original_max_position_embeddings") or raw.get(
                "original_max_position_embeddings") or max_pos
            if orig is None:
                raise ValueError(f"{where} lacks 'original_max_position_embeddings' (and "
                                 f"max_position_embeddings to default it to), which "
                                 f"rope_type={kind!r} requires")
            kwargs["original_max_position_embeddings"] = orig
        if kind == "dynamic" or (kind in ("yarn", "longrope") and kwargs["factor"] is None):
            if max_pos is None:
                raise ValueError(f"config lacks 'max_position_embeddings', which rope_type="
                                 f"{kind!r} reads" + ("" if kind == "dynamic" else
                                                     " when factor is null"))
            kwargs["max_position_embeddings"] = max_pos
        if kind == "yarn":
            kwargs.update(attention_factor=raw.get("attention_factor"),
                          mscale=raw.get("mscale"), mscale_all_dim=raw.get("mscale_all_dim"),
                          # transformers: `.get("beta_fast") or 32`, `if truncate:`.
                          beta_fast=raw.get("beta_fast") or cls.beta_fast,
                          beta_slow=raw.get("beta_slow") or cls.beta_slow,
                          truncate=bool(raw.get("truncate", True)))
        elif kind == "longrope":
            kwargs.update(attention_factor=raw.get("attention_factor"),
                          short_factor=need("short_factor"), long_factor=need("long_factor"))
        elif kind == "llama3":
            kwargs.update(low_freq_factor=need("low_freq_factor"),
                          high_freq_factor=need("high_freq_factor"))
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The transformers-5 `rope_parameters` block (sorted keys, as save_pretrained writes).

        Fields at their defaults are left out, except those transformers requires (`factor`,
        `original_max_position_embeddings`); `max_position_embeddings` is a top-level key of
        config.json, not part of the block.
        """
        out = {"rope_type": self.rope_type, "rope_theta": self.theta}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in (*self.READS[self.rope_type], "partial_rotary_factor"):
            value = getattr(self, name)
            if name == "max_position_embeddings":
                continue
            if name == "factor" and value is None and self.rope_type == "yarn":
                out["factor"] = None  # transformers requires the key; null derives the factor
            elif value != defaults[name]:
                out[name] = list(value) if isinstance(value, tuple) else value
        return dict(sorted(out.items()))

    @staticmethod
    def _finite(value) -> bool:
        """A finite real number (Python or NumPy scalar), not a bool."""
        if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__") or getattr(
                value, "ndim", 0) != 0 or type(value).__name__ == "bool_":
            return False
        return float(value) - float(value) == 0  # false for nan and inf


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """How attention runs: the backend of `lcm.attention.attend` and its block sizes.

    `load_balance` (read by the context-parallel impls "ring", "allgather" and "ring_pallas"
    only): the order in which the sequence is split over the mesh's `context` axis, "zigzag"
    (balanced causal), "striped" or "none" (contiguous shards); see
    `lcm.attention.make_ring_order`. "ring_pallas" (the fused Pallas ring kernels) takes
    "zigzag" or "none" and index masks (no Document). The decoder permutes its tokens,
    positions and segment ids into that order once at its input and its logits back once at its
    output, so no layer reshuffles activations.
    """

    impl: str = "auto"
    block_q: int = 512
    block_k: int = 512
    load_balance: str = "zigzag"

    def __post_init__(self):
        _choice(self, "impl", ATTENTION_IMPLS)
        _positive(self, "block_q", "block_k")
        _choice(self, "load_balance", MODEL_LOAD_BALANCE)
        if self.load_balance != "zigzag" and not self.context_parallel:
            raise ValueError(f"AttentionConfig.load_balance={self.load_balance!r} is read only by "
                             f"impl 'ring' or 'allgather' or 'ring_pallas', not "
                             f"impl={self.impl!r}")

    @property
    def context_parallel(self) -> bool:
        """Whether the sequence is split over the mesh's context axis."""
        return self.impl in CONTEXT_PARALLEL_IMPLS


@dataclasses.dataclass(frozen=True, kw_only=True)
class PositionConfig:
    """How attention sees positions; `lcm.positions.extension` implements each type.

    - rope: the model's RoPE (`ModelConfig.rope`), unchanged.
    - nope: no position signal at all (causal mask only).
    - alibi (Press et al.): logits - slope_h * (query position - key position), no RoPE.
    - self_extend (Jin et al. 2024, LongLM): distances < `window` use normal RoPE; farther
      pairs use grouped positions, key floor(pos / group_size), query floor(pos / group_size)
      + window - window / group_size (LongLM's code).
    - rerope (Su 2023): distances < `window` normal, farther ones clipped to `window`.
    - leaky_rerope: farther distances d become window + (d - window) / leak.

    `log_scale_length` (rerope, leaky_rerope) multiplies each query by
    max(1, log(position + 1) / log(log_scale_length)), as the reference code; None disables it.
    Switch a loaded model with `dataclasses.replace(cfg, positions=PositionConfig(...))`.
    """

    type: str = "rope"
    window: int | None = None
    group_size: int | None = None
    leak: float | None = None
    log_scale_length: int | None = None

    # type -> the fields it requires (and the only ones it reads).
    READS = {
        "rope": (), "nope": (), "alibi": (),
        "self_extend": ("window", "group_size"),
        "rerope": ("window", "log_scale_length"),
        "leaky_rerope": ("window", "leak", "log_scale_length"),
    }
    _OPTIONAL = ("log_scale_length",)

    def __post_init__(self):
        _choice(self, "type", POSITION_TYPES)
        reads = self.READS[self.type]
        for name in ("window", "group_size", "leak", "log_scale_length"):
            value = getattr(self, name)
            if name not in reads and value is not None:
                users = [t for t, names in self.READS.items() if name in names]
                raise ValueError(f"PositionConfig.{name}={value!r} is not read by type="
                                 f"{self.type!r}; it is read by type in {users}")
            if name in reads and value is None and name not in self._OPTIONAL:
                raise ValueError(f"PositionConfig.{name}=None; type={self.type!r} requires it")
        for name in ("window", "group_size", "log_scale_length"):
            if getattr(self, name) is not None:
                _positive(self, name)
        if self.log_scale_length is not None and self.log_scale_length < 2:
            raise ValueError(f"PositionConfig.log_scale_length={self.log_scale_length}; expected "
                             f"an int >= 2 (the training length)")
        if self.leak is not None:
            if not RopeConfig._finite(self.leak) or not self.leak > 1.0:
                raise ValueError(f"PositionConfig.leak={self.leak!r}; expected a finite number "
                                 f"> 1 (the slope beyond the window is 1 / leak)")
            object.__setattr__(self, "leak", float(self.leak))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerKind:
    """What sets one layer's attention apart: its type, window or chunk, and RoPE.

    type: a `LAYER_TYPES` entry; window: the sliding window (a key is seen by queries fewer
    than `window` positions after it, transformers' convention) or None; chunk: the chunk size
    of chunked attention or None; rope: the layer's RopeConfig, None for a layer without RoPE.
    Built by `ModelConfig.layer_kinds`; hashable, so it is static under `jit`.
    """

    type: str = "full_attention"
    window: int | None = None
    chunk: int | None = None
    rope: RopeConfig | None = None

    def mask(self):
        """The layer's causal mask: Causal(), Local(window) or Chunked(chunk)."""
        from lcm.attention.masks import Causal, Chunked, Local  # config imports no lcm module

        if self.window is not None:
            return Local(self.window)
        return Causal() if self.chunk is None else Chunked(self.chunk)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer: Llama, Qwen2/3, Mistral, Ministral, Gemma 2/3, Phi-3 and kin.

    `architecture` only decides the Hugging Face names used on export; the math is set by the
    fields, each off by default (Llama):

    - per-layer schedule: `layer_types` (transformers' spelling, one entry per layer:
      "full_attention", "sliding_attention" with `sliding_window`, "chunked_attention" with
      `attention_chunk_size`); None means every layer "sliding_attention" when `sliding_window`
      is set (Mistral) and "full_attention" otherwise. `sliding_rope`: the RoPE of sliding
      layers when it differs from `rope` (Gemma 3: local base 10k, global 1M); `nope_layers`:
      indices of layers without RoPE (Llama 4, SmolLM3). `layer_kinds` resolves all of it.
    - attention: `qk_norm` ("rms": RMSNorm over each head's q and k with weights, Qwen3 and
      Gemma 3; "l2": the same without weights, Llama 4), `attn_softcap` (Gemma 2's
      cap * tanh(logits / cap)), `query_pre_attn_scalar` (Gemma: logits scaled by
      scalar ** -0.5 instead of head_dim ** -0.5), `qkv_bias` (Qwen2), `out_bias` (the output
      projection's), `attn_output_gate` (Qwen3-Next: the output times sigmoid of a gate
      projection), `attn_sinks` (gpt-oss: a learned logit per head joins each row's softmax
      with a zero value; params "sinks" [layers, heads]).
    - layer: `post_norms` (Gemma 2/3's sandwich: a norm on the attention and MLP outputs before
      each residual add), `norm_weight_offset` (Gemma: RMSNorm scales by 1 + w, so weights
      start at 0), `mlp_activation` ("silu": SwiGLU; "gelu_tanh": GeGLU with tanh-approximated
      GELU).
    - ends: `embed_scale` (Gemma: embeddings times sqrt(hidden_size), rounded to the compute
      dtype), `final_softcap` (Gemma 2's cap on the output logits).

    The layers of different kinds still run under `lax.scan` (over repeats of the schedule's
    pattern; see `lcm.model.layers.run_layers`), so compile time stays flat in depth.
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
    positions: PositionConfig = dataclasses.field(default_factory=PositionConfig)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    architecture: str = "llama"
    layer_types: tuple[str, ...] | None = None
    attention_chunk_size: int | None = None
    sliding_rope: RopeConfig | None = None
    nope_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    out_bias: bool = False
    attn_output_gate: bool = False
    post_norms: bool = False
    norm_weight_offset: float = 0.0
    mlp_activation: str = "silu"
    embed_scale: bool = False
    attn_sinks: bool = False

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "intermediate_size", "max_position_embeddings")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim}; RoPE needs an even head_dim")
        if not RopeConfig._finite(self.norm_eps) or not 0 < self.norm_eps < 1:
            raise ValueError(f"ModelConfig.norm_eps={self.norm_eps!r}; expected a float in (0, 1)")
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        if self.sliding_window is not None:
            _positive(self, "sliding_window")
        if not isinstance(self.rope, RopeConfig):
            raise ValueError(f"ModelConfig.rope={self.rope!r}; expected a RopeConfig")
        if self.rope.max_position_embeddings not in (None, self.max_position_embeddings):
            raise ValueError(f"ModelConfig.rope.max_position_embeddings="
                             f"{self.rope.max_position_embeddings} differs from "
                             f"max_position_embeddings={self.max_position_embeddings}; the rope "
                             f"reads the model's value (as transformers does): make them equal")
        if not isinstance(self.attention, AttentionConfig):
            raise ValueError(f"ModelConfig.attention={self.attention!r}; expected an "
                             f"AttentionConfig")
        if not isinstance(self.positions, PositionConfig):
            raise ValueError(f"ModelConfig.positions={self.positions!r}; expected a "
                             f"PositionConfig")
        _dtype_name(self, "dtype")
        _dtype_name(self, "param_dtype")
        _choice(self, "remat", REMAT_POLICIES)
        _choice(self, "architecture", ARCHITECTURES)
        self._check_schedule()
        self._check_features()
        if self.positions.type != "rope" and (
                not self.uniform_layers or self.attn_softcap is not None or self.nope_layers
                or self.attn_sinks):
            raise ValueError(f"ModelConfig.positions type={self.positions.type!r} needs layers "
                             f"of one kind with RoPE, no attn_softcap and no attn_sinks "
                             f"(layer_types={self.layer_types}, nope_layers={self.nope_layers}, "
                             f"attn_softcap={self.attn_softcap}, attn_sinks={self.attn_sinks})")

    def _check_schedule(self):
        name = "ModelConfig"
        if self.layer_types is not None:
            if isinstance(self.layer_types, str) or not hasattr(self.layer_types, "__len__"):
                raise ValueError(f"{name}.layer_types={self.layer_types!r}; expected a sequence "
                                 f"of {list(LAYER_TYPES)}, one per layer")
            types = tuple(self.layer_types)
            if len(types) != self.num_layers:
                raise ValueError(f"{name}.layer_types has {len(types)} entries; expected "
                                 f"num_layers={self.num_layers}")
            if bad := sorted({t for t in types if t not in LAYER_TYPES}, key=str):
                raise ValueError(f"{name}.layer_types holds {bad}; expected entries in "
                                 f"{list(LAYER_TYPES)}")
            object.__setattr__(self, "layer_types", types)
        types = self.layer_types or ()
        if self.attention_chunk_size is not None:
            _positive(self, "attention_chunk_size")
        for kind, field in (("sliding_attention", "sliding_window"),
                            ("chunked_attention", "attention_chunk_size")):
            if kind in types and getattr(self, field) is None:
                raise ValueError(f"{name}.layer_types has {kind!r} layers but {field}=None; "
                                 f"set {field}")
        if self.attention_chunk_size is not None and "chunked_attention" not in types:
            raise ValueError(f"{name}.attention_chunk_size={self.attention_chunk_size} is read "
                             f"only by 'chunked_attention' entries of layer_types")
        if self.sliding_rope is not None:
            if not isinstance(self.sliding_rope, RopeConfig):
                raise ValueError(f"{name}.sliding_rope={self.sliding_rope!r}; expected a "
                                 f"RopeConfig or None")
            if self.sliding_window is None:
                raise ValueError(f"{name}.sliding_rope is set but sliding_window=None: no layer "
                                 f"is sliding")
        if isinstance(self.nope_layers, (str, bytes)) or not hasattr(self.nope_layers, "__iter__"):
            raise ValueError(f"{name}.nope_layers={self.nope_layers!r}; expected a sequence of "
                             f"layer indices")
        nope = tuple(self.nope_layers)
        for i in nope:
            if (isinstance(i, bool) or not hasattr(i, "__index__")
                    or not 0 <= i < self.num_layers):
                raise ValueError(f"{name}.nope_layers holds {i!r}; expected layer indices in "
                                 f"[0, {self.num_layers})")
        if len(set(nope)) != len(nope):
            raise ValueError(f"{name}.nope_layers={nope} repeats an index")
        object.__setattr__(self, "nope_layers", tuple(sorted(int(i) for i in nope)))

    def _check_features(self):
        name = "ModelConfig"
        if self.qk_norm is not None:
            _choice(self, "qk_norm", QK_NORMS)
        _choice(self, "mlp_activation", MLP_ACTIVATIONS)
        for field in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            value = getattr(self, field)
            if value is None:
                continue
            if not RopeConfig._finite(value) or value <= 0:
                raise ValueError(f"{name}.{field}={value!r}; expected a positive number or None")
            object.__setattr__(self, field, float(value))
        if not RopeConfig._finite(self.norm_weight_offset):
            raise ValueError(f"{name}.norm_weight_offset={self.norm_weight_offset!r}; expected a "
                             f"finite number (Gemma: 1.0)")
        object.__setattr__(self, "norm_weight_offset", float(self.norm_weight_offset))
        for field in ("tie_embeddings", "qkv_bias", "out_bias", "attn_output_gate",
                      "post_norms", "embed_scale", "attn_sinks"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{name}.{field}={getattr(self, field)!r}; expected a bool")

    @functools.cached_property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        """Each layer's attention kind, window or chunk, and RoPE (None: no RoPE)."""
        types = self.layer_types or (
            ("sliding_attention" if self.sliding_window is not None else "full_attention"),
        ) * self.num_layers
        kinds = []
        for i, t in enumerate(types):
            sliding = t == "sliding_attention" and self.sliding_rope is not None
            rope = self.sliding_rope if sliding else self.rope
            kinds.append(LayerKind(
                type=t, window=self.sliding_window if t == "sliding_attention" else None,
                chunk=self.attention_chunk_size if t == "chunked_attention" else None,
                rope=None if i in self.nope_layers else rope))
        return tuple(kinds)

    def layer_config(self, kind: LayerKind) -> ModelConfig:
        """This config with every layer of `kind`: what code written for one kind of layer (a
        cache's visibility, a press's scores) reads as `cfg.sliding_window` inside that layer's
        attention step. Its `rope` is the layer's (the model's own for a layer without RoPE,
        whose attention step rotates nothing). Chunked layers have no such view: ValueError.
        """
        if kind.chunk is not None:
            raise ValueError(f"layer_types 'chunked_attention' (attention_chunk_size="
                             f"{kind.chunk}): the KV cache does not keep chunked layers yet; "
                             f"run them through lcm.model.forward")
        return dataclasses.replace(self, layer_types=None, sliding_window=kind.window,
                                   sliding_rope=None, rope=kind.rope or self.rope,
                                   nope_layers=())

    @property
    def uniform_layers(self) -> bool:
        """Whether every layer is of one kind (one mask and one RoPE)."""
        return len(set(self.layer_kinds)) == 1

    @property
    def attention_scale(self) -> float:
        """The logits' scale: query_pre_attn_scalar ** -0.5, else head_dim ** -0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

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
