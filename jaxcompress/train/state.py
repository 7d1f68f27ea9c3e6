"""TrainState: everything a training run carries from step to step."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

COLLECTIONS = ("params", "batch_stats", "masks", "quant")


class TrainState(struct.PyTreeNode):
    """Parameters, BatchNorm statistics, compression decisions, optimizer and RNG.

    `masks` and `quant` are carried (and checkpointed) with the parameters but are
    never differentiated: they are the data that describes the compressed network.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    masks: Any
    quant: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def variables(self, params=None) -> dict:
        """The `model.apply` variables dict (empty collections left out)."""
        out = {"params": self.params if params is None else params}
        for col in COLLECTIONS[1:]:
            tree = getattr(self, col)
            if tree:
                out[col] = tree
        return out


def create_train_state(model, tx: optax.GradientTransformation, input_shape, seed: int,
                       variables: dict | None = None) -> TrainState:
    """Initialises (or wraps given) variables; `input_shape` is (H, W, C)."""
    init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
    if variables is None:
        variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, *input_shape)), train=False))(init_rng)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), masks=variables.get("masks", {}),
                      quant=variables.get("quant", {}), opt_state=tx.init(params), rng=rng,
                      apply_fn=model.apply, tx=tx)
