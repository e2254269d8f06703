"""Passkey and NIAH accuracy over context length x depth, per context setting and cache method.

Settings: `native` (the model as loaded, lengths <= its max_position_embeddings) and, for
`config.extended_lengths`, `yarn` (RoPE YaRN with factor = longest extended length / native
length, as transformers configures it) and `self_extend` (LongLM's grouped positions, exact in
lcm's two-pass attention). Methods: `full` (every prompt token cached) and the eviction policies
of `lcm.cache` at `config.compression_ratio` (kvpress's ratio: the fraction of prompt entries
removed at prefill): `streaming_llm` (sinks + recent window), `snapkv`, `pyramidkv`. Each
(setting, method) is one run of `lcm.eval.evaluate` in the shared workdir, so rerunning resumes
where a killed run stopped. Self-Extend runs without a KV cache (lcm's cache stores keys rotated
at RoPE positions): it uses `lcm.eval.greedy_generate`, full attention only.

Records come from `lcm.data.make_passkey` (Landmark/LongLoRA text, exact match of the first word)
and `make_niah` (RULER's needle and question over lcm's essay haystack, string_match_all), each
fitted to its length in the model's tokens, fed as plain continuation prompts (the base-model
format those benchmarks use; the instruct chat template makes SmolLM2 chat instead of answer).
"""

from __future__ import annotations

import dataclasses
import time

import jax
from absl import logging

from lcm.config import ModelConfig, PositionConfig, RopeConfig
from lcm.data import ByteTokenizer, make_niah, make_passkey
from lcm.eval import EvalOptions, evaluate, greedy_generate, max_context_length, write_reports
from lcm.eval.generation import default_generate_fn
from lcm.eval.results import markdown_table, read_results

TASKS = ("passkey", "niah")
METHODS = {"full": None, "streaming_llm": "StreamingLLM", "snapkv": "SnapKV",
           "pyramidkv": "PyramidKV"}
EXTENSIONS = ("yarn", "self_extend")
MODELS = ("smollm2", "tiny")


def load_model(name: str, seed: int):
    """(cfg, params, tokenizer): SmolLM2-135M-Instruct, or a small random model for smoke tests."""
    if name == "smollm2":
        from lcm.io import load_smollm2
        return load_smollm2()
    if name == "tiny":
        from lcm.config import AttentionConfig
        from lcm.model import init_params
        cfg = ModelConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                          max_position_embeddings=512,
                          attention=AttentionConfig(impl="xla", block_q=64, block_k=64))
        return cfg, init_params(cfg, jax.random.key(seed))[0], ByteTokenizer()
    raise ValueError(f"config.model={name!r}; expected one of {list(MODELS)}")


def extended_config(cfg: ModelConfig, extension: str, longest: int, config) -> ModelConfig:
    """The model configured to reach `longest` tokens with `extension`."""
    native = cfg.max_position_embeddings
    if extension == "yarn":
        factor = max(1.0, longest / native)
        rope = RopeConfig(rope_type="yarn", theta=cfg.rope.theta, factor=factor,
                          original_max_position_embeddings=native)
        out = dataclasses.replace(cfg, max_position_embeddings=int(native * factor), rope=rope)
    elif extension == "self_extend":
        if not 0 < config.self_extend_window < native:
            raise ValueError(f"config.self_extend_window={config.self_extend_window}; expected "
                             f"0 < window < the native length {native}")
        out = dataclasses.replace(cfg, positions=PositionConfig(
            type="self_extend", window=config.self_extend_window,
            group_size=config.self_extend_group_size))
    else:
        raise ValueError(f"config.extensions holds {extension!r}; expected some of "
                         f"{list(EXTENSIONS)}")
    reach = max_context_length(out)
    if reach is not None and reach < longest:
        raise ValueError(f"{extension} reaches {reach} tokens < extended length {longest}; raise "
                         f"config.self_extend_group_size or lower config.self_extend_window")
    return out


