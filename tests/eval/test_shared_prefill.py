"""Several cache policies evaluated from one prefill per batch: the same tokens as one
`lcm.cache.generate` per policy, the same rows as separate runs, resumable per (run, id)."""

import dataclasses

import numpy as np
import pytest
from test_loop import CFG, PARAMS, TOK, _records

import lcm.cache
import lcm.eval.loop
from lcm.cache import PyramidKV, SnapKV, StreamingLLM, generate
from lcm.eval import EvalOptions, evaluate
from lcm.eval.generation import shared_prefill_generate
from lcm.eval.results import read_results

POLICIES = {"full": None, "streaming_llm": StreamingLLM(compression_ratio=0.5, n_sink=2),
            "snapkv": SnapKV(compression_ratio=0.5, window_size=8),
            "pyramidkv": PyramidKV(compression_ratio=0.5, window_size=8)}
OPTIONS = EvalOptions(batch_size=2, pad_multiple=32, progress=False, heatmaps=False)


def test_shared_prefill_gives_generate_tokens_per_policy():
    rng = np.random.default_rng(1)
    lengths = np.array([40, 23, 31])
    prompts = np.full((3, 48), TOK.pad_id, np.int32)
    for i, n in enumerate(lengths):
        prompts[i, :n] = rng.integers(0, 40, n)
    (free, _), = shared_prefill_generate(PARAMS, CFG, prompts, lengths=lengths,
                                         max_new_tokens=7, policies=(None,))
    # Stop on the token row 1 writes third under the full cache: rows stop on their own.
    stop = (int(free[1, 2]),)
    timings = {}
    got = shared_prefill_generate(PARAMS, CFG, prompts, lengths=lengths, max_new_tokens=7,
                                  policies=tuple(POLICIES.values()), stop_tokens=stop,
                                  pad_token=TOK.pad_id, timings=timings)
    for (tokens, count), policy in zip(got, POLICIES.values()):
        want_tokens, want_count = generate(PARAMS, CFG, prompts, lengths=lengths,
                                           max_new_tokens=7, policy=policy, stop_tokens=stop,
                                           pad_token=TOK.pad_id)
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_array_equal(count, want_count)
    assert got[0][1][1] <= 3  # row 1 stopped (kept and counted its stop token)
    assert timings["prefill_s"] > 0 and len(timings["decode_cpu_s"]) == len(POLICIES)
    # The policies disagree somewhere, so equality above is not vacuous.
    assert len({np.asarray(t).tobytes() for t, _ in got}) > 1


def test_shared_prefill_rejects_policies_with_their_own_cache():
    with pytest.raises(ValueError, match="own cache format"):
        shared_prefill_generate(PARAMS, CFG, np.zeros((1, 8), np.int32), lengths=np.array([8]),
                                max_new_tokens=2, policies=(None, lcm.cache.KIVI(bits=4)))
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        shared_prefill_generate(PARAMS, CFG, np.zeros((1, 8), np.int32), lengths=np.array([8]),
                                max_new_tokens=0, policies=(None,))


def _rows(path, run):
    return [r for r in read_results(str(path / "results.jsonl")) if r["run"] == run]


@pytest.mark.slow
def test_policies_share_a_prefill_and_equal_separate_runs(tmp_path, monkeypatch):
    records = _records(lengths=(56,), tasks=("niah_single_1",))
    calls = []
    real = lcm.cache.prefill_observed
    monkeypatch.setattr(lcm.cache, "prefill_observed",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    summary = evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "shared"), options=OPTIONS,
                       policies=POLICIES)
    monkeypatch.undo()
    assert len(calls) == 2  # one prefill per batch: 3 records in batches of 2
    assert set(summary["timing"]["generate_s"]) == set(POLICIES)
    assert summary["timing"]["samples_this_session"] == len(records) * len(POLICIES)
    for run, policy in POLICIES.items():
        # One policy alone: lcm.eval.generation.question_generate (kvpress's protocol).
        evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "alone"),
                 options=dataclasses.replace(OPTIONS, run=run), policy=policy)
        assert _rows(tmp_path / "shared", run) == _rows(tmp_path / "alone", run)
    # Question-aware compression: the whole prompt compressed, as lcm.cache.generate does.
    aware = dataclasses.replace(OPTIONS, compress_question=True)
    pressed = {run: POLICIES[run] for run in ("snapkv", "streaming_llm")}
    evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "aware"), options=aware,
             policies=pressed)
    for run, policy in pressed.items():
        evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "aware_alone"),
                 options=dataclasses.replace(aware, run=run), policy=policy,
                 generate_fn=generate)
        assert _rows(tmp_path / "aware", run) == _rows(tmp_path / "aware_alone", run)
    # (That the policies' tokens differ is checked by the test above: this tiny model's
    # predictions here all end at EOS at once.)

    # Killed after the first batch, then resumed: the same rows per run. A run added later to
    # the workdir generates its rows only.
    real_append = lcm.eval.loop.append_lines

    def dies(path, rows):
        real_append(path, rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(lcm.eval.loop, "append_lines", dies)
    two = {run: POLICIES[run] for run in ("full", "snapkv")}
    with pytest.raises(KeyboardInterrupt):
        evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "cut"), options=OPTIONS,
                 policies=two)
    monkeypatch.undo()
    resumed = evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "cut"), options=OPTIONS,
                       policies=two)
    assert resumed["timing"]["samples_this_session"] == 2 * (len(records) - 2)
    more = evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "cut"), options=OPTIONS,
                    policies=POLICIES)
    assert more["timing"]["samples_this_session"] == 2 * len(records)
    for run in POLICIES:
        assert _rows(tmp_path / "cut", run) == _rows(tmp_path / "shared", run)


def test_policies_argument_errors(tmp_path):
    records = _records(lengths=(24,), tasks=("passkey",))
    with pytest.raises(ValueError, match="pass one of them"):
        evaluate(PARAMS, CFG, records, TOK, str(tmp_path), options=OPTIONS,
                 policy=SnapKV(compression_ratio=0.5), policies={"full": None})
    with pytest.raises(ValueError, match="run name 'a/b'"):
        evaluate(PARAMS, CFG, records, TOK, str(tmp_path), options=OPTIONS,
                 policies={"a/b": None})
    with pytest.raises(ValueError, match="non-empty dict"):
        evaluate(PARAMS, CFG, records, TOK, str(tmp_path), options=OPTIONS, policies={})
