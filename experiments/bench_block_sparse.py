"""Benchmarks block-sparse attention: does the time of lcm's `xla` backend track mask density?

Table 1, at each of lengths (batch 1, 8 heads, head_dim 64, float32, blocks 512x512), times
`attend(impl="xla")` under masks spanning 100% -> ~2% of Causal's block pairs: Causal (the
baseline), Local(w), SinkWindow(64, w), VerticalSlash with fixed-seed random columns and diagonals
(jax arrays: its layout is built inside jit) and random BlockMask grids (NumPy bool, block_size
512, & Causal()) keeping a chosen fraction of the causal block pairs. Per mask: the layout density
(`mask_layout(...).density`, of the full grid and of Causal's), the xla time and its ratio to
Causal's, and the dense masked reference (`impl="reference"`), which needs T*S*H float32 scores:
at these lengths it is only compiled and shown as OOM from XLA's memory estimate, so it is also
timed at small_length with the same mask recipes, next to xla there (outputs must agree).

Table 2, at layout_length, prices layouts built at run time: `mask_layout` of data-dependent
masks (Document with random segment ids, VerticalSlash, a jax-array BlockMask; and the masks of
lcm.attention.sparse's estimators, estimation included), jitted alone, against the
`attend(impl="xla")` they drive (layout included).

Targets: at ~10% of Causal's density, <= 0.2x Causal's time; a layout <= 10% of the attention.
Cells: median of repeats runs after a warm-up run; a cell whose compiled memory (arguments +
outputs + temporaries) exceeds mem_limit_gib is OOM, not run.

Options are the fields of configs/bench_block_sparse.py:

    python -m experiments.run --config=configs/bench_block_sparse.py --workdir=/tmp/bench_bs \
        --config.lengths=16384,32768 --config.small_length=4096 --config.layout_length=16384
    python -m experiments.bench_block_sparse --config.lengths=2048   # workdir /tmp/lcm/...
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import sys
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments.workdir import write_summary
from lcm.attention import (PARTIAL, BlockMask, Causal, Document, Local, SinkWindow, VerticalSlash,
                           attend, mask_layout)
from lcm.attention.sparse import estimate_block_topk, estimate_vertical_slash

NUM_HEADS, HEAD_DIM, BLOCK = 8, 64, 512


@dataclasses.dataclass(frozen=True)
class Budget:
    """How each cell is timed: `repeats` runs after a warm-up; over `mem_limit_gib` is OOM."""

    repeats: int = 3
    mem_limit_gib: float = 16.0


@dataclasses.dataclass
class Cell:
    """One measurement; `note` replaces the time when the cell did not run."""

    median_s: float | None = None
    min_s: float | None = None
    note: str = ""
    out: object = None  # the last output, for agreement checks

    def __str__(self):
        return self.note if self.median_s is None else f"{self.median_s:.3g} s"


def measure(fn, args, budget: Budget, *, keep_output: bool = False) -> Cell:
    """Compiles jit(fn) ahead of time, checks its memory estimate, then times it."""
    compiled = jax.jit(fn).lower(*args).compile()
    stats = compiled.memory_analysis()
    gib = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
           + stats.output_size_in_bytes) / 2**30
    if gib > budget.mem_limit_gib:
        return Cell(note=f"OOM (needs {gib:.1f} GiB)")
    try:
        out = jax.block_until_ready(compiled(*args))  # warm-up: page faults, thread pools
        times = []
        for _ in range(budget.repeats):
            start = time.perf_counter()
            out = jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
    except Exception as e:  # XlaRuntimeError has no stable import path
        if not isinstance(e, MemoryError) and "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return Cell(note="OOM")
    return Cell(statistics.median(times), min(times), out=out if keep_output else None)


def random_qkv(length):
    """q, k, v [1, length, 8, 64] float32."""
    keys = jax.random.split(jax.random.key(length), 3)
    shape = (1, length, NUM_HEADS, HEAD_DIM)
    return tuple(jax.random.normal(key, shape, jnp.float32) for key in keys)


def random_block_mask(length, fraction, seed, as_jax=False):
    """BlockMask(grid, 512) & Causal() whose grid keeps `fraction` of the causal block pairs,
    drawn without replacement (so the density is exact); NumPy grid (static) or jax (runtime)."""
    nb = -(-length // BLOCK)
    rows, cols = np.tril_indices(nb)
    keep = np.random.default_rng(seed).choice(rows.size, max(1, round(fraction * rows.size)),
                                              replace=False)
    grid = np.zeros((nb, nb), bool)
    grid[rows[keep], cols[keep]] = True
    return BlockMask(jnp.asarray(grid) if as_jax else grid, BLOCK) & Causal()


def random_vertical_slash(length, n, seed, span=None):
    """VerticalSlash shared by all heads: n distinct key columns and n distinct diagonal offsets,
    drawn uniformly from [0, span) (default: the whole length)."""
    rng = np.random.default_rng(seed)
    span = min(span or length, length)
    cols, diags = (np.sort(rng.choice(span, min(n, span), replace=False)) for _ in range(2))
    return VerticalSlash(jnp.asarray(cols[None], jnp.int32), jnp.asarray(diags[None], jnp.int32))


def random_document(length, num_docs, seed):
    """Document(ids) & Causal(): num_docs packed segments with random boundaries."""
    rng = np.random.default_rng(seed)
    bounds = np.sort(rng.choice(np.arange(1, length), num_docs - 1, replace=False))
    ids = np.searchsorted(bounds, np.arange(length), side="right")
    return Document(jnp.asarray(ids[None], jnp.int32)) & Causal()


def masks_at(length):
    """(name, mask) pairs for table 1, densest first."""
    out = [("Causal", Causal())]
    out += [(f"Local({w})", Local(w)) for w in (8192, 4096, 2048, 1024, 512, 256)]
    out += [(f"SinkWindow(64, {w})", SinkWindow(64, w)) for w in (4096, 1024, 256)]
    out += [(f"VerticalSlash {n}+{n} random", random_vertical_slash(length, n, seed=n))
            for n in (1000, 200, 50)]
    out += [("VerticalSlash 50+50 in [0, 2048)", random_vertical_slash(length, 50, 1, span=2048))]
    out += [(f"BlockMask {f:.0%} of causal & Causal", random_block_mask(length, f, seed=i))
            for i, f in enumerate((0.5, 0.2, 0.1, 0.05, 0.02))]
    return out


def attention(impl):
    """f(q, k, v, mask) -> out, with lcm's blocks."""
    return lambda q, k, v, mask: attend(q, k, v, mask, impl=impl, block_q=BLOCK, block_k=BLOCK)


