"""The main job: passkey and needle-in-a-haystack accuracy of SmolLM2-135M-Instruct over context
length x needle depth, for the full KV cache and for cache eviction policies at one compression
ratio, and past the model's native 8k with YaRN and with Self-Extend (experiments/longctx_sweep).

    python -m experiments.run --config=configs/longctx_sweep.py --workdir=/tmp/longctx_sweep

The default: native lengths 1k, 2k, 4k and 8k (needle depths 0/50/100% up to 4k, 50% at 8k),
16k with YaRN (x2) and with Self-Extend (needle-in-a-haystack only, depth 50%), passkey and NIAH,
one sample per cell, full / StreamingLLM / SnapKV / PyramidKV at compression 0.5 natively and
with YaRN (Self-Extend keeps every token: full only). Each batch is prefilled once and its cache
compressed per method. Sized to finish within 10 minutes on a 2-core CPU including model load
and compilation. Rerunning the same command resumes (finished samples are skipped); it writes
results.jsonl, results.md, results.csv, summary.json (with per-setting wall and CPU seconds of
prefill and of each method's decoding) and one heatmap_<run>_<task>.png per (setting/method,
task), plus heatmaps_<task>.png with every run side by side. Overrides:

    --config.lengths='(1024,2048,4096,8192)'   native lengths (prompt + generation, tokens)
    --config.depths='(0.0,0.25,0.5,0.75,1.0)'  needle depths in [0, 1] below long_from tokens
    --config.long_depths='(0.0,0.5,1.0)'       needle depths from long_from tokens on
    --config.long_from=8192
    --config.num_samples=5                     samples per (task, length, depth)
    --config.extended_lengths='(16384,32768)'  lengths past 8k, run with each extension
    --config.extensions='("yarn","self_extend")'
    --config.extended_tasks='("passkey","niah")'
    --config.methods='("full","streaming_llm","snapkv","pyramidkv")'
    --config.extension_methods='("full",)'     methods for the extended lengths (Self-Extend
                                               runs 'full' only)
    --config.compression_ratio=0.5             kvpress's ratio: the fraction of prompt KV removed
    --config.tasks='("passkey","niah")'
    --config.niah_max_new_tokens=32            RULER's budget is 128; the answer needs ~10
    --config.self_extend_window=2048 --config.self_extend_group_size=4
    --config.batch_size=4 --config.batch_tokens=4096   rows per batch: at most batch_size and
                                               batch_tokens // padded prompt length (at least 1)
    --config.model=tiny                        a small random model + byte tokenizer (smoke
                                               tests; scores are meaningless)
    --config.model=/path/to/checkpoint         any model lcm.io.load_pretrained reads: a
                                               Hugging Face directory (Llama, Qwen2/3, Mistral,
                                               Ministral, Gemma 2/3, Phi-3) with its
                                               tokenizer.json, or a .gguf file

Full size (hours on a CPU, minutes on an accelerator):
    --config.depths='(0.0,0.25,0.5,0.75,1.0)' --config.long_depths='(0.0,0.25,0.5,0.75,1.0)' \\
    --config.extended_tasks='("passkey","niah")' --config.num_samples=3
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "longctx_sweep"
    config.model = "smollm2"
    config.seed = 0
    config.tasks = ("passkey", "niah")
    config.lengths = (1024, 2048, 4096, 8192)
    config.depths = (0.0, 0.5, 1.0)
    config.long_depths = (0.5,)
    config.long_from = 8192
    config.num_samples = 1
    config.methods = ("full", "streaming_llm", "snapkv", "pyramidkv")
    config.compression_ratio = 0.5
    config.extended_lengths = (16384,)
    config.extensions = ("yarn", "self_extend")
    config.extension_methods = ("full", "streaming_llm", "snapkv", "pyramidkv")
    config.self_extend_window = 2048
    config.self_extend_group_size = 4
    config.passkey_max_new_tokens = 16
    config.niah_max_new_tokens = 32
    config.extended_tasks = ("niah",)
    config.batch_size = 4
    config.batch_tokens = 4096
    config.progress = True
    return config
