"""The optimizer: AdamW on a warmup-cosine schedule with global-norm gradient clipping."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with linear warmup to `learning_rate`, then cosine decay to
    `learning_rate * end_ratio` at `total_steps`; gradients clipped to global norm
    `clip_norm` (None: no clipping) before the update.

    `accumulation_steps` microbatches make one step: the step's batch is split along its
    leading axis and their gradients averaged (see `lcm.train.train_step`), so a step sees
    the same tokens with less activation memory.
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    end_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    accumulation_steps: int = 1

    def __post_init__(self):
        for name in ("learning_rate", "b1", "b2", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"OptimizerConfig.{name}={value!r}; expected a positive number")
        for name in ("b1", "b2"):
            if getattr(self, name) >= 1:
                raise ValueError(f"OptimizerConfig.{name}={getattr(self, name)!r}; expected a "
                                 f"number in (0, 1)")
        for name in ("warmup_steps", "total_steps", "accumulation_steps"):
            value = getattr(self, name)
            low = 0 if name == "warmup_steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"OptimizerConfig.{name}={value!r}; expected an int >= {low}")
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} >= total_steps="
                             f"{self.total_steps}; expected fewer warmup steps than total")
        if not 0 <= self.end_ratio <= 1:
            raise ValueError(f"OptimizerConfig.end_ratio={self.end_ratio!r}; expected [0, 1]")
        if not 0 <= self.weight_decay:
            raise ValueError(f"OptimizerConfig.weight_decay={self.weight_decay!r}; expected >= 0")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"OptimizerConfig.clip_norm={self.clip_norm!r}; expected a positive "
                             f"number or None")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """step -> learning rate: 0 -> peak over warmup_steps, cosine to peak * end_ratio."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps, end_value=cfg.learning_rate * cfg.end_ratio)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """The optax transformation for `cfg`. Weight decay skips vectors (norm scales, biases)."""
    if not isinstance(cfg, OptimizerConfig):
        raise ValueError(f"cfg={type(cfg).__name__}; expected an OptimizerConfig")

    def decay_mask(params):
        # Stacked per-layer vectors are [layers, embed]: decay only weights with >= 2 dims
        # beyond the layer axis, plus the [vocab, embed] embedding and the LM head.
        def keep(path, x):
            layered = any(getattr(k, "key", None) == "layers" for k in path)
            return x.ndim - int(layered) >= 2
        return jax.tree_util.tree_map_with_path(keep, params)

    parts = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