def measure_attention(impl, qkv, mask, budget, **kw):
    """A jax-array mask is a jit argument, so its layout is built at run time (a closed-over
    one could be folded at compile time); a static mask is closed over, since a NumPy BlockMask
    grid passed through jit would become a tracer."""
    if mask.is_static:
        return measure(lambda q, k, v: attention(impl)(q, k, v, mask), qkv, budget, **kw)
    return measure(attention(impl), (*qkv, mask), budget, **kw)


def _load():
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def density(mask, length, partial=False):
    """Fraction of the full block grid that the xla backend computes (heads share one layout);
    with `partial`, also the fraction of those blocks that need element-mask work."""
    layout = mask_layout(mask, length, length, BLOCK, BLOCK).shared()
    dens = float(layout.density)
    return (dens, float((layout.kinds == PARTIAL).sum() / layout.num_visits)) if partial else dens


def run_masks(length, budget, check=False):
    """name -> (density, PARTIAL share, xla Cell, reference Cell) for masks_at(length)."""
    qkv, rows = random_qkv(length), {}
    for name, mask in masks_at(length):
        xla = measure_attention("xla", qkv, mask, budget, keep_output=check)
        ref = measure_attention("reference", qkv, mask, budget, keep_output=check)
        rows[name] = (*density(mask, length, partial=True), xla, ref)
        logging.info("%d %s: density %.4f, xla %s, reference %s", length, name, rows[name][0],
                     xla, ref)
        if check and xla.out is not None and ref.out is not None:
            err = float(jnp.max(jnp.abs(xla.out - ref.out)))
            if not err <= 2e-5:
                sys.exit(f"FAIL: xla differs from reference on {name} at length {length}: "
                         f"max |diff| {err:.3e} > 2e-5")
            xla.out = ref.out = None
    return rows


def sparsity_table(length, rows, small, small_length):
    causal_density, causal = rows["Causal"][0], rows["Causal"][2].median_s
    lines = [f"#### Block-sparse attention, length {length}: batch 1, {NUM_HEADS} heads, "
             f"head_dim {HEAD_DIM}, float32, blocks {BLOCK}x{BLOCK}; load avg {_load()}", "",
             f"| mask | density (grid) | density ÷ Causal | PARTIAL | lcm xla | xla ÷ Causal xla "
             f"| reference @ {length} | reference @ {small_length or '-'} (xla there) |",
             "|---|--:|--:|--:|--:|--:|---|---|"]
    for name, (dens, part, xla, ref) in rows.items():
        ratio = f"{xla.median_s / causal:.3f}" if xla.median_s and causal else "-"
        at_small = f"{small[name][3]} ({small[name][2]})" if name in small else "-"
        spread = f" (min {xla.min_s:.3g})" if xla.min_s else ""
        lines.append(f"| {name} | {dens:.1%} | {dens / causal_density:.1%} | {part:.0%} | {xla}"
                     f"{spread} | {ratio} | "
                     f"{ref} | {at_small} |")
    return "\n".join(lines)


