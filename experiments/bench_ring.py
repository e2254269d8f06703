"""Context parallelism on the 8-device CPU mesh: lcm ring and all-gather vs one device and peers.

For each causal sequence length (batch 1, 8 heads = 8 KV heads, head_dim 64, float32; equal
heads because the `ringattention` package has no GQA) it runs, in one process on the same
inputs:

- `ring`: lcm.attention.ring_attention, zigzag load balancing, over the 8-device `context` axis,
  its inputs already in zigzag ring order (as a model permutes its tokens once, by
  `RingOrder.to_ring`; the output is compared after `from_ring`, outside the timing);
- `allgather`: the same with strategy="allgather";
- `xla`: lcm's single-device blockwise backend (attend(impl="xla")) on one device;
- `ringattention`: the PyPI package (0.1.2; JAX path, shimmed `jax.lib.xla_bridge`) under
  jax.shard_map, contiguous shards, chunks of `block` tokens;
- `tokamax_ring`: tokamax's splash ring attention kernel in Pallas interpret mode (NumPy causal
  mask), only up to `tokamax_max_length` (interpretation is slow).

Per cell: the median wall time over `repeats` runs after a warm-up, and the compiled memory per
device (arguments + outputs + temporaries from XLA's memory analysis of the partitioned program;
every simulated device shares this host's RAM). Ratios are to lcm's ring. With
`backward=True` every cell is the output and the gradients of sum(out * q) (forward + backward).

With `longest_budget_mib` set, the longest causal length that fits that budget per device is
searched for ring over the 8 devices and for xla on one device, by compiling only (memory
analysis, nothing runs): lengths are multiples of 2 * devices * block, doubled until one does
not fit, then bisected. The ratio of the two is the context-parallel reach.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.run \
        --config=configs/bench_ring.py --workdir=/tmp/bench_ring
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from experiments.workdir import write_summary
from lcm.attention import Causal, attend, make_ring_order, ring_attention
from lcm.sharding import make_mesh

IMPLS = ("ring", "allgather", "xla", "ringattention", "tokamax_ring")
HEADS, HEAD_DIM = 8, 64


def _ringattention():
    """The PyPI package, importable on current jax (it reads the removed jax.lib.xla_bridge)."""
    if not hasattr(jax.lib, "xla_bridge"):
        jax.lib.xla_bridge = types.SimpleNamespace(
            get_backend=lambda: types.SimpleNamespace(platform=jax.default_backend()))
    from ringattention import ringattention
    return ringattention


def make_fns(mesh, block: int, length: int, impls) -> dict:
    """Every implementation as a jitted f(q, k, v) on sequence-sharded (or device-0) inputs."""
    axis = "context"
    spec = PartitionSpec(None, axis, None, None)
    fns = {}
    order = ring_order(length, mesh, block)
    for impl in ("ring", "allgather"):
        if impl in impls:
            fns[impl] = jax.jit(functools.partial(
                ring_attention, mask=Causal(), mesh=mesh, load_balance=order, block_q=block,
                block_k=block, strategy=impl))
    if "xla" in impls:
        fns["xla"] = jax.jit(lambda q, k, v: attend(q, k, v, Causal(), impl="xla",
                                                    block_q=block, block_k=block))
    if "ringattention" in impls:
        ra = _ringattention()
        chunk = min(block, length // mesh.shape[axis])  # its chunks must tile a shard
        kwargs = dict(causal_block_size=1, query_chunk_size=chunk, key_chunk_size=chunk,
                      deterministic=True, dropout_rng=None, attn_pdrop=0.0, dtype=jnp.float32,
                      policy=jax.checkpoint_policies.nothing_saveable, precision=None,
                      prevent_cse=True)
        body = functools.partial(ra, attn_bias=None, segment_ids=None, cache_idx=None,
                                 axis_name=axis, float32_logits=True, blockwise_kwargs=kwargs)
        fns["ringattention"] = jax.jit(jax.shard_map(
            lambda q, k, v: body(q, k, v), mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
            check_vma=False))
    if "tokamax_ring" in impls:
        fns["tokamax_ring"] = _tokamax_ring(mesh, length)
    return fns


def with_gradients(fn):
    """The output and the gradients (q, k, v) of sum(out * q): a training step's attention."""
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * q), out

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(lambda q, k, v: grad(q, k, v)[::-1])


