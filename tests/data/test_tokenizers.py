"""Tokenizers of lcm.data: bytes, a Hugging Face tokenizer.json, a model's own."""

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from lcm.data import ByteTokenizer, HFTokenizer, get_tokenizer
from lcm.data.tokenizers import pad_id, tokenizer_name


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "passkey 12345, 中文 ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # a cut multi-byte character
    with pytest.raises(ValueError, match="vocabulary"):
        tok.decode([300])
    with pytest.raises(ValueError, match="str"):
        tok.encode(b"bytes")


def _tiny_tokenizer_json(path):
    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<pad>", "</s>"])
    tk.train_from_iterator(["the grass is green the sky is blue"] * 20, trainer)
    tk.save(str(path))


def test_hf_tokenizer_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    _tiny_tokenizer_json(path)
    tok = HFTokenizer(path, eos_token="</s>")
    ids = tok.encode("the sky is green")
    assert tok.decode(ids).split() == ["the", "sky", "is", "green"]
    assert tok.eos_id == 2 and pad_id(tok) == 2
    assert tokenizer_name(tok).startswith("hf:tokenizer.json@")
    assert isinstance(get_tokenizer(str(path)), HFTokenizer)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFTokenizer(path, eos_token="<eos>")


def test_hf_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.json"):
        HFTokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        HFTokenizer(bad)


def test_get_tokenizer():
    assert isinstance(get_tokenizer("bytes"), ByteTokenizer)
    tok = ByteTokenizer()
    assert get_tokenizer(tok) is tok
    with pytest.raises(ValueError, match="tokenizer="):
        get_tokenizer(3)
