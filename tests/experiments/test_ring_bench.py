"""bench_ring's compile-only longest-length search (the README's context-parallel reach)."""

import jax
import pytest

from experiments import bench_ring
from lcm.sharding import make_mesh


@pytest.mark.parametrize("limit", [8, 24, 296, 1000, 8192])
def test_longest_finds_the_largest_fitting_multiple(limit):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= limit

    got = bench_ring.longest(fits, 8)
    assert got == limit // 8 * 8
    assert len(calls) <= 2 * max(1, (limit // 8).bit_length()) + 2  # doubling, then bisection


def test_longest_is_none_when_nothing_fits():
    assert bench_ring.longest(lambda n: False, 8) is None


def test_search_longest_compiles_and_ring_reaches_further():
    config = bench_ring_config(longest_budget_mib=12.0)
    mesh = make_mesh((1, 1, 1, 4), devices=jax.devices()[:4])
    reach = bench_ring.search_longest(mesh, config)
    ring, xla = reach["ring"], reach["xla"]
    assert ring["length"] and xla["length"] and reach["ratio"] > 1
    assert ring["mem_bytes"] <= 12 * 2**20
    # the next length after the answer was probed and did not fit (the search is exact)
    over = [int(n) for n, b in ring["probes"].items() if b > 12 * 2**20]
    assert min(over) == ring["length"] + 2 * 4 * config.block


def bench_ring_config(**overrides):
    from configs.bench_ring import get_config

    config = get_config()
    config.num_devices, config.block = 4, 64
    config.update(overrides)
    return config
