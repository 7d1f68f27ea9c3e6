"""The `search` job: the two-stage compression of Zhan, Lin, Cao (2021), end to end.

Stage 1 (pruning): the agent (`search.agent`: ppo | ddpg | random, the random-search
baseline) searches one pruning rate per channel group of the trained network under the
FLOPs budget (`search.flops_budget`, AMC action wall), every candidate evaluated
in-graph on a fixed sample of the *validation* split (`search.eval_size` images,
split A). With `search.rerank_top_k > 0` the top-k distinct candidates by that score
are scored again on a disjoint, larger validation sample (`search.rerank_size` images,
split B; `jaxcompress.rl.rerank`); the `search.select_finetune_top` best on B are then
fine-tuned `search.select_finetune_steps` SGD steps and scored on B again, and the best
after that is kept (EagleEye's protocol; with `select_finetune_top=0`, the best on B);
without re-ranking the best candidate (highest split-A reward) is kept. It is applied with the channel-selection scheme
`search.scheme` (l1 / l2 / bn magnitude, or lasso / variational via
`jaxcompress.pruning`), the network is shrunk physically and fine-tuned.

Stage 2 (quantization, when `search.quant.episodes > 0`): the agent searches weight
bits per layer of the pruned network under an average-bits budget
(`search.quant.bits_budget`, HAQ back-off), the policy is written as a
`jaxcompress.quant_policy/1` file (`bits_policy.json`) and quantization-aware
training and the packed export run through the quant package's path (`quantize_state`,
`train_qat`, `export_and_verify`), the one the `quantize` job uses.

Writes into the workdir: `summary.json`, `pareto.json` and `pareto.png` (every
evaluated candidate: FLOPs, parameters / weight bits, validation accuracy; the
Pareto fronts; the best policy per budget), `rewards.png`, `policy.png` (per-layer
pruning rates and bits, the paper's Figure 4), `bits_policy.json`. The searches
checkpoint their whole state (agent, optimizers, replay buffer, RNG, episode
counter, history) under `stage1/` and `stage2/`; fine-tune and QAT checkpoint as
training runs do; a restarted job resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxcompress import cost, pipeline, schema
from jaxcompress.data import normalize
from jaxcompress.errors import ConfigError
from jaxcompress.latency import latency_model
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.plan import PrunePlan
from jaxcompress.pruning.surgery import without_masks
from jaxcompress.quant import QuantRecipe, quantize_state, train_qat
from jaxcompress.quant.job import export_and_verify, index_bits_from_config
from jaxcompress.quant.policy import make_quant, write_policy
from jaxcompress.rl import report
from jaxcompress.rl.ddpg import DDPG, DDPGConfig
from jaxcompress.rl.env import OBS_DIM, ElementEnv, PruneEnv, QuantEnv
from jaxcompress.rl.evaluate import make_element_evaluator, make_prune_evaluator, make_quant_evaluator
from jaxcompress.rl.ppo import PPO, PPOConfig
from jaxcompress.rl.random_search import RandomSearch
from jaxcompress.rl.rerank import finetune_select, rerank
from jaxcompress.rl.search import channel_ranks, make_reward_fn, run_search
from jaxcompress.timing import forward_latencies
from jaxcompress.train import Recipe, Teacher, setup_experiment
from jaxcompress.train.loop import make_eval_fn
from jaxcompress.train.metrics import write_json

AGENTS = ("ppo", "ddpg", "random")
SCHEMES = ("l1", "l2", "bn", "lasso", "variational")
GRANULARITIES = ("channel", "element")


# ------------------------------------------------------------------------------------ config

def make_agent(name: str, search_cfg, num_steps: int):
    """PPO or DDPG from `search.ppo` / `search.ddpg` (ConfigError on bad values), or
    random search."""
    if name == "ppo":
        return PPO(PPOConfig(**_fields(PPOConfig, search_cfg.ppo)), OBS_DIM)
    if name == "ddpg":
        return DDPG(DDPGConfig(**_fields(DDPGConfig, search_cfg.ddpg)), OBS_DIM, num_steps)
    if name == "random":
        return RandomSearch()
    raise ConfigError(f"unknown search.agent '{name}'; choose one of {', '.join(AGENTS)}")


def _fields(cls, cfg) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    given = dict(cfg) if cfg is not None else {}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {', '.join(sorted(names))}")
    return given


# ------------------------------------------------------------------------------------ pieces

def validation_sample(n: int, size: int, seed: int, skip: int = 0) -> np.ndarray:
    """Indices of a fixed sample of `size` of `n` validation images: positions skip ..
    skip + size of one permutation drawn from `seed` (fewer at its end). Samples of one
    seed at non-overlapping positions are disjoint (split A: skip 0, split B: skip |A|)."""
    return np.random.default_rng(seed).permutation(n)[skip:skip + size]


def eval_data(exp, variables, size: int, seed: int, train_steps: int = 0, train_batch: int = 64,
              skip: int = 0) -> dict:
    """A fixed sample of the validation split (never the test split), normalised
    (`validation_sample`); with `train_steps`, also that many fixed training batches
    (per-candidate fine-tune), the same for every `skip`. The search splits the images
    over `exp.mesh` (`place_on_mesh`): a sample cut short by the end of the validation
    split is trimmed to a multiple of its devices (`search.eval_size` and
    `search.rerank_size` themselves are checked up front, `check_batches`)."""
    x, y = exp.val
    idx = validation_sample(len(x), size, seed, skip)
    devices = exp.mesh.size if exp.mesh is not None else 1
    if len(idx) % devices:
        logging.warning("search: %d validation images left for a sample of %d; using %d, a multiple of the %d "
                        "devices", len(idx), size, len(idx) - len(idx) % devices, devices)
        idx = idx[:len(idx) - len(idx) % devices]
        if not len(idx):
            raise ConfigError(f"the validation split ({len(x)} images) leaves no images for a search sample of "
                              f"{size} after {skip}; raise data.val_size")
    data = dict(variables={k: v for k, v in variables.items() if k in ("params", "batch_stats", "masks")},
                images=jnp.asarray(normalize(x[idx], exp.mean, exp.std)), labels=jnp.asarray(y[idx], jnp.int32))
    if train_steps:
        xt, yt = exp.train
        need = train_steps * train_batch  # drawn with replacement only when the training split is smaller
        idx = np.random.default_rng(seed + 1).choice(len(xt), need, replace=need > len(xt))
        data["train_images"] = jnp.asarray(normalize(xt[idx], exp.mean, exp.std)).reshape(
            (train_steps, train_batch) + xt.shape[1:])
        data["train_labels"] = jnp.asarray(yt[idx], jnp.int32).reshape(train_steps, train_batch)
    return data


def history_points(history: dict) -> list[dict]:
    keys = [k for k in ("episode", "accuracy", "reward", "cost", "cost_ratio", "params") if k in history]
    return [dict({k: history[k][i] for k in keys}, values=history["values"][i]) for i in range(len(history["reward"]))]


def make_env(s, table, multiple: int | None):
    """The stage-1 environment of `search.granularity` (infeasible budgets fail here)."""
    if s.granularity == "element":
        return ElementEnv(table, s.flops_budget, s.a_min, s.a_max, s.params_budget or None)
    return PruneEnv(table, s.flops_budget, s.a_min, s.a_max, C.prunable_groups(table, s.scope), multiple,
                    s.params_budget or None)


def policy_plan(s, table, env, values, seed: int, batch_size: int) -> tuple[PrunePlan, int]:
    """(`PrunePlan`, gradual steps) applying the searched policy `values`: kept channel
    counts per group selected by `search.scheme` (channel granularity, one step), or the
    searched element rates per layer pruned by magnitude in `search.element_iterations`
    gradual steps (element granularity)."""
    settings = dict(seed=seed, batch_size=batch_size, learning_rate=s.finetune_learning_rate)
    if isinstance(env, ElementEnv):
        return PrunePlan.for_element_rates(env.rates(values), **settings), s.element_iterations
    counts = {g: int(values[g]) for g in env.groups}
    return PrunePlan.for_counts(table, counts, s.scheme, **settings), 1


# ------------------------------------------------------------------------------------ stages

def stage1_scoring(s, env, exp, variables, finetune_steps: int | None = None):
    """(evaluator, reward_fn) of stage 1: how every candidate is scored; each candidate
    first takes `finetune_steps` SGD steps (default `search.candidate_finetune_steps`)."""
    steps = s.candidate_finetune_steps if finetune_steps is None else finetune_steps
    if isinstance(env, ElementEnv):
        evaluator = make_element_evaluator(env, exp.model, variables, s.eval_chunk or 1, s.bn_adapt, steps,
                                           s.candidate_finetune_lr)
    else:
        ranks = channel_ranks(C.channel_scores(exp.table, variables, s.rank_criterion))
        evaluator = make_prune_evaluator(env, exp.model, ranks, s.eval_chunk, s.eval_mode, steps,
                                         s.candidate_finetune_lr, s.bn_adapt)
    return evaluator, make_reward_fn(s.reward, env.cost_bounds(), s.cost_norm)


def search_pruning(s, env, exp, variables, seed: int, workdir: str, scoring=None):
    """Stage 1: the agent searches pruning rates; every candidate is scored in-graph on
    a fixed validation sample (split A) by `scoring` (default `stage1_scoring`).
    Returns the `run_search` result (best policy, history)."""
    data = eval_data(exp, variables, s.eval_size, seed, s.candidate_finetune_steps, s.candidate_finetune_batch)
    agent = make_agent(s.agent, s, env.num_steps)
    evaluator, reward_fn = scoring or stage1_scoring(s, env, exp, variables)
    return run_search(env, agent, evaluator, reward_fn, data, num_actors=s.num_actors, episodes=s.episodes, seed=seed,
                      checkpoint_dir=os.path.join(workdir, "stage1"), checkpoint_every=s.checkpoint_every,
                      log_every=s.log_every, name="stage 1 (pruning)", mesh=exp.mesh)


def check_rerank(s, n_val: int) -> None:
    """ConfigError (one line) when re-ranking is on and split A takes every one of the
    `n_val` validation images."""
    if s.rerank_top_k and n_val <= s.eval_size:
        raise ConfigError(f"search.rerank_top_k={s.rerank_top_k} needs validation images beyond split A: the "
                          f"validation split has {n_val}, search.eval_size={s.eval_size} takes them all; lower "
                          f"search.eval_size, raise data.val_size or set search.rerank_top_k=0")


def rerank_stage1(s, exp, variables, res1, scoring, seed: int, evaluate_ft=None) -> dict | None:
    """Held-out re-ranking of stage 1 (`jaxcompress.rl.rerank`): the top
    `search.rerank_top_k` distinct candidates by their split-A reward, scored by the same
    `scoring` on split B, `search.rerank_size` validation images disjoint from split A
    (`validation_sample`); with `evaluate_ft` (the evaluator with
    `search.select_finetune_steps` SGD steps), the `search.select_finetune_top` best on B
    are fine-tuned and re-scored there, the best after that chosen (`finetune_select`).
    None when `rerank_top_k` is 0; ConfigError when the validation split has no image
    left after split A."""
    if not s.rerank_top_k:
        return None
    n_val = len(exp.val[0])
    check_rerank(s, n_val)
    if n_val < s.eval_size + s.rerank_size:
        logging.warning("stage 1 re-ranking: split B has %d validation images, not search.rerank_size=%d (the "
                        "validation split has %d, split A takes %d)", n_val - s.eval_size, s.rerank_size, n_val,
                        s.eval_size)
    data_b = eval_data(exp, variables, s.rerank_size, seed, s.candidate_finetune_steps, s.candidate_finetune_batch,
                       skip=s.eval_size)
    evaluator, reward_fn = scoring
    out = rerank(evaluator, reward_fn, res1.history, data_b, s.rerank_top_k, exp.mesh)
    out["size_a"] = min(s.eval_size, n_val)
    if evaluate_ft is not None and s.select_finetune_top:  # EagleEye's last step
        data_ft = eval_data(exp, variables, s.rerank_size, seed, s.select_finetune_steps, s.candidate_finetune_batch,
                            skip=s.eval_size)
        costs = np.asarray(res1.history["cost"], np.float64)
        out = finetune_select(evaluate_ft, reward_fn, out, data_ft, s.select_finetune_top, costs.min(), costs.max(),
                              exp.mesh)
        logging.info("stage 1 selection: the %d best on split B fine-tuned %d steps; chosen #%d (split B %.4f -> "
                     "%.4f after fine-tuning)", len(out["finetuned"]), s.select_finetune_steps, out["chosen"] + 1,
                     out["best"]["reward_b"], out["best"]["reward_ft"])
    c = out["candidates"][out["chosen"]]
    logging.info("stage 1 re-ranking: %d candidates on %d held-out images; chosen #%d (split A reward %.4f, "
                 "split B %.4f), split-A best has split B %.4f", len(out["candidates"]), out["size_b"],
                 out["chosen"] + 1, c["reward_a"], c["reward_b"], out["candidates"][0]["reward_b"])
    return out


def apply_policy(exp, state, plan: PrunePlan, iterations: int, step_recipe: Recipe, recipe: Recipe, workdir: str,
                 teacher: Teacher | None):
    """The searched policy applied (`gradual_prune`, `step_recipe` between steps), shrunk
    and fine-tuned with `recipe` (its best validation checkpoint, as stage 2 reads it).
    Returns (masked state, small_exp, small_state)."""
    masked = pipeline.gradual_prune(exp, state, plan, step_recipe, os.path.join(workdir, "apply"),
                                    iterations=iterations, teacher=teacher)
    small_exp, small_state = pipeline.shrink_and_finetune(exp, masked.variables(), recipe,
                                                          os.path.join(workdir, "finetune"), teacher=teacher,
                                                          best=True)
    return masked, small_exp, small_state


# ------------------------------------------------------------------------------------ the job

def search(config, workdir: str) -> dict:
    """The `search` job: reference -> stage 1 (pruning rates) -> apply, shrink,
    fine-tune -> stage 2 (bits) -> QAT + export -> reports."""
    wall_start = time.time()
    s, hw = config.search, config.hardware
    schema.validate(config)  # called directly (not through jaxcompress.jobs.run): still checked first
    exp = setup_experiment(config)
    check_rerank(s, len(exp.val[0]))  # before any training or search
    table = exp.table
    env = make_env(s, table, hw.multiple)  # an infeasible budget fails here, before any training or evaluation
    if s.latency_budget:  # measured on this device (cached); the action wall then also keeps to it
        env.add_latency_budget(latency_model(table, hw.latency_batch, list(env.groups),
                                             env.min_widths.astype(int)), s.latency_budget)
    state = pipeline.reference(config, exp, s.checkpoint, workdir, "search.checkpoint")
    teacher = Teacher.of(state)  # fine-tunes distil from the reference when train.distill_weight > 0
    evaluate = make_eval_fn(exp, config.train.eval_batch_size)
    dense = dict(test=evaluate(state, exp.test), val=evaluate(state, exp.val))
    scoring = stage1_scoring(s, env, exp, state.variables())
    res1 = search_pruning(s, env, exp, state.variables(), config.seed, workdir, scoring)
    evaluate_ft = (stage1_scoring(s, env, exp, state.variables(), s.select_finetune_steps)[0]
                   if s.rerank_top_k and s.select_finetune_top else None)  # it fine-tunes re-ranked candidates
    reranked = rerank_stage1(s, exp, state.variables(), res1, scoring, config.seed, evaluate_ft)
    best1 = reranked["best"] if reranked else res1.best  # the policy applied

    values = np.asarray(best1["values"])
    plan, iterations = policy_plan(s, table, env, values, config.seed, config.train.batch_size)
    recipe = Recipe.from_config(config).replace(learning_rate=s.finetune_learning_rate)
    masked, small_exp, small_state = apply_policy(exp, state, plan, iterations,
                                                  recipe.replace(num_epochs=s.element_iteration_epochs),
                                                  recipe.replace(num_epochs=s.finetune_epochs), workdir, teacher)
    latency = forward_latencies({"dense": (exp.model, without_masks(state.variables())),
                                 "shrunk": (small_exp.model, without_masks(small_state.variables()))},
                                exp.input_shape, hw.latency_batch)
    stage1 = stage1_summary(s, env, exp, masked, small_exp, small_state, res1, dense, latency, hw.latency_batch,
                            config.train.eval_batch_size, best1, reranked)

    stage2, res2, qenv = None, None, None
    if s.quant.episodes > 0:
        stage2, res2, qenv = search_bits(config, small_exp, small_state, cost.summarize(table)["totals"]["bytes"],
                                         workdir)
    write_reports(workdir, config.model.name, s, env, table, small_exp, stage1, res1, res2, qenv, reranked)
    dense_cost = cost.summarize(table)["totals"]
    summary = dict(
        job=config.job, model=config.model.name, dataset=config.data.name, agent=s.agent,
        accuracy_dense=dense["test"]["accuracy"], val_accuracy_dense=dense["val"]["accuracy"],
        params_dense=dense_cost["params"], flops_dense=dense_cost["flops"], bytes_dense=dense_cost["bytes"],
        params_pruned=stage1.pop("params_pruned"), flops_pruned=stage1.pop("flops_pruned"),
        params_removed=1.0 - stage1["params_ratio"], flops_left=stage1["flops_ratio"],
        error_increase_pruned=dense["test"]["accuracy"] - stage1["accuracy_pruned"],
        stage1=stage1, stage2=stage2, wall_time_s=time.time() - wall_start,
        device_kind=jax.devices()[0].device_kind)
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def stage1_summary(s, env, exp, masked, small_exp, small_state, res1, dense: dict, latency: dict,
                   latency_batch: int, eval_batch_size: int, best: dict | None = None,
                   reranked: dict | None = None) -> dict:
    """Stage 1's part of summary.json: the applied policy `best` (default the search's
    best; its split-A reward and accuracy), its costs and accuracies, the re-ranking."""
    table, h1 = exp.table, res1.history
    best = best or res1.best
    dense_cost = cost.summarize(table)["totals"]
    pruned_cost = cost.summarize(table, masked.masks)["totals"]
    widths = cost.effective_widths(table, masked.masks)
    masked_test = make_eval_fn(exp, eval_batch_size)(masked, exp.test)
    small_eval = make_eval_fn(small_exp, eval_batch_size)
    pruned_test, pruned_val = small_eval(small_state, small_exp.test), small_eval(small_state, small_exp.val)
    # FLOPs and parameters a sparse kernel costs (equal to the structural counts without element masks)
    flops_ratio = 2 * pruned_cost["sparse_macs"] / dense_cost["flops"]
    params_ratio = pruned_cost["nonzero_params"] / dense_cost["params"]
    logging.info("stage 1: widths %s, FLOPs %.1f%%, params removed %.1f%%, test acc %.4f -> %.4f (masked %.4f)",
                 widths.astype(int).tolist(), 100 * flops_ratio, 100 * (1 - params_ratio),
                 dense["test"]["accuracy"], pruned_test["accuracy"], masked_test["accuracy"])
    names = table.group_names
    return dict(
        agent=s.agent, granularity=s.granularity,
        element_rates=env.rates(best["values"]) if isinstance(env, ElementEnv) else None,
        episodes=len(h1["reward"]), num_actors=s.num_actors, flops_budget=s.flops_budget,
        params_budget=s.params_budget or None, latency_budget=s.latency_budget or None,
        latency_predicted_ratio=(float(env.latency(widths) / env.latency_dense)
                                 if getattr(env, "latency", None) is not None else None),
        latency_s=latency, latency_batch=latency_batch,
        speedup=latency["dense"] / latency["shrunk"] if latency else None,
        reward=s.reward, scheme=s.scheme, best_reward=best["reward"], best_val_accuracy_search=best["accuracy"],
        widths=widths.astype(int).tolist(),
        rates={names[g]: 1.0 - float(widths[g]) / table.widths[g] for g in range(table.num_groups)},
        flops_ratio=flops_ratio, params_ratio=params_ratio, accuracy_masked=masked_test["accuracy"],
        accuracy_pruned=pruned_test["accuracy"], val_accuracy_pruned=pruned_val["accuracy"],
        params_pruned=pruned_cost["nonzero_params"], flops_pruned=2 * pruned_cost["sparse_macs"],
        search_time_s=res1.wall_time_s, compile_time_s=res1.compile_time_s,
        episodes_per_s=len(h1["reward"]) / max(res1.wall_time_s - res1.compile_time_s, 1e-9),
        rerank=rerank_summary(reranked))


def rerank_summary(reranked: dict | None) -> dict | None:
    """The re-ranking in summary.json: sizes, the chosen candidate's and the split-A
    best's scores on both splits (every candidate is in pareto.json)."""
    if reranked is None:
        return None
    c, first = reranked["candidates"][reranked["chosen"]], reranked["candidates"][0]
    return dict(top_k=reranked["top_k"], candidates=len(reranked["candidates"]), size_a=reranked["size_a"],
                size_b=reranked["size_b"], chosen=reranked["chosen"], chosen_episode=c.get("episode"),
                chosen_reward_a=c["reward_a"], chosen_reward_b=c["reward_b"], chosen_accuracy_a=c["accuracy_a"],
                chosen_accuracy_b=c["accuracy_b"], search_best_reward_a=first["reward_a"],
                search_best_reward_b=first["reward_b"], finetuned=reranked.get("finetuned"),
                chosen_reward_ft=c.get("reward_ft"), chosen_accuracy_ft=c.get("accuracy_ft"))