def ring_order(length, mesh, block):
    """lcm's inputs come in zigzag ring order, as a model permutes its tokens once."""
    return make_ring_order(length, mesh.shape["context"], "zigzag", block=block)


def _tokamax_ring(mesh, length):
    import dataclasses

    from tokamax._src.ops.experimental.tpu.splash_attention import (
        ring_attention_kernel, splash_attention_kernel as splash, splash_attention_mask as masks)

    P = mesh.shape["context"]
    mask = masks.make_causal_mask((length, length))
    config = dataclasses.replace(splash.SplashConfig.get_default(), use_base2_exp=False,
                                 fuse_reciprocal=True, interpret=True)
    kernel = ring_attention_kernel.make_ring_attention(
        mask, is_mqa=False, ring_axis="context", config=config, save_residuals=False,
        q_seq_shards=P, kv_seq_shards=P)
    spec = PartitionSpec(None, "context", None)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(kernel.manual_sharding_spec(),
                                                           spec, spec, spec),
                       out_specs=spec, check_vma=False)
    def run(kernel, q, k, v):
        return kernel(q * (HEAD_DIM ** -0.5), k, v, None)

    # tokamax takes [heads, length, head_dim] per batch element.
    return jax.jit(lambda q, k, v: run(kernel, *(x[0].transpose(1, 0, 2) for x in (q, k, v))
                                       ).transpose(1, 0, 2)[None])


def device_bytes(m) -> int:
    """Per-device bytes from a compiled program's memory analysis `m`: arguments + outputs +
    temporaries, less what the outputs alias."""
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def measure(fn, args, repeats: int, max_seconds: float):
    compiled = fn.lower(*args).compile()
    m = compiled.memory_analysis()
    mem = device_bytes(m)
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
        if times[-1] > max_seconds:
            break
    times = times[1:] or times
    return dict(seconds=statistics.median(times), mem_bytes=int(mem),
                temp_bytes=int(m.temp_size_in_bytes)), out


def inputs(length, mesh, sharded: bool):
    keys = jax.random.split(jax.random.key(length), 3)
    shape = (1, length, HEADS, HEAD_DIM)
    xs = [jax.random.normal(k, shape, jnp.float32) for k in keys]
    target = (NamedSharding(mesh, PartitionSpec(None, "context")) if sharded
              else jax.devices()[0])
    return [jax.device_put(x, target) for x in xs]


def compiled_bytes(mesh, impl: str, length: int, block: int, backward: bool) -> int:
    """Per-device memory of `impl` at `length` from XLA's memory analysis; compiles, never runs."""
    fn = make_fns(mesh, block, length, [impl])[impl]
    fn = with_gradients(fn) if backward else fn
    target = (NamedSharding(mesh, PartitionSpec(None, "context")) if impl in _SHARDED_INPUTS
              else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    arg = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.float32, sharding=target)
    return device_bytes(fn.lower(arg, arg, arg).compile().memory_analysis())


def longest(fits, step: int, max_multiple: int = 1 << 20):
    """The largest multiple of `step` with fits(n) true, for fits monotone (true, then false):
    doubles until one does not fit, then bisects. None if `step` itself does not fit."""
    if not fits(step):
        return None
    lo, hi = 1, 2
    while hi <= max_multiple and fits(hi * step):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step


def search_longest(mesh, config) -> dict:
    """Longest causal length within config.longest_budget_mib per device, ring vs one device."""
    budget = config.longest_budget_mib * 2**20
    step = 2 * config.num_devices * config.block
    result = {}
    for impl in ("ring", "xla"):
        probes = {}

        def fits(n, impl=impl, probes=probes):
            probes[n] = compiled_bytes(mesh, impl, n, config.block, config.backward)
            print(f"longest {impl:4s} L={n:8d} {probes[n] / 2**20:9.1f} MiB/device", flush=True)
            return probes[n] <= budget

        n = longest(fits, step)
        result[impl] = dict(length=n, mem_bytes=probes.get(n),
                            probes={str(k): v for k, v in sorted(probes.items())})
    ring, xla = result["ring"]["length"], result["xla"]["length"]
    result["ratio"] = ring / xla if ring and xla else None
    return result


_SHARDED_INPUTS = ("ring", "allgather", "ringattention", "tokamax_ring")


