"""Benchmarks lcm attention against jax.nn and tokamax, side by side in one process.

For each mask x sequence length it times every implementation on the same inputs (batch 1,
8 heads, head_dim 64, float32) and reports the median wall time over --repeats runs, XLA's
compiled memory (arguments + outputs + temporaries, from `compiled.memory_analysis()`) and the
time relative to lcm's `xla` backend. With --backward it times `value_and_grad` w.r.t. q, k, v.

Implementations: `xla` and `reference` are lcm's `attend`; `jax_nn` is
`jax.nn.dot_product_attention`; `tokamax_xla` and `tokamax_xla_chunked` are
`tokamax.dot_product_attention` with that `implementation`. Masks: `causal` and `local<w>`
(lcm's Local(w): a query at p sees keys p-w+1..p, i.e. `local_window_size=(w - 1, 0)` in jax.nn
and tokamax). At startup all implementations are checked against lcm's reference at a short
length (with the window shrunk so that it bites); the script exits if any disagrees.

A cell whose compiled memory exceeds --mem_limit_gib is reported as OOM without running; one
whose time, extrapolated quadratically from the previous length, exceeds --max_seconds is skipped.

Options are the fields of configs/bench_attention.py:

    python -m experiments.run --config=configs/bench_attention.py --workdir=/tmp/bench_attention \
        --config.lengths=1024,4096 --config.masks=causal,local1024
    python -m experiments.run --config=configs/bench_attention.py --workdir=/tmp/bench_attn_bwd \
        --config.backward=True --config.lengths=1024,2048,4096,8192 --config.masks=causal
    python -m experiments.bench_attention --config.lengths=1024   # workdir /tmp/lcm/bench_attention
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tokamax

from experiments.workdir import write_summary
from lcm.attention import Causal, Local, attend

IMPLS = ("xla", "reference", "jax_nn", "tokamax_xla", "tokamax_xla_chunked")
_TITLES = {"xla": "lcm xla", "reference": "lcm reference", "jax_nn": "jax.nn",
           "tokamax_xla": "tokamax xla", "tokamax_xla_chunked": "tokamax xla_chunked"}
NUM_HEADS, HEAD_DIM = 8, 64
CHECK_LENGTH = 640  # not a multiple of 512: the check also covers partial blocks
_LONG_CALL_S = 10.0  # a first call this slow is kept as a sample: one-time costs are noise there



def parse_window(mask: str) -> int | None:
    """'causal' -> None; 'local<w>' -> w."""
    if mask == "causal":
        return None
    if mask.startswith("local") and mask[5:].isdigit() and int(mask[5:]) > 0:
        return int(mask[5:])
    raise ValueError(f"mask={mask!r}; expected 'causal' or 'local<window>', e.g. 'local1024'")


def attention_fns(window: int | None, block_q: int, block_k: int) -> dict:
    """Every implementation as f(q, k, v) -> out, all computing the same mask."""
    lcm_mask = Causal() if window is None else Local(window)
    # jax.nn and tokamax take (left, right) extents around the query: (w - 1, 0) is Local(w).
    kw = dict(is_causal=True) if window is None else dict(local_window_size=(window - 1, 0))
    return {
        "xla": lambda q, k, v: attend(q, k, v, lcm_mask, impl="xla", block_q=block_q,
                                      block_k=block_k),
        "reference": lambda q, k, v: attend(q, k, v, lcm_mask, impl="reference"),
        "jax_nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kw),
        "tokamax_xla": lambda q, k, v: tokamax.dot_product_attention(
            q, k, v, implementation="xla", **kw),
        "tokamax_xla_chunked": lambda q, k, v: tokamax.dot_product_attention(
            q, k, v, implementation="xla_chunked", **kw),
    }


def with_grads(fn):
    """f(q, k, v) -> out  becomes  g(q, k, v, d_out) -> (<out, d_out>, (dq, dk, dv))."""
    def loss(q, k, v, d_out):
        return jnp.sum(fn(q, k, v) * d_out)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def make_inputs(length: int, backward: bool):
    """q, k, v [1, length, 8, 64] float32 (and d_out for the backward pass)."""
    keys = jax.random.split(jax.random.key(length), 4)
    shape = (1, length, NUM_HEADS, HEAD_DIM)
    xs = [jax.random.normal(key, shape, jnp.float32) for key in keys]
    return tuple(xs if backward else xs[:3])


@dataclasses.dataclass
class Cell:
    """One measurement; `note` replaces the numbers when the cell did not run."""

    median_s: float | None = None
    min_s: float | None = None
    mib: float | None = None
    note: str = ""


def measure(fn, args, *, repeats: int, mem_limit_gib: float, estimate_s: float | None,
            max_seconds: float) -> Cell:
    """Compiles fn ahead of time, checks its memory and estimated time, then times it."""
    compiled = jax.jit(fn).lower(*args).compile()
    stats = compiled.memory_analysis()
    nbytes = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
              + stats.output_size_in_bytes)
    if nbytes > mem_limit_gib * 2**30:
        return Cell(mib=nbytes / 2**20, note=f"OOM (needs {nbytes / 2**30:.1f} GiB)")
    if estimate_s is not None and estimate_s > max_seconds:
        return Cell(mib=nbytes / 2**20, note=f"skipped (est. {estimate_s:.0f} s)")
    times = []
    try:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))  # warm-up: page faults, thread pools
        first = time.perf_counter() - start
        if first > _LONG_CALL_S:
            times.append(first)
        while len(times) < repeats:
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
    except MemoryError:
        return Cell(mib=nbytes / 2**20, note="OOM")
    except Exception as e:  # XlaRuntimeError has no stable import path
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return Cell(mib=nbytes / 2**20, note="OOM")
    return Cell(statistics.median(times), min(times), nbytes / 2**20)


def check_agreement(masks, impls, block_q, block_k, backward, tol=2e-5):
    """Exits unless every impl matches lcm's reference at CHECK_LENGTH, for every mask."""
    args = make_inputs(CHECK_LENGTH, backward)
    for mask in masks:
        window = parse_window(mask)
        # Shrink the window so it bites at this length; the conventions do not depend on w.
        window = None if window is None else min(window, CHECK_LENGTH // 4)
        # Blocks of at most 256 so that the check spans several, the last one partial.
        fns = attention_fns(window, min(block_q, 256), min(block_k, 256))
        wrap = with_grads if backward else (lambda f: f)
        want = jax.jit(wrap(fns["reference"]))(*args)
        for name in impls:
            got = jax.jit(wrap(fns[name]))(*args)
            # Error relative to each output's largest entry: gradients reach |x| ~ 10.
            err = max(float(np.max(np.abs(g - w)) / max(1.0, np.max(np.abs(w))))
                      for g, w in zip(map(np.asarray, jax.tree.leaves(got)),
                                      map(np.asarray, jax.tree.leaves(want))))
            logging.info("check %s window=%s %s: scaled max |diff| vs reference %.2e",
                         mask, window, name, err)
            if not err <= tol:
                sys.exit(f"FAIL: {name} differs from lcm reference on mask {mask} (window "
                         f"{window}) at length {CHECK_LENGTH}: scaled max |diff| {err:.3e} > "
                         f"{tol}")


def format_cell(cell: Cell, base: Cell | None, is_base: bool) -> str:
    if cell.median_s is None:
        return cell.note
    text = f"{cell.median_s:.3g} s, {cell.mib:,.0f} MiB"
    if not is_base and base is not None and base.median_s is not None:
        text += f", {cell.median_s / base.median_s:.2f}×"
    return text


def table(mask, lengths, impls, cells, title) -> str:
    """A markdown table: one row per length, one column per impl."""
    lines = [f"#### {title}", "",
             "| length | " + " | ".join(_TITLES[i] for i in impls) + " |",
             "|---:|" + "---|" * len(impls)]
    for length in lengths:
        base = cells.get((mask, length, "xla"))
        row = [format_cell(cells[(mask, length, i)], base, i == "xla") for i in impls]
        lines.append(f"| {length} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def run(config, workdir: str) -> dict:
    """Prints and writes (results.md, summary.json) the tables for `config`'s fields: lengths,
    masks, impls, backward, repeats, mem_limit_gib, max_seconds, block_q, block_k."""
    lengths = [int(x) for x in config.lengths]
    masks, impls = list(config.masks), list(config.impls)
    for mask in masks:
        parse_window(mask)  # raise on a bad name before any work
    for name in impls:
        if name not in IMPLS:
            raise ValueError(f"impl={name!r}; expected one of {list(IMPLS)}")
    block_q, block_k, backward = config.block_q, config.block_k, config.backward
    repeats, mem_limit, max_seconds = config.repeats, config.mem_limit_gib, config.max_seconds

    header = (f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), {jax.default_backend()}, "
              f"jax {jax.__version__}, "
              f"tokamax {tokamax.__version__}, {datetime.date.today().isoformat()}")
    print(header, flush=True)
    report = [header]
    check_agreement(masks, impls, block_q, block_k, backward)
    print(f"check: all impls match lcm reference at length {CHECK_LENGTH}", flush=True)

    cells, rows = {}, []
    direction = "forward + backward (value_and_grad w.r.t. q, k, v)" if backward else "forward"
    for mask in masks:
        fns = attention_fns(parse_window(mask), block_q, block_k)
        last = {}  # impl -> (length, seconds) of its last timed cell
        for length in lengths:
            args = make_inputs(length, backward)
            for name in impls:
                fn = with_grads(fns[name]) if backward else fns[name]
                prev = last.get(name)
                cell = measure(fn, args, repeats=repeats, mem_limit_gib=mem_limit,
                               estimate_s=prev and prev[1] * (length / prev[0]) ** 2,
                               max_seconds=max_seconds)
                if cell.median_s is not None:
                    last[name] = (length, cell.median_s)
                cells[(mask, length, name)] = cell
                rows.append(dict(mask=mask, length=length, impl=name, **dataclasses.asdict(cell)))
                logging.info("%s %d %s: median %s s, min %s s, %s MiB %s", mask, length, name,
                             *(x and f"{x:.4g}" for x in (cell.median_s, cell.min_s, cell.mib)),
                             cell.note)
            del args
        title = (f"{mask}, {direction}; batch 1, {NUM_HEADS} heads, head_dim {HEAD_DIM}, "
                 f"float32; lcm blocks {block_q}x{block_k}")
        report.append(table(mask, lengths, impls, cells, title))
        print("\n" + report[-1], flush=True)
    report.append(f"Cells: median of {repeats} runs, compiled memory (arguments + outputs + "
                  f"temporaries), time relative to lcm xla. OOM: over {mem_limit:g} GiB; "
                  f"skipped: time extrapolated from the previous length over {max_seconds:g} s.")
    print("\n" + report[-1], flush=True)
    return write_summary(workdir, {"machine": header, "cells": rows},
                         markdown="\n\n".join(report))


if __name__ == "__main__":
    from experiments.run import entry_point

    entry_point(default_experiment="bench_attention")
