"""One prepared accelerator check: the Pallas kernels compiled (not interpreted), then lcm's
attention timed against jax.nn.dot_product_attention, and the ring over the visible devices.

    python -m experiments.device_check                 # about 5 minutes on one GPU
    python -m experiments.device_check --lengths=8192,16384 --budget_s=120 --out=check.md

On a machine without a GPU or TPU it says so and exits 0 (nothing to measure). On a GPU it

1. runs tests/kernels/test_block_sparse_gpu.py with LCM_PALLAS_COMPILED=1, so the block-sparse
   kernels are compiled by Triton instead of interpreted, against the dense reference (values
   and gradients over the suite's random shapes and masks); on a TPU the Mosaic kernel's file;
2. checks every timed implementation (bfloat16 inputs; values and gradients, relative error
   under 5e-2) against lcm's float32 dense reference at length 1000 (window 100), then times
   `attend(impl="pallas")` against `jax.nn.dot_product_attention` (implementation "cudnn" and
   "xla") at each length, causal and causal + sliding window of length / 10 (about 10% of the
   blocks), forward and forward + backward (value_and_grad w.r.t. q, k, v): batch 1, 8 query
   heads over 8 KV heads, head_dim 128, bfloat16, the median of --repeats runs after a warm-up;
   a cell whose compiled memory passes the device's memory, or whose compile fails, says so;
3. times `attend(impl="ring")` over every visible device (a context axis of all of them)
   against the single-device pallas call at the longest length that fits.

It prints one markdown table (time in ms and the ratio to lcm pallas; > 1 means lcm is faster)
and writes it to --out if given. A global --budget_s (default 270 s) stops timing when spent;
cells left out are listed as skipped, never guessed.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["8192", "16384", "32768", "65536"], "sequence lengths to time")
flags.DEFINE_integer("repeats", 5, "timed runs per cell (median reported)")
flags.DEFINE_integer("budget_s", 270, "seconds for the whole check (tests included)")
flags.DEFINE_integer("test_timeout_s", 150, "seconds for the compiled kernel tests")
flags.DEFINE_bool("run_tests", True, "run the compiled Pallas kernel tests first")
flags.DEFINE_string("out", None, "also write the table to this file")
flags.DEFINE_integer("check_length", 1000, "length of the reference check (window: a tenth)")
flags.DEFINE_bool("cpu_smoke", False, "on a CPU, run the timing part anyway (pallas interpreted: "
                  "tiny lengths only; for testing this script)")

NUM_HEADS, HEAD_DIM = 8, 128
KERNEL_TESTS = {"gpu": "tests/kernels/test_block_sparse_gpu.py",
                "tpu": "tests/kernels/test_block_sparse_tpu.py"}


def accelerator() -> str | None:
    """'gpu' or 'tpu' when JAX sees one, else None (CPU only)."""
    import jax
    backend = jax.default_backend()
    return backend if backend in ("gpu", "tpu") else None


def run_kernel_tests(platform: str, timeout_s: int) -> str:
    """The kernel test file of `platform`, compiled; one line: pytest's summary or the failure."""
    env = dict(os.environ, LCM_PALLAS_COMPILED="1", JAX_PLATFORMS="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", KERNEL_TESTS[platform]]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s} s"
    lines = [ln for ln in done.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else done.stderr.strip()[-300:]
    return f"{summary} (exit {done.returncode})"


def attention_fns(platform: str, window: int | None):
    """{name: f(q, k, v) -> [B, T, H, D]} for every implementation timed on `platform`."""
    import jax
    from lcm.attention import Causal, Local, attend
    mask = Causal() if window is None else Local(window)
    blocks = {"gpu": dict(block_q=128, block_k=64), "tpu": dict(block_q=512, block_k=512),
              "cpu": dict(block_q=128, block_k=128)}[platform]
    fns = {"lcm pallas": lambda q, k, v: attend(q, k, v, mask, impl="pallas", **blocks),
           "lcm xla": lambda q, k, v: attend(q, k, v, mask, impl="xla")}
    local = None if window is None else (window - 1, 0)
    impls = ("cudnn", "xla") if platform == "gpu" else ("xla",)
    for impl in impls:
        fns[f"jax.nn {impl}"] = (
            lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=local, implementation=impl))
    return fns


def random_qkv(T: int, dtype):
    import jax
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    shape = (1, T, NUM_HEADS, HEAD_DIM)
    return tuple(jax.random.normal(key, shape, dtype) for key in (kq, kk, kv))


