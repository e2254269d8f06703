"""The bad-input catalogue of lcm.train and experiments/train.py: every case a row with what it
must do (`error`: a ValueError whose message matches, naming the field or file; `ok`: a correct
result; `fallback`: a correct result after a warning naming the file), and the corrupt-checkpoint
matrix (the latest checkpoint damaged -> resume from the one before, ending with exactly the
uninterrupted run's parameters and metrics). The case ids start with the kind, so
`pytest --collect-only -q tests/train/test_train_bad_inputs.py | grep -c '\\[error-'` counts them
(docs/reliability.md).

Training here is a toy (a 4x4 linear map fitted by AdamW) through the real fit / resume /
Checkpointer / MetricsWriter, so the matrix costs orbax saves, not model compiles.
"""

import glob
import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import train as train_experiment
from experiments.run import load_config_file
from lcm.data.packing import packed_batches, synthetic_documents
from lcm.train import (Checkpointer, MetricsWriter, OptimizerConfig, fit, init_train_state,
                       make_optimizer, resume)
from lcm.train.checkpoint import MANIFEST
from lcm.train.step import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_STEPS, EVERY = 8, 3  # checkpoints at 3, 6, 8; keep=2 leaves 6 and 8
OPT = make_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=1, total_steps=NUM_STEPS))


def _loss(params, x):
    return jnp.mean((x @ params["w"] - jnp.roll(x, 1, axis=-1)) ** 2)


@jax.jit
def _step(state, x):
    loss, grads = jax.value_and_grad(_loss)(state.params, x)
    updates, opt_state = OPT.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), {"loss": loss}


def _data(poison=None):
    """Batch i is a 4x4 sine pattern; batch `poison` holds a NaN."""
    def batch(i):
        x = np.sin(np.arange(16, dtype=np.float32).reshape(4, 4) + i)
        return np.where(i == poison, np.float32("nan"), x)
    return iter(grain.MapDataset.range(1000).map(batch).to_iter_dataset())


def _train(workdir, num_steps=NUM_STEPS, poison=None, **fit_options):
    """Runs (or resumes) the toy training in workdir; returns (params, metric rows, step
    resumed from)."""
    state = init_train_state({"w": jnp.zeros((4, 4), jnp.float32)}, OPT)
    data = _data(poison)
    writer = MetricsWriter(str(workdir))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=EVERY, keep=2)
    state = resume(checkpointer, state, data, writer)
    start = int(state.step)
    try:
        state = fit(_step, state, data, num_steps=num_steps, checkpointer=checkpointer,
                    writer=writer, **fit_options)
    finally:
        checkpointer.close()
    rows = [{k: v for k, v in r.items() if k != "step_seconds"} for r in writer.read()]
    return np.asarray(state.params["w"]), rows, start


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    params, rows, start = _train(workdir)
    assert start == 0 and sorted(os.listdir(workdir / "checkpoints")) == ["6", "8"]
    return workdir, params, rows


