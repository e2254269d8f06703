"""transformers config.json <-> ModelConfig for Llama, Qwen2/3, Mistral, Ministral, Gemma 2/3 and
Phi-3 (transformers' 4.x and 5.x keys).

Each family fixes some features (`_FIXED`: Gemma's sandwich norms, (1 + w) RMSNorm, GeGLU and
embedding scale, Qwen3's qk-norm) and reads others from config.json (windows, layer types,
soft-caps, RoPE per layer type). A key a config.json leaves out takes transformers' default for
that family (`_DEFAULTS`). Anything lcm does not model (a MoE, an MLP bias, an activation other
than the family's) raises ValueError naming it: nothing loads half-supported.
"""

from __future__ import annotations

from pathlib import Path

from lcm.config import ModelConfig, RopeConfig

# model_type -> HF class for export (Gemma 3 exports its text model).
_CLASSES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "ministral": "MinistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
}
# lcm architecture name -> transformers model_type.
_MODEL_TYPE = {"gemma3": "gemma3_text"}
# transformers' defaults for the keys a config.json may leave out (save_pretrained writes only
# the keys that differ from them).
_GEMMA = {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
          "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
          "rms_norm_eps": 1e-6}
_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "qwen2": {"max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 28},
    "mistral": {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
    "ministral": {"max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen3": {"max_position_embeddings": 32768, "head_dim": 128, "sliding_window": 4096,
              "max_window_layers": 28},
    "gemma2": {**_GEMMA, "max_position_embeddings": 8192, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0},
    "gemma3_text": {**_GEMMA, "max_position_embeddings": 131072},
    "phi3": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
}
# The features each family fixes (ModelConfig field -> value); the rest default to off.
_GEMMA_FIXED = dict(post_norms=True, norm_weight_offset=1.0, mlp_activation="gelu_tanh",
                    embed_scale=True)
_FIXED = {
    "gemma2": _GEMMA_FIXED,
    "gemma3_text": dict(_GEMMA_FIXED, qk_norm="rms"),
    "qwen3": dict(qk_norm="rms"),
}
_FEATURES = ("qk_norm", "post_norms", "norm_weight_offset", "mlp_activation", "embed_scale",
             "attn_output_gate", "attn_sinks")
# Families whose attention_bias key puts biases on q, k, v and o.
_ATTENTION_BIAS = ("llama", "qwen3")


def config_from_hf(hf: dict, source: Path, dtype_name: str) -> ModelConfig:
    """Maps a transformers config.json dict to a ModelConfig; unsupported features raise.

    A Gemma 3 multimodal config (`model_type` "gemma3", with a `text_config`) gives its text
    tower's ModelConfig.
    """
    model_type = hf.get("model_type")
    if model_type == "gemma3" and isinstance(hf.get("text_config"), dict):
        hf = {"tie_word_embeddings": hf.get("tie_word_embeddings", True), **hf["text_config"],
              "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type not in _CLASSES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; expected one of "
                         f"{sorted(_CLASSES)} (or a 'gemma3' config with a text_config)")
    if missing := [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "intermediate_size") if hf.get(k) is None]:
        raise ValueError(f"{source}: config.json lacks {missing}")
    defaults = _DEFAULTS[model_type]

    def get(key, default=None):  # transformers reads a null like a missing key
        value = hf.get(key)
        return defaults.get(key, default) if value is None else value

    _refuse_unsupported(hf, source, model_type, get)
    heads = hf["num_attention_heads"]
    if not isinstance(heads, int) or heads <= 0:  # head_dim's default divides by it
        raise ValueError(f"{source}: num_attention_heads={heads!r}; expected a positive int")
    num_layers = hf["num_hidden_layers"]
    max_position_embeddings = get("max_position_embeddings", 0)
    sliding_window, layer_types = _schedule(hf, source, model_type, get, num_layers)
    rope, sliding_rope = _ropes(hf, source, model_type, max_position_embeddings)
    if sliding_window is None:
        sliding_rope = None
    bias = bool(get("attention_bias", False))
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=num_layers, num_heads=heads,
            num_kv_heads=get("num_key_value_heads", heads),
            head_dim=get("head_dim", hf["hidden_size"] // heads),
            intermediate_size=hf["intermediate_size"], norm_eps=get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bias, out_bias=bias,
            sliding_window=sliding_window, layer_types=layer_types, sliding_rope=sliding_rope,
            max_position_embeddings=max_position_embeddings, rope=rope,
            attn_softcap=get("attn_logit_softcapping"),
            final_softcap=get("final_logit_softcapping"),
            query_pre_attn_scalar=get("query_pre_attn_scalar"),
            dtype=dtype_name, param_dtype=dtype_name,
            architecture=_architecture(model_type), **_FIXED.get(model_type, {}))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from e


def _architecture(model_type: str) -> str:
    return {v: k for k, v in _MODEL_TYPE.items()}.get(model_type, model_type)


def _refuse_unsupported(hf, source, model_type, get):
    """ValueError for the config.json features lcm does not model."""
    act_key = "hidden_activation" if model_type in ("gemma2", "gemma3_text") else "hidden_act"
    want = "gelu_pytorch_tanh" if act_key == "hidden_activation" else "silu"
    act = get(act_key) or ("silu" if act_key == "hidden_act" else want)
    if act != want:
        raise ValueError(f"{source}: {act_key}={act!r} is not supported for {model_type}; "
                         f"expected {want!r}")
    if hf.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported; lcm's MLP has no bias")
    if hf.get("attention_bias") and model_type not in _ATTENTION_BIAS:
        raise ValueError(f"{source}: attention_bias=true is not supported for {model_type}")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf.get(key):
            raise ValueError(f"{source}: {key}={hf[key]!r}: mixture-of-experts layers are not "
                             f"supported")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{source}: use_bidirectional_attention=true is not supported; lcm's "
                         f"decoder is causal")