def search_bits(config, small_exp, small_state, dense_bytes: float, workdir: str):
    """Stage 2: weight bits per layer of the pruned network under the average-bits
    budget, the policy written to `bits_policy.json`, then QAT and packed export
    (`quant.job.quantize_network`). Returns (stage-2 summary, search result, env)."""
    s, q = config.search, config.search.quant
    qtable = small_exp.table
    # the bits budget averages over the weights stored: the nonzero ones of an element-pruned network
    stored = [row["nonzero_weights"] for row in cost.summarize(qtable, small_state.masks)["layers"]]
    qenv = QuantEnv(qtable, q.bits_budget, q.b_min, q.b_max, stored)
    qagent = make_agent(q.agent or s.agent, s, qenv.num_steps)
    data = eval_data(small_exp, small_state.variables(), s.eval_size, config.seed)
    chunk = q.eval_chunk if q.eval_chunk else (1 if jax.default_backend() == "cpu" else 0)
    res2 = run_search(qenv, qagent, make_quant_evaluator(qenv, small_exp.model, q.bits_a or None, chunk),
                      make_reward_fn("acc"), data, num_actors=s.num_actors, episodes=q.episodes,
                      seed=config.seed + 1, checkpoint_dir=os.path.join(workdir, "stage2"),
                      checkpoint_every=s.checkpoint_every, log_every=s.log_every, name="stage 2 (bits)",
                      mesh=small_exp.mesh)
    best = res2.best
    bits = {layer.path: int(b) for layer, b in zip(qtable.layers, np.asarray(best["values"]).astype(int))}
    write_policy(os.path.join(workdir, "bits_policy.json"), bits,
                 {layer.path: int(q.bits_a) for layer in qtable.layers} if q.bits_a else None,
                 model=config.model.name, search_reward=best["reward"], search_val_accuracy=best["accuracy"],
                 pruned_widths=[int(w) for w in qtable.widths])
    bits_a = int(q.bits_a) if q.bits_a else None
    qat = None
    if s.finetune_epochs > 0 and q.qat_epochs > 0:
        qat = qat_and_export(config, small_exp, small_state, bits, bits_a, os.path.join(workdir, "quantize"))
    qbytes = qat["bytes_quantized"] if qat else cost.summarize(
        qtable, None, make_quant(qtable, bits_w=bits, bits_a=bits_a))["totals"]["bytes"]
    stage2 = dict(agent=q.agent or s.agent, episodes=len(res2.history["reward"]), bits_budget=q.bits_budget,
                  bits=bits, avg_bits=float(best["cost"]) / float(qenv.weights.sum()), best_reward=best["reward"],
                  best_val_accuracy_search=best["accuracy"],
                  accuracy_qat=qat["accuracy_exported"] if qat else None, bytes=qbytes, qat=qat,
                  bytes_dense_float32=dense_bytes, compression=dense_bytes / qbytes,
                  search_time_s=res2.wall_time_s, compile_time_s=res2.compile_time_s)
    return stage2, res2, qenv


