"""Knorm (Devoto et al. 2024): keeps the keys of smallest L2 norm."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcm.cache.presses.base import ScorerPress, f32, finish, register


@register
@dataclasses.dataclass(frozen=True)
class Knorm(ScorerPress):
    """Keeps the keys of smallest L2 norm: score -||k||."""

    def score(self, *, keys, valid, **_):
        return finish(-jnp.sqrt(jnp.sum(jnp.square(keys.astype(f32)), axis=-1)), valid, False)