def make_policy(method: str, ratio: float):
    if method not in METHODS:
        raise ValueError(f"config.methods holds {method!r}; expected some of {list(METHODS)}")
    if METHODS[method] is None:
        return None
    import lcm.cache
    cls = getattr(lcm.cache, METHODS[method], None)
    if cls is None:
        raise ValueError(f"method {method!r} needs lcm.cache.{METHODS[method]}, which this "
                         f"version of lcm.cache does not have")
    return cls(compression_ratio=ratio)


def make_records(config, tokenizer, lengths):
    records = []
    for task in config.tasks:
        if task not in TASKS:
            raise ValueError(f"config.tasks holds {task!r}; expected some of {list(TASKS)}")
        make, budget = ((make_passkey, config.passkey_max_new_tokens) if task == "passkey"
                        else (make_niah, config.niah_max_new_tokens))
        index = 0  # distinct per cell, so each cell has its own key / needle value
        for length in lengths:
            for depth in config.depths:
                for _ in range(config.num_samples):
                    records.append(make(index, seed=config.seed, length=length,
                                        tokenizer=tokenizer, depth=float(depth),
                                        max_new_tokens=budget))
                    index += 1
    return records


def plan_runs(config, cfg: ModelConfig):
    """[(run name, model cfg, method, lengths)] in the order they run."""
    native = cfg.max_position_embeddings
    lengths = tuple(int(n) for n in config.lengths)
    if any(n > native for n in lengths):
        raise ValueError(f"config.lengths={lengths} go past the native {native}; put those in "
                         f"config.extended_lengths")
    runs = [(f"native-{m}", cfg, m, lengths) for m in config.methods]
    extended = tuple(int(n) for n in config.extended_lengths)
    if extended:
        for extension in config.extensions:
            ext_cfg = extended_config(cfg, extension, max(extended), config)
            for method in config.extension_methods:
                if extension == "self_extend" and method != "full":
                    raise ValueError(f"config.extension_methods holds {method!r}: Self-Extend "
                                     f"runs without a KV cache, so only 'full'")
                runs.append((f"{extension}-{method}", ext_cfg, method, extended))
    for _, _, method, _ in runs:
        make_policy(method, config.compression_ratio)  # fail before any work
    return runs


def run(config, workdir: str) -> dict:
    """Runs every (setting, method) over the records; returns and writes the summary."""
    start = time.perf_counter()
    cfg, params, tokenizer = load_model(config.model, config.seed)
    load_s = time.perf_counter() - start
    runs = plan_runs(config, cfg)
    records_by_lengths, timings = {}, {}
    for name, run_cfg, method, lengths in runs:
        if lengths not in records_by_lengths:
            records_by_lengths[lengths] = make_records(config, tokenizer, lengths)
        generate_fn = (greedy_generate if run_cfg.positions.type != "rope"
                       else default_generate_fn())
        logging.info("run %s: %d records, lengths %s", name, len(records_by_lengths[lengths]),
                     lengths)
        options = EvalOptions(run=name, batch_size=config.batch_size, pad_multiple=256,
                              progress=config.progress, heatmaps=False)
        summary = evaluate(params, run_cfg, records_by_lengths[lengths], tokenizer, workdir,
                           options=options, policy=make_policy(method, config.compression_ratio),
                           generate_fn=generate_fn)
        timings[name] = summary["timing"]
    total_s = time.perf_counter() - start
    summary = write_reports(workdir, read_results(f"{workdir}/results.jsonl"), extra={
        "sweep": {"model": config.model, "compression_ratio": config.compression_ratio,
                  "model_load_s": round(load_s, 2), "total_s": round(total_s, 2),
                  "runs": timings, "devices": str(jax.devices()[0].device_kind)}})
    logging.info("results (%s):\n%s", workdir, markdown_table(summary))
    return summary
