"""The search: rollouts of N actors, in-graph evaluation, rewards, update: one XLA program.

`rollout` walks one episode as a `lax.scan` over the environment's steps;
`make_iteration` vmaps it over N actors, evaluates the N candidate networks by
vmapping the model over their masks (or bit widths) with shared parameters
(`jaxcompress.rl.evaluate`), computes the rewards and applies
the agent's update. `run_search` jits that iteration once, loops over it, keeps
every evaluated point, checkpoints the whole `SearchState` (agent, optimizers,
replay buffer, RNG, episode counter, best candidate) and the history with Orbax,
resumes from it, and stops with `SearchDiverged` naming the episodes whose reward
or losses are not finite.

Rewards (`REWARDS`; acc is the validation accuracy in [0, 1], F the candidate's
cost: FLOPs for pruning, weight bits for quantization):

* ``acc``: R_acc = acc (the budget is enforced by the action wall / back-off).
* ``flops``: R_FLOPs = acc * (F_hi - F) / (F_hi - F_lo) (the paper's Sec. 2.3).
  With ``cost_norm="bounds"`` (default) F_lo and F_hi are the lowest and highest
  cost an episode can end with (every searched step at its upper, resp. lower,
  rate bound, capped by the budget): a stationary reward. ``"observed"`` uses the
  lowest and highest cost observed so far in the search, the paper's wording
  (R = acc while they are equal).
* ``log_flops``: AMC's R = -(1 - acc) * log(F).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct

from jaxcompress.errors import ConfigError, NonFiniteError
from jaxcompress.train.checkpoint import Checkpointer
from jaxcompress.train.metrics import MetricWriter
from jaxcompress.train.steps import all_finite, replicated, replicated_copy, split_rows

REWARDS = ("acc", "flops", "log_flops")
COST_NORMS = ("bounds", "observed")


class SearchDiverged(NonFiniteError):
    """A reward, an agent loss or the agent's state became NaN / infinite. A
    `ConfigError` so that `launch.main` reports it in one line (the usual cause is a
    learning rate or reward scale)."""


class SearchState(struct.PyTreeNode):
    agent: Any
    rng: jax.Array
    episode: jax.Array  # episodes finished
    cost_min: jax.Array  # lowest / highest candidate cost observed
    cost_max: jax.Array
    best_reward: jax.Array
    best_accuracy: jax.Array
    best_cost: jax.Array
    best_values: jax.Array  # widths per group / bits per layer of the best candidate
    best_actions: jax.Array  # its executed actions (rates / bits) per step


# ------------------------------------------------------------------------------------ rewards

def make_reward_fn(kind: str, cost_bounds: tuple[float, float] | None = None, cost_norm: str = "bounds"):
    """`reward(acc, cost, observed_min, observed_max)` for one of `REWARDS` (module doc)."""
    if kind not in REWARDS:
        raise ConfigError(f"unknown search.reward '{kind}'; choose one of {', '.join(REWARDS)}")
    if cost_norm not in COST_NORMS:
        raise ConfigError(f"unknown search.cost_norm '{cost_norm}'; choose one of {', '.join(COST_NORMS)}")
    if kind == "acc":
        return lambda acc, cost, lo, hi: acc
    if kind == "log_flops":
        return lambda acc, cost, lo, hi: -(1.0 - acc) * jnp.log(cost)

    def r_flops(acc, cost, lo, hi):
        if cost_norm == "bounds":
            lo, hi = cost_bounds
        span = hi - lo
        return jnp.where(span > 0, acc * (hi - cost) / jnp.where(span > 0, span, 1.0), acc)

    return r_flops


# ------------------------------------------------------------------------------------ rollout

def rollout(env, agent, agent_state, key, episode):
    """One episode: `lax.scan` of observe -> act -> step over the environment's steps.

    Returns the final `EnvState` (after `env.finalize`) and the trajectory (leaves
    with leading axis T): obs, action (normalised), the agent's aux, next_obs, done.
    """
    T = env.num_steps

    def body(state, k):
        obs = env.observe(state)
        action, aux = agent.act(agent_state, obs, k, episode)
        return env.step(state, action), dict(obs=obs, action=action, **aux)

    final, traj = jax.lax.scan(body, env.reset(), jax.random.split(key, T))
    final = env.finalize(final)
    traj["next_obs"] = jnp.concatenate([traj["obs"][1:], env.observe(final)[None]], axis=0)
    traj["done"] = (jnp.arange(T) == T - 1).astype(jnp.float32)
    return final, traj


def batched_rollout(env, agent, agent_state, keys, episodes):
    """N actors (one key and episode number each) walking the network in parallel."""
    return jax.vmap(functools.partial(rollout, env, agent, agent_state))(keys, episodes)


# ------------------------------------------------------------------------------------ ranks

def channel_ranks(scores) -> list[np.ndarray]:
    """rank[c] = position of channel c when sorted by decreasing score (ties: lower
    index first, as `criteria.masks_from_scores`)."""
    ranks = []
    for s in scores:
        order = np.argsort(-np.asarray(s), kind="stable")
        r = np.empty(len(order), np.int32)
        r[order] = np.arange(len(order), dtype=np.int32)
        ranks.append(r)
    return ranks


# ------------------------------------------------------------------------------------ iteration

def returns_from_final(reward, num_steps: int, discount: float):
    """Per-step rewards (only the last step is rewarded) and discounted returns, (N, T)."""
    N = reward.shape[0]
    rewards = jnp.zeros((N, num_steps)).at[:, -1].set(reward)
    powers = discount ** jnp.arange(num_steps - 1, -1, -1, dtype=jnp.float32)
    return rewards, reward[:, None] * powers[None, :]


def init_search_state(env, agent, seed: int) -> SearchState:
    agent_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    T = env.num_steps
    values = jnp.asarray(env.initial_values(), jnp.float32)
    return SearchState(agent=agent.init(agent_key), rng=rng, episode=jnp.zeros((), jnp.int32),
                       cost_min=jnp.asarray(jnp.inf), cost_max=jnp.asarray(-jnp.inf),
                       best_reward=jnp.asarray(-jnp.inf), best_accuracy=jnp.asarray(-1.0),
                       best_cost=jnp.asarray(jnp.inf), best_values=values, best_actions=jnp.zeros((T,)))


def make_iteration(env, agent, evaluate: Callable, reward_fn: Callable, num_actors: int):
    """`iteration(state, data) -> (state, records, metrics, finite)`: N rollouts, the N
    candidates' evaluation, rewards and one agent update. Pure: jit it once."""
    N, T = num_actors, env.num_steps
    discount = float(getattr(agent.config, "discount", 1.0))

    def iteration(state: SearchState, data):
        rng, k_roll, k_update = jax.random.split(state.rng, 3)
        episodes = state.episode + jnp.arange(N)
        final, traj = batched_rollout(env, agent, state.agent, jax.random.split(k_roll, N), episodes)
        res = jax.vmap(env.result)(final)
        acc = evaluate(res["values"], data)
        cost = res["cost"]
        cost_min, cost_max = jnp.minimum(state.cost_min, cost.min()), jnp.maximum(state.cost_max, cost.max())
        reward = reward_fn(acc, cost, cost_min, cost_max)
        rewards, returns = returns_from_final(reward, T, discount)
        batch = jax.tree.map(lambda x: x.reshape((N * T,) + x.shape[2:]), traj)
        batch.update(reward=rewards.reshape(-1), episode_reward=jnp.repeat(reward, T),
                     **{"return": returns.reshape(-1)})
        agent_state, metrics = agent.update(state.agent, batch, k_update, state.episode + N)
        i = jnp.argmax(reward)
        better = reward[i] > state.best_reward
        pick = lambda new, old: jnp.where(better, new, old)
        state = state.replace(
            agent=agent_state, rng=rng, episode=state.episode + N, cost_min=cost_min, cost_max=cost_max,
            best_reward=pick(reward[i], state.best_reward), best_accuracy=pick(acc[i], state.best_accuracy),
            best_cost=pick(cost[i], state.best_cost), best_values=pick(res["values"][i], state.best_values),
            best_actions=pick(res["actions"][i], state.best_actions))
        records = dict(episode=episodes, accuracy=acc, reward=reward, cost=cost, cost_ratio=res["cost_ratio"],
                       values=res["values"], actions=res["actions"])
        if "params" in res:
            records["params"] = res["params"]
        finite = all_finite((reward, metrics)) & all_finite(agent_state)
        return state, records, metrics, finite

    return iteration


