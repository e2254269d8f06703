"""Passkey and NIAH accuracy over context length x depth, per context setting and cache method.

Settings: `native` (the model as loaded, lengths <= its max_position_embeddings) and, for
`config.extended_lengths`, `yarn` (RoPE YaRN with factor = longest extended length / native
length, as transformers configures it) and `self_extend` (LongLM's grouped positions, exact in
lcm's two-pass attention). Methods: `full` (every prompt token cached) and the eviction policies
of `lcm.cache` at `config.compression_ratio` (kvpress's ratio: the fraction of prompt entries
removed at prefill): `streaming_llm` (sinks + recent window), `snapkv`, `pyramidkv`. Each
(setting, method) is one run (`<setting>-<method>`) in the shared workdir; the methods of a
setting are evaluated together by `lcm.eval.evaluate(..., policies=...)`, which prefills each
batch once and compresses that cache per method, and rerunning resumes per (run, sample) where a
killed run stopped. Self-Extend keeps every token (`lcm.cache.extended`), so its only method is
`full`.

Needle depths: `config.depths` with `config.num_samples` samples each below `config.long_from`
tokens, `config.long_depths` with `config.long_samples` each from there on (the extended lengths
included), so the long, costly lengths can have fewer samples. `config.preset` picks the grid:
the top-level fields ("cpu"), or those with `config.accelerator`'s fields over them
("accelerator"); "auto" takes "accelerator" when `jax.default_backend()` is not "cpu".

Reports: besides `lcm.eval.write_reports`' tables and heatmaps, `sweep.md` (`sweep_table`) gives
for every (task, length, method) the samples n (depths pooled), the accuracy and its 95% Wilson
score interval (`lcm.eval.metrics.wilson_interval`; passkey's and single-needle NIAH's sample
scores are 0 or 1), and `sweep_<task>.png` shows score and n by depth x length, one panel per
method, with the native lengths and then each extension's lengths as columns (`plot_sweep`).

Compilation: `config.compilation_cache` points JAX's persistent compilation cache at a directory
(thresholds at zero so that every CPU program is written), so a rerun loads the compiled
programs instead of compiling them. `summary.json`'s `sweep.compilation` counts the programs
compiled and those read from the cache in this run and their seconds (`compile_s`: XLA compile
or cache read), from `jax.monitoring` events.

Records come from `lcm.data.make_passkey` (Landmark/LongLoRA text, exact match of the first word)
and `make_niah` (RULER's needle and question over lcm's essay haystack, string_match_all), each
fitted to its length in the model's tokens, fed as plain continuation prompts (the base-model
format those benchmarks use; the instruct chat template makes SmolLM2 chat instead of answer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import jax
from absl import logging

from lcm.checks import check_int, check_number
from lcm.config import ModelConfig, PositionConfig, RopeConfig
from lcm.data import ByteTokenizer, make_niah, make_passkey
from lcm.eval import EvalOptions, evaluate, max_context_length, write_reports
from lcm.eval.metrics import wilson_interval
from lcm.eval.results import read_results

TASKS = ("passkey", "niah")
METHODS = {"full": None, "streaming_llm": "StreamingLLM", "snapkv": "SnapKV",
           "pyramidkv": "PyramidKV"}
EXTENSIONS = ("yarn", "self_extend")
MODELS = ("smollm2", "tiny")
PRESETS = ("auto", "cpu", "accelerator")


def load_model(name: str, seed: int):
    """(cfg, params, tokenizer): "tiny" (a small random model for smoke tests), or what
    `lcm.io.load_pretrained` reads: "smollm2" (SmolLM2-135M-Instruct, embedded), a Hugging Face
    checkpoint directory with its tokenizer.json, or a .gguf file."""
    if name != "tiny":
        from lcm.io import load_pretrained
        if name not in MODELS and not os.path.exists(name):
            raise ValueError(f"config.model={name!r}; expected one of {list(MODELS)} or the "
                             f"path of a checkpoint directory or .gguf file")
        cfg, params, tokenizer = load_pretrained(name)
        if tokenizer is None:
            raise ValueError(f"config.model={name!r} has no tokenizer.json; the sweep's tasks "
                             f"are text")
        return cfg, params, tokenizer
    from lcm.config import AttentionConfig
    from lcm.model import init_params
    cfg = ModelConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                      max_position_embeddings=512,
                      attention=AttentionConfig(impl="xla", block_q=64, block_k=64))
    return cfg, init_params(cfg, jax.random.key(seed))[0], ByteTokenizer()


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


def make_records(config, tokenizer, lengths, tasks, field="tasks"):
    records = []
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"config.{field} holds {task!r}; expected some of {list(TASKS)}")
        make, budget = ((make_passkey, config.passkey_max_new_tokens) if task == "passkey"
                        else (make_niah, config.niah_max_new_tokens))
        index = 0  # distinct per cell, so each cell has its own key / needle value
        for length in lengths:
            for depth in depths_at(config, length):
                for _ in range(samples_at(config, length)):
                    records.append(make(index, seed=config.seed, length=length,
                                        tokenizer=tokenizer, depth=float(depth),
                                        max_new_tokens=budget))
                    index += 1
    return records


def depths_at(config, length: int) -> tuple[float, ...]:
    """The needle depths of the cells at `length`."""
    return tuple(config.long_depths if length >= config.long_from else config.depths)


def samples_at(config, length: int) -> int:
    """Samples per (task, depth) at `length`."""
    return int(config.long_samples if length >= config.long_from else config.num_samples)


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
            # Self-Extend keeps every token (no eviction policy applies): full only.
            methods = [m for m in config.extension_methods
                       if extension != "self_extend" or m == "full"]
            runs += [(f"{extension}-{m}", ext_cfg, m, extended) for m in methods]
    for _, _, method, _ in runs:
        make_policy(method, config.compression_ratio)  # fail before any work
    return runs


def resolve_preset(config):
    """(preset name, config with the preset's fields applied): "cpu" is the top-level fields,
    "accelerator" puts `config.accelerator`'s fields over them, "auto" is "accelerator" when
    `jax.default_backend()` is not "cpu"."""
    preset = config.get("preset", "cpu")
    if preset not in PRESETS:
        raise ValueError(f"config.preset={preset!r}; expected one of {list(PRESETS)}")
    if preset == "auto":
        preset = "cpu" if jax.default_backend() == "cpu" else "accelerator"
    config = config.copy_and_resolve_references()
    if preset == "accelerator":
        overrides = config.get("accelerator") or {}
        for key, value in overrides.items():
            if key not in config or key == "accelerator":
                valid = sorted(k for k in config if k != "accelerator")
                raise ValueError(f"config.accelerator.{key} is not a field of the sweep; "
                                 f"expected some of {valid}")
            config[key] = value
    return preset, config


def compilation_cache_dir(config, workdir: str) -> str | None:
    """The persistent compilation cache directory `config.compilation_cache` names (None for
    "off"): "user" is $XDG_CACHE_HOME (else ~/.cache) / lcm / jax_compilation_cache,
    "workdir" is <workdir>/jax_compilation_cache, anything else a directory path."""
    choice = config.get("compilation_cache", "off")
    if not isinstance(choice, str) or not choice:
        raise ValueError(f"config.compilation_cache={choice!r}; expected \"user\", "
                         f"\"workdir\", \"off\" or a directory path")
    if choice == "off":
        return None
    if choice == "user":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".cache")
        return os.path.join(base, "lcm", "jax_compilation_cache")
    if choice == "workdir":
        return os.path.join(workdir, "jax_compilation_cache")
    return os.path.expanduser(choice)


class CompileCounter:
    """Counts XLA compilations and persistent-cache hits from `jax.monitoring` events, from one
    listener pair registered for the process; `snapshot()` gives the running totals."""

    _instance = None

    def __init__(self):
        self.totals = {"programs": 0, "cache_hits": 0, "compile_s": 0.0}
        jax.monitoring.register_event_listener(self._event)
        jax.monitoring.register_event_duration_secs_listener(self._duration)

    @classmethod
    def get(cls) -> "CompileCounter":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _event(self, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.totals["cache_hits"] += 1

    def _duration(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":  # compiled or read from cache
            self.totals["programs"] += 1
            self.totals["compile_s"] += duration

    def snapshot(self) -> dict:
        return dict(self.totals)

    @staticmethod
    def since(before: dict, after: dict) -> dict:
        """Programs compiled (not read from the cache), cache hits and compile seconds between
        two snapshots."""
        hits = after["cache_hits"] - before["cache_hits"]
        return {"compiled": after["programs"] - before["programs"] - hits, "cache_hits": hits,
                "compile_s": round(after["compile_s"] - before["compile_s"], 2)}


@contextlib.contextmanager
def persistent_compilation_cache(path: str | None):
    """Within the block, JAX writes every compiled program to `path` and reads it back from there
    (thresholds at zero: the CPU's programs compile in under JAX's default 1 s); the previous
    settings are restored afterwards. None: JAX's own settings, untouched."""
    if path is None:
        yield
        return
    from jax.experimental.compilation_cache import compilation_cache as cc

    os.makedirs(path, exist_ok=True)
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    cc.reset_cache()  # the cache opens once per process: reopen it at `path`
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        cc.reset_cache()


def check_config(config) -> None:
    """The sweep's sizes and lists, checked before the model loads: a sweep with no sample
    (num_samples=0, no task, no length) is an error, not empty tables."""
    for name, minimum in (("num_samples", 1), ("long_samples", 1), ("batch_size", 1), ("seed", 0),
                          ("passkey_max_new_tokens", 1), ("niah_max_new_tokens", 1),
                          ("long_from", 1)):
        check_int("config", name, config[name], minimum)
    if config.batch_tokens is not None:
        check_int("config", "batch_tokens", config.batch_tokens, 1)
    check_number("config", "compression_ratio", config.compression_ratio, 0, 1, hi_open=True)
    if not isinstance(config.compress_question, bool):
        raise ValueError(f"config.compress_question={config.compress_question!r}; expected "
                         f"True or False")
    for name in ("tasks", "lengths", "methods"):
        if not config[name]:
            raise ValueError(f"config.{name}={config[name]!r}; expected at least one (the sweep "
                             f"would have no sample)")
    for name in ("lengths", "extended_lengths"):
        for i, n in enumerate(config[name]):
            check_int(None, f"config.{name}[{i}]", n, 1)
    for name in ("depths", "long_depths"):
        if not config[name]:
            raise ValueError(f"config.{name}={config[name]!r}; expected at least one depth")
        for i, d in enumerate(config[name]):
            check_number(None, f"config.{name}[{i}]", d, 0, 1)


def run(config, workdir: str) -> dict:
    """Runs every (setting, method) over the records; returns and writes the summary."""
    preset, config = resolve_preset(config)
    check_config(config)
    cache_dir = compilation_cache_dir(config, workdir)
    counter = CompileCounter.get()
    with persistent_compilation_cache(cache_dir):
        before = counter.snapshot()
        summary = _run(config, workdir, preset)
        compilation = {"cache_dir": cache_dir, **counter.since(before, counter.snapshot())}
    summary["sweep"]["compilation"] = compilation
    _write_atomic(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=1) + "\n")
    logging.info("compilation: %s", compilation)
    return summary


