"""Benchmarks of the search (`benchmarks/configs/search_*.py`).

`speed`: episodes per second of the jitted, vmapped search iteration at N actors
against `PythonLoopSearch`, a straightforward per-layer Python loop over the same
environment functions, agent and evaluation data (each piece jitted on its own, one
candidate network evaluated at a time with `model.apply`), in the same process. Both
draw the same random numbers, so they make the same decisions: the benchmark checks
that their rewards agree.

`agents`: PPO against DDPG and random search (`bench.agents`) on the same environment
and episode budget, several seeds (reward curves, final best reward: the paper's
Figure 2), then the best policy of every run and uniform pruning at the same budget
fine-tuned alike (quality at a budget).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxcompress import pipeline
from jaxcompress.pruning import criteria as C
from jaxcompress.rl import report
from jaxcompress.rl.env import PruneEnv
from jaxcompress.rl.evaluate import correct_fraction, make_prune_evaluator
from jaxcompress.rl.job import eval_data, make_agent
from jaxcompress.rl.search import (channel_ranks, init_search_state, make_iteration, make_reward_fn,
                                   returns_from_final, run_search)
from jaxcompress.train import Recipe, Teacher, setup_experiment
from jaxcompress.train.loop import load_trained, make_eval_fn
from jaxcompress.timing import time_call
from jaxcompress.train.metrics import write_json


class PythonLoopSearch:
    """The same search written the straightforward way: Python loops over actors and
    layers, one jitted call per observe / act / step, one `model.apply` per candidate,
    rewards in NumPy, then the same jitted agent update."""

    def __init__(self, env, agent, model, ranks, reward_fn, num_actors: int):
        self.env, self.agent, self.N = env, agent, num_actors
        self.ranks = ranks
        self.reward_fn = reward_fn
        self.observe = jax.jit(env.observe)
        self.act = jax.jit(agent.act)
        self.step = jax.jit(env.step)
        self.finalize = jax.jit(env.finalize)
        self.result = jax.jit(env.result)
        self.update = jax.jit(agent.update)
        self.split = jax.jit(jax.random.split, static_argnums=1)
        self.apply = jax.jit(lambda v, x, y: correct_fraction(model.apply(v, x, train=False), y))
        self.discount = float(getattr(agent.config, "discount", 1.0))

    def accuracy(self, widths, data) -> float:
        group_masks = [jnp.asarray((r < w).astype(np.float32)) for r, w in zip(self.ranks, np.asarray(widths))]
        variables = data["variables"]
        masks = self.env.table.layer_masks(group_masks, variables.get("masks"))
        return float(self.apply({**variables, "masks": masks}, data["images"], data["labels"]))

    def iteration(self, state, data):
        env, T, N = self.env, self.env.num_steps, self.N
        rng, k_roll, k_update = self.split(state.rng, 3)
        keys = self.split(k_roll, N)
        steps, results, accs = [], [], []
        for n in range(N):
            s = env.reset()
            ks = self.split(keys[n], T)
            traj = []
            for t in range(T):
                obs = self.observe(s)
                action, aux = self.act(state.agent, obs, ks[t], state.episode + n)
                s = self.step(s, action)
                traj.append(dict(obs=obs, action=action, **aux))
            s = self.finalize(s)
            res = self.result(s)
            accs.append(self.accuracy(res["values"], data))
            traj = {k: np.stack([np.asarray(tr[k]) for tr in traj]) for k in traj[0]}
            traj["next_obs"] = np.concatenate([traj["obs"][1:], np.asarray(self.observe(s))[None]])
            traj["done"] = (np.arange(T) == T - 1).astype(np.float32)
            steps.append(traj)
            results.append(res)
        acc = np.asarray(accs, np.float32)
        cost = np.asarray([float(r["cost"]) for r in results], np.float32)
        cost_min, cost_max = min(float(state.cost_min), cost.min()), max(float(state.cost_max), cost.max())
        reward = np.asarray(self.reward_fn(jnp.asarray(acc), jnp.asarray(cost), cost_min, cost_max))
        rewards, returns = returns_from_final(jnp.asarray(reward), T, self.discount)
        batch = {k: jnp.asarray(np.concatenate([st[k] for st in steps])) for k in steps[0]}
        batch.update(reward=rewards.reshape(-1), episode_reward=jnp.repeat(jnp.asarray(reward), T),
                     **{"return": returns.reshape(-1)})
        agent_state, _ = self.update(state.agent, batch, k_update, state.episode + N)
        state = state.replace(agent=agent_state, rng=rng, episode=state.episode + N,
                              cost_min=jnp.asarray(cost_min, jnp.float32), cost_max=jnp.asarray(cost_max, jnp.float32))
        return state, dict(accuracy=acc, reward=reward)


def _setup(config):
    s = config.search
    exp = setup_experiment(config)
    env = PruneEnv(exp.table, s.flops_budget, s.a_min, s.a_max, C.prunable_groups(exp.table, s.scope),
                   config.hardware.multiple, s.params_budget or None)
    if not s.checkpoint:
        raise ValueError("the search benchmarks need search.checkpoint (a trained workdir)")
    state = load_trained(exp, s.checkpoint, Recipe.from_config(config))
    variables = state.variables()
    ranks = channel_ranks(C.channel_scores(exp.table, variables, s.rank_criterion))
    return exp, env, state, variables, ranks


def speed(config, workdir: str) -> dict:
    """Episodes/s of the jitted vmapped search vs the Python loop (module doc)."""
    s, b = config.search, config.bench
    exp, env, _, variables, ranks = _setup(config)
    reward_fn = make_reward_fn(s.reward, env.cost_bounds(), s.cost_norm)
    rows = []
    for eval_size in b.eval_sizes:
        data = eval_data(exp, variables, eval_size, config.seed)
        # Per-candidate evaluation cost alone, for the breakdown.
        single = PythonLoopSearch(env, make_agent(s.agent, s, env.num_steps), exp.model, ranks, reward_fn, 1)
        widths = np.asarray(env.max_widths)
        single.accuracy(widths, data)
        eval_one_s = float(np.median([time_call(lambda: single.accuracy(widths, data)) for _ in range(5)]))
        for n in b.actors:
            agent = make_agent(s.agent, s, env.num_steps)
            evaluate = make_prune_evaluator(env, exp.model, ranks, s.eval_chunk, s.eval_mode)
            step = jax.jit(make_iteration(env, agent, evaluate, reward_fn, n))
            state = jax.tree.map(jnp.array, init_search_state(env, agent, config.seed))
            t0 = time.perf_counter()
            compiled = step.lower(state, data).compile()
            compile_s = time.perf_counter() - t0
            ref_state, ref_rec, _, _ = compiled(state, data)
            jit_iters = max(1, -(-b.jit_episodes // n))
            loop = PythonLoopSearch(env, agent, exp.model, ranks, reward_fn, n) if n in b.loop_actors else None
            row = dict(eval_size=int(data["labels"].shape[0]), actors=n, compile_s=compile_s,
                       eval_one_candidate_ms=1e3 * eval_one_s)
            if loop is not None:
                loop_state, loop_rec = loop.iteration(state, data)  # warm-up (compiles the pieces)
                row["rewards_match"] = bool(np.allclose(loop_rec["reward"], np.asarray(ref_rec["reward"]), atol=1e-6))
            # Interleaved rounds (jit block, then one loop iteration): drift of a shared machine hits both alike.
            jit_times, loop_times = [], []
            st = ref_state
            for _ in range(b.rounds):
                t0 = time.perf_counter()
                for _ in range(jit_iters):
                    st, rec, _, _ = compiled(st, data)
                jax.block_until_ready(st)
                jit_times.append((time.perf_counter() - t0) / (jit_iters * n))
                if loop is not None:
                    t0 = time.perf_counter()
                    loop_state, _ = loop.iteration(loop_state, data)
                    jax.block_until_ready(loop_state)
                    loop_times.append((time.perf_counter() - t0) / n)
            jit_eps = 1.0 / float(np.median(jit_times))
            row.update(jit_episodes_per_s=jit_eps, jit_episodes_timed=b.rounds * jit_iters * n)
            if loop is not None:
                row.update(loop_episodes_per_s=1.0 / float(np.median(loop_times)), loop_episodes_timed=b.rounds * n)
                row["speedup"] = jit_eps / row["loop_episodes_per_s"]
            rows.append(row)
            logging.info("search speed: %s", row)
            print(f"eval {row['eval_size']:5d} N={n:3d}: jit {jit_eps:8.1f} ep/s (compile {compile_s:.1f}s)"
                  + (f", loop {row['loop_episodes_per_s']:6.1f} ep/s, speed-up {row['speedup']:.1f}x, "
                     f"same rewards {row['rewards_match']}" if "speedup" in row else ""))
    summary = dict(job=config.job, model=config.model.name, agent=s.agent, eval_mode=s.eval_mode, rows=rows,
                   device_kind=jax.devices()[0].device_kind, cpu_count=os.cpu_count())
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def agents(config, workdir: str) -> dict:
    """The agents (PPO, DDPG, random search) over seeds (stability) and fine-tuned quality
    vs uniform (module doc)."""
    s, b = config.search, config.bench
    exp, env, state, variables, ranks = _setup(config)
    data = eval_data(exp, variables, s.eval_size, config.seed, s.candidate_finetune_steps, s.candidate_finetune_batch)
    reward_fn = make_reward_fn(s.reward, env.cost_bounds(), s.cost_norm)
    evaluate = make_prune_evaluator(env, exp.model, ranks, s.eval_chunk, s.eval_mode, s.candidate_finetune_steps,
                                    s.candidate_finetune_lr, s.bn_adapt)
    runs = {}
    for name in b.agents:
        agent = make_agent(name, s, env.num_steps)  # one object per agent: the seeds share one compile
        for seed in b.seeds:
            res = run_search(env, agent, evaluate, reward_fn, data, num_actors=b.num_actors.get(name, s.num_actors),
                             episodes=s.episodes, seed=seed,
                             checkpoint_dir=os.path.join(workdir, f"{name}_seed{seed}"),
                             checkpoint_every=s.checkpoint_every, log_every=s.log_every, name=f"{name} seed {seed}")
            runs[(name, seed)] = res
    test_eval = make_eval_fn(exp, config.train.eval_batch_size)
    recipe = Recipe.from_config(config).replace(num_epochs=s.finetune_epochs, learning_rate=s.finetune_learning_rate)
    teacher = Teacher.of(state)

    def finetuned(widths, tag):
        masks = exp.table.layer_masks(C.masks_from_scores(C.channel_scores(exp.table, variables, s.rank_criterion),
                                                          [int(w) for w in widths]), variables.get("masks"))
        # the policies' fine-tunes distil from the reference when train.distill_weight > 0
        small_exp, st = pipeline.shrink_and_finetune(exp, {**variables, "masks": masks}, recipe,
                                                     os.path.join(workdir, f"finetune_{tag}"), teacher=teacher)
        ev = make_eval_fn(small_exp, config.train.eval_batch_size)
        masked = test_eval(state.replace(masks=masks), exp.test)["accuracy"]
        return dict(widths=[int(w) for w in widths], accuracy_masked=masked, accuracy=ev(st, small_exp.test)["accuracy"],
                    flops_ratio=float(env.flops(np.asarray(widths, np.float32))) / env.flops_dense)

    results = {}
    for (name, seed), res in runs.items():
        best = res.best
        ft = finetuned(best["values"], f"{name}_seed{seed}") if b.finetune else {}
        results[f"{name}_seed{seed}"] = dict(agent=name, seed=seed, best_reward=best["reward"],
                                             best_val_accuracy=best["accuracy"], episodes=len(res.history["reward"]),
                                             search_time_s=res.wall_time_s, **{f"ft_{k}": v for k, v in ft.items()})
    uniform = None
    if b.finetune:
        ratio = C.keep_ratio_for_flops(exp.table, s.flops_budget, list(env.groups), config.hardware.multiple)
        counts = C.keep_counts(exp.table, ratio, list(env.groups), config.hardware.multiple)
        uniform = dict(keep_ratio=ratio, **finetuned(counts, "uniform"))
        # scored like the agents' candidates (their reward's accuracy, after the per-candidate SGD steps if any)
        uniform["search_val_accuracy"] = float(jax.jit(evaluate)(jnp.asarray([counts], jnp.float32), data)[0])
    per_agent = {}
    for name in b.agents:
        rs = [results[f"{name}_seed{seed}"] for seed in b.seeds]
        best = np.asarray([r["best_reward"] for r in rs])
        entry = dict(best_reward_mean=float(best.mean()), best_reward_std=float(best.std()),
                     best_reward_min=float(best.min()), best_reward_max=float(best.max()))
        finals = [np.mean(runs[(name, seed)].history["reward"][-b.final_window:]) for seed in b.seeds]
        entry.update(final_mean_reward_mean=float(np.mean(finals)), final_mean_reward_std=float(np.std(finals)))
        if b.finetune:
            acc = np.asarray([r["ft_accuracy"] for r in rs])
            entry.update(ft_accuracy_mean=float(acc.mean()), ft_accuracy_std=float(acc.std()))
        per_agent[name] = entry
    curves = {f"{name} seed {seed}": runs[(name, seed)].history["reward"] for name in b.agents for seed in b.seeds}
    report.plot_reward_curves(os.path.join(workdir, "rewards.png"), curves,
                              f"{config.model.name}, {s.flops_budget:.0%} FLOPs: reward per episode", window=16,
                              best=False)
    report.plot_reward_curves(os.path.join(workdir, "best_rewards.png"),
                              {k: report.moving_best(v) for k, v in curves.items()},
                              "best reward so far", window=1, best=False)
    summary = dict(job=config.job, model=config.model.name, flops_budget=s.flops_budget, episodes=s.episodes,
                   seeds=list(b.seeds), runs=results, per_agent=per_agent, uniform=uniform,
                   device_kind=jax.devices()[0].device_kind)
    write_json(os.path.join(workdir, "summary.json"), summary)
    for name, e in per_agent.items():
        print(f"{name}: best reward {e['best_reward_mean']:.4f} +- {e['best_reward_std']:.4f}"
              + (f", fine-tuned test acc {e['ft_accuracy_mean']:.4f} +- {e['ft_accuracy_std']:.4f}"
                 if b.finetune else ""))
    if uniform:
        print(f"uniform: search val acc {uniform['search_val_accuracy']:.4f}, fine-tuned test acc "
              f"{uniform['accuracy']:.4f}")
    return summary
