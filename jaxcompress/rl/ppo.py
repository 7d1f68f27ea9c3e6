"""PPO with the two-stage paper's four changes (Zhan, Lin, Cao 2021, Sec. 2.4, Eq. 2-3).

1. *Computation-constrained PPO*: no n-step advantages. A critic Q_phi(s, a) is
   trained by regression (Eq. 2), and the sampled Q-values Q_phi(s_t, a_t) of the
   minibatch replace the advantages in the policy loss. We normalise them per
   minibatch, A_t = (Q_t - mean Q) / (std Q + 1e-8) (*our choice*: the mean acts
   as a baseline, which does not bias the policy gradient, and the scale makes the
   step size independent of the reward's units).
2. *PPO-clip* (Eq. 3, Schulman et al. 2017): L = -E[min(r A, clip(r, 1-c, 1+c) A)],
   r = pi_theta(a|s) / pi_theta_old(a|s), c = 0.2 (`rlax.clipped_surrogate_pg_loss`).
3. *Smoothed policy update*: N parallel actors collect one minibatch under the old
   policy; `epochs` clipped steps are taken on it; target actor and critic track the
   learned ones by Polyak averaging, theta' <- tau theta + (1 - tau) theta'
   (`optax.incremental_update`).
4. *Target policy regularisation* (TD3, Fujimoto et al. 2018): the critic's target
   is y_t = r_t + gamma (1 - done_t) Q_phi'(s_{t+1}, a~), a~ = clip(mu_theta'(s_{t+1})
   + clip(eps, -noise_clip, noise_clip), 0, 1), eps ~ N(0, target_noise^2), in the
   normalised action space [0, 1]. `critic_target="return"` regresses on the
   observed Monte-Carlo returns instead.

Networks (paper: one hidden layer of 64 units, sigmoid output): the actor maps the
state through Dense(64)-tanh to the mean mu of a Gaussian over a pre-squash value
u; the action is sigmoid(u) in [0, 1] (the environment maps it onto [a_min, a_max]
or [b_min, b_max]); log std is a learned state-independent vector (`distrax.Normal`).
The ratio is computed on u, where the sigmoid's Jacobian cancels. `policy="beta"`
uses a Beta(1 + softplus, 1 + softplus) distribution over [0, 1] instead
(`distrax.Beta`). The critic is Dense(64)-relu-Dense(1) on [s, a]. Both are updated
with Adam on the full minibatch (N x T transitions).
"""
from __future__ import annotations

import dataclasses

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import rlax

from jaxcompress.errors import ConfigError
from jaxcompress.rl.nets import ActorCritic, ActorCriticState, Critic, adam_step

_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    hidden: int = 64
    actor_lr: float = 3e-3
    critic_lr: float = 1e-2
    clip: float = 0.2
    epochs: int = 4
    critic_epochs: int = 32
    tau: float = 0.05
    target_noise: float = 0.1
    noise_clip: float = 0.25
    discount: float = 1.0
    entropy_coef: float = 0.0
    init_std: float = 1.0
    policy: str = "gaussian"  # gaussian (sigmoid-squashed) | beta
    critic_target: str = "mix"  # mix | td (TD3 target, change 4) | return (observed Monte-Carlo returns)
    return_weight: float = 0.5  # mix: y = w * return + (1 - w) * TD3 target
    advantage: str = "q"  # q: normalised critic Q(s, a) (change 1) | return: normalised observed return
    baseline: str = "state"  # state: subtract Q(s, mu(s)) before normalising | mean: only the batch mean
    normalize_advantages: bool = True  # divide by the batch's standard deviation (False: centred values only)

    def __post_init__(self):
        if self.policy not in ("gaussian", "beta"):
            raise ConfigError(f"search.ppo.policy='{self.policy}' must be gaussian or beta")
        if self.critic_target not in ("mix", "td", "return"):
            raise ConfigError(f"search.ppo.critic_target='{self.critic_target}' must be mix, td or return")
        if not 0.0 <= self.return_weight <= 1.0:
            raise ConfigError(f"search.ppo.return_weight={self.return_weight:g} must be in [0, 1]")
        if self.baseline not in ("state", "mean"):
            raise ConfigError(f"search.ppo.baseline='{self.baseline}' must be state or mean")
        if self.advantage not in ("q", "return"):
            raise ConfigError(f"search.ppo.advantage='{self.advantage}' must be q or return")
        if not 0.0 < self.tau <= 1.0:
            raise ConfigError(f"search.ppo.tau={self.tau:g} must be in (0, 1]")
        if self.epochs < 1 or self.critic_epochs < 1 or self.hidden < 1:
            raise ConfigError("search.ppo.epochs, critic_epochs and hidden must be >= 1")


class Actor(nn.Module):
    hidden: int
    policy: str
    init_std: float

    @nn.compact
    def __call__(self, obs):
        h = nn.tanh(nn.Dense(self.hidden, name="hidden")(obs))
        if self.policy == "beta":
            out = nn.Dense(2, kernel_init=nn.initializers.variance_scaling(0.01, "fan_in", "normal"),
                           name="out")(h)
            return 1.0 + nn.softplus(out[..., 0]), 1.0 + nn.softplus(out[..., 1])
        mean = nn.Dense(1, kernel_init=nn.initializers.variance_scaling(0.01, "fan_in", "normal"), name="out")(h)
        log_std = self.param("log_std", nn.initializers.constant(jnp.log(self.init_std)), ())
        return mean[..., 0], jnp.broadcast_to(log_std, mean[..., 0].shape)


