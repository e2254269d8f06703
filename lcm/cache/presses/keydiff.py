"""KeyDiff (arXiv 2504.15364, kvpress's KeyDiffPress): keeps the keys least like the others."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcm.cache.presses.base import ScorerPress, f32, finish, register


@register
@dataclasses.dataclass(frozen=True)
class KeyDiff(ScorerPress):
    """Per kv head, the anchor is the mean of the unit-normalised (rotated) keys; each key
    scores minus its cosine similarity to it. kvpress's single-shot version."""

    def score(self, *, keys, valid, **_):
        k = keys.astype(f32)
        unit = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
        count = jnp.maximum(valid.sum(-1, keepdims=True), 1).astype(f32)[..., None]
        anchor = jnp.where(valid[..., None], unit, 0.0).sum(2, keepdims=True) / count
        cos = (unit * anchor).sum(-1) / jnp.maximum(jnp.linalg.norm(anchor, axis=-1), 1e-8)
        return finish(-cos, valid, False)