def run(config, workdir: str) -> dict:
    P = config.num_devices
    if jax.device_count() < P:
        sys.exit(f"bench_ring needs {P} devices, have {jax.device_count()}: run with "
                 f"XLA_FLAGS=--xla_force_host_platform_device_count={P}")
    # "--config.impls=ring,xla" arrives as one item: split it.
    impls_all = [n for item in config.impls for n in str(item).split(",") if n]
    unknown = set(impls_all) - set(IMPLS)
    if unknown:
        raise ValueError(f"config.impls has {sorted(unknown)}; expected some of {list(IMPLS)}")
    mesh = make_mesh((1, 1, 1, P), devices=jax.devices()[:P])
    cells, errors = {}, {}
    skipped = set()
    for length in config.lengths:
        impls = [i for i in impls_all if i not in skipped
                 and not (i == "tokamax_ring" and length > config.tokamax_max_length)]
        fns = make_fns(mesh, config.block, length, impls)
        if config.backward:
            fns = {name: with_gradients(fn) for name, fn in fns.items()}
        sharded = inputs(length, mesh, True)
        single = inputs(length, mesh, False)
        order = ring_order(length, mesh, config.block)
        spec = NamedSharding(mesh, PartitionSpec(None, "context"))
        in_ring_order = [jax.device_put(order.to_ring(x), spec) for x in sharded]
        ref = None
        for impl in impls:
            args = {"xla": single, "ring": in_ring_order, "allgather": in_ring_order}.get(
                impl, sharded)
            try:
                cell, out = measure(fns[impl], args, config.repeats, config.max_seconds)
            except Exception as e:  # out of memory or unsupported: recorded, not fatal
                cells[(impl, length)] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
                skipped.add(impl)
                continue
            if config.backward:
                out = out[0]  # compare outputs; the gradients are timed and sized with them
            out = np.asarray(order.from_ring(out) if impl in ("ring", "allgather") else out)
            ref = out if ref is None else ref
            errors[(impl, length)] = float(np.abs(out - ref).max())
            cell["max_abs_diff_vs_first"] = errors[(impl, length)]
            cells[(impl, length)] = cell
            print(f"L={length:7d} {impl:14s} {cell['seconds']:8.3f} s  "
                  f"{cell['mem_bytes'] / 2**20:9.1f} MiB/device  diff {errors[(impl, length)]:.1e}",
                  flush=True)
            if cell["seconds"] > config.max_seconds:
                skipped.add(impl)
            del out
    reach = search_longest(mesh, config) if config.longest_budget_mib else None
    markdown = _table(config, impls_all, cells, reach)
    print(markdown)
    summary = dict(cells={f"{i}@{n}": c for (i, n), c in cells.items()},
                   longest_causal_length=reach, devices=P,
                   longest_budget_mib=config.longest_budget_mib,
                   block=config.block, lengths=list(config.lengths), impls=impls_all,
                   backward=bool(config.backward))
    return write_summary(workdir, summary, markdown=markdown)


def _table(config, impls, cells, reach) -> str:
    head = "| length | " + " | ".join(impls) + " |"
    lines = [f"Causal{', forward + backward' if config.backward else ''}, batch 1, {HEADS} "
             f"heads, head_dim {HEAD_DIM}, float32, "
             f"{config.num_devices} CPU devices; time (s) / compiled memory per device (MiB) / "
             f"time relative to lcm ring", "", head,
             "|" + "---|" * (len(impls) + 1)]
    for n in config.lengths:
        base = cells.get(("ring", n), {}).get("seconds")
        row = []
        for impl in impls:
            c = cells.get((impl, n))
            if c is None:
                row.append("-")
            elif "error" in c:
                row.append("error")
            else:
                rel = f" ({c['seconds'] / base:.2f}x)" if base else ""
                row.append(f"{c['seconds']:.3f} s / {c['mem_bytes'] / 2**20:.0f} MiB{rel}")
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    if reach is not None:
        ratio = "-" if reach["ratio"] is None else f"{reach['ratio']:.1f}x"
        lines += ["", f"Longest causal length within {config.longest_budget_mib:g} MiB per device "
                  f"({'forward + backward' if config.backward else 'forward'}; compiled, not "
                  f"run): ring over {config.num_devices} devices {reach['ring']['length']}, "
                  f"one device (xla) {reach['xla']['length']}; ratio {ratio}"]
    return "\n".join(lines)
