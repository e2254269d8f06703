"""Experiments behind the runner: the fine-tuning recipe, the model benchmark's bookkeeping, the
remat memory benchmark, the data pipeline benchmark and the windowed-cache benchmark, at tiny
sizes."""

import json
import os

import numpy as np
import pytest

from experiments import bench_model, bench_model_peer, bench_remat, finetune_longctx
from experiments.run import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_passkey_rows_follow_their_statement():
    tokens, loss_mask = finetune_longctx.passkey_batch(0, 5, 4, 40, vocab_size=64,
                                                       num_values=16, num_digits=2)
    assert tokens.shape == loss_mask.shape == (4, 40)
    for row in range(4):
        marks = np.flatnonzero(tokens[row] == finetune_longctx.MARK)
        assert len(marks) == 2 and marks[1] == 37  # the key, then the query at the end
        np.testing.assert_array_equal(tokens[row, marks[0] + 1:marks[0] + 3], tokens[row, -2:])
        assert np.all((tokens[row, -2:] >= 2) & (tokens[row, -2:] < 18))
        filler = np.delete(tokens[row], [marks[0], marks[0] + 1, marks[0] + 2, 37, 38, 39])
        assert filler.min() >= 18
    np.testing.assert_array_equal(loss_mask.sum(1), 2)
    np.testing.assert_array_equal(loss_mask[:, -2:], 1)
    again, _ = finetune_longctx.passkey_batch(0, 6, 1, 40, vocab_size=64, num_values=16,
                                              num_digits=2)
    np.testing.assert_array_equal(again[0], tokens[1])  # row i is a function of (seed, i)


@pytest.mark.slow
def test_finetune_experiment_runs_and_writes_its_table(tmp_path):
    config = load_config_file(os.path.join(ROOT, "configs", "finetune_longctx.py"))
    config.model.update(hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                        intermediate_size=32, attention_impl="reference", num_layers=1)
    config.update(length=16, eval_lengths=(16, 32),
                  methods=("none", "dynamic", "self_extend", "rerope"), pretrain_steps=3,
                  finetune_steps=2, batch_size=4, eval_samples=4, eval_batch_size=4)
    summary = finetune_longctx.run(config, str(tmp_path))
    assert len(summary["rows"]) == 4 * 2 * 2  # methods x (as is, fine-tuned) x lengths
    assert all(0 <= r["accuracy"] <= 1 and r["answer_nll"] > 0 and r["perplexity"] > 1
               for r in summary["rows"])
    by = {(r["method"], r["variant"], r["length"]): r for r in summary["rows"]}
    # Self-Extend and ReRoPE differ from plain RoPE only past their window (8 tokens here),
    # and their fine-tuned weights are plain RoPE's.
    for method in ("self_extend", "rerope"):
        for variant in ("as is", "+ PoSE fine-tune"):
            assert by[(method, variant, 16)]["perplexity"] != by[("none", variant, 16)][
                "perplexity"]
    # Dynamic NTK leaves RoPE unchanged up to the original window.
    assert by[("dynamic", "as is", 16)]["perplexity"] == pytest.approx(
        by[("none", "as is", 16)]["perplexity"], rel=1e-5)
    table = (tmp_path / "results.md").read_text()
    assert "| Self-Extend (w 8, g 3) + PoSE fine-tune |" in table
    assert "| NTK dynamic ×8 as is |" in table and "Perplexity" in table
    assert (tmp_path / "accuracy.png").exists()
    assert (tmp_path / "results.csv").read_text().startswith(
        "method,variant,length,accuracy,perplexity")


def test_bench_model_prompts_match_the_peer_and_ratios_are_lcm_over_peer():
    np.testing.assert_array_equal(bench_model.prompt_ids(300, 1000),
                                  bench_model_peer.prompt_ids(300, 1000))
    rows = [{"impl": "lcm", "length": 1000, "prefill_s": 1.0, "decode_s_per_token": 0.1},
            {"impl": "transformers", "length": 1000, "prefill_s": 2.0,
             "decode_s_per_token": 0.05}]
    text = bench_model.table(rows, ["lcm", "transformers"], [1000])
    assert "| 1000 | 1,000 | 500 | 2.00× | 10.0 | 20.0 | 0.50× |" in text


