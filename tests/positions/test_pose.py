"""PoSE and E²-LLM position augmentation against NumPy statements of the papers' definitions."""

import jax
import numpy as np
import pytest

from lcm.positions.pose import (e2llm_positions, pose_positions, pose_sample,
                                skip_positions)


def _numpy_skip_positions(chunk_len, cuts, biases):
    """PoSE: part i = [st_i, st_{i+1}) gets positions st_i + u_i + j."""
    starts = [0, *cuts, chunk_len]
    out = []
    for i in range(len(starts) - 1):
        out += [starts[i] + biases[i] + j for j in range(starts[i + 1] - starts[i])]
    return np.asarray(out)


def test_skip_positions_match_numpy_statement():
    rng = np.random.default_rng(0)
    for chunk_len, parts in [(16, 2), (16, 4), (33, 3), (8, 1)]:
        cuts = np.sort(rng.choice(np.arange(1, chunk_len), parts - 1, replace=False))
        biases = np.sort(rng.integers(0, 100, parts))
        np.testing.assert_array_equal(skip_positions(chunk_len, cuts, biases),
                                      _numpy_skip_positions(chunk_len, cuts, biases))


@pytest.mark.parametrize("num_chunks,anchor_start", [(2, True), (3, False), (5, True)])
def test_pose_draws_follow_the_definition(num_chunks, anchor_start):
    chunk_len, target_len = 24, 96
    span = target_len - chunk_len
    sample = jax.jit(lambda k: pose_sample(k, chunk_len, target_len, num_chunks=num_chunks,
                                           anchor_start=anchor_start))
    firsts, lasts = set(), set()
    for seed in range(64):
        cuts, biases = map(np.asarray, sample(jax.random.key(seed)))
        assert cuts.shape == (num_chunks - 1,) and biases.shape == (num_chunks,)
        assert np.all(np.diff(cuts) > 0) and 1 <= cuts.min(initial=1) and cuts.max(
            initial=1) < chunk_len
        assert np.all(np.diff(biases) >= 0) and 0 <= biases[0] and biases[-1] <= span
        if anchor_start:
            assert biases[0] == 0
        firsts.add(int(biases[0]))
        lasts.add(int(biases[-1]))
        pos = np.asarray(pose_positions(jax.random.key(seed), chunk_len, target_len,
                                        num_chunks=num_chunks, anchor_start=anchor_start))
        np.testing.assert_array_equal(pos, _numpy_skip_positions(chunk_len, cuts, biases))
        assert pos.max() < target_len
    assert len(lasts) > 10  # the skipping biases spread over the window
    assert (firsts == {0}) == anchor_start


def test_pose_covers_the_target_window_and_reference_first_chunk():
    chunk_len, target_len = 32, 256
    pos = np.asarray(jax.jit(lambda k: pose_positions(k, chunk_len, target_len, batch_size=512,
                                                      max_first_len=(chunk_len + 1) // 2))(
        jax.random.key(0)))
    assert pos.shape == (512, chunk_len)
    assert pos.max() == target_len - 1 and pos.min() == 0
    # The authors' code: the first part is 1..(chunk_len + 1) // 2 tokens at 0, 1, ...
    # (a row whose second bias drew 0 has no visible jump).
    jumps = np.diff(pos, axis=1) != 1
    first_len = np.argmax(jumps, axis=1) + 1
    assert jumps.any(1).mean() > 0.9
    assert first_len[jumps.any(1)].max() <= (chunk_len + 1) // 2
    # Relative distances up to target_len - 1 are trained although chunks are 32 long.
    distances = (pos[:, -1] - pos[:, 0])
    assert distances.max() > 0.9 * target_len
    assert len(np.unique(pos)) > 0.9 * target_len


def test_e2llm_positions_stay_inside_the_interpolated_window():
    scales = (1, 2, 4)
    seen = set()
    fn = jax.jit(lambda k: e2llm_positions(k, 16, scales, batch_size=8))
    for seed in range(40):
        pos, scale = fn(jax.random.key(seed))
        pos, scale = np.asarray(pos), float(scale)
        seen.add(scale)
        assert scale in scales
        np.testing.assert_array_equal(np.diff(pos, axis=1), 1)
        assert pos.min() >= 0 and pos.max() / scale < 16  # interpolated: inside the window
        assert pos[:, 0].max() <= (scale - 1) * 16
    assert seen == set(map(float, scales))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"target_len=8 < chunk_len=16"):
        pose_positions(jax.random.key(0), 16, 8)
    with pytest.raises(ValueError, match=r"num_chunks=20 > chunk_len=16"):
        pose_positions(jax.random.key(0), 16, 64, num_chunks=20)
    with pytest.raises(ValueError, match=r"max_first_len=16; needs num_chunks=2"):
        pose_positions(jax.random.key(0), 16, 64, max_first_len=16)
    with pytest.raises(ValueError, match=r"scales=\(0.5,\); expected numbers >= 1"):
        e2llm_positions(jax.random.key(0), 16, (0.5,))