def qat_and_export(config, exp, state, bits_w: dict, bits_a: int | None, workdir: str) -> dict:
    """Stage 2's QAT of the pruned network at the searched bits, through the quant
    package's own path (`quantize_state`, `train_qat`, `export_and_verify`; quantizer,
    calibration and index bits as `config.quant` sets them for the quantize job), distilled
    from the pruned float network when train.distill_weight > 0. Returns the figures."""
    q = config.search.quant
    qrecipe = QuantRecipe.from_config(config)
    evaluate = make_eval_fn(exp, config.train.eval_batch_size)
    qstate, _ = quantize_state(exp, state, bits_w, bits_a, qrecipe)
    accuracy_ptq = evaluate(qstate, exp.test)["accuracy"]
    recipe = Recipe.from_config(config).replace(num_epochs=q.qat_epochs, learning_rate=q.qat_learning_rate)
    qstate, _ = train_qat(exp, qstate, recipe, os.path.join(workdir, "qat"), teacher=Teacher.of(state))
    accuracy_qat = evaluate(qstate, exp.test)["accuracy"]
    out = export_and_verify(os.path.join(workdir, "model.npz"), exp, qstate, evaluate, model_name=config.model.name,
                            quantizer=qrecipe.quantizer, index_bits=index_bits_from_config(config.quant),
                            verify_batch=config.quant.verify_batch, seed=config.seed)
    return dict(accuracy_ptq=accuracy_ptq, accuracy_qat=accuracy_qat, accuracy_exported=out["accuracy"],
                bytes_quantized=float(out["accounting"]["totals"]["bytes"]), file_bytes=out["exported"]["file_bytes"],
                outputs_match=bool(out["outputs_match"]),
                payload_equals_accounting=bool(out["payload_equals_accounting"]))