PPOState = ActorCriticState  # PPO keeps nothing besides the networks and their optimizers


class PPO(ActorCritic):
    """The agent: static config + pure functions of a `PPOState`."""

    name = "ppo"

    def __init__(self, config: PPOConfig, obs_dim: int):
        self.config = config
        super().__init__(obs_dim, Actor(config.hidden, config.policy, config.init_std), Critic(config.hidden),
                         config.actor_lr, config.critic_lr)

    def init(self, key) -> PPOState:
        return PPOState(**self.init_networks(key))

    # -- policy --------------------------------------------------------------------
    def distribution(self, actor_params, obs):
        a, b = self.actor_net.apply(actor_params, obs)
        if self.config.policy == "beta":
            return distrax.Beta(a, b)
        return distrax.Normal(a, jnp.exp(b))

    def squash(self, raw):
        return raw if self.config.policy == "beta" else jax.nn.sigmoid(raw)

    def log_prob(self, actor_params, obs, raw):
        return self.distribution(actor_params, obs).log_prob(raw)

    def act(self, state: PPOState, obs, key, episode=None):
        """Samples a normalised action in [0, 1] from the current policy; `aux` keeps
        what the update needs (the pre-squash sample and its log-probability)."""
        dist = self.distribution(state.actor, obs)
        raw = dist.sample(seed=key)
        if self.config.policy == "beta":
            raw = jnp.clip(raw, _EPS, 1.0 - _EPS)
        return self.squash(raw), {"raw": raw, "log_prob": dist.log_prob(raw)}

    def greedy(self, actor_params, obs):
        """Deterministic action of a policy (its mean, squashed)."""
        a, b = self.actor_net.apply(actor_params, obs)
        if self.config.policy == "beta":
            return a / (a + b)
        return jax.nn.sigmoid(a)

    # -- losses --------------------------------------------------------------------
    def critic_targets(self, state: PPOState, batch, key):
        c = self.config
        if c.critic_target == "return":
            return batch["return"]
        mu = self.greedy(state.target_actor, batch["next_obs"])
        eps = jnp.clip(c.target_noise * jax.random.normal(key, mu.shape), -c.noise_clip, c.noise_clip)
        a_next = jnp.clip(mu + eps, 0.0, 1.0)
        q_next = self.critic_net.apply(state.target_critic, batch["next_obs"], a_next)
        td = batch["reward"] + c.discount * (1.0 - batch["done"]) * q_next
        if c.critic_target == "td":
            return td
        return c.return_weight * batch["return"] + (1.0 - c.return_weight) * td

    def critic_loss(self, critic_params, batch, targets):
        q = self.critic_net.apply(critic_params, batch["obs"], batch["action"])
        return jnp.mean((q - targets) ** 2)

    def policy_loss(self, actor_params, batch, advantages):
        """Eq. 3: clipped surrogate with `advantages` (minus an optional entropy bonus)."""
        dist = self.distribution(actor_params, batch["obs"])
        ratio = jnp.exp(dist.log_prob(batch["raw"]) - batch["log_prob"])
        loss = rlax.clipped_surrogate_pg_loss(ratio, advantages, self.config.clip)
        if self.config.entropy_coef:
            loss = loss - self.config.entropy_coef * jnp.mean(dist.entropy())
        return loss, ratio

    def advantages(self, state: PPOState, batch):
        if self.config.advantage == "return":
            values = batch["return"]
        else:
            values = self.critic_net.apply(state.critic, batch["obs"], batch["action"])
        if self.config.baseline == "state":
            values = values - self.critic_net.apply(state.critic, batch["obs"], self.greedy(state.actor, batch["obs"]))
        values = jax.lax.stop_gradient(values)
        values = values - values.mean()
        return values / (values.std() + 1e-8) if self.config.normalize_advantages else values

    # -- update --------------------------------------------------------------------
    def update(self, state: PPOState, batch, key, episode=None):
        """One update on a minibatch of transitions (leaves with leading axis B).

        `batch`: obs, action (normalised), raw, log_prob (old policy), reward,
        next_obs, done, return. Critic: `epochs` Adam steps on Eq. 2 towards fixed
        targets; actor: `epochs` clipped steps (Eq. 3); then Polyak averaging.
        """
        c = self.config
        targets = jax.lax.stop_gradient(self.critic_targets(state, batch, key))

        def critic_step(carry, _):
            params, opt, loss = adam_step(self.critic_tx, self.critic_loss, *carry, batch, targets)
            return (params, opt), loss

        (critic, critic_opt), critic_losses = jax.lax.scan(critic_step, (state.critic, state.critic_opt),
                                                           None, c.critic_epochs)
        state = state.replace(critic=critic, critic_opt=critic_opt)
        adv = self.advantages(state, batch)

        def actor_step(carry, _):
            params, opt, (loss, ratio) = adam_step(self.actor_tx, self.policy_loss, *carry, batch, adv, has_aux=True)
            return (params, opt), (loss, jnp.mean(jnp.abs(ratio - 1.0) > c.clip))

        (actor, actor_opt), (actor_losses, clip_frac) = jax.lax.scan(actor_step, (state.actor, state.actor_opt),
                                                                    None, c.epochs)
        state = state.replace(actor=actor, actor_opt=actor_opt)
        state = self.polyak(state)
        metrics = dict(critic_loss=critic_losses[-1], actor_loss=actor_losses[-1], clip_fraction=clip_frac[-1])
        if c.policy == "gaussian":
            metrics["policy_std"] = jnp.exp(actor["params"]["log_std"])
        return state, metrics
