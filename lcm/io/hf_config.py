"""transformers config.json <-> ModelConfig for Llama, Qwen2 and Mistral (4.x and 5.x keys)."""

from __future__ import annotations

from pathlib import Path

from lcm.config import ModelConfig, RopeConfig

# model_type -> (HF class, transformers' defaults for the keys a config.json may leave out).
_ARCHS = {
    "llama": ("LlamaForCausalLM", {"max_position_embeddings": 2048}),
    "qwen2": ("Qwen2ForCausalLM", {"max_position_embeddings": 32768}),
    "mistral": ("MistralForCausalLM",
                {"max_position_embeddings": 4096 * 32, "sliding_window": 4096}),
}


def config_from_hf(hf: dict, source: Path, dtype_name: str) -> ModelConfig:
    """Maps a transformers config.json dict to a ModelConfig; unsupported features raise."""
    model_type = hf.get("model_type")
    if model_type not in _ARCHS:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; expected one of "
                         f"{sorted(_ARCHS)}")
    if missing := [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "intermediate_size") if hf.get(k) is None]:
        raise ValueError(f"{source}: config.json lacks {missing}")
    if (hf.get("hidden_act") or "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is "
                         f"supported")
    for key in ("attention_bias", "mlp_bias"):
        if model_type == "llama" and hf.get(key):
            raise ValueError(f"{source}: {key}=true is not supported yet; lcm has no o_proj/MLP "
                             f"bias")

    sliding_window = None
    if model_type == "mistral":  # null means no window; a missing key means transformers' 4096
        sliding_window = hf.get("sliding_window", _ARCHS["mistral"][1]["sliding_window"])
    if model_type == "qwen2":
        # Qwen2 windows only the layers >= max_window_layers; lcm has one window for all layers.
        sliding = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
        if hf.get("use_sliding_window") or sliding:
            raise ValueError(f"{source}: use_sliding_window=true (layer_types="
                             f"{hf.get('layer_types')}) is not supported for qwen2; set "
                             f"use_sliding_window=false")

    def get(key, default):  # transformers reads a null like a missing key
        value = hf.get(key)
        return _ARCHS[model_type][1].get(key, default) if value is None else value

    heads = hf["num_attention_heads"]
    if not isinstance(heads, int) or heads <= 0:  # head_dim's default divides by it
        raise ValueError(f"{source}: num_attention_heads={heads!r}; expected a positive int")
    max_position_embeddings = get("max_position_embeddings", 0)
    rope = _rope_from_hf(hf, source, model_type, max_position_embeddings)
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=get("num_key_value_heads", heads),
            head_dim=get("head_dim", hf["hidden_size"] // heads),
            intermediate_size=hf["intermediate_size"], norm_eps=get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(get("tie_word_embeddings", False)), qkv_bias=model_type == "qwen2",
            sliding_window=sliding_window,
            max_position_embeddings=max_position_embeddings, rope=rope,
            dtype=dtype_name, param_dtype=dtype_name, architecture=model_type)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from e


def _rope_from_hf(hf: dict, source: Path, model_type: str,
                  max_position_embeddings) -> RopeConfig:
    """The RopeConfig of config.json, either form (see RopeConfig.from_hf).

    max_position_embeddings comes with the architecture's default filled in, as transformers reads
    it. A partial_rotary_factor other than 1 is refused: transformers' Llama/Qwen2/Mistral ignore
    it for the default rope and fail on it for the scaled ones (cos and q differ in size).
    """
    try:
        rope = RopeConfig.from_hf({**hf, "max_position_embeddings": max_position_embeddings})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: RoPE config: {e}") from e
    if rope.partial_rotary_factor != 1.0 and rope.rope_type != "proportional":
        raise ValueError(f"{source}: partial_rotary_factor={rope.partial_rotary_factor} is not "
                         f"supported for {model_type} with rope_type={rope.rope_type!r}: "
                         f"transformers' {model_type} rotates the whole head")
    return rope


def config_to_hf(cfg: ModelConfig, dtype_name: str) -> dict:
    """The config.json transformers 5 writes for `cfg` (the keys of save_pretrained's)."""
    arch = cfg.architecture
    if cfg.qkv_bias != (arch == "qwen2"):
        raise ValueError(f"cfg.qkv_bias={cfg.qkv_bias} cannot be exported as "
                         f"architecture={arch!r}; q/k/v biases exist in (and only in) qwen2")
    if cfg.sliding_window is not None and arch != "mistral":
        raise ValueError(f"cfg.sliding_window={cfg.sliding_window} cannot be exported as "
                         f"architecture={arch!r}; use architecture='mistral'")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"cfg.hidden_size={cfg.hidden_size} must be a multiple of "
                         f"num_heads={cfg.num_heads}: transformers' LlamaConfig rejects it")
    hf = {
        "architectures": [_ARCHS[arch][0]], "attention_dropout": 0.0,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,  # lcm has no tokenizer
        "dtype": dtype_name, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "hidden_size": cfg.hidden_size, "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings, "model_type": arch,
        "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": cfg.rope.to_hf(),
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, "vocab_size": cfg.vocab_size,
    }
    if arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    else:
        hf.update(layer_types=["full_attention"] * cfg.num_layers, use_sliding_window=False,
                  sliding_window=None, max_window_layers=cfg.num_layers)
    return dict(sorted(hf.items()))
