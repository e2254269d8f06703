"""The optimizer: AdamW on a warmup-cosine schedule with global-norm gradient clipping."""

from __future__ import annotations

import dataclasses

import jax
import optax

from lcm.checks import check_int, check_number


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
        for name in ("learning_rate", "eps"):
            check_number("OptimizerConfig", name, getattr(self, name), 0, lo_open=True)
        for name in ("b1", "b2"):
            check_number("OptimizerConfig", name, getattr(self, name), 0, 1, lo_open=True,
                         hi_open=True)
        check_int("OptimizerConfig", "warmup_steps", self.warmup_steps, 0)
        check_int("OptimizerConfig", "total_steps", self.total_steps, 1)
        check_int("OptimizerConfig", "accumulation_steps", self.accumulation_steps, 1)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} >= total_steps="
                             f"{self.total_steps}; expected fewer warmup steps than total")
        check_number("OptimizerConfig", "end_ratio", self.end_ratio, 0, 1)
        check_number("OptimizerConfig", "weight_decay", self.weight_decay, 0)
        if self.clip_norm is not None:
            check_number("OptimizerConfig", "clip_norm", self.clip_norm, 0, lo_open=True)


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
