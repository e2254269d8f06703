"""The evaluation loop: greedy fallback vs a step-by-step reference, batching, resume, errors."""

import dataclasses
import filecmp
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.config import AttentionConfig, ModelConfig, PositionConfig, RopeConfig
from lcm.data import Record
from lcm.eval import EvalOptions, evaluate, greedy_generate, load_records, max_context_length
from lcm.eval.results import read_results
from lcm.eval.scoring import score_sample
from lcm.model import forward, init_params

CFG = ModelConfig(vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48, max_position_embeddings=256,
                  attention=AttentionConfig(impl="xla", block_q=16, block_k=16))
PARAMS = init_params(CFG, jax.random.key(0))[0]


class CharTokenizer:
    """Lowercase letters, digits and ' .?:' as ids 0..39; EOS 40, PAD 41."""

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 .?:"
    eos_id, pad_id = 40, 41

    def encode(self, text):
        return [self.chars.index(c) for c in text.lower() if c in self.chars]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i < len(self.chars))


TOK = CharTokenizer()


def _records(lengths=(24, 56), depths=(0.0, 0.5, 1.0), tasks=("passkey", "niah_single_1")):
    out = []
    for task in tasks:
        metric = "exact_match" if task == "passkey" else "string_match_all"
        for n in lengths:
            for i, d in enumerate(depths):
                filler = "grass sky " * (n // 10)
                cut = int(d * len(filler))
                prompt = f"{filler[:cut]} key {i}{n} {filler[cut:]} key?"
                out.append(Record(id=f"{task}/{n}/{i}", task=task, context=filler, question="?",
                                  prompt=prompt, answers=(f"{i}{n}",), length=n, depth=d,
                                  max_new_tokens=4 if task == "passkey" else 6, metric=metric))
    return out


_fwd = jax.jit(forward, static_argnames=("cfg",))


def _reference_greedy(tokens, n_new, stop):
    """One row, one forward per step with the argmax on the host. The row sits in a fixed
    128-token buffer (one compile; causal attention keeps the tail from mattering)."""
    seq, out = list(tokens), []
    for _ in range(n_new):
        buf = np.full((1, 128), TOK.pad_id, np.int32)
        buf[0, :len(seq)] = seq
        logits = _fwd(PARAMS, jnp.asarray(buf), CFG)
        token = int(np.argmax(np.asarray(logits[0, len(seq) - 1])))
        out.append(token)
        seq.append(token)
        if token in stop:
            break
    return out


@pytest.mark.slow
def test_greedy_fallback_matches_stepwise_reference():
    rng = np.random.default_rng(0)
    lengths = np.array([5, 17, 11])
    prompts = np.full((3, 20), 41, np.int32)
    for i, n in enumerate(lengths):
        prompts[i, :n] = rng.integers(0, 40, n)
    want = [_reference_greedy(prompts[i, :n], 6, stop=()) for i, n in enumerate(lengths)]
    # Stop on the token row 1 emits third: row 1 stops there, others keep their own course.
    stop = (want[1][2],)
    tokens, count = greedy_generate(PARAMS, CFG, prompts, lengths=lengths, max_new_tokens=6,
                                    stop_tokens=stop, pad_token=41)
    tokens, count = np.asarray(tokens), np.asarray(count)
    for i, n in enumerate(lengths):
        ref = _reference_greedy(prompts[i, :n], 6, stop=stop)
        assert count[i] == len(ref)
        np.testing.assert_array_equal(tokens[i, :count[i]], ref)
        assert (tokens[i, count[i]:] == 41).all()
    assert count[1] == 3


def test_greedy_fallback_rejects_what_it_cannot_do():
    prompts, lengths = np.zeros((1, 4), np.int32), np.array([4])
    with pytest.raises(ValueError, match="policy"):
        greedy_generate(PARAMS, CFG, prompts, lengths=lengths, max_new_tokens=2, policy="snapkv")
    with pytest.raises(ValueError, match="temperature"):
        greedy_generate(PARAMS, CFG, prompts, lengths=lengths, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(PARAMS, CFG, prompts, lengths=lengths, max_new_tokens=0)


def _eval(workdir, records, **kw):
    options = EvalOptions(**{"batch_size": 2, "pad_multiple": 32, "progress": False, **kw})
    return evaluate(PARAMS, CFG, records, TOK, str(workdir), options=options,
                    generate_fn=greedy_generate)


@pytest.mark.slow
def test_evaluate_predictions_scores_and_reports(tmp_path):
    records = _records()
    summary = _eval(tmp_path, records)
    rows = read_results(str(tmp_path / "results.jsonl"))
    # Buckets in order of (padded prompt length, generation budget), records in order within.
    order = sorted(records, key=lambda r: (-(-len(TOK.encode(r.prompt)) // 32),
                                           r.max_new_tokens))
    assert [r["id"] for r in rows] == [r.id for r in order]
    by_id = {r.id: r for r in records}
    for row in rows:
        record = by_id[row["id"]]
        ids = TOK.encode(record.prompt)
        want = _reference_greedy(ids, record.max_new_tokens, stop=(TOK.eos_id,))
        if want and want[-1] == TOK.eos_id:
            want = want[:-1]
        assert row["prediction"] == TOK.decode(want)
        assert row["num_prompt_tokens"] == len(ids) and row["truncated_tokens"] == 0
        assert row["score"] == score_sample(record.metric, row["prediction"], record.answers,
                                            task=record.task)
    cells = {(c["task"], c["length"]): c for c in summary["cells"]}
    assert set(cells) == {(t, n) for t in ("passkey", "niah_single_1") for n in (24, 56)}
    assert all(c["num_samples"] == 3 for c in cells.values())
    # One call wrote the table, CSV, summary and one heatmap per task with depths.
    for name in ("results.md", "results.csv", "summary.json", "heatmap_eval_passkey.png",
                 "heatmap_eval_niah_single_1.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    import matplotlib.image
    assert matplotlib.image.imread(str(tmp_path / "heatmap_eval_passkey.png")).ndim == 3
    assert "**avg**" in (tmp_path / "results.md").read_text()
    assert summary["timing"]["samples_this_session"] == len(records)


class _Interrupt(Exception):
    pass


class _Pending:
    """An output still being computed, as a dispatched jax.Array is: `block_until_ready` waits
    (here 0.3 s); reading it before that fails."""

    def __init__(self, value):
        self.value, self.ready = value, False

    def block_until_ready(self):
        time.sleep(0.3)
        self.ready = True
        return self

    def __array__(self, dtype=None, copy=None):
        assert self.ready, "read before it was waited for"
        return self.value


def _pending_generate(params, cfg, prompts, *, lengths, max_new_tokens, policy=None,
                      stop_tokens=(), temperature=0.0):
    rows = len(prompts)
    return (_Pending(np.zeros((rows, max_new_tokens), np.int32)),
            _Pending(np.full((rows,), max_new_tokens, np.int32)))


def test_model_time_includes_asynchronously_dispatched_work(tmp_path):
    records = _records(lengths=(24,), depths=(0.5,), tasks=("passkey",))
    summary = evaluate(PARAMS, CFG, records, TOK, str(tmp_path), generate_fn=_pending_generate,
                       options=EvalOptions(pad_multiple=32, progress=False, heatmaps=False))
    # The loop waits for the outputs inside its model timer, not when it decodes them.
    assert summary["timing"]["generate_s"]["eval"] >= 0.6, summary["timing"]
    assert summary["timing"]["model_s"] >= summary["timing"]["generate_s"]["eval"]


def test_interrupted_run_resumes_to_the_same_results_file(tmp_path):
    records = _records()
    _eval(tmp_path / "full", records)

    calls = []

    def dies_after_two_batches(*args, **kw):
        if len(calls) == 2:
            raise _Interrupt
        calls.append(1)
        return greedy_generate(*args, **kw)

    dies_after_two_batches.__module__ = greedy_generate.__module__
    dies_after_two_batches.__qualname__ = greedy_generate.__qualname__
    options = EvalOptions(batch_size=2, pad_multiple=32, progress=False)
    with pytest.raises(_Interrupt):
        evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "cut"), options=options,
                 generate_fn=dies_after_two_batches)
    partial = read_results(str(tmp_path / "cut" / "results.jsonl"))
    assert len(partial) == 4
    # A kill in the middle of a write leaves a torn line; resume cuts it.
    with open(tmp_path / "cut" / "results.jsonl", "a") as f:
        f.write('{"id": "torn')
    summary = _eval(tmp_path / "cut", records)
    assert summary["timing"]["samples_this_session"] == len(records) - 4
    assert filecmp.cmp(tmp_path / "full" / "results.jsonl", tmp_path / "cut" / "results.jsonl",
                       shallow=False)
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["cells"] == full["cells"]


def test_resume_refuses_a_different_setup_or_overwrite(tmp_path):
    records = _records(lengths=(24,), tasks=("passkey",))
    _eval(tmp_path, records)
    with pytest.raises(ValueError, match="resume=True"):
        options = EvalOptions(batch_size=2, pad_multiple=32, progress=False)
        evaluate(PARAMS, CFG, records, TOK, str(tmp_path), options=options,
                 generate_fn=greedy_generate, resume=False)
    with pytest.raises(ValueError, match=r"different setup .*'model'"):
        other = dataclasses.replace(CFG, norm_eps=1e-5)
        evaluate(PARAMS, other, records, TOK, str(tmp_path),
                 options=EvalOptions(batch_size=2, pad_multiple=32, progress=False),
                 generate_fn=greedy_generate)
    # Another run name shares the workdir: rows of both runs, one table. Records may come as a
    # Grain MapDataset (e.g. lcm.data.synthetic_dataset).
    import grain
    summary = _eval(tmp_path, grain.MapDataset.source(records), run="other", pad_multiple=64)
    assert {c["run"] for c in summary["cells"]} == {"eval", "other"}


def test_too_long_prompt_is_rejected_unless_extended_or_truncated(tmp_path):
    record = Record(id="long", task="passkey", context="", question="", prompt="ab " * 90,
                    answers=("1",), length=300, max_new_tokens=4, metric="exact_match")
    small = dataclasses.replace(CFG, max_position_embeddings=128)
    options = EvalOptions(pad_multiple=32, progress=False)
    with pytest.raises(ValueError, match=r"record 'long': 270 prompt tokens .* usable length 128"):
        evaluate(PARAMS, small, [record], TOK, str(tmp_path / "a"), options=options,
                 generate_fn=greedy_generate)
    extended = dataclasses.replace(small, positions=PositionConfig(
        type="self_extend", window=32, group_size=4))
    assert max_context_length(extended) == (128 - 32) * 4 + 32
    for truncation in ("middle", "left"):
        evaluate(PARAMS, small, [record], TOK, str(tmp_path / truncation),
                 options=dataclasses.replace(options, truncation=truncation),
                 generate_fn=greedy_generate)
        row = read_results(str(tmp_path / truncation / "results.jsonl"))[0]
        assert row["num_prompt_tokens"] == 124 and row["truncated_tokens"] == 270 - 124


def test_max_context_length_per_setting():
    assert max_context_length(CFG) == 256
    yarn = dataclasses.replace(CFG, rope=RopeConfig(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=256))
    assert max_context_length(yarn) == 1024
    assert max_context_length(dataclasses.replace(
        CFG, positions=PositionConfig(type="rerope", window=16))) is None


def test_load_records_names_file_and_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    good = _records(lengths=(24,), depths=(0.5,), tasks=("passkey",))[0]
    path = tmp_path / "records.jsonl"
    path.write_text(good.to_json() + "\n" + '{"id": "x"}\n')
    with pytest.raises(ValueError, match=r"records.jsonl: line 2"):
        load_records(str(path))
    path.write_text(good.to_json() + "\n\n" + good.to_json().replace("exact_match", "em") + "\n")
    assert load_records(str(path))[0] == good


def test_results_file_errors_name_the_line(tmp_path):
    path = tmp_path / "results.jsonl"
    row = json.dumps({"id": "a", "task": "t", "length": 1, "metric": "exact_match",
                      "prediction": "", "score": 0.0})
    path.write_text(f'{row}\nnot json\n')
    with pytest.raises(ValueError, match=r"results.jsonl: line 2 is not valid JSON"):
        read_results(str(path))
    path.write_text(f'{row}\n{{"id": "b"')
    with pytest.raises(ValueError, match="line 2 is incomplete"):
        read_results(str(path))
    assert [r["id"] for r in read_results(str(path), repair=True)] == ["a"]
    assert os.path.getsize(path) == len(row) + 1
