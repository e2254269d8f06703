"""Every registered press through the machinery: registering a press tests it.

For each press in `lcm.cache.PRESSES` (its `example()` instance): prefill (budget respected,
kept positions sorted and within each row's prompt, deterministic, the same under `jit` with
traced lengths, batch rows independent), compress of a kept prefill (equal to prefill), a
decode step and generate; decode-time presses also decode under their budget.
"""

import ast
import dataclasses
import importlib
import pkgutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cache_entries

import lcm.cache.presses as presses_package
from lcm.cache import (PRESSES, Press, compress, decode_step, generate, prefill,
                       prefill_observed)
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import init_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
PARAMS = init_params(CFG, jax.random.key(0))[0]
TOKENS = jax.random.randint(jax.random.key(1), (2, 24), 0, CFG.vocab_size, dtype=jnp.int32)
LENGTHS = jnp.asarray([24, 15])
NEXT = jnp.asarray([3, 7], jnp.int32)
ROOM = 6


def _equal_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _kept(cache, layer, row):
    """Per head, the kept original positions in slot order."""
    return [list(h) for h in cache_entries(cache, layer, row)]


def test_every_press_class_is_registered():
    """A Press subclass defined in lcm.cache.presses but not registered would go untested."""
    found = set()
    for info in pkgutil.iter_modules(presses_package.__path__):
        module = importlib.import_module(f"lcm.cache.presses.{info.name}")
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and issubclass(obj, Press) and obj.__module__ ==
                    module.__name__ and not name.startswith("_")):
                found.add(name)
    abstract = {"Press", "ScorerPress", "WrapperPress", "CacheFormat"}
    assert found - abstract == set(PRESSES)


def test_nothing_in_the_cache_branches_on_a_press_class():
    """Outside a press's own module, lcm.cache never tests isinstance against a press class."""
    root = Path(presses_package.__path__[0]).parent  # lcm/cache
    names = set(PRESSES)
    offenders = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        own = {path.stem}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance"
                    and len(node.args) == 2):
                classes = node.args[1]
                elts = classes.elts if isinstance(classes, ast.Tuple) else [classes]
                for e in elts:
                    name = e.id if isinstance(e, ast.Name) else getattr(e, "attr", None)
                    if name in names and PRESSES[name].__module__.rsplit(".", 1)[1] not in own:
                        offenders.append(f"{path.name}:{node.lineno} isinstance(..., {name})")
    assert not offenders, offenders


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in PRESSES if PRESSES[n].runs_at_prefill))
def test_press_at_prefill(name):
    press = PRESSES[name].example()
    run = dict(policy=press, lengths=LENGTHS, max_new_tokens=ROOM)
    logits, cache = prefill(PARAMS, TOKENS, CFG, **run)
    assert np.isfinite(np.asarray(logits)).all()
    _equal_trees((logits, cache), prefill(PARAMS, TOKENS, CFG, **run))  # deterministic
    jitted = jax.jit(lambda t, n: prefill(PARAMS, t, CFG, policy=press, lengths=n,
                                          max_new_tokens=ROOM))(TOKENS, LENGTHS)
    np.testing.assert_allclose(jitted[0], logits, atol=1e-6, rtol=1e-6)
    alone_logits, alone = prefill(PARAMS, TOKENS[1:, :15], CFG, policy=press,
                                  max_new_tokens=ROOM)
    np.testing.assert_allclose(alone_logits[0], logits[1], atol=2e-5, rtol=2e-5)
    if not press.owns_cache:
        for layer in range(CFG.num_layers):
            assert _kept(cache, layer, 1) == _kept(alone, layer, 0)
            for row, length in enumerate(np.asarray(LENGTHS)):
                kept = _kept(cache, layer, row)
                budget = press.scorer.layer_budget(int(length), layer, CFG.num_layers)
                assert sum(map(len, kept)) <= len(kept) * min(budget, length), (layer, row)
                for head in kept:
                    assert head == sorted(head) and len(set(head)) == len(head)
                    assert all(0 <= p < length for p in head)
        # One prefill, compressed afterwards, keeps the same entries.
        _, full, obs = prefill_observed(PARAMS, TOKENS, CFG, [press], lengths=LENGTHS)
        small = compress(full, press, obs, CFG, max_new_tokens=ROOM)
        for layer in range(CFG.num_layers):
            for row in range(2):
                assert _kept(small, layer, row) == _kept(cache, layer, row)
    out, cache = decode_step(PARAMS, cache, NEXT, CFG)
    assert out.shape == (2, CFG.vocab_size) and np.isfinite(np.asarray(out)).all()
    tokens, count = generate(PARAMS, CFG, TOKENS, lengths=LENGTHS, max_new_tokens=3,
                             policy=press)
    assert tokens.shape == (2, 3) and np.all(np.asarray(count) == 3)
    assert np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < CFG.vocab_size))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in PRESSES if PRESSES[n].decode_kind))