# ------------------------------------------------------------------------------------ driver

@dataclasses.dataclass
class SearchResult:
    state: SearchState
    history: dict  # every evaluated candidate: lists keyed like `records`, plus per-iteration metrics
    wall_time_s: float
    compile_time_s: float

    @property
    def best(self) -> dict:
        s = jax.device_get(self.state)
        return dict(reward=float(s.best_reward), accuracy=float(s.best_accuracy), cost=float(s.best_cost),
                    values=np.asarray(s.best_values).tolist(), actions=np.asarray(s.best_actions).tolist())


# ------------------------------------------------------------------------------------ compile cache

@dataclasses.dataclass(frozen=True)
class IterationSpec:
    """The static configuration of one search iteration: what `make_iteration` closes
    over. Hashable: its parts compare as the objects they are (environments, agents and
    functions by identity; a bound method by its object and function), and the spec
    holds them, so a cache key can never name a collected object's successor."""

    env: Any
    agent: Any
    evaluate: Callable
    reward_fn: Callable
    num_actors: int

    def iteration(self) -> Callable:
        return make_iteration(self.env, self.agent, self.evaluate, self.reward_fn, self.num_actors)


def abstract_arguments(*args) -> tuple:
    """Hashable signature of `args`: (tree structure, the leaves' shapes, dtypes and
    shardings); a leaf that is not a `jax.Array` has no sharding (None)."""
    leaves, treedef = jax.tree.flatten(args)
    shapes = jax.eval_shape(lambda a: a, leaves)  # shapes, dtypes and weak types
    return treedef, tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type,
                                               sharding=x.sharding if isinstance(x, jax.Array) else None)
                          for a, x in zip(shapes, leaves))


