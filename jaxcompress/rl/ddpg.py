"""DDPG as used by AMC (He et al. 2018, Sec. 3.4) and HAQ (Wang et al. 2019): the baseline.

Same environment, same normalised action space [0, 1] as `jaxcompress.rl.ppo`, so
the comparison is fair. AMC's settings are the defaults: actor and critic with two
hidden layers of 300 units, Adam with learning rates 1e-4 (actor) and 1e-3
(critic), tau = 0.01, discount 1, batch 64, `warmup_episodes` of uniformly random
actions before any update, then truncated-normal exploration around the actor's
action (truncated to [0, 1]) with sigma 0.5 decaying by 0.95 per episode. Every
transition of an episode is stored with the episode's final reward (AMC's
`agent.observe(final_reward, ...)`); each update subtracts a moving average of the
sampled batch's mean reward, b <- b + alpha (mean r - b) (AMC's `moving_alpha` =
0.5), and the critic regresses on y = (r - b) + gamma (1 - done) Q'(s', mu'(s')).
After warm-up, `updates_per_episode` updates are made per episode (default one
per step, as AMC).

The replay buffer is a fixed-size ring buffer of jnp arrays inside the agent state
(hand-written: no library keeps one in a jittable pytree), so a whole search
iteration, acting, storing and updating, stays one XLA program.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxcompress.errors import ConfigError
from jaxcompress.rl.nets import ActorCritic, ActorCriticState, Critic, adam_step


@dataclasses.dataclass(frozen=True)
class DDPGConfig:
    hidden: int = 300
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    tau: float = 0.01
    discount: float = 1.0
    batch_size: int = 64
    warmup_episodes: int = 100
    sigma: float = 0.5
    sigma_decay: float = 0.95
    buffer_size: int = 2000  # transitions
    moving_alpha: float = 0.5
    updates_per_episode: int = 0  # 0: one update per step of the episode (AMC)

    def __post_init__(self):
        if not 0.0 < self.tau <= 1.0:
            raise ConfigError(f"search.ddpg.tau={self.tau:g} must be in (0, 1]")
        if self.batch_size < 1 or self.buffer_size < 1 or self.warmup_episodes < 0:
            raise ConfigError("search.ddpg.batch_size and buffer_size must be >= 1, warmup_episodes >= 0")


class DeterministicActor(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, obs):
        h = nn.relu(nn.Dense(self.hidden, name="hidden0")(obs))
        h = nn.relu(nn.Dense(self.hidden, name="hidden1")(h))
        return nn.sigmoid(nn.Dense(1, name="out")(h))[..., 0]


class ReplayBuffer(struct.PyTreeNode):
    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array
    done: jax.Array
    position: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, capacity: int, obs_dim: int) -> "ReplayBuffer":
        z = lambda *s: jnp.zeros(s, jnp.float32)
        return cls(obs=z(capacity, obs_dim), action=z(capacity), reward=z(capacity), next_obs=z(capacity, obs_dim),
                   done=z(capacity), position=jnp.zeros((), jnp.int32), count=jnp.zeros((), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.action.shape[0]

    def add(self, obs, action, reward, next_obs, done) -> "ReplayBuffer":
        """Writes a batch of B transitions at the ring position (overwriting the oldest)."""
        B = action.shape[0]
        idx = (self.position + jnp.arange(B)) % self.capacity
        return self.replace(obs=self.obs.at[idx].set(obs), action=self.action.at[idx].set(action),
                            reward=self.reward.at[idx].set(reward), next_obs=self.next_obs.at[idx].set(next_obs),
                            done=self.done.at[idx].set(done), position=(self.position + B) % self.capacity,
                            count=jnp.minimum(self.count + B, self.capacity))

    def sample(self, key, batch_size: int) -> dict:
        idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(self.count, 1))
        return dict(obs=self.obs[idx], action=self.action[idx], reward=self.reward[idx],
                    next_obs=self.next_obs[idx], done=self.done[idx])


class DDPGState(ActorCriticState):
    buffer: ReplayBuffer
    moving_average: jax.Array
    baseline_ready: jax.Array


class DDPG(ActorCritic):
    """The agent: static config + pure functions of a `DDPGState`."""

    name = "ddpg"

    def __init__(self, config: DDPGConfig, obs_dim: int, num_steps: int):
        self.config = config
        self.num_steps = num_steps
        super().__init__(obs_dim, DeterministicActor(config.hidden), Critic(config.hidden, layers=2),
                         config.actor_lr, config.critic_lr)

    def init(self, key) -> DDPGState:
        return DDPGState(**self.init_networks(key), buffer=ReplayBuffer.create(self.config.buffer_size, self.obs_dim),
                         moving_average=jnp.zeros((), jnp.float32), baseline_ready=jnp.zeros((), bool))

    def greedy(self, actor_params, obs):
        return self.actor_net.apply(actor_params, obs)

    def sigma(self, episode):
        c = self.config
        return c.sigma * c.sigma_decay ** jnp.maximum(episode - c.warmup_episodes, 0).astype(jnp.float32)

    def act(self, state: DDPGState, obs, key, episode):
        """Uniform random during warm-up; then truncated-normal noise around mu(s) on [0, 1]."""
        c = self.config
        k1, k2 = jax.random.split(key)
        mu = self.greedy(state.actor, obs)
        sigma = jnp.maximum(self.sigma(episode), 1e-6)
        z = jax.random.truncated_normal(k1, (0.0 - mu) / sigma, (1.0 - mu) / sigma, jnp.shape(mu))
        explore = jnp.clip(mu + sigma * z, 0.0, 1.0)
        action = jnp.where(episode < c.warmup_episodes, jax.random.uniform(k2, jnp.shape(mu)), explore)
        return action, {}

    def _learn(self, state: DDPGState, key):
        c = self.config
        batch = state.buffer.sample(key, c.batch_size)
        mean_r = batch["reward"].mean()
        ma = jnp.where(state.baseline_ready, state.moving_average + c.moving_alpha * (mean_r - state.moving_average),
                       mean_r)
        reward = batch["reward"] - ma
        q_next = self.critic_net.apply(state.target_critic, batch["next_obs"],
                                       self.greedy(state.target_actor, batch["next_obs"]))
        target = jax.lax.stop_gradient(reward + c.discount * (1.0 - batch["done"]) * q_next)

        def critic_loss(p):
            return jnp.mean((self.critic_net.apply(p, batch["obs"], batch["action"]) - target) ** 2)

        critic, critic_opt, closs = adam_step(self.critic_tx, critic_loss, state.critic, state.critic_opt)

        def actor_loss(p):
            return -jnp.mean(self.critic_net.apply(critic, batch["obs"], self.greedy(p, batch["obs"])))

        actor, actor_opt, aloss = adam_step(self.actor_tx, actor_loss, state.actor, state.actor_opt)
        state = state.replace(actor=actor, critic=critic, actor_opt=actor_opt, critic_opt=critic_opt,
                              moving_average=ma, baseline_ready=jnp.ones((), bool))
        return self.polyak(state), (closs, aloss)

    def update(self, state: DDPGState, batch, key, episode):
        """Stores the N x T transitions (reward = the episode's final reward), then, once
        `episode` (episodes finished after this batch) passes the warm-up, learns."""
        c = self.config
        final = batch["episode_reward"]
        state = state.replace(buffer=state.buffer.add(batch["obs"], batch["action"], final, batch["next_obs"],
                                                      batch["done"]))
        num_episodes = batch["action"].shape[0] // self.num_steps
        n = (c.updates_per_episode or self.num_steps) * num_episodes

        def learn(state):
            def body(s, k):
                return self._learn(s, k)
            state, (closs, aloss) = jax.lax.scan(body, state, jax.random.split(key, n))
            return state, (closs[-1], aloss[-1])

        def skip(state):
            return state, (jnp.zeros(()), jnp.zeros(()))

        state, (closs, aloss) = jax.lax.cond(episode >= c.warmup_episodes, learn, skip, state)
        return state, dict(critic_loss=closs, actor_loss=aloss, sigma=self.sigma(episode),
                           baseline=state.moving_average)