def test_press_while_decoding(name):
    press = PRESSES[name].example()
    at_prefill = press if press.runs_at_prefill else None
    _, cache = prefill(PARAMS, TOKENS, CFG, policy=at_prefill, lengths=LENGTHS,
                       max_new_tokens=ROOM, layout="uniform")
    steps = 5
    tokens = NEXT
    for _ in range(steps):
        logits, cache = decode_step(PARAMS, cache, tokens, CFG, policy=press)
        assert np.isfinite(np.asarray(logits)).all()
        tokens = jnp.argmax(logits, -1).astype(jnp.int32)
        lengths = np.asarray(cache.length)
        if press.decode_kind == "stepwise":
            assert lengths.max() <= press.decode_budget()
        elif int(cache.step) == 0:  # just compressed
            assert lengths.max() <= press.kept_slots(cache.num_heads)
    out, count = generate(PARAMS, CFG, TOKENS, lengths=LENGTHS, max_new_tokens=4,
                          policy=at_prefill, decode_policy=press)
    again = generate(PARAMS, CFG, TOKENS, lengths=LENGTHS, max_new_tokens=4,
                     policy=at_prefill, decode_policy=press)
    _equal_trees((out, count), again)
    alone, _ = generate(PARAMS, CFG, TOKENS[1:, :15], max_new_tokens=4, policy=at_prefill,
                        decode_policy=press)
    np.testing.assert_array_equal(alone[0], out[1])


def test_presses_are_hashable_frozen_and_named():
    for name, cls in PRESSES.items():
        press = cls.example()
        hash(press)  # static under jit
        assert dataclasses.is_dataclass(press) and type(press).__name__ == name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(press, dataclasses.fields(press)[0].name, None)


def test_the_readme_press_runs_and_keeps_the_largest_values():
    """The docs' 'A new press' block (docs/kv-cache.md), run as written, a small model in scope."""
    text = (Path(__file__).parents[2] / "docs" / "kv-cache.md").read_text()
    block = text.split("A new press:\n\n```python\n", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) < 30
    scope = {"params": PARAMS, "prompts": TOKENS, "cfg": CFG}
    try:
        exec(compile(block, "docs/kv-cache.md", "exec"), scope)
        cache = scope["cache"]
        v = np.asarray(prefill(PARAMS, TOKENS, CFG)[1].v)  # every entry, [L, B, K, T, D]
        norms = np.linalg.norm(v, axis=-1)
        for layer in range(CFG.num_layers):
            for head, kept in enumerate(_kept(cache, layer, 0)):
                assert len(kept) == 12
                assert set(kept) == set(np.argsort(-norms[layer, 0, head])[:12].tolist())
    finally:
        PRESSES.pop("ValueNorm", None)  # registered by the block


@pytest.mark.parametrize("press,message", [
    (PRESSES["TOVA"](0.5), "needs a token budget"),
    (PRESSES["StreamingLLM"](0.5), "needs a token budget"),
    (PRESSES["SnapKV"](0.5), "expected Decoding"),
    (PRESSES["KIVI"](), "expected Decoding")], ids=lambda x: getattr(type(x), "__name__", x))
def test_generate_refuses_a_press_that_cannot_decode_before_tracing(press, message):
    with pytest.raises(ValueError, match=message):
        generate(PARAMS, CFG, TOKENS, lengths=LENGTHS, max_new_tokens=2, decode_policy=press)
    _, cache = prefill(PARAMS, TOKENS, CFG, lengths=LENGTHS, max_new_tokens=2, layout="uniform")
    with pytest.raises(ValueError, match=message):
        decode_step(PARAMS, cache, NEXT, CFG, policy=press)
