"""The main job: passkey and needle-in-a-haystack accuracy of SmolLM2-135M-Instruct over context
length x needle depth, for the full KV cache and for cache eviction policies at one compression
ratio, and past the model's native 8k with YaRN and with Self-Extend (experiments/longctx_sweep).

    python -m experiments.run --config=configs/longctx_sweep.py --workdir=/tmp/longctx_sweep

Two presets, chosen by `--config.preset`:

- `cpu` (the top-level fields; for a 2-core CPU, timed with model load and compilation in
  docs/evaluation.md): passkey and NIAH at 1k, 2k and 4k with needle depths 0/33/67/100% and 2
  samples per depth (8 per (task, length, method), 16 per (length, method) with the tasks
  pooled: the table's "all tasks" rows, each with its 95% interval); full / StreamingLLM /
  SnapKV / PyramidKV at compression 0.5, kvpress's protocol. A prompt's prefill dominates the
  time (the sweep prefills about 225 tokens/s on 2 cores, so a 4k prompt costs about 18 s): per
  task cells of 15 at 1k-4k would take about twice the 10-minute budget, and the 8k and 16k
  cells belong to the accelerator preset (`--config.lengths='(1024,2048,4096,8192)'` adds 8k
  here, with `long_depths` x `long_samples` = 2 samples per task, about 2.5 more minutes).
  Both tasks decode 16 tokens, so the prompts of one length form one group, run in batches of
  8 at 1k, 8 at 2k and 4 at 4k (batch_size=8, batch_tokens=16384: no padding row).
- `accelerator`: the fields of `config.accelerator` replace the top-level ones: the full grid,
  5 depths (0/25/50/75/100%) x 3 samples per task at every length to 8k (15 per (task, length,
  method)), and 16k with YaRN x2 and with Self-Extend on both tasks.
- `auto` (the default): `accelerator` when `jax.default_backend()` is not "cpu", else `cpu`.
  The preset in effect and its grid are written to summary.json.

Override a field of the preset in effect: `--config.num_samples=5` (cpu) or
`--config.accelerator.num_samples=5` (accelerator). The per-cell table (`sweep.md`, also in the
log) gives for every (task, length, method), and for every (length, method) with the tasks
pooled, the samples n, the accuracy and its 95% Wilson interval; heatmaps give score and n by
depth x length. Each batch is prefilled once and its cache compressed per method. Rerunning the
same command resumes (finished samples are skipped); JAX's persistent compilation cache
(`config.compilation_cache`) makes a rerun, into the same or a new workdir, load its compiled
programs instead of compiling them. Outputs: results.jsonl, results.md, results.csv, sweep.md,
summary.json (per-setting wall and CPU seconds of prefill and of each method's decoding, compile
seconds and cache hits), heatmap_<run>_<task>.png,
heatmaps_<task>.png and sweep_<task>.png. Fields:

    preset="auto"                             "auto", "cpu" or "accelerator" (above)
    lengths=(1024,2048,4096)                  native lengths (prompt + generation, tokens)
    depths=(0.0,0.33,0.67,1.0)                needle depths in [0, 1] below long_from tokens
    num_samples=2                             samples per (task, length, depth) below long_from
    long_from=8192                            from this length on: long_depths, long_samples
    long_depths=(0.25,0.75)  long_samples=1
    extended_lengths=()                       lengths past 8k, run with each extension
    extensions=("yarn","self_extend")
    extended_tasks=("passkey","niah")
    methods=("full","streaming_llm","snapkv","pyramidkv")
    extension_methods=(...)                   methods for the extended lengths (Self-Extend
                                              runs 'full' only)
    compression_ratio=0.5                     kvpress's ratio: the fraction of prompt KV removed
    compress_question=False                   kvpress's protocol (context compressed, question
                                              appended); True compresses the prompt with the
                                              question in it
    tasks=("passkey","niah")
    passkey_max_new_tokens=16                 passkey is scored on its first word (<= 5 digits)
    niah_max_new_tokens=16                    RULER's budget is 128; the answer needs ~10
    self_extend_window=2048 self_extend_group_size=4
    batch_size=8 batch_tokens=16384           rows per batch: at most batch_size and
                                              batch_tokens // padded prompt length (at least 1)
    compilation_cache="user"                  JAX's persistent compilation cache: "user"
                                              ($XDG_CACHE_HOME or ~/.cache, then
                                              lcm/jax_compilation_cache), "workdir"
                                              (<workdir>/jax_compilation_cache), a directory,
                                              or "off"
    model="smollm2"                           or "tiny" (a small random model + byte tokenizer
                                              for smoke tests; scores are meaningless), or any
                                              model lcm.io.load_pretrained reads: a Hugging
                                              Face directory (Llama, Qwen2/3, Mistral,
                                              Ministral, Gemma 2/3, Phi-3) with its
                                              tokenizer.json, or a .gguf file
"""

import ml_collections

PRESETS = ("auto", "cpu", "accelerator")


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "longctx_sweep"
    config.preset = "auto"
    config.model = "smollm2"
    config.seed = 0
    config.tasks = ("passkey", "niah")
    config.lengths = (1024, 2048, 4096)
    config.depths = (0.0, 0.33, 0.67, 1.0)
    config.num_samples = 2
    config.long_from = 8192
    config.long_depths = (0.25, 0.75)
    config.long_samples = 1
    config.methods = ("full", "streaming_llm", "snapkv", "pyramidkv")
    config.compression_ratio = 0.5
    config.compress_question = False
    config.extended_lengths = ()
    config.extensions = ("yarn", "self_extend")
    config.extension_methods = ("full", "streaming_llm", "snapkv", "pyramidkv")
    config.extended_tasks = ("passkey", "niah")
    config.self_extend_window = 2048
    config.self_extend_group_size = 4
    config.passkey_max_new_tokens = 16
    config.niah_max_new_tokens = 16
    config.batch_size = 8
    config.batch_tokens = 16384
    config.compilation_cache = "user"
    config.progress = True

    # The full grid, for an accelerator: replaces the fields above when the preset is
    # "accelerator" (or "auto" on a non-CPU backend).
    config.accelerator = ml_collections.ConfigDict()
    acc = config.accelerator
    acc.lengths = (1024, 2048, 4096, 8192)
    acc.depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    acc.num_samples = 3
    acc.long_depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    acc.long_samples = 3
    acc.extended_lengths = (16384,)
    acc.extended_tasks = ("passkey", "niah")
    acc.batch_size = 16
    acc.batch_tokens = 65536
    return config
