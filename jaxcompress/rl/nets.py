"""What the PPO and DDPG agents share: the Q(s, a) critic network, the actor-critic
state with target copies (TD3 / DDPG target networks), Polyak averaging and one Adam
step on a loss."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct


class Critic(nn.Module):
    """Q(s, a): `layers` x Dense(hidden)-relu on [s, a], then Dense(1)."""

    hidden: int
    layers: int = 1

    @nn.compact
    def __call__(self, obs, action):
        h = jnp.concatenate([obs, action[..., None]], axis=-1)
        for i in range(self.layers):
            h = nn.relu(nn.Dense(self.hidden, name=f"hidden{i}")(h))
        return nn.Dense(1, name="out")(h)[..., 0]


class ActorCriticState(struct.PyTreeNode):
    actor: dict
    critic: dict
    target_actor: dict
    target_critic: dict
    actor_opt: optax.OptState
    critic_opt: optax.OptState


class ActorCritic:
    """Base of the agents: an actor and a critic network, their Adam optimizers and
    target copies. Subclasses set `config` (with `tau`) and `obs_dim`."""

    def __init__(self, obs_dim: int, actor_net: nn.Module, critic_net: nn.Module, actor_lr: float,
                 critic_lr: float):
        self.obs_dim = obs_dim
        self.actor_net, self.critic_net = actor_net, critic_net
        self.actor_tx, self.critic_tx = optax.adam(actor_lr), optax.adam(critic_lr)

    def init_networks(self, key) -> dict:
        """Fresh actor and critic, targets equal to them, Adam states: the
        `ActorCriticState` fields."""
        k1, k2 = jax.random.split(key)
        obs = jnp.zeros((1, self.obs_dim))
        actor = self.actor_net.init(k1, obs)
        critic = self.critic_net.init(k2, obs, jnp.zeros((1,)))
        return dict(actor=actor, critic=critic, target_actor=actor, target_critic=critic,
                    actor_opt=self.actor_tx.init(actor), critic_opt=self.critic_tx.init(critic))

    def polyak(self, state):
        """theta' <- tau theta + (1 - tau) theta' for the target actor and critic."""
        tau = self.config.tau
        return state.replace(target_actor=optax.incremental_update(state.actor, state.target_actor, tau),
                             target_critic=optax.incremental_update(state.critic, state.target_critic, tau))


def adam_step(tx: optax.GradientTransformation, loss_fn: Callable, params, opt_state, *args, has_aux=False):
    """One optimizer step on `loss_fn(params, *args)`: `(params, opt_state, loss or (loss, aux))`."""
    out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, out
