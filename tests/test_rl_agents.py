"""PPO and DDPG: the clipped loss by hand, Polyak targets, a bandit, rollouts, the search loop."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.rl import (DDPG, DDPGConfig, OBS_DIM, PPO, PPOConfig, PruneEnv, SearchDiverged, batched_rollout,
                            make_reward_fn, rollout, run_search)
from jaxcompress.rl.env import CompressionEnv, EnvState
from jaxcompress.rl.report import best_per_budget, pareto_front


class Bandit(CompressionEnv):
    """T steps, each observing its index; the 'accuracy' of an episode is
    1 - mean_t (a_t - target_t)^2 (actions in units [0, 1])."""

    kind = "bandit"

    def __init__(self, targets):
        self.targets = np.asarray(targets, np.float32)
        self.num_steps = T = len(targets)
        self.low, self.high = np.zeros(T, np.float32), np.ones(T, np.float32)
        self.static_obs = np.zeros((T, OBS_DIM - 2), np.float32)
        self.static_obs[:, 0] = np.arange(T) / max(T - 1, 1)

    def initial_values(self):
        return np.zeros(self.num_steps, np.float32)

    def reduced(self, values):
        return jnp.zeros(())

    def step(self, state, a_norm):
        a = self.to_units(state.t, a_norm)
        return EnvState(t=state.t + 1, values=state.values.at[state.t].set(a), actions=state.actions.at[state.t].set(a),
                        prev_action=a)

    def result(self, state):
        return dict(values=state.values, actions=state.actions, cost=jnp.zeros(()), cost_ratio=jnp.zeros(()))

    def accuracy(self, values, data):
        return 1.0 - jnp.mean((values - jnp.asarray(self.targets)) ** 2, axis=-1)


def test_ppo_clipped_loss_equals_hand_computation():
    agent = PPO(PPOConfig(clip=0.2), OBS_DIM)
    state = jax.jit(agent.init)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(6, OBS_DIM)).astype(np.float32)
    raw = rng.normal(size=6).astype(np.float32)
    mean, log_std = jax.jit(agent.actor_net.apply)(state.actor, obs)
    mean, std = np.asarray(mean, np.float64), np.exp(np.asarray(log_std, np.float64))
    logp_new = -0.5 * ((raw - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    ratio = np.array([0.5, 0.9, 1.0, 1.1, 1.5, 3.0])
    adv = np.array([1.0, -2.0, 0.5, 1.5, -1.0, 2.0])
    batch = dict(obs=obs, raw=raw, log_prob=(logp_new - np.log(ratio)).astype(np.float32))
    loss, got_ratio = jax.jit(agent.policy_loss)(state.actor, batch, jnp.asarray(adv, jnp.float32))
    expected = -np.mean(np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv))
    np.testing.assert_allclose(np.asarray(got_ratio), ratio, rtol=1e-5)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # 0.5*1 | min(-1.8, -1.8) | 0.5 | min(1.65, 1.65) | min(-1.5, -1.2) | min(6, 2.4)
    np.testing.assert_allclose(expected, -np.mean([0.5, -1.8, 0.5, 1.65, -1.5, 2.4]))


def _batch(T=3, N=4, seed=0):
    rng = np.random.default_rng(seed)
    B = N * T
    r = rng.random(N).astype(np.float32)
    return dict(obs=rng.normal(size=(B, OBS_DIM)).astype(np.float32), action=rng.random(B).astype(np.float32),
                raw=rng.normal(size=B).astype(np.float32), log_prob=-np.ones(B, np.float32),
                reward=np.where(np.arange(B) % T == T - 1, np.repeat(r, T), 0).astype(np.float32),
                next_obs=rng.normal(size=(B, OBS_DIM)).astype(np.float32),
                done=(np.arange(B) % T == T - 1).astype(np.float32), episode_reward=np.repeat(r, T),
                **{"return": np.repeat(r, T)})


@pytest.mark.parametrize("kind", ["ppo", "ddpg"])
def test_target_networks_move_by_tau(kind):
    if kind == "ppo":
        agent = PPO(PPOConfig(tau=0.05), OBS_DIM)
        tau = 0.05
    else:
        agent = DDPG(DDPGConfig(tau=0.01, warmup_episodes=0, updates_per_episode=1, hidden=16), OBS_DIM, 3)
        tau = 0.01
    state = jax.jit(agent.init)(jax.random.PRNGKey(1))
    # start the targets away from the online networks so the average is visible
    state = state.replace(target_actor=jax.tree.map(lambda x: x + 1.0, state.actor),
                          target_critic=jax.tree.map(lambda x: x - 1.0, state.critic))
    new, _ = jax.jit(agent.update)(state, _batch(N=1), jax.random.PRNGKey(2), jnp.asarray(5))
    chex.assert_trees_all_close(new.target_actor,
                                jax.tree.map(lambda n, o: tau * n + (1 - tau) * o, new.actor, state.target_actor),
                                atol=1e-6)
    chex.assert_trees_all_close(new.target_critic,
                                jax.tree.map(lambda n, o: tau * n + (1 - tau) * o, new.critic, state.target_critic),
                                atol=1e-6)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), new.actor, state.actor))
    assert max(float(m) for m in moved) > 0  # the online network did learn


def test_td3_target_uses_clipped_noise_on_target_action():
    agent = PPO(PPOConfig(target_noise=10.0, noise_clip=0.25, discount=0.5, critic_target="td"), OBS_DIM)
    state = agent.init(jax.random.PRNGKey(0))
    batch = _batch()
    y = agent.critic_targets(state, batch, jax.random.PRNGKey(3))
    mu = agent.greedy(state.target_actor, batch["next_obs"])
    lo = agent.critic_net.apply(state.target_critic, batch["next_obs"], jnp.clip(mu - 0.25, 0, 1))
    hi = agent.critic_net.apply(state.target_critic, batch["next_obs"], jnp.clip(mu + 0.25, 0, 1))
    q = (np.asarray(y) - batch["reward"]) / (0.5 * (1 - batch["done"]) + 1e-30)
    # noise of std 10 is clipped to +-0.25: every target is Q' at mu -/+ 0.25
    live = batch["done"] == 0
    assert np.all(np.isclose(q[live], np.asarray(lo)[live], atol=1e-5) | np.isclose(q[live], np.asarray(hi)[live],
                                                                                        atol=1e-5))
    np.testing.assert_allclose(np.asarray(y)[~live], batch["reward"][~live])


def test_ppo_finds_the_bandit_optimum():
    env = Bandit([0.7, 0.2])
    agent = PPO(PPOConfig(), OBS_DIM)  # the defaults: Q-advantages, clip, targets, target noise
    res = run_search(env, agent, env.accuracy, make_reward_fn("acc"), {}, num_actors=16, episodes=16 * 60, seed=0,
                     log_every=0)
    s, greedy = env.reset(), []
    for _ in range(env.num_steps):  # the learned deterministic policy, step by step
        greedy.append(float(agent.greedy(res.state.agent.actor, env.observe(s))))
        s = env.step(s, greedy[-1])
    np.testing.assert_allclose(greedy, [0.7, 0.2], atol=0.06)
    assert res.best["reward"] > 0.999
    first, last = np.mean(res.history["reward"][:64]), np.mean(res.history["reward"][-64:])
    assert last > first + 0.05


@pytest.mark.parametrize("kind", ["ppo", "ddpg"])
def test_vmapped_rollout_equals_single_rollouts(zoo, kind):
    env = PruneEnv(zoo.table("lenet5"), 0.4, 0.0, 0.9)
    agent = PPO(PPOConfig(), OBS_DIM) if kind == "ppo" else DDPG(DDPGConfig(warmup_episodes=2, hidden=32), OBS_DIM,
                                                                      env.num_steps)
    state = agent.init(jax.random.PRNGKey(0))
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    episodes = jnp.arange(5)  # DDPG: the first two explore uniformly (warm-up), the rest by truncated normal
    final, traj = jax.jit(lambda k, e: batched_rollout(env, agent, state, k, e))(keys, episodes)
    single = jax.jit(lambda k, e: rollout(env, agent, state, k, e))
    for n in range(5):
        f, t = single(keys[n], episodes[n])
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[n], (final, traj)), (f, t), atol=1e-6)
    assert len({tuple(np.asarray(v)) for v in final.values}) == 5  # the actors explore differently


def test_search_resumes_from_checkpoint_and_stops_on_nan(tmp_path):
    env = Bandit([0.3, 0.6, 0.5])
    agent = DDPG(DDPGConfig(warmup_episodes=8, hidden=16, batch_size=8), OBS_DIM, env.num_steps)
    kw = dict(num_actors=4, seed=3, log_every=0)
    reward = make_reward_fn("acc")
    full = run_search(env, agent, env.accuracy, reward, {}, episodes=24, **kw)
    run_search(env, agent, env.accuracy, reward, {}, episodes=12, checkpoint_dir=str(tmp_path), checkpoint_every=1,
               **kw)
    resumed = run_search(env, agent, env.accuracy, reward, {}, episodes=24, checkpoint_dir=str(tmp_path), **kw)
    np.testing.assert_allclose(resumed.history["reward"], full.history["reward"], rtol=1e-6)
    assert len(resumed.history["metrics"]) == 6
    chex.assert_trees_all_close(resumed.state.agent.actor, full.state.agent.actor, rtol=1e-5)

    def nan_accuracy(values, data):  # NaN from the first iteration on
        return jnp.where(jnp.sum(values) > -1, jnp.nan, 0.0) * jnp.ones(values.shape[0])
    with pytest.raises(SearchDiverged, match=r"episodes 1\.\.4"):
        run_search(env, agent, nan_accuracy, reward, {}, episodes=24, **kw)


def test_bad_agent_settings_and_zero_actors():
    with pytest.raises(ConfigError):
        PPOConfig(policy="cauchy")
    with pytest.raises(ConfigError):
        DDPGConfig(tau=0.0)
    env = Bandit([0.5])
    with pytest.raises(ConfigError, match="num_actors=0"):
        run_search(env, PPO(PPOConfig(), OBS_DIM), env.accuracy, make_reward_fn("acc"), {}, num_actors=0,
                   episodes=4)
    with pytest.raises(ConfigError, match="unknown search.reward"):
        make_reward_fn("speed")


def test_rewards_forms():
    acc, cost = jnp.asarray([0.9, 0.8]), jnp.asarray([100.0, 50.0])
    np.testing.assert_allclose(make_reward_fn("acc")(acc, cost, 0, 0), [0.9, 0.8])
    np.testing.assert_allclose(make_reward_fn("flops", (40.0, 140.0))(acc, cost, 0, 0), [0.9 * 0.4, 0.8 * 0.9])
    np.testing.assert_allclose(make_reward_fn("flops", cost_norm="observed")(acc, cost, 50.0, 100.0), [0.0, 0.8])
    np.testing.assert_allclose(make_reward_fn("log_flops")(acc, cost, 0, 0),
                               [-0.1 * np.log(100.0), -0.2 * np.log(50.0)], rtol=1e-6)


def test_pareto_front_and_best_per_budget():
    cost = [3, 1, 2, 2, 5, 1]
    acc = [0.9, 0.5, 0.8, 0.7, 0.9, 0.6]
    assert pareto_front(cost, acc) == [5, 2, 0]  # (1, .6) (2, .8) (3, .9); (5, .9) is dominated by (3, .9)
    out = best_per_budget([0.3, 0.1, 0.2], [0.9, 0.5, 0.8], [0.05, 0.15, 0.25, 1.0])
    assert [o["index"] for o in out] == [None, 1, 2, 0]


@pytest.mark.parametrize("normalize", [True, False])
def test_advantages_are_centred_q_minus_state_value_and_scaled_only_when_normalised(normalize):
    agent = PPO(PPOConfig(normalize_advantages=normalize), OBS_DIM)
    state = agent.init(jax.random.PRNGKey(0))
    batch = _batch()
    q = np.asarray(agent.critic_net.apply(state.critic, batch["obs"], batch["action"]), np.float64)
    v = np.asarray(agent.critic_net.apply(state.critic, batch["obs"], agent.greedy(state.actor, batch["obs"])),
                   np.float64)
    a = q - v
    want = (a - a.mean()) / (a.std() + 1e-8) if normalize else a - a.mean()
    np.testing.assert_allclose(np.asarray(agent.advantages(state, batch)), want, rtol=1e-4, atol=1e-6)