def _run(config, workdir: str, preset: str) -> dict:
    start, cpu_start = time.perf_counter(), time.process_time()
    cfg, params, tokenizer = load_model(config.model, config.seed)
    load_s = time.perf_counter() - start
    runs = plan_runs(config, cfg)
    settings: dict[str, list] = {}  # runs of one setting share their prefills
    for name, run_cfg, method, lengths in runs:
        settings.setdefault(name.split("-")[0], []).append((name, run_cfg, method, lengths))
    records_by_setting, made = {}, {}  # built before any work: a bad task name fails first
    for setting, members in settings.items():
        key = ((config.tasks, "tasks") if setting == "native" else
               (config.extended_tasks, "extended_tasks"))
        if key not in made:
            made[key] = make_records(config, tokenizer, members[0][3], *key)
        records_by_setting[setting] = made[key]
    timings = {}
    for setting, members in settings.items():
        run_cfg, records = members[0][1], records_by_setting[setting]
        policies = {name: make_policy(method, config.compression_ratio)
                    for name, _, method, _ in members}
        logging.info("setting %s: %d records x %s", setting, len(records), list(policies))
        options = EvalOptions(run=setting, batch_size=config.batch_size,
                              batch_tokens=config.batch_tokens, pad_multiple=256,
                              progress=config.progress, heatmaps=False,
                              compress_question=bool(config.compress_question))
        summary = evaluate(params, run_cfg, records, tokenizer, workdir, options=options,
                           policies=policies)
        timings[setting] = summary["timing"]
    total_s = time.perf_counter() - start
    rows = read_results(f"{workdir}/results.jsonl")
    grid = {"tasks": list(config.tasks), "lengths": list(config.lengths),
            "depths": list(config.depths), "num_samples": config.num_samples,
            "long_from": config.long_from, "long_depths": list(config.long_depths),
            "long_samples": config.long_samples,
            "extended_lengths": list(config.extended_lengths),
            "extended_tasks": list(config.extended_tasks)}
    summary = write_reports(workdir, rows, extra={
        "sweep": {"model": config.model, "preset": preset, "grid": grid,
                  "compression_ratio": config.compression_ratio,
                  "compress_question": bool(config.compress_question),
                  "model_load_s": round(load_s, 2), "total_s": round(total_s, 2),
                  "total_cpu_s": round(time.process_time() - cpu_start, 2),
                  "settings": timings, "devices": str(jax.devices()[0].device_kind),
                  "backend": jax.default_backend()}})
    for task in sorted({r["task"] for r in rows}):
        plot_sweep(rows, task, os.path.join(workdir, f"sweep_{task}.png"))
        summary["files"][f"sweep/{task}"] = f"sweep_{task}.png"
    table = sweep_table(summary)
    _write_atomic(os.path.join(workdir, "sweep.md"), table)
    summary["files"]["sweep"] = "sweep.md"
    logging.info("results (%s):\n%s", workdir, table)
    return summary


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _length_label(setting: str, n: int) -> str:
    return (f"{n // 1024}k" if n % 1024 == 0 else str(n)) + SHORT.get(setting, f" {setting}")


