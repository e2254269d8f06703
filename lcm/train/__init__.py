"""Training: an Optax train step over the (sharded) functional decoder, Orbax checkpoints of the
state and the data position, metrics files and a resumable loop."""

from lcm.train.checkpoint import Checkpointer
from lcm.train.loop import fit, resume
from lcm.train.metrics import MetricsWriter
from lcm.train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from lcm.train.step import (
                            TrainState,
                            batch_sharding,
                            init_train_state,
                            lm_loss,
                            make_train_step,
                            state_shardings,
                            target_weights,
                            train_step,
)

__all__ = ["OptimizerConfig", "make_optimizer", "learning_rate_schedule", "TrainState",
           "init_train_state", "lm_loss", "target_weights", "train_step", "make_train_step",
           "state_shardings", "batch_sharding", "Checkpointer", "MetricsWriter", "fit", "resume"]
