"""The memory_recall experiment at a tiny size: data, training loop, CSV, plot and summary."""

import csv
import os

import numpy as np
import pytest

from configs.memory_recall import get_config
from experiments import memory_recall


def test_passkey_batches_are_pure_and_place_the_passkey_at_the_distance():
    config = get_config()
    tokens, passkey, distance = memory_recall.make_batch(config, 5, 64)
    again, _, _ = memory_recall.make_batch(config, 5, 64)
    np.testing.assert_array_equal(tokens, again)
    tokens, passkey, distance = (np.asarray(x) for x in (tokens, passkey, distance))
    F, P, S = config.num_fillers, config.num_passkeys, config.segment_len
    assert np.all(tokens[:, -1] == F + P)
    found = np.argwhere((tokens >= F) & (tokens < F + P))
    assert len(found) == 64  # one passkey per row
    rows, cols = found.T
    np.testing.assert_array_equal(tokens[rows, cols] - F, passkey[rows])
    np.testing.assert_array_equal(config.num_segments - 1 - cols // S, distance[rows])
    assert len(set(distance.tolist())) > 1


@pytest.mark.slow
def test_tiny_run_writes_csv_plot_and_summary(tmp_path):
    config = get_config()
    config.update(dict(memories="none,knn", num_segments=2, segment_len=8, hidden_size=16,
                       steps=2, batch_size=4, eval_examples=8))
    summary = memory_recall.run(config, str(tmp_path))
    assert [r["memory"] for r in summary["results"]] == ["none", "knn"]
    with open(tmp_path / "memory_recall.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["memory"], r["distance_segments"]) for r in rows] == [
        ("none", "0"), ("none", "1"), ("knn", "0"), ("knn", "1")]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    assert os.path.getsize(tmp_path / "memory_recall.png") > 1000
    assert (tmp_path / "summary.json").exists() and (tmp_path / "results.md").exists()
    with pytest.raises(ValueError, match="memories"):
        config.memories = "none,lstm"
        memory_recall.run(config, str(tmp_path))
