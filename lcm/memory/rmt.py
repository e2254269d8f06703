"""Recurrent Memory Transformer (Bulatov et al. 2022), decoder form.

Each segment runs as [memory (read slots); tokens; memory (write slots)] through the unchanged
decoder with causal attention; the final hidden states of the write slots (after the final norm,
as Hugging Face's last hidden state that the RMT code reads) are the next segment's memory.
Gradients flow through the memory across segments (BPTT, truncated with `bptt_segments`).
Positions restart at 0 in every segment, so the model never sees positions past
2 * num_mem_tokens + segment_len.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcm.memory.base import Memory, key_validity
from lcm.model import WeightSpec, rms_norm


@dataclasses.dataclass(frozen=True)
class RecurrentMemory(Memory):
    """`num_mem_tokens` learned memory embeddings read before and written after each segment.

    Params: "memory" [num_mem_tokens, hidden] (the initial memory). State: "tokens"
    [B, num_mem_tokens, hidden]. With num_mem_tokens = 0 a single segment is the plain forward.
    """

    num_mem_tokens: int

    level = "token"

    def __post_init__(self):
        self._check_ints(0, "num_mem_tokens")

    def param_specs(self, cfg):
        # Embedding-like: unit variance, as lcm.model's token embeddings.
        return {"memory": WeightSpec((self.num_mem_tokens, cfg.hidden_size), (None, "embed"))}

    def init(self, cfg, batch, memory_params):
        mem = memory_params["memory"].astype(cfg.compute_dtype)
        return {"tokens": jnp.broadcast_to(mem[None], (batch,) + mem.shape)}

    def read(self, state, params, x, valid, cfg):
        """Wraps the segment: (x [B, 2N + T, E], positions [B, 2N + T], valid [B, 2N + T])."""
        B, T, _ = x.shape
        mem = state["tokens"].astype(x.dtype)
        x = jnp.concatenate([mem, x, mem], 1)
        n = self.num_mem_tokens
        ones = jnp.ones((B, n), bool)
        valid = jnp.concatenate([ones, valid, ones], 1)
        positions = jnp.broadcast_to(jnp.arange(T + 2 * n, dtype=jnp.int32), (B, T + 2 * n))
        return x, positions, valid

    def write(self, state, params, x, model_params, cfg):
        """Splits the decoder output: (segment hidden states [B, T, E], next state)."""
        n = self.num_mem_tokens
        T = x.shape[1] - 2 * n
        new = rms_norm(x[:, n + T:], model_params["final_norm"], cfg.norm_eps,
                       cfg.norm_weight_offset)
        return x[:, n:n + T], dict(state, tokens=new.astype(state["tokens"].dtype))

    def layer(self, state, params, h, q, k, v, ctx):
        # Padding between the tokens and the write slots must stay invisible to the slots.
        mask = ctx.self_mask() & key_validity(q.shape[1], ctx.valid)
        return ctx.attend(ctx.rope(q), ctx.rope(k), v, mask), state
