"""Optimisers and learning-rate schedules from a config (optax)."""
from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
# every field of a config / `Recipe` that `make_optimizer` reads (with the steps per epoch)
OPTIMIZER_FIELDS = ("optimizer", "learning_rate", "momentum", "nesterov", "weight_decay", "schedule", "num_epochs",
                    "warmup_epochs", "decay_epochs", "decay_factor")


def learning_rate_schedule(cfg, steps_per_epoch: int) -> optax.Schedule:
    """`cosine`: warm-up then cosine decay to 0; `step`: x`decay_factor` at each of
    `decay_epochs`; `constant`."""
    total = max(1, cfg.num_epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0 if warmup else cfg.learning_rate, cfg.learning_rate,
                                                  warmup, total)
    if cfg.schedule == "step":
        boundaries = {int(e * steps_per_epoch): cfg.decay_factor for e in cfg.decay_epochs}
        return optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
    return optax.constant_schedule(cfg.learning_rate)


def make_optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum or Adam/AdamW; weight decay on kernels only."""
    lr = learning_rate_schedule(cfg, steps_per_epoch)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    if cfg.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                           optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    if cfg.optimizer == "adam":
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask), optax.adam(lr))
    return optax.adamw(lr, weight_decay=cfg.weight_decay, mask=decay_mask)
