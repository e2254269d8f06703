"""lcm: long-sequence modeling in JAX.

A library for researchers who run decoder language models on sequences far longer than one
chip or one attention matrix holds: define or load a model, run it with block-sparse or ring
attention over a device mesh, extend its context window, give it a recurrent memory, shrink its
KV cache with an eviction policy, and measure all of that on long-context benchmarks. The same
code runs on a TPU pod slice, a GPU, a laptop CPU, and on 8 simulated CPU devices in tests.

Packages (each exports a small public API; see its docstring or the API reference):

- `lcm.attention`: `attend(q, k, v, mask, impl=...)` over interchangeable backends (reference,
  xla, pallas, ring, allgather); masks as values (Causal, Local, SinkWindow, Document,
  BlockMask, VerticalSlash, MaskFn, and their `&` / `|`) lowering to one block layout.
- `lcm.positions`: RoPE and its scaling family (linear, dynamic, YaRN, LongRoPE, Llama 3),
  Self-Extend, ReRoPE, ALiBi, NoPE.
- `lcm.config`: the frozen, self-checking ModelConfig, AttentionConfig, RopeConfig and
  PositionConfig.
- `lcm.model`: the functional decoder: params as pytrees with logical axes, `forward`, one
  decoder layer for every path.
- `lcm.sharding`: meshes (real or simulated CPU devices) and logical-axis sharding rules.
- `lcm.cache`: the KV cache, prefill / decode / generate, and kvpress-compatible presses
  (eviction, selection, quantization), chunked prefill, speculative decoding.
- `lcm.memory`: segment recurrence with memory kinds (Transformer-XL, RMT, Infini-attention,
  kNN, block retrieval, linear recurrences).
- `lcm.io`: Hugging Face safetensors import/export, GGUF import, `load_pretrained`.
- `lcm.data`: records, tokenizers, synthetic generators, benchmark readers, Grain pipelines.
- `lcm.eval`: benchmark metrics, the resumable evaluation loop, results files and plots.
- `lcm.train`: Optax train step, Orbax checkpoints, the training loop.

Importing `lcm` imports none of them: `import lcm.attention` (or `from lcm.cache import ...`)
loads what it needs.
"""
