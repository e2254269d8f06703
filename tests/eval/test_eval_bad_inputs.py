"""The bad-input catalogue of lcm.eval (and the records it reads): every case a row with what it
must do (`error`: a ValueError whose message matches, naming the argument, or the file and line;
`ok`: a correct result; `fallback`: a correct result after a warning naming the file and line),
and the kill / corrupt / resume matrix of an evaluation workdir: each damaged workdir resumes to
exactly the results file of an uninterrupted run. Case ids start with the kind, so
`pytest --collect-only -q tests/eval/test_eval_bad_inputs.py | grep -c '\\[error-'` counts them
(docs/reliability.md).

The "model" is a NumPy generate_fn (it echoes the prompt's last tokens), so the loop, its files
and its resume rules run without a compile.
"""

import dataclasses
import filecmp
import json
import shutil

import numpy as np
import pytest

from lcm.config import AttentionConfig, ModelConfig
from lcm.data import Record
from lcm.eval import EvalOptions, evaluate, load_records
from lcm.eval.results import read_results, summarize

CFG = ModelConfig(vocab_size=48, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                  head_dim=8, intermediate_size=16, max_position_embeddings=256,
                  attention=AttentionConfig(impl="reference"))
OPTIONS = EvalOptions(batch_size=4, pad_multiple=32, progress=False, heatmaps=False)


class DigitTokenizer:
    chars = "0123456789 abcdefghijklmnopqrstuvwxyz?"

    def encode(self, text):
        return [self.chars.index(c) for c in text if c in self.chars]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i < len(self.chars))


TOK = DigitTokenizer()


def echo_generate(params, cfg, prompts, *, lengths, max_new_tokens, policy=None,
                  stop_tokens=(), temperature=0.0):
    """The prompt's last `max_new_tokens` tokens: deterministic, some answers right."""
    prompts, lengths = np.asarray(prompts), np.asarray(lengths)
    out = np.stack([prompts[i, max(n - max_new_tokens, 0):n][:max_new_tokens]
                    for i, n in enumerate(lengths)])
    return out.astype(np.int32), np.full(len(prompts), out.shape[1], np.int32)


