"""H2O against its original code (FMInference/H2O, h2o_hf/utils_real_drop/modify_llama.py):
kept positions per head after the prompt and after each of 16 decode steps, and every step's
logits (fixtures from tests/fixtures/make_h2o_fixtures.py, which runs the original's
H2OKVCache_LayerWise unchanged).

The original scores each attention head by its attention summed over all queries (prompt and
decode steps, not divided by their number as kvpress's ObservedAttention) and runs on
multi-head models only; on a GQA model its per-head selection is per query head over repeated
K/V, which is `H2O(gqa="query_head")`. The fixtures hold a GQA tiny Llama and its multi-head
copy (k/v projections repeated per group, the same function), so both are checked against the
one original run."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import H2O, decode_step, prefill
from lcm.io import load_hf_checkpoint

FIXTURES = Path(__file__).parents[1] / "fixtures" / "h2o"
META = json.loads((FIXTURES / "meta.json").read_text())
DATA = np.load(FIXTURES / "expected.npz")
CASES = [("mha", "mean", "hh6_recent10"), ("gqa", "query_head", "hh12_recent4")]


def test_every_fixture_is_checked():
    assert {name for _, _, name in CASES} == set(META["configurations"])
    assert DATA["input_ids"].shape == (1, META["prompt"])
    assert len(set(DATA["input_ids"][0].tolist()) | set(DATA["tokens"].tolist())) == (
        META["prompt"] + META["steps"])  # distinct ids: no tied keys


@pytest.fixture(scope="module")
def models():
    return {name: load_hf_checkpoint(FIXTURES / name) for name in ("mha", "gqa")}


def kept(cache, cfg):
    return np.stack([np.asarray(cache.kept_positions(layer)[0])
                     for layer in range(cfg.num_layers)])


def run(models, model, policy, steps):
    """(logits [steps + 1, vocab], kept [steps + 1, L, heads, C]) as the fixture lays them."""
    cfg, params = models[model]
    logits, cache = prefill(params, jnp.asarray(DATA["input_ids"]), cfg, policy=policy,
                            max_new_tokens=1)
    out_logits, out_kept = [np.asarray(logits[0])], [kept(cache, cfg)]
    for token in DATA["tokens"][:steps]:
        logits, cache = decode_step(params, cache, jnp.asarray([token]), cfg, policy=policy)
        out_logits.append(np.asarray(logits[0]))
        out_kept.append(kept(cache, cfg))
    return np.stack(out_logits), np.stack(out_kept)


@pytest.mark.slow
@pytest.mark.parametrize("model,gqa,name", CASES)
def test_h2o_matches_the_original_step_by_step(models, model, gqa, name):
    """Each original configuration once (the two models are the same function, and on the
    multi-head one every gqa vote is the per-head selection)."""
    conf = META["configurations"][name]
    size = conf["hh_size"] + conf["recent_size"]
    assert META["prompt"] > size  # the prompt itself is compressed
    logits, kept_pos = run(models, model, H2O(conf["hh_size"], conf["recent_size"], gqa=gqa),
                           META["steps"])
    want = DATA[f"{name}/kept"]
    assert kept_pos.shape[2] == want.shape[2] == 4  # one selection per query head
    np.testing.assert_array_equal(kept_pos[..., size:], -1)  # exactly hh + recent kept
    for step in range(META["steps"] + 1):
        np.testing.assert_array_equal(kept_pos[step, ..., :size], want[step],
                                      err_msg=f"kept after step {step}")
        np.testing.assert_allclose(logits[step], DATA[f"{name}/logits"][step], atol=1e-4,
                                   rtol=1e-4, err_msg=f"logits at step {step}")


@pytest.mark.slow
def test_group_mean_is_not_the_originals_per_head_selection(models):
    """On the GQA model the kvpress-style group vote (gqa="mean", one selection per kv head)
    keeps other entries than the original's per-query-head selection: the fixture tells the
    options apart."""
    conf = META["configurations"]["hh6_recent10"]
    size = conf["hh_size"] + conf["recent_size"]
    _, kept_pos = run(models, "gqa", H2O(conf["hh_size"], conf["recent_size"]), 4)
    want = DATA["hh6_recent10/kept"][:5]  # [steps, L, 4 query heads, size]
    assert kept_pos.shape[2] == 2
    per_kv_head = np.repeat(kept_pos[..., :size], 2, axis=2)
    assert (per_kv_head != want).any()
