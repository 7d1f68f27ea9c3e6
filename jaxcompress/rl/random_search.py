"""Random search: the baseline every learned agent has to beat (issue 16).

`RandomSearch` is an agent with the PPO / DDPG interface (`init`, `act`, `update`)
that ignores its observations: every action is drawn uniformly from the normalised
action space [0, 1], which the environment maps onto [a_min, a_max] (or
[b_min, b_max]) and then walls exactly as it walls a learned agent's action (AMC's
action wall, HAQ's back-off). So each episode is a feasible policy at the budget,
drawn by the environment's own `step`, and `run_search` scores the candidates with
the same in-graph evaluator, in the same jitted iterations of N actors, the same
number of them (`search.episodes`), and keeps the same best-candidate bookkeeping
and history as for the learned agents (`search.agent=random`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class RandomSearchConfig:
    """Nothing to tune; `discount` only keeps the iteration's returns defined."""

    discount: float = 1.0


class RandomSearchState(struct.PyTreeNode):
    draws: jax.Array  # actions drawn so far (a counter: the search state needs a pytree)


class RandomSearch:
    """Uniform random actions in [0, 1]; no learning (`update` only counts)."""

    name = "random"

    def __init__(self, config: RandomSearchConfig | None = None):
        self.config = config or RandomSearchConfig()

    def init(self, key) -> RandomSearchState:
        del key
        return RandomSearchState(draws=jnp.zeros((), jnp.int32))

    def act(self, state: RandomSearchState, obs, key, episode=None):
        del state, obs, episode
        return jax.random.uniform(key, (), jnp.float32), {}

    def update(self, state: RandomSearchState, batch, key, episode=None):
        del key, episode
        return state.replace(draws=state.draws + batch["action"].shape[0]), {}