def with_backward(fn):
    import jax
    import jax.numpy as jnp

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def check_against_reference(fns, window, T: int) -> dict[str, str]:
    """Each fn (forward and gradients) against lcm's reference at a short odd length in
    float32; {name: 'ok' | the error}. Timings of a failing implementation are not reported."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from lcm.attention import Causal, Local, attend
    mask = Causal() if window is None else Local(window)
    q, k, v = random_qkv(T, jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = attend(*f32, mask, impl="reference")
    want_grads = with_backward(lambda q, k, v: attend(q, k, v, mask, impl="reference"))(*f32)[1]

    def rel(got, want):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))

    status = {}
    for name, fn in fns.items():
        try:
            err = rel(jax.jit(fn)(q, k, v), want)
            grads = jax.jit(with_backward(fn))(q, k, v)[1]
            err = max([err] + [rel(a, b) for a, b in zip(grads, want_grads)])
            status[name] = "ok" if err < 5e-2 else f"differs by {err:.2e} (relative)"
        except Exception as e:  # noqa: BLE001 - a failing backend is reported, not fatal
            status[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return status


def time_cell(fn, args, repeats: int, memory_limit: float | None):
    """(median ms, '') or (None, why)."""
    import jax
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001
        return None, f"compile failed: {type(e).__name__}"
    analysis = compiled.memory_analysis()
    if memory_limit is not None and analysis is not None:
        need = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                + analysis.temp_size_in_bytes)
        if need > memory_limit:
            return None, f"OOM ({need / 2**30:.0f} GiB)"
    try:
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        return None, f"failed: {type(e).__name__}"
    return 1e3 * statistics.median(times), ""


def device_memory() -> float | None:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def ring_row(platform: str, T: int, repeats: int):
    """(devices, ring ms, single-device pallas ms) at length T, forward + backward, causal."""
    import jax
    import jax.numpy as jnp
    from lcm.attention import Causal, attend
    from lcm.sharding import make_mesh
    n = len(jax.devices())
    mesh = make_mesh((1, 1, 1, n))
    q, k, v = random_qkv(T, jnp.bfloat16)
    ring = with_backward(lambda q, k, v: attend(q, k, v, Causal(), impl="ring", mesh=mesh))
    single = with_backward(attention_fns(platform, None)["lcm pallas"])
    r, why_r = time_cell(ring, (q, k, v), repeats, None)
    s, why_s = time_cell(single, (q, k, v), repeats, None)
    return n, (r, why_r), (s, why_s)


def fmt(ms, why):
    return f"{ms:.2f}" if ms is not None else why


def main(argv):
    del argv
    start = time.perf_counter()
    platform = accelerator()
    if platform is None and FLAGS.cpu_smoke:
        platform = "cpu"
    elif platform is None:
        import jax
        print(f"device_check: no GPU or TPU visible (jax.default_backend() = "
              f"{jax.default_backend()!r}); nothing to measure. Run it on a machine with an "
              f"accelerator.")
        return 0
    import jax
    import jax.numpy as jnp
    lines = [f"device_check on {jax.devices()[0].device_kind} x {len(jax.devices())} "
             f"(jax {jax.__version__}, backend {platform})", ""]
    if FLAGS.run_tests and platform in KERNEL_TESTS:
        lines.append(f"compiled kernel tests ({KERNEL_TESTS[platform]}): "
                     f"{run_kernel_tests(platform, FLAGS.test_timeout_s)}")
    print("\n".join(lines), flush=True)
    status = {}
    n = FLAGS.check_length
    for window_name, window in (("causal", None), ("causal+window", max(n // 10, 1))):
        fns = attention_fns(platform, window)
        for name, result in check_against_reference(fns, window, n).items():
            status[(window_name, name)] = result
    checked = ", ".join(f"{w}/{name}: {s}" for (w, name), s in status.items())
    lines.append(f"reference check (T={n}, window {max(n // 10, 1)}, values and gradients): "
                 f"{checked}")
    limit = device_memory()
    header = ["length", "mask", "pass"]
    names = list(attention_fns(platform, None))
    header += [f"{n} ms" for n in names] + [f"{n} / lcm pallas" for n in names[1:]]
    rows, skipped = [], []
    for T in (int(x) for x in FLAGS.lengths):
        for mask_name, window in (("causal", None), ("causal+window", T // 10)):
            fns = attention_fns(platform, window)
            q, k, v = random_qkv(T, jnp.bfloat16)
            for pass_name in ("fwd", "fwd+bwd"):
                if time.perf_counter() - start > FLAGS.budget_s:
                    skipped.append(f"{T}/{mask_name}/{pass_name}")
                    continue
                cells = {}
                for name, fn in fns.items():
                    if status[(mask_name, name)] != "ok":
                        cells[name] = (None, "failed check")
                        continue
                    f = fn if pass_name == "fwd" else with_backward(fn)
                    cells[name] = time_cell(f, (q, k, v), FLAGS.repeats, limit)
                base = cells["lcm pallas"][0]
                ratios = [f"{cells[n][0] / base:.2f}x" if base and cells[n][0] else "-"
                          for n in names[1:]]
                rows.append([str(T), mask_name, pass_name]
                            + [fmt(*cells[n]) for n in names] + ratios)
                print(" | ".join(rows[-1]), flush=True)
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "batch 1, 8 heads, head_dim 128, bfloat16; causal+window: a sliding window of "
              "length / 10 (about 10% of the blocks); ratio = that implementation's time / lcm "
              "pallas's (> 1: lcm is faster)", ""] + table
    if skipped:
        lines.append(f"skipped (budget of {FLAGS.budget_s} s spent): {', '.join(skipped)}")
    if time.perf_counter() - start < FLAGS.budget_s:
        T = max((int(r[0]) for r in rows if r[3][0].isdigit()), default=8192)
        n, (r, why_r), (s, why_s) = ring_row(platform, T, FLAGS.repeats)
        ratio = f"{r / s:.2f}x" if r and s else "-"
        lines += ["", f"ring over {n} device(s), causal, T={T}, fwd+bwd: ring {fmt(r, why_r)} ms,"
                  f" one-device pallas {fmt(s, why_s)} ms, ring / pallas {ratio}"]
    lines.append(f"\ntotal {time.perf_counter() - start:.0f} s")
    text = "\n".join(lines)
    print("\n" + text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    app.run(main)
