"""Activation memory of a training step per remat policy, and the longest length that fits.

For a model shaped like `config.model` (default: SmolLM2-135M's shapes, random weights) it
compiles (never runs) the jitted train step (AdamW, float32) at each of `config.lengths`, batch
1, for each remat policy in `config.policies`, and reads XLA's compiled memory analysis: device
bytes (arguments + outputs + temporaries, aliasing of the donated state subtracted) and host
bytes (`host_*` fields: where `remat="offload"` puts each layer's input). From these it reports
the longest length whose device bytes fit `config.budget_gib` (the measured lengths, doubled
until one does not fit).

On a CPU backend host and device memory are the same RAM and XLA's CPU compiler reports no
host bytes, so "offload" shows like "full" there; on TPU/GPU the same command shows the saving.
With `config.topology` set (e.g. "v5e:1x1") the step is compiled ahead of time for that TPU
topology on any machine (deviceless AOT through libtpu, `pip install -e '.[tpu]'`), so TPU
memory, offload included, is measured without a TPU. The program is checked for host-memory
residuals either way (`offloaded` column).

    python -m experiments.run --config=configs/bench_remat.py --workdir=/tmp/bench_remat
    python -m experiments.run --config=configs/bench_remat.py --config.topology=v5e:1x1 \
        --workdir=/tmp/bench_remat_tpu
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from experiments.workdir import write_summary
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import param_shapes
from lcm.train import OptimizerConfig, init_train_state, make_optimizer, train_step


def target_sharding(topology: str):
    """The sharding to compile for: None (the default backend) or the first chip of a TPU
    topology such as "v5e:1x1", described by libtpu without a TPU (deviceless AOT)."""
    if not topology:
        return None
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as err:  # no libtpu, or a name libtpu does not know
        raise ValueError(
            f"config.topology={topology!r}: could not describe this TPU topology ({err}); it "
            "needs libtpu (pip install -e '.[tpu]') and a name such as 'v5e:1x1', 'v4:2x2x1' "
            "or 'v5p:2x2x1'") from err
    return jax.sharding.SingleDeviceSharding(desc.devices[0])


def measure(cfg: ModelConfig, length: int, sharding=None) -> dict:
    """Compiled memory of one train step at batch 1 x `length` (nothing is allocated), for the
    default backend or, given `sharding`, the device it names."""
    optimizer = make_optimizer(OptimizerConfig(total_steps=10, warmup_steps=1))
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer), param_shapes(cfg))
    batch = {"tokens": jax.ShapeDtypeStruct((1, length), jnp.int32)}
    if sharding is not None:
        state, batch = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), (state, batch))
    step = jax.jit(lambda s, b: train_step(s, b, cfg, optimizer), donate_argnums=0)
    jaxpr = str(jax.make_jaxpr(lambda s, b: train_step(s, b, cfg, optimizer))(state, batch))
    try:
        stats = step.lower(state, batch).compile().memory_analysis()
    except jax.errors.JaxRuntimeError as err:  # a TPU target refuses what exceeds its HBM
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return {"device_gib": None, "host_gib": None, "temp_gib": None,
                "offloaded": "<host>" in jaxpr, "error": str(err).splitlines()[0][:300]}
    device = (stats.argument_size_in_bytes + stats.output_size_in_bytes
              + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    host = (stats.host_argument_size_in_bytes + stats.host_output_size_in_bytes
            + stats.host_temp_size_in_bytes)
    return {"device_gib": device / 2**30, "host_gib": host / 2**30,
            "temp_gib": stats.temp_size_in_bytes / 2**30, "offloaded": "<host>" in jaxpr}


def fits_budget(row: dict, budget_gib: float) -> bool:
    return row["device_gib"] is not None and row["device_gib"] <= budget_gib


def describe(row: dict) -> str:
    if row["device_gib"] is None:
        return f"does not compile: {row['error']}"
    return (f"device {row['device_gib']:.2f} GiB (temporaries {row['temp_gib']:.2f}), host "
            f"{row['host_gib']:.2f} GiB, offloaded {row['offloaded']}")


def cell(row: dict) -> str:
    if row["device_gib"] is None:
        return "out of memory"
    return (f"{row['device_gib']:.2f} GiB"
            + (f" + {row['host_gib']:.2f} host" if row["host_gib"] else "")
            + (" (offloaded)" if row["offloaded"] and not row["host_gib"] else ""))


def run(config, workdir: str) -> dict:
    m = config.model
    base = ModelConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                       num_layers=m.num_layers, num_heads=m.num_heads,
                       num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                       intermediate_size=m.intermediate_size, tie_embeddings=True,
                       max_position_embeddings=max(config.lengths),
                       attention=AttentionConfig(impl="xla", block_q=m.block, block_k=m.block))
    sharding = target_sharding(config.get("topology", ""))
    target = (f"TPU {config.topology}, deviceless AOT compile" if sharding is not None
              else jax.default_backend())
    rows, longest = [], {}
    for policy in config.policies:
        cfg = dataclasses.replace(base, remat=policy)
        fits = 0
        for length in config.lengths:
            row = {"policy": policy, "length": length, **measure(cfg, length, sharding)}
            rows.append(row)
            print(f"{policy:8s} {length:7d}: " + describe(row), flush=True)
            if fits_budget(row, config.budget_gib):
                fits = max(fits, length)
        length = max(config.lengths)
        while fits == length and length < config.max_search_length:
            length *= 2
            row = measure(cfg, length, sharding)
            print(f"{policy:8s} {length:7d}: " + describe(row), flush=True)
            if not fits_budget(row, config.budget_gib):
                break
            fits = length
        longest[policy] = fits
    lines = [f"Train step memory (XLA compiled estimate, {target}), batch 1, "
             f"float32, AdamW; model {m.num_layers} layers x {m.hidden_size}", "",
             "| policy | " + " | ".join(str(x) for x in config.lengths)
             + f" | longest ≤ {config.budget_gib:g} GiB |",
             "|---|" + "---:|" * (len(config.lengths) + 1)]
    for policy in config.policies:
        cells = [cell(r) for r in rows if r["policy"] == policy]
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {longest[policy]} |")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    return write_summary(workdir, {"rows": rows, "longest": longest, "target": target,
                                   "backend": jax.default_backend()}, markdown=text)