def _schedule(hf, source, model_type, get, num_layers):
    """(sliding_window, layer_types) as transformers resolves them for the family."""
    if model_type in ("llama", "phi3"):
        window = get("sliding_window") if model_type == "phi3" else None
        return window, None
    if model_type == "mistral":  # null means no window; a missing key means 4096
        return (hf.get("sliding_window", _DEFAULTS["mistral"]["sliding_window"]), None)
    if model_type in ("qwen2", "qwen3"):
        window = get("sliding_window") if hf.get("use_sliding_window") else None
        types = hf.get("layer_types") or [
            "sliding_attention" if window is not None and i >= get("max_window_layers")
            else "full_attention" for i in range(num_layers)]
    elif model_type == "ministral":
        window = get("sliding_window")
        types = hf.get("layer_types") or [
            "sliding_attention" if window is not None else "full_attention"] * num_layers
    else:  # gemma2, gemma3_text
        window = get("sliding_window")
        pattern = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
        types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(num_layers)]
    if not isinstance(types, list):
        raise ValueError(f"{source}: layer_types={types!r}; expected a list")
    if bad := sorted({str(t) for t in types} - {"full_attention", "sliding_attention"}):
        raise ValueError(f"{source}: layer_types holds {bad}; lcm loads 'full_attention' and "
                         f"'sliding_attention' layers")
    if "sliding_attention" not in types:
        return None, None  # every layer full: ModelConfig's default schedule
    if window is None:
        raise ValueError(f"{source}: layer_types has 'sliding_attention' layers but "
                         f"sliding_window is null")
    return window, (None if "full_attention" not in types else tuple(types))


