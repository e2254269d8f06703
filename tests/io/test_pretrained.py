"""`lcm.io.load_pretrained` (a checkpoint by name or path) and the main job on a Gemma 3
checkpoint given by path."""

from __future__ import annotations

import shutil
import string

import numpy as np
import pytest
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from lcm.data.tokenizers import HFTokenizer
from lcm.io import load_hf_checkpoint, load_pretrained
from tests.io.test_hf import FIXTURES


def char_tokenizer(path, vocab_size: int) -> None:
    """A character-level tokenizer.json of exactly `vocab_size` ids (made with `tokenizers`)."""
    chars = ["[UNK]"] + list(string.digits + string.ascii_letters + " .,:;?!'\"-\n()")
    vocab = (chars + [f"<extra_{i}>" for i in range(vocab_size)])[:vocab_size]
    tk = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(vocab)},
                                               unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tk.decoder = decoders.Fuse()
    tk.save(str(path))


@pytest.fixture
def gemma3_with_tokenizer(tmp_path):
    path = tmp_path / "gemma3"
    shutil.copytree(FIXTURES / "gemma3", path)
    char_tokenizer(path / "tokenizer.json", 96)
    (path / "tokenizer_config.json").write_text('{"eos_token": {"content": "\\n"}}')
    return path


def test_a_checkpoint_directory_loads_with_its_tokenizer(gemma3_with_tokenizer):
    cfg, params, tokenizer = load_pretrained(str(gemma3_with_tokenizer))
    want_cfg, want = load_hf_checkpoint(FIXTURES / "gemma3")
    assert cfg == want_cfg
    np.testing.assert_array_equal(params["embed"], want["embed"])
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.decode(tokenizer.encode("key 12345.")) == "key 12345."
    assert tokenizer.eos_id == tokenizer.encode("\n")[0]
    assert load_pretrained(FIXTURES / "gemma3")[2] is None  # no tokenizer.json: None


@pytest.mark.parametrize("spec, match", [("llama", "neither 'smollm2'"), (3, "expected")])
def test_bad_model_names_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        load_pretrained(spec)


@pytest.mark.slow
def test_the_main_job_runs_a_gemma3_checkpoint_given_by_path(gemma3_with_tokenizer, tmp_path):
    from configs.longctx_sweep import get_config
    from experiments import longctx_sweep

    config = get_config()
    config.model = str(gemma3_with_tokenizer)
    config.tasks, config.extended_tasks = ("passkey",), ("passkey",)
    config.lengths, config.depths, config.long_depths = (320,), (0.5,), (0.5,)
    config.methods, config.extensions, config.extension_methods = ("full", "snapkv"), ("yarn",), (
        "full",)
    config.long_from, config.extended_lengths = 1536, (1536,)
    config.batch_size, config.progress = 1, False
    summary = longctx_sweep.run(config, str(tmp_path / "work"))
    cells = {(c["run"], c["task"], c["length"]) for c in summary["cells"]}
    assert cells == {("native-full", "passkey", 320), ("native-snapkv", "passkey", 320),
                     ("yarn-full", "passkey", 1536)}
    assert summary["sweep"]["model"] == str(gemma3_with_tokenizer)
