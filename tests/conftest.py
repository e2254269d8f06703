"""Test setup: 8 simulated CPU devices (set before JAX is imported) and strict numerics."""

import gc
import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Derandomized: the same examples every run, so CI is reproducible; no deadline since each new
# shape compiles.
settings.register_profile("lcm", derandomize=True, deadline=None, max_examples=20,
                          print_blob=True)
settings.load_profile("lcm")


@pytest.fixture(scope="session")
def devices():
    ds = jax.devices()
    assert len(ds) == 8, f"conftest should give 8 CPU devices, got {len(ds)}"
    return ds


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA's CPU JIT keeps three memory
    mappings per live executable, and JAX's caches keep every executable a worker compiled:
    half the suite in one worker passed Linux's default `vm.max_map_count` (65530), after
    which the next compile segfaulted inside XLA (seen once per full run before this)."""
    yield
    jax.clear_caches()
    gc.collect()