def _records():
    """48 records: 2 tasks x 4 lengths x 6 depths; the key sits at the end half the time."""
    out = []
    for task in ("passkey", "niah"):
        for n in (40, 60, 80, 100):
            for i in range(6):
                key = f"{i}{n}"
                tail = f" {key}" if i % 2 else " zz"
                prompt = "ab " * (n // 6) + f"key {key} ?" + tail
                out.append(Record(id=f"{task}/{n}/{i}", task=task, context="", question="?",
                                  prompt=prompt, answers=(key,), length=n, depth=i / 5,
                                  max_new_tokens=len(key) + 1, metric="string_match_all"))
    return out


RECORDS = _records()


def _eval(workdir, generate_fn=echo_generate, records=RECORDS):
    return evaluate(None, CFG, records, TOK, str(workdir), options=OPTIONS,
                    generate_fn=generate_fn)


class _Killed(Exception):
    pass


def _dies_after(batches):
    calls = []

    def generate(*args, **kw):
        if len(calls) == batches:
            raise _Killed
        calls.append(1)
        return echo_generate(*args, **kw)

    generate.__module__, generate.__qualname__ = __name__, "echo_generate"  # same fingerprint
    return generate


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    summary = _eval(workdir)
    assert summary["num_samples"] == 48 and 0 < summary["avg_over_tasks"]["eval"][40] < 100
    return workdir, summary


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A workdir whose run was killed after 5 of its 12 batches."""
    workdir = tmp_path_factory.mktemp("killed")
    with pytest.raises(_Killed):
        _eval(workdir, _dies_after(5))
    assert len(read_results(str(workdir / "results.jsonl"))) == 20
    return workdir


def _lines(workdir):
    return (workdir / "results.jsonl").read_bytes().splitlines(keepends=True)


def _append(workdir, data: bytes):
    with open(workdir / "results.jsonl", "ab") as f:
        f.write(data)


def _kill_only(workdir):
    pass


def _duplicate_row(workdir):  # a batch appended twice
    _append(workdir, _lines(workdir)[5])


def _duplicate_batch(workdir):
    _append(workdir, b"".join(_lines(workdir)[4:8]))


def _torn_last_line(workdir):  # killed mid-write
    _append(workdir, _lines(workdir)[0][:37])


def _duplicate_and_torn(workdir):
    _duplicate_row(workdir)
    _torn_last_line(workdir)


@pytest.mark.parametrize("damage,warning", [
    pytest.param(_kill_only, None, id="ok-killed-mid-run"),
    pytest.param(_torn_last_line, None, id="ok-torn-last-line"),
    pytest.param(_duplicate_row, r"results.jsonl: lines \[21\] repeat earlier rows",
                 id="fallback-duplicate-row"),
    pytest.param(_duplicate_batch, r"results.jsonl: lines \[21, 22, 23, 24\] repeat",
                 id="fallback-duplicate-batch"),
    pytest.param(_duplicate_and_torn, r"lines \[21\] repeat", id="fallback-duplicate-and-torn"),
])
def test_damaged_workdir_resumes_to_the_uninterrupted_results(straight, killed, tmp_path,
                                                              damage, warning):
    workdir = tmp_path / "w"
    shutil.copytree(killed, workdir)
    damage(workdir)
    if warning is None:
        summary = _eval(workdir)
    else:
        with pytest.warns(UserWarning, match=warning):
            summary = _eval(workdir)
    assert summary["num_samples"] == 48  # not 49
    assert summary["timing"]["samples_this_session"] == 28
    assert summary["cells"] == straight[1]["cells"]
    assert filecmp.cmp(straight[0] / "results.jsonl", workdir / "results.jsonl", shallow=False)


def _corrupt(line_number, data: bytes):
    def damage(workdir):
        lines = _lines(workdir)
        lines[line_number - 1] = data
        (workdir / "results.jsonl").write_bytes(b"".join(lines))
    return damage


def _changed_duplicate(workdir):
    row = json.loads(_lines(workdir)[5])
    _append(workdir, (json.dumps({**row, "prediction": "other"}, sort_keys=True) + "\n").encode())


def _row_without(key):
    def damage(workdir):
        row = json.loads(_lines(workdir)[2])
        _corrupt(3, (json.dumps({k: v for k, v in row.items() if k != key}) + "\n").encode())(
            workdir)
    return damage


def _runs_json(text):
    def damage(workdir):
        (workdir / "runs.json").write_text(text)
    return damage


@pytest.mark.parametrize("damage,match", [
    pytest.param(_changed_duplicate, r"results.jsonl: lines 6 and 21 both hold run 'eval' id "
                                     r"'passkey/40/5', with different content",
                 id="error-conflicting-duplicate"),
    pytest.param(_corrupt(4, b'{"id": "\xff\xfe"}\n'), r"results.jsonl: line 4 is not UTF-8",
                 id="error-non-utf8-line"),
    pytest.param(_corrupt(7, b"not json\n"), r"results.jsonl: line 7 is not valid JSON",
                 id="error-not-json"),
    pytest.param(_corrupt(2, b"[1, 2]\n"), r"results.jsonl: line 2 is not a result row \(no 'id'\)",
                 id="error-not-an-object"),
    pytest.param(_row_without("task"), r"results.jsonl: line 3 is not a result row \('task' is "
                                       r"missing\)", id="error-row-without-task"),
    pytest.param(_row_without("score"), r"line 3 is not a result row \('score' is missing\)",
                 id="error-row-without-score"),
    pytest.param(_row_without("length"), r"line 3 is not a result row \('length' is missing\)",
                 id="error-row-without-length"),
    pytest.param(_runs_json("{garbage"), r"runs.json is unreadable \(Expecting",
                 id="error-corrupt-runs.json"),
    pytest.param(_runs_json(""), r"runs.json is unreadable", id="error-empty-runs.json"),
    pytest.param(_runs_json("[]"), r"runs.json is unreadable \(a JSON list",
                 id="error-runs.json-not-an-object"),
])
def test_unreadable_workdir_is_an_error_naming_file_and_line(killed, tmp_path, damage, match):
    workdir = tmp_path / "w"
    shutil.copytree(killed, workdir)
    damage(workdir)
    before = (workdir / "results.jsonl").read_bytes()
    with pytest.raises(ValueError, match=match):
        _eval(workdir)
    assert (workdir / "results.jsonl").read_bytes() == before  # nothing rewritten


def _record(**changes):
    return dataclasses.replace(RECORDS[0], **changes)


def _write(tmp, name, text):
    path = f"{tmp}/{name}"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


LIBRARY_ERRORS = [  # (id, call, message)
    ("EvalOptions.batch_size=0", lambda tmp: EvalOptions(batch_size=0),
     r"EvalOptions.batch_size=0; expected a positive int"),
    ("EvalOptions.pad_multiple=2.0", lambda tmp: EvalOptions(pad_multiple=2.0),
     r"EvalOptions.pad_multiple=2.0"),
    ("EvalOptions.batch_tokens=0", lambda tmp: EvalOptions(batch_tokens=0),
     r"EvalOptions.batch_tokens=0; expected None or an int >= 1"),
    ("EvalOptions.max_length=-1", lambda tmp: EvalOptions(max_length=-1),
     r"EvalOptions.max_length=-1"),
    ("EvalOptions.truncation", lambda tmp: EvalOptions(truncation="cut"),
     r"EvalOptions.truncation='cut'; expected one of"),
    ("EvalOptions.run=''", lambda tmp: EvalOptions(run=""), r"EvalOptions.run=''"),
    ("EvalOptions.run='a/b'", lambda tmp: EvalOptions(run="a/b"), r"without '/'"),
    ("Record.length=-1", lambda tmp: _record(length=-1), r"length=-1; expected an int >= 0"),
    ("Record.depth=1.5", lambda tmp: _record(depth=1.5), r"depth=1.5; expected None or a float"),
    ("Record.depth=nan", lambda tmp: _record(depth=float("nan")), r"depth=nan"),
    ("Record.max_new_tokens=0", lambda tmp: _record(max_new_tokens=0), r"max_new_tokens=0"),
    ("Record.answers", lambda tmp: _record(answers=(1,)), r"every answer must be a str"),
    ("Record.id", lambda tmp: _record(id=""), r"Record.id is empty"),
    ("evaluate duplicate record id", lambda tmp: _eval(tmp, records=[RECORDS[0], RECORDS[0]]),
     r"record id 'passkey/40/0' appears twice"),
    ("evaluate not a Record", lambda tmp: _eval(tmp, records=[{"id": "x"}]),
     r"records hold a dict; expected lcm.data.Record"),
    ("evaluate unknown metric", lambda tmp: _eval(tmp, records=[_record(metric="f1")]),
     r"metric='f1'; expected one of"),
    ("evaluate prompt too long", lambda tmp: _eval(tmp, records=[_record(prompt="ab " * 200)]),
     r"record 'passkey/40/0': \d+ prompt tokens .* usable length 256"),
    ("load_records missing file", lambda tmp: load_records(f"{tmp}/none.jsonl"),
     r"records file .*none.jsonl' does not exist"),
    ("load_records bad line", lambda tmp: load_records(_write(
        tmp, "r.jsonl", RECORDS[0].to_json() + "\n" + '{"id": "x"}\n')),
     r"r.jsonl: line 2"),
    ("read_results torn without repair", lambda tmp: read_results(_write(
        tmp, "t.jsonl", '{"id": "a"')), r"t.jsonl: line 1 is incomplete \(a killed run\?\)"),
    ("summarize mixed metrics", lambda tmp: summarize([
        {"id": "a", "task": "t", "length": 1, "metric": "exact_match", "score": 0.0,
         "prediction": ""},
        {"id": "b", "task": "t", "length": 1, "metric": "string_match_all", "score": 0.0,
         "prediction": ""}]), r"task='t' length=1: samples use metrics"),
]


@pytest.mark.parametrize("call,match", [
    pytest.param(call, match, id=f"error-{name}") for name, call, match in LIBRARY_ERRORS])
def test_library_errors_name_the_argument_or_file(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(str(tmp_path))


@pytest.mark.parametrize("call", [
    pytest.param(lambda: EvalOptions(batch_size=np.int64(4), pad_multiple=np.int64(32),
                                     batch_tokens=np.int64(512), max_length=np.int64(256)),
                 id="ok-EvalOptions-numpy-ints"),
    pytest.param(lambda: Record.from_json(_record(length=np.int64(40), depth=np.float32(0.5),
                                                  max_new_tokens=np.int64(4)).to_json()),
                 id="ok-Record-numpy-scalars-round-trip"),
])
def test_numpy_scalars_are_accepted(call):
    value = call()
    if isinstance(value, EvalOptions):
        assert value.batch_size == 4 and type(value.batch_size) is int
    else:
        assert value.length == 40 and type(value.length) is int and value.depth == 0.5


def test_error_nan_params_stop_the_evaluation_before_any_work(tmp_path):
    """Greedy decoding would turn NaN logits into token 0: NaN weights are refused by name
    before anything runs, and a shared prefill that still gives NaN logits (finite weights
    that overflow) stops the run with the rows named, before results are written."""
    import jax

    from lcm.eval.generation import check_finite_logits
    from lcm.model import init_params
    params = init_params(CFG, jax.random.key(0))[0]
    bad = {**params, "final_norm": params["final_norm"].at[3].set(np.float32("nan"))}
    records = [r for r in _records() if r.length == 40][:4]
    with pytest.raises(ValueError, match=r"params\['final_norm'\] \(shape \(16,\)\) holds NaN"):
        evaluate(bad, CFG, records, TOK, str(tmp_path / "w"), options=OPTIONS)
    assert not (tmp_path / "w").exists()
    logits = np.zeros((3, 48), np.float32)
    check_finite_logits(logits, "the prefill")
    logits[1, 5] = np.inf
    with pytest.raises(FloatingPointError, match=r"the prefill gave NaN or infinite logits for "
                                                  r"rows \[1\]"):
        check_finite_logits(logits, "the prefill")