def _interval_text(cell) -> str:
    if cell.get("ci_low") is None:
        return f"{cell['score']:.0f}"
    return f"{cell['score']:.0f} [{cell['ci_low']:.0f}-{cell['ci_high']:.0f}]"


def sweep_table(summary: dict) -> str:
    """Markdown: one row per (task, context length and setting), one column per method, each
    entry the accuracy (0-100) and its 95% Wilson interval over the n samples of that row
    (depths pooled); n per entry where the methods of a row differ in n."""
    cells = {}
    for c in summary["cells"]:
        setting, method = c["run"].split("-", 1) if "-" in c["run"] else ("native", c["run"])
        cells[(c["task"], setting, c["length"], method)] = c
    methods = [m for m in METHODS if any(k[3] == m for k in cells)]
    methods += sorted({k[3] for k in cells} - set(methods))
    tasks = sorted({k[0] for k in cells})
    if len(tasks) > 1:  # a row per (setting, length) with the tasks pooled, where all have it
        for setting, length in sorted({k[1:3] for k in cells}):
            for m in methods:
                parts = [cells.get((t, setting, length, m)) for t in tasks]
                if all(c is not None and c.get("successes") is not None for c in parts):
                    cells[("all tasks", setting, length, m)] = _pooled(parts)
    order = {s: i for i, s in enumerate(("native", *EXTENSIONS))}
    keys = sorted({k[:3] for k in cells},
                  key=lambda k: (k[0] == "all tasks", k[0] != "passkey", k[0],
                                 order.get(k[1], 9), k[2]))
    head = ["task", "length", "n", *[LABELS.get(m, m) for m in methods]]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * len(methods)]
    for task, setting, length in keys:
        row = [cells.get((task, setting, length, m)) for m in methods]
        sizes = {c["num_samples"] for c in row if c}
        same = len(sizes) == 1
        entries = ["" if c is None else _interval_text(c) + ("" if same else
                                                            f" (n={c['num_samples']})")
                   for c in row]
        lines.append("| " + " | ".join([task, _length_label(setting, length),
                                        str(sizes.pop()) if same else "-", *entries]) + " |")
    lines += ["", "Accuracy in percent with its 95% Wilson score interval [low-high] over the "
              "row's n samples (needle depths pooled; 'all tasks' rows pool the tasks too); a "
              "cell with fractional sample scores has no interval."]
    return "\n".join(lines) + "\n"