def _ropes(hf, source, model_type, max_position_embeddings):
    """(rope, sliding_rope): the RopeConfig of full layers and that of sliding layers.

    max_position_embeddings comes with the family's default filled in, as transformers reads it.
    A partial_rotary_factor other than 1 is refused but for Phi-3 (Phi-4-mini rotates 3/4 of each
    head): transformers' Llama/Qwen/Mistral/Gemma ignore it for the default rope and fail on it
    for the scaled ones.
    """
    full = {**hf, "max_position_embeddings": max_position_embeddings}
    sliding = full
    if model_type == "gemma3_text":
        block = hf.get("rope_parameters")
        if not (isinstance(block, dict) and any(isinstance(v, dict) for v in block.values())):
            # 4.x keys: rope_theta (+ rope_scaling) for full layers, rope_local_base_freq for
            # sliding ones; transformers' defaults 1e6 and 1e4.
            full["rope_theta"] = hf.get("rope_theta") or 1_000_000.0
            if not hf.get("rope_scaling") and not block:
                full["rope_parameters"] = {"rope_type": "default",
                                           "rope_theta": full["rope_theta"]}
            sliding = {**full, "rope_scaling": None, "rope_parameters": {
                "rope_type": "default",
                "rope_theta": hf.get("rope_local_base_freq") or 10_000.0}}
    try:
        rope = RopeConfig.from_hf(full, layer_type="full_attention")
        sliding_rope = RopeConfig.from_hf(sliding, layer_type="sliding_attention")
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: RoPE config: {e}") from e
    for r in (rope, sliding_rope):
        if r.partial_rotary_factor != 1.0 and r.rope_type != "proportional" and (
                model_type != "phi3"):
            raise ValueError(f"{source}: partial_rotary_factor={r.partial_rotary_factor} is not "
                             f"supported for {model_type} with rope_type={r.rope_type!r}: "
                             f"transformers' {model_type} rotates the whole head")
    return rope, (None if sliding_rope == rope else sliding_rope)


def config_to_hf(cfg: ModelConfig, dtype_name: str) -> dict:
    """The config.json transformers 5 writes for `cfg` (the keys of save_pretrained's)."""
    arch = cfg.architecture
    model_type = _MODEL_TYPE.get(arch, arch)
    _check_exportable(cfg, model_type)
    hf = {
        "architectures": [_CLASSES[model_type]], "attention_dropout": 0.0,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,  # lcm has no tokenizer
        "dtype": dtype_name, "head_dim": cfg.head_dim,
        "hidden_size": cfg.hidden_size, "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings, "model_type": model_type,
        "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": cfg.rope.to_hf(),
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, "vocab_size": cfg.vocab_size,
    }
    if model_type in ("gemma2", "gemma3_text"):
        hf["hidden_activation"] = "gelu_pytorch_tanh"
    else:
        hf["hidden_act"] = "silu"
    types = [k.type for k in cfg.layer_kinds]
    if model_type == "llama":
        hf.update(attention_bias=cfg.out_bias, mlp_bias=False, pretraining_tp=1)
    elif model_type in ("mistral", "phi3"):
        hf["sliding_window"] = cfg.sliding_window
    elif model_type == "qwen2":
        hf.update(layer_types=types, use_sliding_window=False, sliding_window=None,
                  max_window_layers=cfg.num_layers)
    elif model_type == "qwen3":
        sliding = cfg.sliding_window is not None
        hf.update(attention_bias=cfg.out_bias, layer_types=types, use_sliding_window=sliding,
                  sliding_window=cfg.sliding_window, max_window_layers=cfg.num_layers)
    else:  # ministral, gemma2, gemma3_text
        hf.update(layer_types=types, sliding_window=cfg.sliding_window)
    if model_type in ("gemma2", "gemma3_text"):
        scalar = cfg.query_pre_attn_scalar
        hf.update(query_pre_attn_scalar=int(scalar) if scalar.is_integer() else scalar,

                  attn_logit_softcapping=cfg.attn_softcap,
                  final_logit_softcapping=cfg.final_softcap, attention_bias=False,
                  use_bidirectional_attention=None)
    if model_type == "gemma3_text":
        sliding_rope = cfg.sliding_rope or cfg.rope
        hf["rope_parameters"] = {"full_attention": cfg.rope.to_hf(),
                                 "sliding_attention": sliding_rope.to_hf()}
        # transformers' default pattern: layer_types (written above) is what it reads.
        hf.update(use_bidirectional_attention=False, _sliding_window_pattern=6)
    if model_type == "phi3":
        del hf["head_dim"]  # Phi-3 derives it as hidden_size / num_heads
        hf.update(original_max_position_embeddings=(cfg.rope.original_max_position_embeddings
                                                    or cfg.max_position_embeddings),
                  partial_rotary_factor=cfg.rope.partial_rotary_factor, embd_pdrop=0.0,
                  resid_pdrop=0.0)
    return dict(sorted(hf.items()))