@functools.lru_cache(maxsize=8)
def compile_iteration(spec: IterationSpec, arguments: tuple, mesh: jax.sharding.Mesh | None = None):
    """`spec`'s iteration, jitted (the state donated) and compiled for `arguments`
    (`abstract_arguments(state, data)`, their shardings included). On a `mesh` every
    output (the state, the records) is replicated over it, so the state goes back into
    the next call unchanged. Memoised on all three, so that resuming or repeating a
    search in one process with the same objects compiles once."""
    treedef, leaves = arguments
    out = dict(out_shardings=replicated(mesh)) if mesh is not None else {}
    step_fn = jax.jit(spec.iteration(), donate_argnums=0, **out)
    return step_fn.lower(*jax.tree.unflatten(treedef, leaves)).compile()


def _compiled_iteration(spec: IterationSpec, state, data, mesh=None):
    """(compiled iteration, seconds it took); compiled uncached if `spec` is unhashable
    (an agent or environment defining equality without a hash)."""
    start = time.time()
    arguments = abstract_arguments(state, data)
    try:
        hash(spec)
    except TypeError:
        return compile_iteration.__wrapped__(spec, arguments, mesh), time.time() - start
    return compile_iteration(spec, arguments, mesh), time.time() - start


def on_one_device(tree):
    """`tree` with every array that spans several devices (e.g. a network `fit` left
    replicated over the mesh) reduced to its copy on the default device: the search's
    program without a mesh (`place_on_mesh`'s fallback), compiled for one device."""
    device = jax.devices()[0]

    def one(x):
        return jax.device_put(x, device) if isinstance(x, jax.Array) and len(x.devices()) > 1 else x

    return jax.tree.map(one, tree)


# The evaluation data's example axis per key (`rl.job.eval_data`): validation images and
# labels (n, ...); the per-candidate fine-tune's batches (steps, b, ...). Other keys (the
# network's variables) are replicated.
EXAMPLE_AXIS = {"images": 0, "labels": 0, "train_images": 1, "train_labels": 1}


def place_on_mesh(data: dict, mesh: jax.sharding.Mesh | None) -> dict:
    """The search's evaluation `data` placed for `mesh`: every key of `EXAMPLE_AXIS`
    split over the mesh's 'data' axis along its example axis, the rest replicated, so the
    N candidates' evaluation runs data-parallel on every device of every host (the
    accuracies' means become all-reduces). Every process holds the same full arrays
    (`eval_data` draws them from the seed); each puts its own devices' rows. None or a
    one-device mesh: `on_one_device` (today's single-device program). An example count
    the devices do not divide is a one-line ConfigError."""
    if mesh is None or mesh.size == 1:
        return on_one_device(data)
    out = {}
    for key, value in data.items():
        axis = EXAMPLE_AXIS.get(key)
        if axis is None:
            out[key] = jax.device_put(value, replicated(mesh))
            continue
        x = np.asarray(value)
        if x.shape[axis] % mesh.size:
            raise ConfigError(f"the search's evaluation {key} has {x.shape[axis]} examples, not a multiple of the "
                              f"{mesh.size} devices; set search.eval_size / search.rerank_size / "
                              f"search.candidate_finetune_batch to multiples of {mesh.size}")
        out[key] = split_rows(x, mesh, axis)
    return out


def _to_lists(tree) -> dict:
    return {k: np.asarray(v).tolist() for k, v in tree.items()}


