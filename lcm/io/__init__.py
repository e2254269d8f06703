"""Checkpoint import/export: Hugging Face safetensors directories (Llama, Qwen2, Mistral)."""

from lcm.io.hf import load_hf_checkpoint, save_hf_checkpoint

__all__ = ["load_hf_checkpoint", "save_hf_checkpoint"]