def _check_exportable(cfg: ModelConfig, model_type: str) -> None:
    """ValueError naming the first field of `cfg` the family cannot express."""
    arch = cfg.architecture
    fixed = _FIXED.get(model_type, {})
    defaults = {f: ModelConfig.__dataclass_fields__[f].default for f in _FEATURES}
    for field in _FEATURES:
        want = fixed.get(field, defaults[field])
        if getattr(cfg, field) != want:
            raise ValueError(f"cfg.{field}={getattr(cfg, field)!r} cannot be exported as "
                             f"architecture={arch!r}, which has {field}={want!r}")
    qkv_bias = model_type == "qwen2" or (model_type in _ATTENTION_BIAS and cfg.out_bias)
    if cfg.qkv_bias != qkv_bias or (cfg.out_bias and model_type not in _ATTENTION_BIAS):
        raise ValueError(f"cfg.qkv_bias={cfg.qkv_bias} cannot be exported as architecture="
                         f"{arch!r} with out_bias={cfg.out_bias}: q/k/v biases exist alone in "
                         f"qwen2, with the output bias (attention_bias) in llama and qwen3")
    gemma = model_type in ("gemma2", "gemma3_text")
    if not gemma:
        for field in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            if getattr(cfg, field) is not None:
                raise ValueError(f"cfg.{field}={getattr(cfg, field)} cannot be exported as "
                                 f"architecture={arch!r}; use a gemma architecture")
    if cfg.nope_layers or cfg.attention_chunk_size is not None:
        raise ValueError(f"cfg.nope_layers={cfg.nope_layers}, attention_chunk_size="
                         f"{cfg.attention_chunk_size} cannot be exported as architecture="
                         f"{arch!r}")
    if cfg.sliding_rope is not None and model_type != "gemma3_text":
        raise ValueError(f"cfg.sliding_rope cannot be exported as architecture={arch!r}; only "
                         f"gemma3 has a RoPE per layer type")
    types = {k.type for k in cfg.layer_kinds}
    if model_type in ("llama", "qwen2") and types != {"full_attention"}:
        raise ValueError(f"cfg.sliding_window={cfg.sliding_window} cannot be exported as "
                         f"architecture={arch!r}; use architecture='mistral'")
    if model_type in ("mistral", "phi3") and len(types) > 1:
        raise ValueError(f"cfg.layer_types={cfg.layer_types} cannot be exported as architecture="
                         f"{arch!r} (one window for all layers); use 'ministral'")
    if model_type != "phi3" and cfg.rope.partial_rotary_factor != 1.0 and (
            cfg.rope.rope_type != "proportional"):
        raise ValueError(f"cfg.rope.partial_rotary_factor={cfg.rope.partial_rotary_factor} "
                         f"cannot be exported as architecture={arch!r}; use 'phi3'")
    if cfg.hidden_size % cfg.num_heads and model_type in ("llama", "qwen2", "mistral"):
        raise ValueError(f"cfg.hidden_size={cfg.hidden_size} must be a multiple of "
                         f"num_heads={cfg.num_heads}: transformers' {model_type} config rejects "
                         f"it")
    if model_type == "phi3" and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ValueError(f"cfg.head_dim={cfg.head_dim} cannot be exported as architecture="
                         f"'phi3', which derives head_dim = hidden_size / num_heads = "
                         f"{cfg.hidden_size / cfg.num_heads:g}")