def run_search(env, agent, evaluate: Callable, reward_fn: Callable, data, *, num_actors: int, episodes: int,
               seed: int = 0, checkpoint_dir: str | None = None, checkpoint_every: int = 10,
               log_every: int = 10, name: str = "search", mesh: jax.sharding.Mesh | None = None) -> SearchResult:
    """Runs ceil(episodes / num_actors) jitted iterations; resumable from `checkpoint_dir`.
    On a `mesh`, the evaluation images are split over its devices and the state is
    replicated (`place_on_mesh`): the same numbers as on one device, to float rounding.

    `history` gets one entry per evaluated candidate (episode, accuracy, reward,
    cost, cost_ratio, values, actions[, params]) and one per iteration under
    `metrics` (the agent's losses).
    """
    if num_actors < 1:
        raise ConfigError(f"search.num_actors={num_actors} must be >= 1")
    if episodes < 1:
        raise ConfigError(f"the number of search episodes must be >= 1, got {episodes}")
    iterations = -(-episodes // num_actors)
    mesh = mesh if mesh is not None and mesh.size > 1 else None  # one device: the single-device program
    state = init_search_state(env, agent, seed)
    history: dict = {"metrics": []}
    # checksummed (the last one kept); divergence, Ctrl-C, ...: the checkpoints on disk stand
    with Checkpointer(checkpoint_dir, max_to_keep=1) if checkpoint_dir else contextlib.nullcontext() as ckpt:
        state, history, start, compile_time = _search_iterations(
            ckpt, checkpoint_dir, state, history, IterationSpec(env, agent, evaluate, reward_fn, num_actors), data,
            num_actors, iterations, checkpoint_every, log_every, name, mesh)
    return SearchResult(state=state, history=history, wall_time_s=time.time() - start, compile_time_s=compile_time)


def _search_iterations(ckpt, checkpoint_dir, state, history, spec: IterationSpec, data, num_actors, iterations,
                       checkpoint_every, log_every, name, mesh=None):
    """`run_search`'s loop (resume, iterations, logs, checkpoints) with its checkpointer open.
    Returns (state, history, start time, compile seconds)."""
    if ckpt is not None and ckpt.latest_step() is not None:
        state, meta = ckpt.restore_tree(state)
        history = meta["history"]
        logging.info("%s: resumed at episode %d from %s", name, int(state.episode), checkpoint_dir)
    last_saved = ckpt.latest_step() if ckpt is not None else None
    # fresh buffers: targets start as copies, and the step donates
    state = jax.tree.map(jnp.array, state) if mesh is None else replicated_copy(state, mesh)
    data = place_on_mesh(data, mesh)
    start = time.time()
    compiled, compile_time = _compiled_iteration(spec, state, data, mesh)
    done = int(state.episode) // num_actors
    writer = MetricWriter(checkpoint_dir) if checkpoint_dir else None  # search curves, TensorBoard too
    for it in range(done, iterations):
        state, records, metrics, finite = compiled(state, data)
        records, metrics, finite = jax.device_get((records, metrics, finite))
        first = it * num_actors + 1
        if not finite:  # checked before anything of this iteration is kept or saved
            bad = [k for k, v in {**metrics, "reward": records["reward"]}.items() if not np.all(np.isfinite(v))]
            kept = (f"the last good checkpoint (iteration {last_saved}) in {checkpoint_dir} is kept"
                    if last_saved is not None else "no checkpoint was saved")
            raise SearchDiverged(f"{name}: non-finite {', '.join(bad) or 'agent parameters'} in episodes {first}.."
                                 f"{first + num_actors - 1} (iteration {it + 1} of {iterations}); {kept}; lower the "
                                 f"agent's learning rates or check the reward")
        for k, v in _to_lists(records).items():
            history.setdefault(k, []).extend(v)
        history["metrics"].append({k: float(v) for k, v in metrics.items()})
        if writer is not None:
            writer.write((it + 1) * num_actors, reward={"mean": float(np.mean(records["reward"])),
                                                        "max": float(np.max(records["reward"])),
                                                        "best": float(state.best_reward)},
                         accuracy={"mean": float(np.mean(records["accuracy"])), "best": float(state.best_accuracy)},
                         agent=history["metrics"][-1])
        if log_every and ((it + 1) % log_every == 0 or it + 1 == iterations):
            r = np.asarray(history["reward"][-log_every * num_actors:])
            logging.info("%s: episode %d/%d, reward mean %.4f max %.4f, best %.4f (acc %.4f)", name,
                         (it + 1) * num_actors, iterations * num_actors, r.mean(), r.max(), float(state.best_reward),
                         float(state.best_accuracy))
        if ckpt is not None and ((it + 1) % checkpoint_every == 0 or it + 1 == iterations):
            ckpt.save_tree(it + 1, state, {"history": history})
            last_saved = it + 1
    if writer is not None:
        writer.close()
    return state, history, start, compile_time