@pytest.mark.slow
def test_remat_memory_bench_orders_policies(tmp_path):
    config = load_config_file(os.path.join(ROOT, "configs", "bench_remat.py"))
    config.model.update(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2,
                        num_kv_heads=1, head_dim=16, intermediate_size=64, block=128)
    config.update(lengths=(512,), policies=("none", "full", "offload"), budget_gib=1.0,
                  max_search_length=512)
    summary = bench_remat.run(config, str(tmp_path))
    by = {(r["policy"], r["length"]): r for r in summary["rows"]}
    # Saving nothing inside a layer needs less temporary memory than saving everything.
    assert by[("full", 512)]["temp_gib"] < by[("none", 512)]["temp_gib"]
    assert by[("offload", 512)]["offloaded"] and not by[("full", 512)]["offloaded"]
    assert json.loads((tmp_path / "summary.json").read_text())["longest"]["none"] >= 512


def test_remat_bench_names_the_tpu_topology_it_cannot_describe():
    # CI has no libtpu; where it is installed, the name is still not a TPU topology.
    with pytest.raises(ValueError, match=r"config.topology='v0x:9x9'.*libtpu"):
        bench_remat.target_sharding("v0x:9x9")
    assert bench_remat.target_sharding("") is None


@pytest.mark.slow
def test_data_bench_reads_every_record_on_every_path(tmp_path):
    """bench_data at a tiny size, one Grain worker: every path (in-process, worker, peer) yields
    every record once, with the same prompt tokens."""
    from experiments import bench_data

    config = load_config_file(os.path.join(ROOT, "configs", "bench_data.py"))
    config.update(tasks=("passkey", "niah_single_1"), lengths=(512, 1024), num_samples=3,
                  buckets=(512, 1024), tokens_per_batch=2048, workers=1, passes=1)
    summary = bench_data.run(config, str(tmp_path))
    rows = {r["path"]: r for r in summary["rows"]}
    assert set(rows) == {"index", "filter_peer", "plan_inproc_regenerate",
                         "plan_workers1_regenerate", "plan_inproc_materialized",
                         "plan_workers1_materialized"}
    total = rows["index"]["records"]
    assert total == 2 * 2 * 3
    assert all(r["records"] == total for r in rows.values()), rows
    assert len({r["prompt_tokens"] for r in rows.values()}) == 1, rows
    assert (tmp_path / "summary.json").exists()


def test_window_cache_bench_keeps_windows_and_counts_bytes(tmp_path):
    """bench_window_cache at a tiny size without the peer: the layered cache is smaller than
    the full one once prompts pass the window, and the analytic bytes follow the shapes."""
    from experiments import bench_window_cache, bench_window_cache_peer

    np.testing.assert_array_equal(bench_window_cache.prompt_ids(300, 1000),
                                  bench_window_cache_peer.prompt_ids(300, 1000))
    config = load_config_file(os.path.join(ROOT, "configs", "bench_window_cache.py"))
    config.lengths, config.decode_tokens, config.repeats, config.peer_python = (64, 160), 2, 1, ""
    config.hidden_size, config.intermediate_size, config.sliding_window = 32, 64, 32
    config.vocab_size, config.block, config.num_layers = 128, 64, 6
    rows = {r["length"]: r for r in bench_window_cache.run(config, str(tmp_path))["rows"]}
    assert rows[64]["cache_bytes"] < rows[64]["full_cache_bytes"]
    assert rows[160]["cache_bytes"] / rows[160]["full_cache_bytes"] < 0.4
    # 1B at 8k: 4 global layers of 8192 entries and 22 sliding ones of 512, 1 kv head.
    layered, full = bench_window_cache.analytic_bytes(26, 1, 256, 512, 6, 8192)
    assert (layered, full) == (1028 * (4 * 8192 + 22 * 512), 1028 * 26 * 8192)