def write_reports(workdir: str, model_name: str, s, env, table, small_exp, stage1: dict, res1, res2, qenv,
                  reranked: dict | None = None) -> None:
    """pareto.json / pareto.png (every candidate, the fronts, the best per budget, the
    re-ranked candidates with both splits' scores and the chosen one), rewards.png and
    policy.png (per-layer rates and bits, the paper's Figure 4)."""
    params_dense = cost.summarize(table)["totals"]["params"]
    points1 = history_points(res1.history)
    acc1 = [p["accuracy"] for p in points1]
    front_flops = report.pareto_front([p["cost"] for p in points1], acc1)
    front_params = report.pareto_front([p["params"] for p in points1], acc1)
    names = table.group_names
    pareto = dict(stage1=dict(points=points1, front_flops=[points1[i] for i in front_flops],
                              front_params=[points1[i] for i in front_params],
                              best_per_budget=report.best_per_budget([p["cost_ratio"] for p in points1], acc1,
                                                                     tuple(s.report_budgets)),
                              groups=list(names), flops_dense=env.flops_dense, rerank=reranked))
    ylabel1 = (f"val accuracy (after {s.candidate_finetune_steps} SGD steps)" if s.candidate_finetune_steps
               else "val accuracy (no fine-tune)")
    panels = [dict(x=[p["cost_ratio"] for p in points1], y=acc1, front=front_flops, xlabel="FLOPs / dense",
                   ylabel=ylabel1, title="stage 1: FLOPs"),
              dict(x=[p["params"] / params_dense for p in points1], y=acc1, front=front_params,
                   xlabel="params / dense", ylabel=ylabel1, title="stage 1: parameters")]
    curves = {"stage 1 (pruning)": res1.history["reward"]}
    bits = None
    if res2 is not None:
        points2 = history_points(res2.history)
        acc2 = [p["accuracy"] for p in points2]
        front_size = report.pareto_front([p["cost"] for p in points2], acc2)
        pareto["stage2"] = dict(points=points2, front_size=[points2[i] for i in front_size],
                                layers=[l.path for l in small_exp.table.layers])
        panels.append(dict(x=[p["cost"] / float(qenv.weights.sum()) for p in points2], y=acc2, front=front_size,
                           xlabel="average weight bits", ylabel="val accuracy (no QAT)", title="stage 2: bits"))
        curves["stage 2 (bits)"] = res2.history["reward"]
        bits = np.asarray(res2.best["values"]).astype(int).tolist()
    write_json(os.path.join(workdir, "pareto.json"), pareto)
    report.plot_pareto(os.path.join(workdir, "pareto.png"), panels)
    report.plot_reward_curves(os.path.join(workdir, "rewards.png"), curves, f"{model_name}: search rewards ({s.agent})")
    element_rates, rates = stage1["element_rates"], stage1["rates"]
    layer_rates = ([element_rates[l.path] for l in table.layers] if element_rates else
                   [rates[names[l.out_group]] if l.out_group >= 0 else 0.0 for l in table.layers])
    report.plot_policy(os.path.join(workdir, "policy.png"), [l.path for l in table.layers], layer_rates, bits,
                       f"{model_name}: searched pruning rates and bits")