def _largest(path):
    files = [f for f in glob.glob(f"{path}/**", recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _overwrite_64_bytes(ckpt):
    path = _largest(f"{ckpt}/state")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    open(path, "wb").write(bytes(data))


def _truncate_array(ckpt):
    path = _largest(f"{ckpt}/state")
    os.truncate(path, os.path.getsize(path) // 2)


def _empty_state_metadata(ckpt):
    open(f"{ckpt}/state/_METADATA", "w").close()


def _garbage_data_metadata(ckpt):
    open(f"{ckpt}/data/metadata", "w").write("garbage{")


def _empty_directory(ckpt):
    shutil.rmtree(ckpt)
    os.makedirs(ckpt)


def _missing_array_file(ckpt):
    os.remove(_largest(f"{ckpt}/state"))


def _garbage_manifest(ckpt):
    open(f"{ckpt}/{MANIFEST}", "w").write("{not json")


def _truncated_without_manifest(ckpt):  # a checkpoint of an older lcm: Orbax's own error
    os.remove(f"{ckpt}/{MANIFEST}")
    _truncate_array(ckpt)


@pytest.mark.parametrize("damage,why", [
    pytest.param(_overwrite_64_bytes, "does not match its SHA-256", id="fallback-overwritten"),
    pytest.param(_truncate_array, r"has \d+ bytes, expected \d+", id="fallback-truncated-array"),
    pytest.param(_empty_state_metadata, r"_METADATA has 0 bytes", id="fallback-empty-METADATA"),
    pytest.param(_garbage_data_metadata, r"data/metadata has 8 bytes",
                 id="fallback-garbage-data-metadata"),
    pytest.param(_empty_directory, "the directory is empty", id="fallback-empty-checkpoint-dir"),
    pytest.param(_missing_array_file, "is missing", id="fallback-missing-array-file"),
    pytest.param(_garbage_manifest, f"{MANIFEST} is unreadable", id="fallback-garbage-manifest"),
    pytest.param(_truncated_without_manifest, r"Error", id="fallback-truncated-no-manifest"),
])
def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(straight, tmp_path, damage,
                                                                 why):
    workdir, want_params, want_rows = straight
    shutil.copytree(workdir, tmp_path / "w")
    ckpt = str(tmp_path / "w" / "checkpoints" / "8")
    damage(ckpt)
    with pytest.warns(UserWarning, match=rf"checkpoint {ckpt} (is corrupt or incomplete|cannot "
                                         rf"be restored) \(.*{why}"):
        params, rows, start = _train(tmp_path / "w")
    assert start == 6
    np.testing.assert_array_equal(params, want_params)  # bit for bit
    assert rows == want_rows
    assert os.path.isdir(f"{ckpt}.corrupt")  # set aside; step 8 was saved anew and verifies
    assert Checkpointer(tmp_path / "w" / "checkpoints", every_steps=EVERY).verify(8) is None


def test_error_no_intact_checkpoint_names_each(straight, tmp_path):
    shutil.copytree(straight[0], tmp_path / "w")
    for step in ("6", "8"):
        _overwrite_64_bytes(str(tmp_path / "w" / "checkpoints" / step))
    with pytest.warns(UserWarning), pytest.raises(
            ValueError, match=r"no intact checkpoint under .*checkpoints/8: .*SHA-256.*"
                              r"checkpoints/6: .*SHA-256"):
        _train(tmp_path / "w")
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["6", "8"]  # nothing moved


def test_fallback_torn_last_metrics_row_is_dropped(straight, tmp_path):
    workdir, want_params, want_rows = straight
    shutil.copytree(workdir, tmp_path / "w")
    shutil.rmtree(tmp_path / "w" / "checkpoints" / "8")  # killed writing row 8, before its save
    path = tmp_path / "w" / "metrics.csv"
    path.write_text(path.read_text()[:-12])
    with pytest.warns(UserWarning, match=r"metrics.csv: line 9 is incomplete"):
        params, rows, start = _train(tmp_path / "w")
    assert start == 6 and rows == want_rows
    np.testing.assert_array_equal(params, want_params)


def _tiny_config(**changes):
    config = load_config_file(os.path.join(ROOT, "configs", "train_tiny.py"))
    for name, value in changes.items():
        node = config
        *groups, last = name.split(".")
        for g in groups:
            node = node[g]
        node[last] = value
    return config


def _metrics_file(directory, text):
    path = os.path.join(directory, "metrics.csv")
    os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())
    return MetricsWriter(directory).read


CONFIG_ERRORS = [  # (field, value, message)
    ("optimizer.learning_rate", float("nan"), r"OptimizerConfig.learning_rate=nan; expected a "
                                              r"number in \(0"),
    ("optimizer.learning_rate", 0.0, r"OptimizerConfig.learning_rate=0.0"),
    ("optimizer.learning_rate", float("inf"), r"OptimizerConfig.learning_rate=inf"),
    ("optimizer.warmup_steps", 500, r"OptimizerConfig.warmup_steps=500 >= total_steps=200"),
    ("optimizer.warmup_steps", -1, r"OptimizerConfig.warmup_steps=-1"),
    ("optimizer.end_ratio", 2.0, r"OptimizerConfig.end_ratio=2.0; expected a number in \[0, 1\]"),
    ("optimizer.weight_decay", float("nan"), r"OptimizerConfig.weight_decay=nan"),
    ("optimizer.clip_norm", 0.0, r"OptimizerConfig.clip_norm=0.0"),
    ("optimizer.accumulation_steps", 0, r"OptimizerConfig.accumulation_steps=0"),
    ("log_every", 0, r"config.log_every=0; expected a positive int"),
    ("num_steps", 0, r"config.num_steps=0"),
    ("checkpoint_every", 0, r"config.checkpoint_every=0"),
    ("keep_checkpoints", 0, r"config.keep_checkpoints=0"),
    ("seed", -1, r"config.seed=-1"),
    ("data.seq_len", 0, r"config.data.seq_len=0"),
    ("data.batch_size", 0, r"config.data.batch_size=0"),
    ("data.min_length", 200, r"config.data.min_length=200 > max_length=96"),
    ("data.num_packing_bins", 0, r"config.data.num_packing_bins=0"),
]


@pytest.mark.parametrize("field,value,match", [
    pytest.param(*case, id=f"error-config.{case[0]}={case[1]}") for case in CONFIG_ERRORS])
def test_config_errors_come_before_any_work(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        train_experiment.run(_tiny_config(**{field: value}), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # nothing built, nothing written


def test_error_token_ids_past_the_model_vocabulary_stop_training_before_the_first_step(tmp_path):
    """A byte tokenizer (ids up to 258) with a 64-token model: inside jit the ids would be
    clamped silently; the runner checks each batch on the host and stops at the first."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "long context " * 20}) + "\n"
                            for _ in range(8)))
    config = _tiny_config(**{"data.source": str(docs), "model.vocab_size": 64})
    with pytest.raises(ValueError, match=r"the data's tokens holds id \d+; expected ids in "
                                         r"\[0, 64\) \(cfg.vocab_size=64\)"):
        train_experiment.run(config, str(tmp_path / "w"))
    assert not glob.glob(str(tmp_path / "w" / "checkpoints" / "[0-9]*"))


def _optimizer(**changes):
    return OptimizerConfig(**{"learning_rate": 0.1, "warmup_steps": 1, "total_steps": 8,
                              **changes})


LIBRARY_ERRORS = [  # (id, call, message)
    ("OptimizerConfig.b2=1", lambda tmp: _optimizer(b2=1.0),
     r"OptimizerConfig.b2=1.0; expected a number in \(0, 1\)"),
    ("OptimizerConfig.eps=-1", lambda tmp: _optimizer(eps=-1.0), r"OptimizerConfig.eps=-1.0"),
    ("OptimizerConfig.total_steps=2.5", lambda tmp: _optimizer(total_steps=2.5),
     r"OptimizerConfig.total_steps=2.5; expected a positive int"),
    ("Checkpointer.every_steps=0", lambda tmp: Checkpointer(tmp, every_steps=0),
     r"every_steps=0; expected a positive int"),
    ("Checkpointer.keep=0", lambda tmp: Checkpointer(tmp, every_steps=1, keep=0),
     r"keep=0; expected a positive int"),
    ("fit.log_every=0", lambda tmp: fit(_step, None, iter(()), num_steps=1, log_every=0),
     r"log_every=0; expected a positive int"),
    ("fit.num_steps=-1", lambda tmp: fit(_step, None, iter(()), num_steps=-1),
     r"num_steps=-1"),
    ("packed_batches.seq_len=0", lambda tmp: packed_batches(
        synthetic_documents(0, vocab_size=8), seq_len=0, batch_size=1),
     r"seq_len=0; expected a positive int"),
    ("config.model.unknown", lambda tmp: train_experiment.model_config(
        _tiny_config(**{"model.widht": 3})), r"config.model has unknown fields \['widht'\]"),
    ("config.init", lambda tmp: train_experiment.load_model(
        _tiny_config(init="llama"), jax.random.key(0)), r"config.init='llama'; expected"),
    ("metrics.csv torn middle row", lambda tmp: _metrics_file(
        tmp, "step,loss\n1,0.5\n2,0.\n3\n4,0.25\n")(),
     r"metrics.csv: line 4 is not a metrics row \(1 values for 2 columns\)"),
    ("metrics.csv not a number", lambda tmp: _metrics_file(tmp, "step,loss\n1,abc\n2,0.5\n")(),
     r"metrics.csv: line 2 is not a metrics row"),
    ("metrics.csv no header", lambda tmp: _metrics_file(tmp, "1,0.5\n")(),
     r"metrics.csv: line 1 is '1,0.5'; expected a header"),
    ("metrics.csv not UTF-8", lambda tmp: _metrics_file(tmp, b"step,loss\n1,\xff\n")(),
     r"metrics.csv: not UTF-8"),
]


@pytest.mark.parametrize("call,match", [
    pytest.param(call, match, id=f"error-{name}") for name, call, match in LIBRARY_ERRORS])
def test_library_errors_name_the_argument_or_file(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(str(tmp_path))


@pytest.mark.parametrize("call", [
    pytest.param(lambda tmp: _optimizer(warmup_steps=np.int64(1), total_steps=np.int64(8),
                                        accumulation_steps=np.int64(1), learning_rate=
                                        np.float32(0.1)), id="ok-OptimizerConfig-numpy-scalars"),
    pytest.param(lambda tmp: Checkpointer(tmp, every_steps=np.int64(3), keep=np.int64(2)),
                 id="ok-Checkpointer-numpy-ints"),
    pytest.param(lambda tmp: packed_batches(synthetic_documents(0, vocab_size=8),
                                            seq_len=np.int64(8), batch_size=np.int64(2)),
                 id="ok-packed_batches-numpy-ints"),
    pytest.param(lambda tmp: train_experiment.check_config(_tiny_config()),
                 id="ok-train_tiny-config"),
])
def test_numpy_ints_and_good_configs_are_accepted(tmp_path, call):
    call(str(tmp_path / "c"))


def test_ok_fit_takes_numpy_ints(tmp_path):
    """ok: num_steps / log_every as NumPy ints train like Python ints."""
    params, rows, _ = _train(tmp_path, num_steps=np.int64(4), log_every=np.int64(2))
    assert [r["step"] for r in rows] == [2, 4]
    assert json.loads(json.dumps(rows))  # plain Python numbers in the rows


def test_error_nan_loss_stops_before_it_is_checkpointed(tmp_path):
    """error: batch 4 (step 5, not logged with log_every=4) holds a NaN: the run stops at the
    next checkpoint step, 6, naming it, before saving; the last checkpoint is the finite step 3."""
    with pytest.raises(FloatingPointError, match=r"step 6: loss is nan; stopped before this "
                                                 r"state is checkpointed"):
        _train(tmp_path, poison=4, log_every=4)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


# Orbax leaves its failed reads' coroutines unawaited (its noise, not an lcm failure).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_error_checkpoints_of_another_model_name_each(straight, tmp_path):
    """error: a state of another shape (the model changed) restores from no checkpoint; the
    error names each and says why, and nothing is renamed."""
    shutil.copytree(straight[0], tmp_path / "w")
    checkpointer = Checkpointer(tmp_path / "w" / "checkpoints", every_steps=EVERY)
    other = init_train_state({"w": jnp.zeros((5, 5), jnp.float32)}, OPT)
    with pytest.warns(UserWarning, match=r"checkpoints/8 cannot be restored"), pytest.raises(
            ValueError, match=r"no intact checkpoint .*checkpoints/8: .*checkpoints/6: .*if the "
                              r"model or optimizer changed"):
        checkpointer.restore_latest(other)
    checkpointer.close()
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["6", "8"]