def layout_table(length, budget):
    """Table 2: a runtime layout, jitted alone, against the attention it drives."""
    q, k, v = random_qkv(length)
    layout = lambda mask: mask_layout(mask, length, length, BLOCK, BLOCK)
    vs_estimate = lambda q, k: estimate_vertical_slash(q, k, num_vertical=1000, num_slash=1000)
    topk_estimate = lambda q, k: estimate_block_topk(q, k, block_size=BLOCK, k_blocks=4) & Causal()
    masks = {"Document & Causal, 16 random segments": random_document(length, 16, seed=0),
             "VerticalSlash 1000+1000 random": random_vertical_slash(length, 1000, seed=1000),
             "VerticalSlash 50+50 in [0, 2048)": random_vertical_slash(length, 50, 1, span=2048),
             "BlockMask (jax grid) 10% of causal & Causal":
                 random_block_mask(length, 0.1, seed=2, as_jax=True)}
    lines = [f"#### Runtime layouts, length {length}: `mask_layout` jitted alone vs "
             f"`attend(impl=\"xla\")` (layout included); load average {_load()}", "",
             "| mask | density ÷ Causal | build layout | attention | build ÷ attention |",
             "|---|--:|--:|--:|--:|"]
    causal_density = density(Causal(), length)
    rows = [(name, density(m, length), measure(layout, (m,), budget),
             measure(attention("xla"), (q, k, v, m), budget)) for name, m in masks.items()]
    for name, estimate in (("estimate_vertical_slash 1000+1000 (+ estimation)", vs_estimate),
                           ("estimate_block_topk k_blocks=4 & Causal (+ estimation)",
                            topk_estimate)):
        rows.append((name, density(estimate(q, k), length),
                     measure(lambda q, k: layout(estimate(q, k)), (q, k), budget),
                     measure(lambda q, k, v: attention("xla")(q, k, v, estimate(q, k)),
                             (q, k, v), budget)))
    for name, dens, build, attn in rows:
        logging.info("layout %s: build %s, attention %s", name, build, attn)
        ratio = f"{build.median_s / attn.median_s:.2%}" if build.median_s and attn.median_s else "-"
        lines.append(f"| {name} | {dens / causal_density:.1%} | {build} | {attn} | {ratio} |")
    return "\n".join(lines)


def run(config, workdir: str) -> dict:
    """Prints and writes (results.md, summary.json) the tables for `config`'s fields: lengths,
    repeats, mem_limit_gib, small_length, layout_length."""
    lengths = [int(x) for x in config.lengths]  # () runs only the other tables
    small_length, layout_length = config.small_length, config.layout_length
    budget = Budget(repeats=config.repeats, mem_limit_gib=config.mem_limit_gib)
    if min(lengths, default=1) <= 0 or min(small_length, layout_length) < 0:
        raise ValueError(f"config.lengths={lengths}, small_length={small_length}, layout_length="
                         f"{layout_length}; expected positive lengths (0: skip)")
    header = (f"machine: {os.cpu_count()} CPUs, {jax.default_backend()}, jax {jax.__version__}, "
              f"{datetime.date.today().isoformat()}")
    print(header, flush=True)
    report = [header]
    small = run_masks(small_length, budget, check=True) if small_length else {}
    if small:
        print(f"check: xla matches the reference (max |diff| <= 2e-5) for every mask at length "
              f"{small_length}", flush=True)
    summary = {"machine": header, "lengths": {}}
    for length in lengths:
        rows = run_masks(length, budget)
        summary["lengths"][length] = {name: {"density": d, "partial": p, "xla_s": x.median_s,
                                             "reference_s": r.median_s, "note": x.note or r.note}
                                      for name, (d, p, x, r) in rows.items()}
        report.append(sparsity_table(length, rows, small, small_length))
        print("\n" + report[-1], flush=True)
    report.append(
        f"Median (min) of {budget.repeats} runs after a warm-up; ratios of medians. Density: "
        f"block pairs computed (`mask_layout(...).density`) of the full grid and of Causal's; "
        f"PARTIAL: the share of them that apply the element mask. Load avg counts this "
        f"process (~2). reference: dense masked `impl=\"reference\"`; OOM: XLA's compiled "
        f"memory estimate exceeds {budget.mem_limit_gib:g} GiB (not run). The last column runs "
        f"the same mask recipe at small_length: reference time (xla time there). "
        f"Target: at ~10% of Causal's density, xla <= 0.2x Causal xla.")
    print("\n" + report[-1], flush=True)
    if layout_length:
        report += [layout_table(layout_length, budget), "Target: build <= 10% of attention."]
        print("\n" + report[-2] + "\n\n" + report[-1], flush=True)
    return write_summary(workdir, summary, markdown="\n\n".join(report))


if __name__ == "__main__":
    from experiments.run import entry_point

    entry_point(default_experiment="bench_block_sparse")
