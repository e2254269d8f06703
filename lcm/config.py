"""Frozen, keyword-only, self-checking configs.

Every config validates itself on construction: a bad value raises ValueError naming the field, the
value and what is allowed. Configs are hashable, so they can be static arguments of `jax.jit`.
Tests shrink them with `dataclasses.replace(cfg, num_layers=2)`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcm.checks import check_choice, check_int

DTYPES = ("float32", "bfloat16", "float16")
ARCHITECTURES = ("llama", "qwen2", "mistral")
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
    def from_hf(cls, config: dict) -> RopeConfig:
        """The RopeConfig of a transformers config.json dict, read where transformers reads it.

        Accepts the transformers-5 `rope_parameters` block and the 4.x `rope_theta` +
        `rope_scaling` form (with the legacy `type` key); `rope_scaling` wins when both are set,
        and a `rope_theta` inside the block wins over the top-level one, as in transformers.
        Top-level keys read too: `max_position_embeddings` (dynamic; yarn/longrope without a
        factor; the default `original_max_position_embeddings`), `partial_rotary_factor`, and
        `original_max_position_embeddings`, which overrides the block's (Phi-3 style), as
        transformers does when it builds the rotary embedding. Keys a type does not read are
        ignored (transformers warns); unknown types and missing keys raise ValueError.
        """
        if not isinstance(config, dict):
            raise ValueError(f"config={type(config).__name__}; expected a config.json dict")
        block, scaling = config.get("rope_parameters"), config.get("rope_scaling")
        for name, value in (("rope_parameters", block), ("rope_scaling", scaling)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name}={value!r}; expected a JSON object or null")
        raw, where = dict(scaling or block or {}), "rope_scaling" if scaling else "rope_parameters"
        if nested := [k for k, v in raw.items() if isinstance(v, dict)]:
            raise ValueError(f"{where} is nested per layer type ({nested}); lcm has one RoPE "
                             f"for all layers")
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
            if (isinstance(self.leak, bool) or not isinstance(self.leak, (int, float))
                    or not self.leak > 1.0 or self.leak == float("inf")):
                raise ValueError(f"PositionConfig.leak={self.leak!r}; expected a finite number "
                                 f"> 1 (the slope beyond the window is 1 / leak)")
            object.__setattr__(self, "leak", float(self.leak))


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
    positions: PositionConfig = dataclasses.field(default_factory=PositionConfig)
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