def _pooled(cells) -> dict:
    """One cell from several tasks' cells of one (setting, length, method): successes and
    samples summed, the accuracy and Wilson interval of the sum."""
    k = sum(int(c["successes"]) for c in cells)
    n = sum(int(c["num_samples"]) for c in cells)
    low, high = wilson_interval(k, n)
    return {"num_samples": n, "successes": k, "score": 100.0 * k / n,
            "ci_low": 100.0 * low, "ci_high": 100.0 * high}


LABELS = {"full": "full cache", "streaming_llm": "StreamingLLM", "snapkv": "SnapKV",
          "pyramidkv": "PyramidKV"}
SHORT = {"native": "", "yarn": " YaRN", "self_extend": " SE"}


def plot_sweep(rows, task: str, path: str) -> None:
    """Score and samples n by needle depth x context length, one panel per method; a panel's
    columns are the native lengths, then each extended length per extension (e.g. '16k YaRN',
    '16k SE')."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lcm.eval.results import cell_text, depth_grid

    runs = sorted({r["run"] for r in rows if r["task"] == task and r.get("depth") is not None})
    methods = [m for m in METHODS if any(run.split("-", 1)[1] == m for run in runs)]
    depths = sorted({round(r["depth"], 4) for r in rows if r["task"] == task
                     and r.get("depth") is not None})
    panels = []
    for method in methods:
        columns, counts, labels = [], [], []
        for setting in ("native", *EXTENSIONS):
            if f"{setting}-{method}" not in runs:
                continue
            ds, lengths, grid, sizes = depth_grid(rows, f"{setting}-{method}", task, counts=True)
            for j, n in enumerate(lengths):
                column = np.full(len(depths), np.nan)
                count = np.zeros(len(depths), dtype=int)
                for i, d in enumerate(ds):
                    column[depths.index(d)] = grid[i, j]
                    count[depths.index(d)] = sizes[i, j]
                columns.append(column)
                counts.append(count)
                labels.append(_length_label(setting, n))
        panels.append((method, np.stack(columns, 1), np.stack(counts, 1), labels))
    width = 1.6 + sum(0.75 * len(labels) + 0.8 for _, _, _, labels in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 1.6 + 0.55 * len(depths)),
                             squeeze=False, sharey=True, layout="constrained")
    for ax, (method, grid, count, labels) in zip(axes[0], panels):
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if grid[i, j] == grid[i, j]:  # not NaN (no sample at that depth)
                    ax.text(j, i, cell_text(grid[i, j], count[i, j]), ha="center",
                            va="center", fontsize=7)
        ax.set_title(LABELS.get(method, method), fontsize=10)
        ax.set_xlabel("context length (tokens)")
    axes[0][0].set_ylabel("needle depth")
    fig.suptitle(f"{task}: score (samples n) by needle depth x context length", fontsize=11)
    fig.colorbar(image, ax=list(axes[0]), label="score")
    fig.savefig(path + ".tmp", format="png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp", path)
